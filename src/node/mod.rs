//! The node: it binds one QUIC endpoint, runs discovery, and drives the
//! overlay core from a single task, the driver, which owns all routing
//! state. Connection tasks (`link`, `session`) decode frames and send
//! them to the driver's inbox; the driver routes and hands frames back to
//! the connections' writers. It never waits on a connection, so a slow peer
//! cannot stall the node: full queues drop events and count them.
//!
//! At-least-once events take a detour through the delivery core
//! ([`crate::delivery`]) and the store ([`crate::store`]): the driver hands
//! the core's writes to the store's writer thread and the commits back to
//! the core, which then acknowledges them.

mod client_connection;
mod config;
mod connection;
mod driver;
mod link;
mod metrics;
mod pressure;
mod runtime;
mod session;

use std::collections::HashMap;
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::delivery::{DeliveryConfig, DeliveryCore};
use crate::discovery::{Announcement, Discovery, MdnsDiscovery};
use crate::identity::{self, Identity, IdentityError, NodeId};
use crate::overlay::{DialTarget, Overlay, OverlayConfig};
use crate::store::reader::Reader;
use crate::store::writer::Writer;
use crate::store::{LmdbStore, Store};
use crate::tls::{self, Liveness};
use crate::trust::{self, Permissions, Trust, TrustConfig, TrustError, PERMISSIONS_FILE};
use crate::web::{self, certificate::WebCertificate};
use crate::wire::{
    ClientRequest, DeliveryMessage, NodeEventFrame, NodeHello, NodeStatus, OverlayMessage,
    PublishFrame, PublishReply, PROTOCOL_VERSION,
};
pub use config::{Limits, NodeConfig, NodeError, ReplayConfig, DEFAULT_CLUSTER, DEFAULT_PORT};
use connection::accept_connections;
pub use driver::STALLED_AFTER;
use driver::{Driver, DriverParts};
use link::LinkHandle;
use metrics::Metrics;
pub use runtime::runtime;
use session::SessionHandle;

/// Inputs queued for the driver before connection readers wait: the point
/// where backpressure reaches QUIC flow control.
const INBOX_CAPACITY: usize = 4096;

/// A running node. Dropping it leaves it running; call [`Node::shutdown`].
pub struct Node {
    id: NodeId,
    name: String,
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    web_addr: Option<SocketAddr>,
    dashboard: Option<String>,
    endpoint: quinn::Endpoint,
    topology: watch::Receiver<Topology>,
    held: Arc<AtomicU64>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// A node's place in the overlay as it sees it, for tools that watch the
/// tree form and repair (the simulator does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub parent: Option<NodeId>,
    pub root: NodeId,
    pub depth: u32,
    /// In id order.
    pub children: Vec<NodeId>,
    /// Every node this one has a link to, in id order.
    pub links: Vec<NodeId>,
}

/// A socket for QUIC other than a UDP socket of the host: the simulator's
/// virtual network.
pub struct CustomSocket {
    pub socket: Arc<dyn quinn::AsyncUdpSocket>,
    pub runtime: Arc<dyn quinn::Runtime>,
    /// The simulator seeds QUIC's random choices here, so runs replay.
    pub endpoint: quinn::EndpointConfig,
}

