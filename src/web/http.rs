//! `--web ADDR`: what a browser fetches before it opens a WebTransport
//! session: where to connect and which certificate to expect. Over HTTPS
//! when the
//! node was given a certificate browsers trust (`--web-cert`), since a
//! page elsewhere than localhost must come from a secure origin to use
//! WebTransport.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::certificate::WebCertificate;

/// How long a connection may take to send its request's head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// What the pages need to know of the node.
pub struct Site {
    /// The certificate WebTransport sessions are shown.
    pub certificate: Arc<WebCertificate>,
    /// The node's QUIC port, where WebTransport sessions go.
    pub quic_port: u16,
}

/// Serves `listener` until the task is aborted; over TLS with `tls`.
pub async fn serve(listener: TcpListener, site: Arc<Site>, tls: Option<TlsAcceptor>) {
    loop {
        let Ok((stream, remote)) = listener.accept().await else {
            continue;
        };
        let (site, tls) = (site.clone(), tls.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let answer = answer(&site, &request);
                async move { Ok::<_, Infallible>(answer) }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT);
            let served = match tls {
                Some(tls) => match tls.accept(stream).await {
                    Ok(stream) => http.serve_connection(TokioIo::new(stream), service).await,
                    Err(e) => return tracing::debug!(%remote, "web TLS handshake failed: {e}"),
                },
                None => http.serve_connection(TokioIo::new(stream), service).await,
            };
            if let Err(e) = served {
                tracing::debug!(%remote, "web request failed: {e}");
            }
        });
    }
}

/// The answer to one request.
fn answer<B>(site: &Site, request: &Request<B>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match request.uri().path() {
        "/webtransport.json" => {
            let host = request
                .headers()
                .get(HOST)
                .and_then(|host| host.to_str().ok())
                .and_then(|host| host.parse::<hyper::http::uri::Authority>().ok());
            let Some(host) = host else {
                return plain(StatusCode::BAD_REQUEST, "a Host header is needed\n");
            };
            let body = serde_json::json!({
                "url": format!("https://{}:{}/", host.host(), site.quic_port),
                "certHash": site.certificate.sha256_hex(),
            });
            let mut response = page(body.to_string(), "application/json");
            // Renewed every few days: always ask the node.
            response
                .headers_mut()
                .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        "/" => file(DASHBOARD, "text/html; charset=utf-8"),
        path => match FILES.iter().find(|(name, _)| *name == path) {
            Some((name, source)) if name.ends_with(".html") => {
                file(source, "text/html; charset=utf-8")
            }
            Some((_, source)) => file(source, "text/javascript; charset=utf-8"),
            None => plain(
                StatusCode::NOT_FOUND,
                "not here: try / (the dashboard), /treescale.js or /webtransport.json\n",
            ),
        },
    }
}

/// The dashboard: a page of the JavaScript client.
const DASHBOARD: &str = include_str!("../../clients/js/src/dashboard.html");

/// The JavaScript client (clients/js/src), embedded so that building the
/// node needs no Node.js: its ES modules, and the dashboard's.
const FILES: [(&str, &str); 5] = [
    (
        "/treescale.js",
        include_str!("../../clients/js/src/treescale.js"),
    ),
    ("/codec.js", include_str!("../../clients/js/src/codec.js")),
    (
        "/messages.js",
        include_str!("../../clients/js/src/messages.js"),
    ),
    (
        "/dashboard.js",
        include_str!("../../clients/js/src/dashboard.js"),
    ),
    ("/dashboard.html", DASHBOARD),
];

/// One of the files above; the node's own version, so a page sees an
/// upgrade at once.
fn file(source: &'static str, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = page(source, content_type);
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// HTTPS with the web certificate, for `--web` with `--web-cert`.
pub fn tls_acceptor(certificate: Arc<WebCertificate>) -> TlsAcceptor {
    let config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(certificate);
    TlsAcceptor::from(Arc::new(config))
}

fn page(body: impl Into<Bytes>, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = page(text, "text/plain; charset=utf-8");
    *response.status_mut() = status;
    response
}
