//! The browser's way in: WebTransport sessions on the node's QUIC
//! endpoint (ALPN `h3`), the certificate browsers are shown, and the HTTP
//! side (`--web`) that tells a page where to connect.

pub mod certificate;
pub mod http;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use certificate::WebCertificate;

use crate::trust::{ClusterCa, TokenScope, TrustConfig};

/// The ALPN of HTTP/3, which WebTransport runs on.
pub const WEB_ALPN: &[u8] = web_transport_quinn::ALPN.as_bytes();

/// How often the node checks whether its web certificate is due for
/// renewal.
const RENEWAL_CHECK: Duration = Duration::from_secs(3600);

/// The browser side's work, for the node to run: renewing the certificate
/// it made, and serving `listener` (`--web`) when given.
pub fn tasks(
    certificate: Arc<WebCertificate>,
    listener: Option<tokio::net::TcpListener>,
    quic_port: u16,
) -> Vec<Pin<Box<dyn Future<Output = ()> + Send>>> {
    let mut tasks: Vec<Pin<Box<dyn Future<Output = ()> + Send>>> = Vec::new();
    if let Some(listener) = listener {
        let tls = (!certificate.made_here()).then(|| http::tls_acceptor(certificate.clone()));
        let site = Arc::new(http::Site {
            certificate: certificate.clone(),
            quic_port,
        });
        tasks.push(Box::pin(http::serve(listener, site, tls)));
    }
    if !certificate.made_here() {
        return tasks;
    }
    tasks.push(Box::pin(async move {
        let mut every = tokio::time::interval(RENEWAL_CHECK);
        loop {
            every.tick().await;
            match certificate.renew_if_due(SystemTime::now()) {
                Ok(false) => {}
                Ok(true) => tracing::info!(
                    cert_sha256 = certificate.sha256_hex().unwrap_or_default(),
                    "made a new WebTransport certificate; open sessions keep theirs"
                ),
                Err(e) => tracing::warn!("{e}; browsers keep the current one until it expires"),
            }
        }
    }));
    tasks
}

/// How long the dashboard token a node makes at start is valid.
const DASHBOARD_TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);

/// The dashboard's address for a person on this machine: with a read-only
/// token in its fragment (which browsers do not send to the server) when
/// `trust` holds the CA key, as Jupyter does; else without, and the page
/// asks for one.
pub fn dashboard_url(
    web: SocketAddr,
    certificate: &WebCertificate,
    trust: &TrustConfig,
) -> (String, bool) {
    let scheme = if certificate.made_here() {
        "http"
    } else {
        "https"
    };
    // A page from localhost is a secure context, as WebTransport needs.
    let host = match web.ip() {
        ip if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), web.port()),
        _ => web,
    };
    let page = format!("{scheme}://{host}/");
    let ca = trust
        .dir()
        .ok()
        .flatten()
        .and_then(|dir| ClusterCa::load(&dir).ok().flatten());
    let token = ca.filter(ClusterCa::can_issue).and_then(|ca| {
        ca.issue_scoped_token("dashboard", TokenScope::ReadOnly, DASHBOARD_TOKEN_TTL)
            .ok()
    });
    match token {
        Some(token) => (format!("{page}#token={token}"), true),
        None => (page, false),
    }
}

/// Logs where browsers connect: the WebTransport URL with the certificate
/// hash a page needs, and the web side's address.
pub fn log_where(quic: SocketAddr, certificate: &WebCertificate, web: Option<SocketAddr>) {
    let cert_sha256 = certificate.sha256_hex();
    let cert_sha256 = cert_sha256.as_deref().unwrap_or("(not needed: --web-cert)");
    tracing::info!(url = %format!("https://{quic}/"), cert_sha256, "WebTransport for browsers");
    if let Some(web) = web {
        let scheme = if certificate.made_here() {
            "http"
        } else {
            "https"
        };
        tracing::info!(url = %format!("{scheme}://{web}/webtransport.json"), "serving where browsers connect");
    }
}