impl Node {
    /// Starts a node with mDNS discovery as configured.
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        let discovery: Option<Box<dyn Discovery>> = if config.mdns {
            Some(Box::new(MdnsDiscovery::new(config.interfaces.clone())))
        } else {
            None
        };
        Self::start_with(config, discovery).await
    }

    /// Starts a node with the given discovery, or none.
    pub async fn start_with(
        config: NodeConfig,
        discovery: Option<Box<dyn Discovery>>,
    ) -> Result<Node, NodeError> {
        Self::start_on(config, discovery, None).await
    }

    /// Starts a node with the given discovery, running QUIC on `socket`
    /// when given instead of binding `config.listen`.
    pub async fn start_on(
        config: NodeConfig,
        discovery: Option<Box<dyn Discovery>>,
        socket: Option<CustomSocket>,
    ) -> Result<Node, NodeError> {
        let lock = lock_data_dir(&config.data_dir)?;
        let key = identity::load_or_create_key(&config.data_dir)?;
        let (identity, trust) = trust::node_credentials(&config.trust, &config.data_dir, key)?;
        let permissions = match (&config.permissions, config.trust.dir()?) {
            (Some(path), _) => Permissions::load(path, true).map_err(TrustError::from)?,
            (None, Some(certs)) => {
                Permissions::load(&certs.join(PERMISSIONS_FILE), false).map_err(TrustError::from)?
            }
            (None, None) => Permissions::allow_all(),
        };
        let id = identity.id;
        let store: Arc<dyn Store> = Arc::new(LmdbStore::open(&config.data_dir, id, &config.store)?);
        let recovered = store.recover()?;
        let web_certificate = Arc::new(match &config.web_certificate {
            Some((cert, key)) => WebCertificate::from_files(tls::provider(), cert, key)?,
            None => WebCertificate::made(tls::provider(), SystemTime::now())?,
        });
        let server_config =
            tls::server_config(&identity, &trust, config.liveness, web_certificate.clone());
        let endpoint = match socket {
            None => tls::endpoint(config.listen, Some(server_config)),
            Some(CustomSocket {
                socket,
                runtime,
                endpoint,
            }) => quinn::Endpoint::new_with_abstract_socket(
                endpoint,
                Some(server_config),
                socket,
                runtime,
            ),
        }
        .map_err(|source| NodeError::Bind {
            addr: config.listen,
            source,
        })?;
        let addr = endpoint.local_addr().map_err(|source| NodeError::Bind {
            addr: config.listen,
            source,
        })?;
        let name = config
            .name
            .clone()
            .unwrap_or_else(|| default_name(addr.port()));
        let metrics_listener = match config.metrics {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| NodeError::Metrics { addr, source })?,
            ),
            None => None,
        };
        let metrics_addr = metrics_listener
            .as_ref()
            .and_then(|listener| listener.local_addr().ok());
        let web_listener = match config.web {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| NodeError::Web { addr, source })?,
            ),
            None => None,
        };
        let web_addr = web_listener
            .as_ref()
            .and_then(|listener| listener.local_addr().ok());
        let (inbox_tx, inbox_rx) = mpsc::channel(INBOX_CAPACITY);
        let shared = Arc::new(Shared {
            identity,
            trust: trust.clone(),
            permissions,
            metrics: Metrics::default(),
            name: name.clone(),
            cluster: config.cluster.clone(),
            endpoint: endpoint.clone(),
            liveness: config.liveness,
            max_frame: config.max_frame,
            limits: config.limits,
            connections: Mutex::new(HashMap::new()),
            inbox: inbox_tx,
            next_id: AtomicU64::new(1),
            operations_denied: AtomicU64::new(0),
            publishes_throttled: AtomicU64::new(0),
            pressure: Arc::default(),
            clients_refused: Mutex::default(),
        });
        let (discovery_tx, discovery_rx) = mpsc::unbounded_channel();
        let mut discovery = discovery;
        if let Some(discovery) = discovery.as_mut() {
            let me = Announcement {
                id,
                name: name.clone(),
                cluster: config.cluster.clone(),
                ca: trust.fingerprint(),
                addr,
                root: id,
            };
            discovery.start(&me, discovery_tx)?;
        }
        let span = tracing::info_span!("node", id = %id.short(), name = %name);
        span.in_scope(|| tracing::info!(%addr, cluster = %config.cluster, "node started"));
        let seed = config.seed.unwrap_or_else(rand::random);
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let overlay_config = OverlayConfig {
            started_ms: unix_ms,
            ..config.overlay.clone()
        };
        let mut overlay = Overlay::new(id, name.clone(), overlay_config, seed);
        let now = now();
        for peer in &config.static_peers {
            overlay.add_static_peer(*peer, now);
        }
        let (stored_tx, stored_rx) = mpsc::unbounded_channel();
        let writer = Writer::start(store.clone(), &recovered, stored_tx, config.store.inline_io);
        if !recovered.outbox.is_empty() {
            span.in_scope(|| {
                tracing::info!(
                    events = recovered.outbox.len(),
                    "resuming custody of stored events"
                )
            });
        }
        let delivery = DeliveryCore::new(
            id,
            DeliveryConfig {
                unacked: config.limits.unacked,
            },
            recovered,
            now,
            unix_ms,
        );
        let position = overlay.position();
        let (topology_tx, topology) = watch::channel(Topology {
            parent: None,
            root: position.root,
            depth: position.depth,
            children: Vec::new(),
            links: Vec::new(),
        });
        let held = Arc::new(AtomicU64::new(0));
        let (read_tx, read_rx) = mpsc::unbounded_channel();
        let reader = Reader::start(store, read_tx, config.store.inline_io);
        let driver = Driver::new(DriverParts {
            shared: shared.clone(),
            overlay,
            topology: topology_tx,
            held: held.clone(),
            addr,
            reader,
            writer,
            delivery,
            lock,
            discovery,
            replay: config.replay,
        });
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let metrics_server = metrics_listener.map(|listener| {
            span.in_scope(|| tracing::info!(addr = ?metrics_addr, "serving metrics"));
            let serve = metrics::serve(listener, shared.inbox.clone(), shared.metrics.clone());
            tokio::spawn(serve.instrument(span.clone()))
        });
        span.in_scope(|| web::log_where(addr, &web_certificate, web_addr));
        let dashboard =
            web_addr.map(|web| web::dashboard_url(web, &web_certificate, &config.trust));
        match &dashboard {
            Some((url, true)) => span.in_scope(|| {
                tracing::info!(%url, "dashboard, with a read-only token valid for 12 h")
            }),
            Some((url, false)) if config.trust == TrustConfig::Insecure => {
                span.in_scope(|| tracing::info!(%url, "dashboard"))
            }
            Some((url, false)) => span.in_scope(|| {
                tracing::info!(%url, "dashboard; it asks for a token: run `treescale certs issue token --read-only --name NAME` where ca.key is")
            }),
            None => {}
        }
        let web_tasks: Vec<_> = web::tasks(web_certificate, web_listener, addr.port())
            .into_iter()
            .map(|task| tokio::spawn(task.instrument(span.clone())))
            .collect();
        let accept_loop = tokio::spawn(accept_connections(shared).instrument(span.clone()));
        let task = tokio::spawn(
            async move {
                driver
                    .run(inbox_rx, discovery_rx, stored_rx, read_rx, shutdown_rx)
                    .await;
                accept_loop.abort();
                if let Some(server) = metrics_server {
                    server.abort();
                }
                for task in web_tasks {
                    task.abort();
                }
            }
            .instrument(span),
        );
        Ok(Node {
            id,
            name,
            addr,
            metrics_addr,
            web_addr,
            dashboard: dashboard.map(|(url, _)| url),
            endpoint,
            topology,
            held,
            shutdown: Some(shutdown_tx),
            task,
        })
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address the endpoint is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where metrics are served, when they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Where the web side (`--web`) is served, when it is.
    pub fn web_addr(&self) -> Option<SocketAddr> {
        self.web_addr
    }

    /// The dashboard's URL for a person on this machine, with a read-only
    /// token when the node could make one: with `--web`.
    pub fn dashboard_url(&self) -> Option<&str> {
        self.dashboard.as_deref()
    }

    /// Follows the node's place in the tree as it changes.
    pub fn topology(&self) -> watch::Receiver<Topology> {
        self.topology.clone()
    }

    /// At-least-once events this node holds in custody: stored, and not yet
    /// acknowledged by the next node towards their subscriptions.
    pub fn custody_held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Open QUIC connections of this node, to nodes and clients alike.
    pub fn connection_count(&self) -> usize {
        self.endpoint.open_connections()
    }

    /// Closes every connection, says goodbye on mDNS and waits until done.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Waits until the node stops by itself (it only does on a fatal error).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }
}

