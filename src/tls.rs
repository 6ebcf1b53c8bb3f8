//! TLS 1.3 for QUIC: configs for the node endpoint, node dialers and clients.
//!
//! Trust is anchored in the cluster CA (see [`crate::trust`]): every peer
//! shows a certificate it issued. A dialler that learned a node id from
//! discovery also checks that the certificate's key hashes to it; a peer
//! known only by address (a static `--peer`, or a client given `--node`)
//! has its id learned from the handshake. In insecure mode any certificate
//! is accepted. Every handshake signature is verified, so a peer always
//! proves it holds the key of the certificate it shows.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{Identity, NodeId};
use crate::trust::{Role, Trust};
use crate::web::certificate::{CertificateChooser, WebCertificate};
use crate::web::WEB_ALPN;
use crate::wire::{CLIENT_ALPN, NODE_ALPN};

/// Liveness settings of every QUIC connection.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    /// How often an idle connection sends a PING, so it never looks idle to a
    /// healthy peer.
    pub keep_alive: Duration,
    /// How long without any packet before a peer is declared gone.
    pub idle_timeout: Duration,
}

impl Default for Liveness {
    /// LAN defaults: a dead peer is noticed within about one second.
    fn default() -> Self {
        Liveness {
            keep_alive: Duration::from_millis(250),
            idle_timeout: Duration::from_secs(1),
        }
    }
}

/// aws-lc-rs: its AES-GCM, which protects every QUIC packet, costs 25-40%
/// less than ring's on datagrams of 1.4 KB and more here
/// (docs/performance.md).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The RTT assumed before the first sample. quinn's default (333 ms) makes
/// a dial to an unreachable node fail only after about 3 s (three probe
/// timeouts); on a LAN 100 ms brings that down to the idle timeout, which
/// is what decides how soon a node re-joins elsewhere after a partition.
/// Farther peers only see an early retransmit of their first packets.
const INITIAL_RTT: Duration = Duration::from_millis(100);

/// The largest datagram MTU discovery tries (quinn's default stops at
/// Ethernet's 1,452). Most of a node's QUIC work is per packet, so on a
/// path that carries more (loopback, so a client beside its node; jumbo
/// frames) bigger packets cut a node's CPU per event; on a 1,500-byte LAN
/// the probes above it are lost and packets stay Ethernet-sized. A batch
/// of such datagrams is more than one UDP send carries: the socket splits
/// it (`udp`). 8 and 32 KiB measured no better (docs/performance.md).
const MAX_UDP_PAYLOAD: u16 = 16_384;

/// A QUIC endpoint on a fresh socket, as a server when `server` is given.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime found"))?;
    let socket = crate::udp::bind(addr, &*runtime)?;
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .expect("within QUIC's bounds");
    quinn::Endpoint::new_with_abstract_socket(config, server, socket, runtime)
}

fn transport(liveness: Liveness) -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.initial_rtt(INITIAL_RTT);
    let mut mtu_discovery = quinn::MtuDiscoveryConfig::default();
    mtu_discovery.upper_bound(MAX_UDP_PAYLOAD);
    transport.mtu_discovery_config(Some(mtu_discovery));
    transport.keep_alive_interval(Some(liveness.keep_alive));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(liveness.idle_timeout)
            .expect("idle timeout fits a QUIC varint"),
    ));
    Arc::new(transport)
}

/// The node's one server config: the node and client ALPNs, and HTTP/3
/// for browsers (WebTransport), who are shown `web` instead of the node's
/// certificate. A peer that shows a certificate must show one from the
/// CA; the ALPN decides later which role it needs, and a client without
/// one must bring a token.
pub fn server_config(
    identity: &Identity,
    trust: &Trust,
    liveness: Liveness,
    web: Arc<WebCertificate>,
) -> quinn::ServerConfig {
    let provider = provider();
    let node = Arc::new(node_certificate(identity, &provider));
    let verifier = Arc::new(PeerVerifier {
        trust: trust.clone(),
        expected: None,
        provider: provider.clone(),
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CertificateChooser { node, web }));
    tls.alpn_protocols = vec![NODE_ALPN.to_vec(), CLIENT_ALPN.to_vec(), WEB_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .expect("TLS 1.3 with ring's AES-128-GCM suits QUIC");
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport(liveness));
    config
}

