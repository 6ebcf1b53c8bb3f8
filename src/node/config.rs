//! What a node is told when it starts, and why it may not.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::discovery::DiscoveryError;
use crate::identity::IdentityError;
use crate::overlay::{replay, OverlayConfig};
use crate::store::{StoreConfig, StoreError};
use crate::tls::Liveness;
use crate::trust::{TrustConfig, TrustError};
use crate::web::certificate::WebCertificateError;
use crate::wire::DEFAULT_MAX_FRAME;

/// Default name of the cluster a node joins.
pub const DEFAULT_CLUSTER: &str = "treescale";
/// Default UDP port of `--listen`.
pub const DEFAULT_PORT: u16 = 7700;

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// UDP address of the QUIC endpoint; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Holds the node's key (its identity) and its store.
    pub data_dir: PathBuf,
    /// Human name, for directed delivery and the tree picture; defaults to
    /// the host name, with the port unless it is 7700.
    pub name: Option<String>,
    /// Nodes join only nodes of the same cluster.
    pub cluster: String,
    /// Interfaces mDNS may use; empty means all.
    pub interfaces: Vec<String>,
    /// Addresses always dialled, for networks without multicast.
    pub static_peers: Vec<SocketAddr>,
    /// Whether to announce and browse over mDNS.
    pub mdns: bool,
    pub liveness: Liveness,
    /// Largest frame accepted from any peer or client.
    pub max_frame: usize,
    pub overlay: OverlayConfig,
    pub store: StoreConfig,
    pub limits: Limits,
    pub replay: ReplayConfig,
    /// Seeds the overlay's random choices; `None` draws one. The simulator
    /// sets it so that a run can be replayed.
    pub seed: Option<u64>,
    /// Where the cluster CA is, or insecure mode.
    pub trust: TrustConfig,
    /// Client permissions; `None` reads `permissions.toml` in the certs
    /// dir, and without that file every client may do everything.
    pub permissions: Option<PathBuf>,
    /// Where to serve Prometheus metrics over HTTP; `None` serves none.
    pub metrics: Option<SocketAddr>,
    /// Where to tell browsers where to connect, over HTTP; `None` serves
    /// nothing. WebTransport itself is always on, on the QUIC endpoint.
    pub web: Option<SocketAddr>,
    /// A certificate chain and its key (PEM files) shown to browsers,
    /// e.g. a publicly trusted one for the node's domain; `None` makes a
    /// short-lived one that pages accept by its hash.
    pub web_certificate: Option<(PathBuf, PathBuf)>,
}

impl NodeConfig {
    /// Defaults for a node keeping its state in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        NodeConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            data_dir: data_dir.into(),
            name: None,
            cluster: DEFAULT_CLUSTER.to_string(),
            interfaces: Vec::new(),
            static_peers: Vec::new(),
            mdns: true,
            liveness: Liveness::default(),
            max_frame: DEFAULT_MAX_FRAME,
            overlay: OverlayConfig::default(),
            store: StoreConfig::default(),
            limits: Limits::default(),
            replay: ReplayConfig::default(),
            seed: None,
            trust: TrustConfig::UserDefault,
            permissions: None,
            metrics: None,
            web: None,
            web_certificate: None,
        }
    }
}

/// How much of what it routed a node keeps to fill the gaps a repair left
/// (docs/delivery.md, "Gaps from repairs"): events older than `keep_for`,
/// or beyond `max_bytes`, are let go. Either at zero turns replays off.
#[derive(Debug, Clone, Copy)]
pub struct ReplayConfig {
    pub keep_for: Duration,
    pub max_bytes: usize,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            keep_for: replay::DEFAULT_KEEP_FOR,
            max_bytes: replay::DEFAULT_MAX_BYTES,
        }
    }
}

/// What one client, or one address, may hold of a node. Past a limit the
/// request or connection is refused with a documented error
/// (docs/security.md), so no peer can make a node grow without bound.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Subscriptions (plain and queue group) one client connection holds.
    pub subscriptions_per_client: usize,
    /// QUIC connections, of nodes and clients alike, from one IP address.
    pub connections_per_address: usize,
    /// Bytes of deliveries waiting for one client that does not read them;
    /// past it the client is disconnected with `SLOW_CONSUMER`. A quarter
    /// of it waiting holds publishers back, and a client that writes
    /// nothing for [`super::STALLED_AFTER`] meanwhile is a slow consumer too.
    pub consumer_bytes: usize,
    /// Bytes of events waiting for one link; past it at-most-once batches
    /// for that link are dropped and counted (custody sends at-least-once
    /// events again). A quarter of it waiting holds event sources back.
    pub link_bytes: usize,
    /// Events of a durable subscription delivered and not yet
    /// acknowledged; the next wait for an ack.
    pub unacked: usize,
    /// At-least-once events one client has published and the node not yet
    /// committed; past it the node reads no more of that client's publish
    /// streams until some are.
    pub pending_publishes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            subscriptions_per_client: 10_000,
            connections_per_address: 256,
            consumer_bytes: 64 << 20,
            // Backpressure starts at a quarter (32 MiB), far above what a
            // healthy link holds; this is for a peer that stopped reading.
            link_bytes: 128 << 20,
            unacked: 4096,
            // As many as the client library keeps unconfirmed, so it never
            // waits on this limit; only clients that ignore confirmations do.
            pending_publishes: 16_384,
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error(
        "data dir {0} is in use by another treescale node; stop it or choose another --data-dir"
    )]
    DataDirInUse(PathBuf),
    #[error("cannot lock data dir {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}; is the port taken? choose another with --listen")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot serve metrics on {addr}: {source}; choose another --metrics address")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot serve the web side on {addr}: {source}; choose another --web address")]
    Web {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the certificate for browsers: {0}")]
    WebCertificate(#[from] WebCertificateError),
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error(transparent)]
    Store(#[from] StoreError),
}