/// Holds an exclusive lock on `data_dir/LOCK` for the node's lifetime.
fn lock_data_dir(data_dir: &Path) -> Result<File, NodeError> {
    std::fs::create_dir_all(data_dir).map_err(|source| {
        NodeError::Identity(IdentityError::CreateDir {
            path: data_dir.to_path_buf(),
            source,
        })
    })?;
    let path = data_dir.join("LOCK");
    let file = File::create(&path).map_err(|source| NodeError::Lock {
        path: path.clone(),
        source,
    })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(NodeError::DataDirInUse(data_dir.to_path_buf()))
        }
        Err(std::fs::TryLockError::Error(source)) => Err(NodeError::Lock { path, source }),
    }
}

/// A name a person recognizes: the machine's host name, with the port when
/// it is not the default, so that nodes sharing a machine differ.
fn default_name(port: u16) -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let host = host.split('.').next().unwrap_or_default();
    let host = if host.is_empty() { "treescale" } else { host };
    if port == DEFAULT_PORT {
        host.to_string()
    } else {
        format!("{host}-{port}")
    }
}

/// The driver's clock. Read through tokio, so a simulated runtime can drive
/// virtual time.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// What connection tasks share with each other and the driver.
pub(crate) struct Shared {
    pub identity: Identity,
    pub trust: Trust,
    pub permissions: Permissions,
    pub metrics: Metrics,
    pub name: String,
    pub cluster: String,
    pub endpoint: quinn::Endpoint,
    pub liveness: Liveness,
    pub max_frame: usize,
    pub limits: Limits,
    /// Open connections by remote IP, for `limits.connections_per_address`.
    connections: Mutex<HashMap<IpAddr, usize>>,
    pub inbox: mpsc::Sender<Input>,
    next_id: AtomicU64,
    /// Counted by session tasks, reported in the status' counters.
    pub operations_denied: AtomicU64,
    pub publishes_throttled: AtomicU64,
    /// Which destinations are congested: what holds event sources back.
    pub pressure: Arc<pressure::Pressure>,
    /// Clients refused for want of a certificate or a valid token: anyone
    /// may connect and be refused again and again, so they are logged at
    /// most once per interval.
    pub clients_refused: Mutex<connection::RateLimitedLog>,
}