/// The node's certificate with its key, as rustls shows it.
fn node_certificate(identity: &Identity, provider: &CryptoProvider) -> CertifiedKey {
    let key = provider
        .key_provider
        .load_private_key(identity.private_key())
        .expect("ring signs with the Ed25519 keys this node makes");
    CertifiedKey::new(vec![identity.certificate.clone()], key)
}

/// Config for dialling another node. `expected` is the id discovery
/// announced, when known.
pub fn node_dial_config(
    identity: &Identity,
    trust: &Trust,
    expected: Option<NodeId>,
    liveness: Liveness,
) -> quinn::ClientConfig {
    dial_config(Some(identity), trust, expected, liveness, NODE_ALPN)
}

/// Config for a client connecting to a node, optionally pinned to its id.
/// `identity` is the client's certificate; insecure mode needs none.
pub fn client_dial_config(
    identity: Option<&Identity>,
    trust: &Trust,
    expected: Option<NodeId>,
    liveness: Liveness,
) -> quinn::ClientConfig {
    dial_config(identity, trust, expected, liveness, CLIENT_ALPN)
}

/// A dialler's config with any ALPN: tests use it to offer a wrong one.
pub fn dial_config(
    identity: Option<&Identity>,
    trust: &Trust,
    expected: Option<NodeId>,
    liveness: Liveness,
    alpn: &[u8],
) -> quinn::ClientConfig {
    let provider = provider();
    let verifier = Arc::new(PeerVerifier {
        trust: trust.clone(),
        expected,
        provider: provider.clone(),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut tls = match identity {
        Some(identity) => builder
            .with_client_auth_cert(vec![identity.certificate.clone()], identity.private_key())
            .expect("our own key matches our own certificate"),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .expect("TLS 1.3 with ring's AES-128-GCM suits QUIC");
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport(liveness));
    config
}

/// The certificate the peer showed, if any.
pub fn peer_certificate(connection: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let identity = connection.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().cloned()
}

/// The node id proven by the peer's certificate, if it showed one.
pub fn peer_node_id(connection: &quinn::Connection) -> Option<NodeId> {
    NodeId::from_certificate(&peer_certificate(connection)?)
}

/// The ALPN the handshake settled on.
pub fn negotiated_alpn(connection: &quinn::Connection) -> Option<Vec<u8>> {
    let data = connection.handshake_data()?;
    let data = data
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?;
    data.protocol
}

/// Checks a peer's certificate: in a cluster, that it chains to the CA, is
/// valid now and suits the role (a node serving must show a node
/// certificate); always, that its key hashes to `expected` when discovery
/// announced an id. Handshake signatures are checked with the provider's
/// algorithms.
#[derive(Debug)]
struct PeerVerifier {
    trust: Trust,
    expected: Option<NodeId>,
    provider: Arc<CryptoProvider>,
}

impl PeerVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        role: Role,
    ) -> Result<(), rustls::Error> {
        let id = NodeId::from_certificate(end_entity).ok_or(rustls::Error::InvalidCertificate(
            CertificateError::BadEncoding,
        ))?;
        if let Trust::Cluster(anchor) = &self.trust {
            if let Err(e) = anchor.verify(end_entity, intermediates, now, role) {
                anchor.report_refused(end_entity, &e);
                return Err(rustls::Error::InvalidCertificate(certificate_error(&e)));
            }
        }
        match self.expected {
            Some(expected) if expected != id => {
                tracing::warn!(
                    expected = %expected.short(),
                    presented = %id.short(),
                    "peer certificate does not match the announced node id"
                );
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ))
            }
            _ => Ok(()),
        }
    }
}

/// The TLS alert that tells the peer why its certificate was refused.
fn certificate_error(error: &webpki::Error) -> CertificateError {
    match error {
        webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
        webpki::Error::CertExpired { .. } => CertificateError::Expired,
        webpki::Error::CertNotValidYet { .. } => CertificateError::NotValidYet,
        webpki::Error::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        _ => CertificateError::ApplicationVerificationFailure,
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now, Role::Node)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    /// A client without a certificate may still show a token after the
    /// handshake (the session checks it); a node never gets that far
    /// without one (its link refuses it).
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Node and client certificates both allow client auth; a client's
        // on the node ALPN is refused after the handshake.
        self.check(end_entity, intermediates, now, Role::Client)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