impl Shared {
    /// A fresh number for a connection or session.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn hello(&self) -> NodeHello {
        NodeHello {
            version: PROTOCOL_VERSION,
            id: self.identity.id,
            name: self.name.clone(),
            cluster: self.cluster.clone(),
        }
    }
}

/// Everything the driver hears from connection tasks.
pub(crate) enum Input {
    LinkUp {
        handle: LinkHandle,
        dialed: Option<DialTarget>,
    },
    LinkDown {
        peer: NodeId,
        conn_id: u64,
        /// The peer closed it because it no longer needed it (`CLOSED`):
        /// no sign of a failure.
        parted: bool,
    },
    DialFailed {
        target: DialTarget,
    },
    /// A control message for the overlay core.
    Overlay {
        peer: NodeId,
        conn_id: u64,
        message: OverlayMessage,
    },
    /// A control message for the delivery core.
    Delivery {
        peer: NodeId,
        conn_id: u64,
        message: DeliveryMessage,
    },
    NodeEvents {
        peer: NodeId,
        conn_id: u64,
        frames: Vec<NodeEventFrame>,
    },
    SessionOpen {
        session: u64,
        handle: SessionHandle,
    },
    SessionClosed {
        session: u64,
    },
    Request {
        session: u64,
        request: ClientRequest,
    },
    /// The metrics endpoint wants the status.
    Scrape {
        reply: oneshot::Sender<NodeStatus>,
    },
    Publish {
        session: u64,
        frames: Vec<PublishFrame>,
        reply: mpsc::UnboundedSender<PublishReply>,
        /// One of the client's allowance per at-least-once frame.
        permits: Vec<tokio::sync::OwnedSemaphorePermit>,
    },
}
