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

mod connection;
mod delivery;
mod link;
mod metrics;
mod pressure;
mod session;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::delivery::{Commit, DeliveryConfig, DeliveryCore};
use crate::discovery::{Announcement, Discovery, DiscoveryError, DiscoveryEvent, MdnsDiscovery};
use crate::identity::{self, Identity, IdentityError, NodeId};
use crate::overlay::{
    Action, DialTarget, Hop, LocalSub, NewConnection, NextHop, Overlay, OverlayConfig, Route,
};
use crate::store::writer::{Outcome, Writer};
use crate::store::{LmdbStore, Store, StoreConfig, StoreError};
use crate::tls::{self, Liveness};
use crate::topic::{Pattern, Topic};
use crate::trust::{self, Permissions, Trust, TrustConfig, TrustError, PERMISSIONS_FILE};
use crate::wire::stream::FrameBatch;
use crate::wire::{
    ClientReply, ClientRequest, Counters, Delivery, Destination, ErrorCode, Event, GroupKey,
    NodeEventFrame, NodeHello, NodeMessage, NodeStatus, PeerStatus, PublishFrame, PublishReply,
    Published, ReplyTo, RequestError, RequestFailure, DEFAULT_MAX_FRAME, NODE_ALPN,
    PROTOCOL_VERSION,
};
use delivery::Publisher;
use link::LinkHandle;
use metrics::Metrics;
use session::SessionHandle;

/// Default name of the cluster a node joins.
pub const DEFAULT_CLUSTER: &str = "treescale";
/// Default UDP port of `--listen`.
pub const DEFAULT_PORT: u16 = 7700;
/// Longest queue-group name accepted.
const MAX_GROUP_LEN: usize = 64;
/// Inputs queued for the driver before connection readers wait: the point
/// where backpressure reaches QUIC flow control.
const INBOX_CAPACITY: usize = 4096;
/// How often the parent link's RTT is given to the core for the tree picture.
const RTT_REPORT_INTERVAL: Duration = Duration::from_millis(500);
/// How often unacknowledged custody and durable deliveries are checked.
const CUSTODY_TICK: Duration = Duration::from_millis(250);
/// At-least-once events handed to the store and not yet committed, past
/// which the driver stops reading new input until the store catches up.
/// This is where a slow disk pushes back on publishers.
const MAX_STORE_BACKLOG: usize = 65536;
/// How long a new root must hold before discovery announces it.
const ROOT_ANNOUNCE_AFTER: Duration = Duration::from_millis(250);
/// A congested client whose deliveries make no progress for this long is
/// a slow consumer: while it is congested every publisher waits for it.
pub const STALLED_AFTER: Duration = Duration::from_secs(2);

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
            seed: None,
            trust: TrustConfig::UserDefault,
            permissions: None,
            metrics: None,
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
    /// nothing for [`STALLED_AFTER`] meanwhile is a slow consumer too.
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
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A running node. Dropping it leaves it running; call [`Node::shutdown`].
pub struct Node {
    id: NodeId,
    name: String,
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
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
        let server_config = tls::server_config(&identity, &trust, config.liveness);
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
        let mut overlay = Overlay::new(id, name.clone(), config.overlay.clone(), seed);
        let now = now();
        for peer in &config.static_peers {
            overlay.add_static_peer(*peer, now);
        }
        let (stored_tx, stored_rx) = mpsc::unbounded_channel();
        let next_key = recovered.outbox.last().map_or(1, |(key, _)| key + 1);
        let writer = Writer::start(
            store.clone(),
            recovered.queues.clone(),
            next_key,
            stored_tx,
            config.store.inline_writer,
        );
        if !recovered.outbox.is_empty() {
            span.in_scope(|| {
                tracing::info!(
                    events = recovered.outbox.len(),
                    "resuming custody of stored events"
                )
            });
        }
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
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
        let driver = Driver {
            shared: shared.clone(),
            overlay,
            topology: topology_tx,
            held: held.clone(),
            addr,
            links: BTreeMap::new(),
            sessions: BTreeMap::new(),
            inboxes: HashMap::new(),
            subscriptions: BTreeMap::new(),
            waits: Vec::new(),
            counters: Counters::default(),
            route: Route::default(),
            deliveries: BTreeMap::new(),
            forwards: BTreeMap::new(),
            store,
            writer,
            delivery,
            _lock: lock,
            discovery,
            root_announcement: None,
            announced_root: id,
        };
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let metrics_server = metrics_listener.map(|listener| {
            span.in_scope(|| tracing::info!(addr = ?metrics_addr, "serving metrics"));
            let serve = metrics::serve(listener, shared.inbox.clone(), shared.metrics.clone());
            tokio::spawn(serve.instrument(span.clone()))
        });
        let accept_loop = tokio::spawn(accept_connections(shared).instrument(span.clone()));
        let task = tokio::spawn(
            async move {
                driver
                    .run(inbox_rx, discovery_rx, stored_rx, shutdown_rx)
                    .await;
                accept_loop.abort();
                if let Some(server) = metrics_server {
                    server.abort();
                }
            }
            .instrument(span),
        );
        Ok(Node {
            id,
            name,
            addr,
            metrics_addr,
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
    Control {
        peer: NodeId,
        conn_id: u64,
        message: NodeMessage,
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

/// A connection counted against its address's limit until dropped.
struct ConnectionSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl ConnectionSlot {
    /// Takes a slot for `ip`, or `None` when it has as many as allowed.
    fn take(shared: &Arc<Shared>, ip: IpAddr) -> Option<ConnectionSlot> {
        let mut open = shared.connections.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(ip).or_default();
        if *count >= shared.limits.connections_per_address {
            return None;
        }
        *count += 1;
        Some(ConnectionSlot {
            shared: shared.clone(),
            ip,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self
            .shared
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

async fn accept_connections(shared: Arc<Shared>) {
    // A flood of refusals cannot fill the disk with log lines.
    let mut refusals = connection::RateLimitedLog::default();
    while let Some(incoming) = shared.endpoint.accept().await {
        let remote = incoming.remote_address();
        // Refused before the handshake, so a flood costs no crypto.
        let Some(slot) = ConnectionSlot::take(&shared, remote.ip()) else {
            incoming.refuse();
            if let Some(refused) = refusals.count(1, now()) {
                tracing::warn!(%remote, refused,
                    limit = shared.limits.connections_per_address,
                    "connections refused: too many from one address (--max-connections-per-address)");
            }
            continue;
        };
        let shared = shared.clone();
        let task = async move {
            let _slot = slot;
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(e) => {
                    tracing::debug!(%remote, "handshake failed: {e}");
                    return;
                }
            };
            if tls::negotiated_alpn(&connection).as_deref() == Some(NODE_ALPN) {
                link::accept(shared, connection).await;
            } else {
                session::serve(shared, connection).await;
            }
        };
        tokio::spawn(task.in_current_span());
    }
}

/// A client waiting for interest in a topic.
struct InterestWait {
    session: u64,
    request: u64,
    topic: Topic,
    deadline: Instant,
}

/// The one task that owns the overlay core and all routing state.
struct Driver {
    shared: Arc<Shared>,
    overlay: Overlay,
    topology: watch::Sender<Topology>,
    /// The outbox's size, for [`Node::custody_held`].
    held: Arc<AtomicU64>,
    addr: SocketAddr,
    // Ordered maps, here and below, so that the order of sends does not
    // depend on hashing and a simulation replays exactly.
    links: BTreeMap<NodeId, LinkHandle>,
    sessions: BTreeMap<u64, SessionHandle>,
    /// The session behind each inbox that answers to requests go to.
    inboxes: HashMap<u64, u64>,
    /// Each client subscription's pattern and group, for unsubscribe and cleanup.
    subscriptions: BTreeMap<LocalSub, (Pattern, Option<String>)>,
    waits: Vec<InterestWait>,
    counters: Counters,
    /// Reused for every routing decision.
    route: Route,
    /// Deliveries and forwards gathered while handling one input, sent as
    /// one batch per destination when it is done.
    deliveries: BTreeMap<u64, FrameBatch>,
    forwards: BTreeMap<NodeId, LinkFrames>,
    /// Read directly; written only through `writer`.
    store: Arc<dyn Store>,
    writer: Writer<Commit<Publisher>>,
    delivery: DeliveryCore<Publisher>,
    /// Held so no second node opens the same data dir.
    _lock: File,
    /// Announces this node (and its root) until dropped, which says
    /// goodbye.
    discovery: Option<Box<dyn Discovery>>,
    /// A new root to announce once it has held for [`ROOT_ANNOUNCE_AFTER`]:
    /// a tree merging changes its nodes' roots several times in a moment,
    /// and each announcement goes to every node of the LAN.
    root_announcement: Option<(NodeId, Instant)>,
    /// The root discovery announces now.
    announced_root: NodeId,
}

impl Driver {
    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Input>,
        mut discovery: mpsc::UnboundedReceiver<DiscoveryEvent>,
        mut stored: mpsc::UnboundedReceiver<Outcome<Commit<Publisher>>>,
        mut shutdown: oneshot::Receiver<()>,
    ) {
        self.overlay.handle_timeout(now());
        self.apply_actions();
        let mut rtt_tick = tokio::time::interval(RTT_REPORT_INTERVAL);
        let mut custody_tick = tokio::time::interval(CUSTODY_TICK);
        loop {
            let wake = self.next_wake();
            let store_keeps_up = self.delivery.store_backlog() < MAX_STORE_BACKLOG;
            // Biased: a fixed order of polling keeps simulations replayable.
            // Rare, cheap inputs first; the inbox, which can be busy without
            // pause, after them.
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                outcome = stored.recv() => match outcome {
                    Some(outcome) => self.delivery.handle_stored(outcome, now()),
                    None => {
                        tracing::error!("the store's writer stopped; the node cannot keep its guarantees and stops");
                        break;
                    }
                },
                _ = custody_tick.tick() => {
                    self.delivery.handle_timeout(now());
                    self.find_stalled_clients();
                }
                _ = rtt_tick.tick() => {
                    for link in self.links.values() {
                        self.shared.metrics.link_rtt.observe(link.connection.rtt().as_secs_f64());
                    }
                    let parent = self.overlay.parent().and_then(|p| self.links.get(&p));
                    if let Some(link) = parent {
                        self.overlay.handle_parent_rtt(link.connection.rtt());
                    }
                }
                Some(event) = discovery.recv() => self.handle_discovery(event),
                input = inbox.recv(), if store_keeps_up => match input {
                    Some(input) => self.handle(input),
                    None => break,
                },
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {
                    self.overlay.handle_timeout(now());
                }
            }
            // The timer branch comes after the inbox, so a busy inbox must
            // not keep the core's timers (joins, retries) from running.
            if self.next_wake() <= now() {
                self.overlay.handle_timeout(now());
            }
            self.apply_delivery_actions();
            self.flush_batches();
            self.apply_actions();
            self.answer_waits();
            self.publish_topology();
            self.held
                .store(self.delivery.outbox_len().0 as u64, Ordering::Relaxed);
        }
        tracing::info!("node shutting down");
        let code = ErrorCode::ShuttingDown;
        self.shared.endpoint.close(code.varint(), code.reason());
        drop(self.discovery.take());
        // Waits for the writer to commit what it was given.
        drop(self.writer);
        let _ =
            tokio::time::timeout(Duration::from_secs(1), self.shared.endpoint.wait_idle()).await;
    }

    fn next_wake(&self) -> Instant {
        let far = now() + Duration::from_secs(3600);
        let waits = self.waits.iter().map(|w| w.deadline);
        let announce = self.root_announcement.map(|(_, at)| at);
        self.overlay
            .poll_timeout()
            .into_iter()
            .chain(waits)
            .chain(announce)
            .min()
            .unwrap_or(far)
    }

    fn handle_discovery(&mut self, event: DiscoveryEvent) {
        match event {
            DiscoveryEvent::Found { id, addrs, root } => {
                tracing::debug!(peer = %id.short(), ?addrs, root = ?root.map(|r| r.short()), "discovered");
                self.overlay.handle_discovered(id, addrs, root, now());
            }
            DiscoveryEvent::Lost { id } => {
                tracing::debug!(peer = %id.short(), "peer left discovery");
                self.overlay.handle_vanished(id);
            }
        }
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::LinkUp { handle, dialed } => {
                self.link_up(handle, dialed);
            }
            Input::LinkDown {
                peer,
                conn_id,
                parted,
            } => {
                if self.links.get(&peer).is_some_and(|l| l.conn_id == conn_id) {
                    self.links.remove(&peer);
                    if parted {
                        self.overlay.handle_link_closed(peer, now());
                    } else {
                        self.overlay.handle_link_down(peer, now());
                    }
                    self.delivery.handle_link_down(peer);
                }
            }
            Input::DialFailed { target } => self.overlay.handle_dial_failed(target, now()),
            Input::Control {
                peer,
                conn_id,
                message,
            } => {
                if !self.is_current(peer, conn_id) {
                    return;
                }
                match message {
                    NodeMessage::Durables(records) => self.delivery.handle_durables(peer, records),
                    NodeMessage::CustodyAck(tokens) => {
                        self.delivery.handle_custody_ack(peer, &tokens)
                    }
                    message => self.overlay.handle_message(peer, message, now()),
                }
            }
            Input::NodeEvents {
                peer,
                conn_id,
                frames,
            } => {
                if !self.is_current(peer, conn_id) {
                    return;
                }
                let mut custody = Vec::new();
                for frame in frames {
                    self.counters.events_received += 1;
                    match frame {
                        NodeEventFrame::Event { event, groups } => {
                            self.dispatch(Hop::Edge(peer), event, Some(&groups));
                        }
                        NodeEventFrame::Directed { event, to } => {
                            self.dispatch_directed(Hop::Edge(peer), event, to)
                        }
                        NodeEventFrame::Request {
                            mut event,
                            groups,
                            reply,
                        } => {
                            event.reply = Some(Box::new(reply));
                            // Interest withdrawn on the way: the requester
                            // times out, as for a lost answer.
                            self.dispatch(Hop::Edge(peer), event, Some(&groups));
                        }
                        NodeEventFrame::Reply { event, to } => {
                            self.dispatch_reply(Hop::Edge(peer), event, to)
                        }
                        NodeEventFrame::Custody {
                            token,
                            event,
                            targets,
                        } => custody.push((token, event, targets)),
                    }
                }
                if !custody.is_empty() {
                    self.delivery.handle_custody(peer, custody, now());
                }
            }
            Input::SessionOpen { session, handle } => {
                self.inboxes.insert(handle.inbox, session);
                self.sessions.insert(session, handle);
            }
            Input::SessionClosed { session } => self.session_closed(session),
            Input::Request { session, request } => self.request(session, request),
            Input::Scrape { reply } => {
                let _ = reply.send(self.status());
            }
            Input::Publish {
                session,
                frames,
                reply,
                permits,
            } => {
                let (mut custody, mut seqs) = (Vec::new(), Vec::new());
                for frame in frames {
                    match frame {
                        PublishFrame::Event(event) => {
                            self.counters.events_published += 1;
                            self.dispatch(Hop::Local, event.at(self.overlay.id()), None);
                        }
                        PublishFrame::Directed { event, to } => {
                            self.counters.events_published += 1;
                            let event = event.at(self.overlay.id());
                            self.dispatch_directed(Hop::Local, event, to);
                        }
                        PublishFrame::AtLeastOnce(event) => {
                            let seq = event.id.seq;
                            match self.delivery.admit(event.at(self.overlay.id())) {
                                Ok(item) => {
                                    self.counters.events_published += 1;
                                    seqs.push(seq);
                                    self.dispatch(Hop::Local, item.event.clone(), None);
                                    custody.push(item);
                                }
                                Err(refusal) => {
                                    let _ = reply.send(PublishReply::Refused {
                                        seq,
                                        reason: refusal.reason,
                                        message: refusal.message,
                                    });
                                }
                            }
                        }
                        PublishFrame::Request { event, request } => {
                            self.publish_request(session, event, request, &reply)
                        }
                        PublishFrame::Reply { event, to } => {
                            self.counters.events_published += 1;
                            let event = event.at(self.overlay.id());
                            self.dispatch_reply(Hop::Local, event, to);
                        }
                        PublishFrame::Flush(token) => {
                            // Everything before the flush has been routed.
                            self.flush_batches();
                            let _ = reply.send(PublishReply::Flushed(token));
                        }
                    }
                }
                let then = Commit::Publisher {
                    events: seqs.len(),
                    publisher: Publisher {
                        reply,
                        seqs,
                        _permits: permits,
                    },
                };
                self.delivery.take_custody(custody, then, now());
            }
        }
    }

    /// Whether the client's subscription number `sub` is taken.
    fn sub_in_use(&self, session: u64, sub: u64) -> bool {
        self.subscriptions.contains_key(&LocalSub { session, sub })
            || self.delivery.is_attached(session, sub)
    }

    fn is_current(&self, peer: NodeId, conn_id: u64) -> bool {
        self.links.get(&peer).is_some_and(|l| l.conn_id == conn_id)
    }

    /// Takes a new connection to a node; the overlay decides which of two
    /// to the same peer survives.
    fn link_up(&mut self, handle: LinkHandle, dialed: Option<DialTarget>) {
        let peer = handle.hello.id;
        let addr = handle.connection.remote_address();
        match self.overlay.handle_link_up(peer, addr, dialed, now()) {
            NewConnection::Link => {
                tracing::info!(peer = %peer.short(), name = %handle.hello.name, remote = %addr, "linked");
                self.links.insert(peer, handle);
                self.delivery.handle_link_up(peer);
            }
            NewConnection::CloseDuplicate => {
                tracing::debug!(peer = %peer.short(), "closing duplicate connection");
                handle.close(ErrorCode::DuplicateConnection);
            }
            NewConnection::ReplaceOld => {
                tracing::debug!(peer = %peer.short(), "replacing connection");
                if let Some(old) = self.links.insert(peer, handle) {
                    old.close(ErrorCode::DuplicateConnection);
                }
                // What went over the old connection may not have arrived.
                self.delivery.handle_link_replaced(peer);
                self.delivery.handle_link_up(peer);
            }
        }
    }

    fn request(&mut self, session: u64, request: ClientRequest) {
        let reply = match request {
            ClientRequest::Hello { .. } => return,
            ClientRequest::Subscribe {
                sub,
                pattern,
                group,
            } => self.subscribe(session, sub, pattern, group),
            ClientRequest::Unsubscribe { sub } => {
                let key = LocalSub { session, sub };
                match self.subscriptions.remove(&key) {
                    Some((pattern, group)) => {
                        if let Some(handle) = self.sessions.get_mut(&session) {
                            handle.subscriptions -= 1;
                        }
                        self.overlay.unsubscribe(&pattern, group.as_deref(), key);
                        ClientReply::Unsubscribed { sub }
                    }
                    // A durable subscription keeps its events; only its
                    // client goes.
                    None if self.delivery.detach(session, Some(sub)) => {
                        ClientReply::Unsubscribed { sub }
                    }
                    None => error_reply(
                        sub,
                        RequestError::UnknownSubscription,
                        format!("no subscription {sub}"),
                    ),
                }
            }
            ClientRequest::Tree { request } => ClientReply::Tree {
                request,
                nodes: self.overlay.tree(),
            },
            ClientRequest::Status { request } => ClientReply::Status {
                request,
                status: Box::new(self.status()),
            },
            ClientRequest::WaitInterest {
                request,
                topic,
                timeout_ms,
            } => match Topic::new(topic) {
                Ok(topic) if self.overlay.has_interest(&topic) => ClientReply::Interest {
                    request,
                    present: true,
                },
                Ok(topic) => {
                    self.waits.push(InterestWait {
                        session,
                        request,
                        topic,
                        deadline: now() + Duration::from_millis(timeout_ms.into()),
                    });
                    return;
                }
                Err(e) => error_reply(request, RequestError::InvalidTopic, e.to_string()),
            },
            ClientRequest::SubscribeDurable {
                sub,
                name,
                pattern,
                limits,
                ack_wait_ms,
            } => {
                let ack_wait = Duration::from_millis(ack_wait_ms.max(1).into());
                if self.sub_in_use(session, sub) {
                    error_reply(
                        sub,
                        RequestError::DuplicateSubscription,
                        format!("subscription {sub} already exists"),
                    )
                } else {
                    let attach = self.delivery.subscribe(
                        session,
                        sub,
                        name.clone(),
                        pattern,
                        limits,
                        ack_wait,
                        now(),
                    );
                    match attach {
                        Ok(()) => return,
                        Err(refusal) => self.attach_refused(sub, &name, refusal),
                    }
                }
            }
            ClientRequest::AckDurable { sub, position } => {
                self.delivery.handle_ack(session, sub, position, now());
                return;
            }
        };
        self.reply(session, reply);
    }

    fn subscribe(
        &mut self,
        session: u64,
        sub: u64,
        pattern: String,
        group: Option<String>,
    ) -> ClientReply {
        let pattern = match Pattern::new(pattern) {
            Ok(pattern) => pattern,
            Err(e) => return error_reply(sub, RequestError::InvalidPattern, e.to_string()),
        };
        if let Some(group) = &group {
            let valid = !group.is_empty()
                && group.len() <= MAX_GROUP_LEN
                && !group.chars().any(|c| c.is_whitespace() || c.is_control());
            if !valid {
                return error_reply(
                    sub,
                    RequestError::InvalidGroup,
                    format!("queue group must be 1 to {MAX_GROUP_LEN} bytes without whitespace"),
                );
            }
        }
        let key = LocalSub { session, sub };
        if self.sub_in_use(session, sub) {
            return error_reply(
                sub,
                RequestError::DuplicateSubscription,
                format!("subscription {sub} already exists"),
            );
        }
        let limit = self.shared.limits.subscriptions_per_client;
        let Some(handle) = self.sessions.get_mut(&session) else {
            return error_reply(
                sub,
                RequestError::UnknownSubscription,
                "session gone".into(),
            );
        };
        if handle.subscriptions >= limit {
            return error_reply(
                sub,
                RequestError::TooManySubscriptions,
                format!("this client already holds {limit} subscriptions, the node's --max-subscriptions-per-client"),
            );
        }
        handle.subscriptions += 1;
        self.overlay.subscribe(&pattern, group.as_deref(), key);
        self.subscriptions.insert(key, (pattern, group));
        ClientReply::Subscribed { sub }
    }

    fn session_closed(&mut self, session: u64) {
        if let Some(handle) = self.sessions.remove(&session) {
            self.inboxes.remove(&handle.inbox);
            // Handed to its connection but never wholly written: lost to
            // it (a slow consumer's queue, or a client that left).
            self.counters.events_dropped += handle.backlog.events();
        }
        self.delivery.detach(session, None);
        self.waits.retain(|w| w.session != session);
        let gone: Vec<LocalSub> = self
            .subscriptions
            .keys()
            .filter(|k| k.session == session)
            .copied()
            .collect();
        for key in gone {
            let (pattern, group) = self.subscriptions.remove(&key).expect("listed above");
            self.overlay.unsubscribe(&pattern, group.as_deref(), key);
        }
    }

    fn reply(&self, session: u64, reply: ClientReply) {
        if let Some(handle) = self.sessions.get(&session) {
            let _ = handle.replies.send(reply);
        }
    }

    /// Routes one event (or request) and queues it for every destination;
    /// whether there was any.
    fn dispatch(&mut self, from: Hop, event: Event, assigned: Option<&[GroupKey]>) -> bool {
        let mut route = std::mem::take(&mut self.route);
        route.local.clear();
        route.edges.clear();
        self.overlay.route(from, &event.topic, assigned, &mut route);
        let routed = !route.local.is_empty() || !route.edges.is_empty();
        // The last destination takes the event, the others a clone.
        match route.edges.pop() {
            None => self.deliver_here(&route.local, event),
            Some((last, last_groups)) => {
                if !route.local.is_empty() {
                    self.deliver_here(&route.local, event.clone());
                }
                for (edge, groups) in route.edges.drain(..) {
                    self.forward(edge, event_frame(event.clone(), groups));
                }
                self.forward(last, event_frame(event, last_groups));
            }
        }
        self.route = route;
        routed
    }

    /// Routes a client's request with the address of its inbox here, or
    /// answers at once that nothing anywhere would receive it.
    fn publish_request(
        &mut self,
        session: u64,
        event: Published,
        request: u64,
        publisher: &mpsc::UnboundedSender<PublishReply>,
    ) {
        let Some(inbox) = self.sessions.get(&session).map(|s| s.inbox) else {
            return;
        };
        self.counters.events_published += 1;
        let mut event = event.at(self.overlay.id());
        event.reply = Some(Box::new(ReplyTo {
            node: self.overlay.id(),
            inbox,
            request,
        }));
        let topic = event.topic.clone();
        if !self.dispatch(Hop::Local, event, None) {
            self.counters.requests_without_responders += 1;
            let _ = publisher.send(PublishReply::RequestFailed {
                request,
                reason: RequestFailure::NoResponders,
                message: format!("no responders for {topic}"),
            });
        }
    }

    /// Sends an answer one hop along the tree path to its requester's
    /// node, or hands it to the requester when it has arrived.
    fn dispatch_reply(&mut self, from: Hop, event: Event, to: ReplyTo) {
        if to.node == self.overlay.id() {
            let session = self.inboxes.get(&to.inbox).copied();
            let Some(session) = session.filter(|s| self.sessions.contains_key(s)) else {
                // The requester is gone, or the address was made up.
                self.counters.replies_undeliverable += 1;
                return;
            };
            let delivery = Delivery::Reply {
                request: to.request,
                event,
            };
            deliveries_for(&mut self.deliveries, &self.sessions, session).push(&delivery);
            return;
        }
        match self.overlay.next_hop(from, &Destination::Node(to.node)) {
            NextHop::Edge(peer) => {
                self.forward(peer, NodeEventFrame::Reply { event, to });
            }
            _ => {
                self.counters.events_unroutable += 1;
                tracing::debug!(node = %to.node.short(), "answer for a node not in this tree dropped");
            }
        }
    }

    /// Adds `frame` to the batch for `peer`, begun with room for as many
    /// bytes as the last one held.
    fn forward(&mut self, peer: NodeId, frame: NodeEventFrame) {
        let links = &self.links;
        let batch = self.forwards.entry(peer).or_insert_with(|| LinkFrames {
            frames: FrameBatch::with_room(links.get(&peer).map_or(0, |link| link.last_batch)),
            custody: Vec::new(),
        });
        batch.frames.push(&frame);
        if let NodeEventFrame::Custody { token, .. } = frame {
            batch.custody.push(token);
        }
    }

    /// Queues `event` for each of these local subscriptions; the last one
    /// takes it, the others a copy (reference counts, not the payload).
    fn deliver_here(&mut self, subs: &[LocalSub], event: Event) {
        let Some((last, others)) = subs.split_last() else {
            return;
        };
        for sub in others {
            self.deliver_one(sub, event.clone());
        }
        self.deliver_one(last, event);
    }

    fn deliver_one(&mut self, sub: &LocalSub, mut event: Event) {
        let delivery = match event.reply.take() {
            None => Delivery::Event {
                sub: sub.sub,
                event,
            },
            Some(reply) => Delivery::Request {
                sub: sub.sub,
                event,
                reply: *reply,
            },
        };
        deliveries_for(&mut self.deliveries, &self.sessions, sub.session).push(&delivery);
    }

    /// Sends a directed event one hop along the tree path to its node, or
    /// hands it to this node's subscribers when it has arrived.
    fn dispatch_directed(&mut self, from: Hop, event: Event, to: Destination) {
        match self.overlay.next_hop(from, &to) {
            NextHop::Here => {
                let mut route = std::mem::take(&mut self.route);
                route.local.clear();
                route.edges.clear();
                self.overlay.route_here(&event.topic, &mut route);
                self.deliver_here(&route.local, event);
                self.route = route;
            }
            NextHop::Edge(peer) => self.forward(peer, NodeEventFrame::Directed { event, to }),
            NextHop::Unknown => {
                self.counters.events_unroutable += 1;
                tracing::debug!(?to, "directed event for an unknown node dropped");
            }
        }
    }

    /// Hands each destination its batch; the driver never waits on a
    /// connection. A client whose backlog passed its bound is disconnected
    /// as a slow consumer; a link past its bound has its batch dropped and
    /// counted.
    fn flush_batches(&mut self) {
        let limit = self.shared.limits.consumer_bytes;
        for (session, mut batch) in std::mem::take(&mut self.deliveries) {
            let Some(handle) = self.sessions.get_mut(&session) else {
                continue;
            };
            let (events, bytes) = (batch.frames(), batch.bytes());
            if handle.slow {
                self.counters.events_dropped += events as u64;
                continue;
            }
            // Only what already waits counts against the limit: one batch
            // is always taken, however large (a durable window of big
            // events), so memory stays under the limit plus a batch.
            let queued = handle.backlog.bytes();
            if queued > limit {
                let why = format!(
                    "{} of deliveries waited, over the node's limit of {} (--max-consumer-bytes)",
                    mib(queued),
                    mib(limit)
                );
                disconnect_slow_consumer(session, handle, &why);
                self.counters.events_dropped += events as u64;
                continue;
            }
            handle.last_batch = bytes;
            batch.fit();
            handle.backlog.add(bytes, events as u64);
            if handle.deliveries.send(batch).is_ok() {
                self.counters.events_delivered += events as u64;
            } else {
                // The client is going: never written, so not held.
                handle.backlog.remove(bytes);
                handle.backlog.remove_events(events as u64);
            }
        }
        let limit = self.shared.limits.link_bytes;
        for (peer, batch) in std::mem::take(&mut self.forwards) {
            let Some(link) = self.links.get_mut(&peer) else {
                continue;
            };
            let LinkFrames {
                mut frames,
                custody,
            } = batch;
            let (events, bytes) = (frames.frames() as u64, frames.bytes());
            let queued = link.backlog.bytes();
            if queued > limit {
                self.counters.events_dropped += events;
                if let Some(dropped) = link.dropped.count(events, now()) {
                    tracing::warn!(peer = %peer.short(), dropped, queued, limit,
                        "link not keeping up; events dropped (--max-link-bytes); at-least-once ones are sent again");
                }
                // Custody frames are not lost with the batch: they go
                // again, as if unacknowledged.
                self.delivery.handle_unsent(custody.into_iter());
                continue;
            }
            link.last_batch = bytes;
            frames.fit();
            link.backlog.add(bytes, events);
            if link.events.send(frames).is_ok() {
                self.counters.events_forwarded += events;
            } else {
                link.backlog.remove(bytes);
                link.backlog.remove_events(events);
                self.delivery.handle_unsent(custody.into_iter());
            }
        }
    }

    /// Disconnects, as slow consumers, the clients that are congested and
    /// have written nothing for [`STALLED_AFTER`]: they hold every
    /// publisher back and do not drain.
    fn find_stalled_clients(&mut self) {
        let now = now();
        for (session, handle) in self.sessions.iter_mut() {
            if handle.slow || !handle.backlog.is_congested() {
                handle.stalled = None;
                continue;
            }
            let written = handle.backlog.written();
            match handle.stalled {
                Some((seen, since)) if seen == written => {
                    if now.duration_since(since) >= STALLED_AFTER {
                        let why = format!(
                            "{} of deliveries waited and none were read for {STALLED_AFTER:?} (a quarter of --max-consumer-bytes holds every publisher back)",
                            mib(handle.backlog.bytes())
                        );
                        disconnect_slow_consumer(*session, handle, &why);
                    }
                }
                _ => handle.stalled = Some((written, now)),
            }
        }
    }

    fn apply_actions(&mut self) {
        while let Some(action) = self.overlay.poll_action() {
            match action {
                Action::Send { peer, message } => {
                    if let Some(link) = self.links.get(&peer) {
                        let _ = link.control.send(message);
                    }
                }
                Action::Disconnect { peer } => {
                    if let Some(link) = self.links.remove(&peer) {
                        tracing::debug!(peer = %peer.short(), "closing link no longer needed");
                        link.close(ErrorCode::Closed);
                    }
                }
                Action::Dial { target, addrs } => {
                    let span = tracing::debug_span!("dial", ?target);
                    tokio::spawn(link::dial(self.shared.clone(), target, addrs).instrument(span));
                }
            }
        }
    }

    /// Tells watchers, and discovery, about a changed place in the tree;
    /// compares first, so an unchanged tree costs no allocation.
    fn publish_topology(&mut self) {
        let position = self.overlay.position();
        if position.root != self.topology.borrow().root {
            self.root_announcement = Some((position.root, now() + ROOT_ANNOUNCE_AFTER));
        }
        if let Some((root, _)) = self.root_announcement.filter(|(_, at)| *at <= now()) {
            self.root_announcement = None;
            if root != self.announced_root {
                self.announced_root = root;
                if let Some(discovery) = self.discovery.as_mut() {
                    discovery.announce_root(root);
                }
            }
        }
        let parent = self.overlay.parent();
        if parent != self.topology.borrow().parent {
            // The handshake measured the new edge already: show it in the
            // tree now, not at the next periodic report.
            if let Some(link) = parent.and_then(|p| self.links.get(&p)) {
                self.overlay.handle_parent_rtt(link.connection.rtt());
                self.apply_actions();
            }
        }
        let unchanged = {
            let seen = self.topology.borrow();
            seen.parent == parent
                && seen.root == position.root
                && seen.depth == position.depth
                && seen.children.iter().copied().eq(self.overlay.children())
                && seen.links.iter().eq(self.links.keys())
        };
        if !unchanged {
            self.topology.send_replace(Topology {
                parent,
                root: position.root,
                depth: position.depth,
                children: self.overlay.children().collect(),
                links: self.links.keys().copied().collect(),
            });
        }
    }

    fn answer_waits(&mut self) {
        if self.waits.is_empty() {
            return;
        }
        let now = now();
        let mut waits = std::mem::take(&mut self.waits);
        waits.retain(|wait| {
            let present = self.overlay.has_interest(&wait.topic);
            if present || wait.deadline <= now {
                self.reply(
                    wait.session,
                    ClientReply::Interest {
                        request: wait.request,
                        present,
                    },
                );
                return false;
            }
            true
        });
        self.waits = waits;
    }

    fn status(&mut self) -> NodeStatus {
        let parent = self.overlay.parent();
        let mut peers: Vec<PeerStatus> = self
            .links
            .iter()
            .map(|(id, link)| PeerStatus {
                id: *id,
                name: link.hello.name.clone(),
                addr: link.connection.remote_address().to_string(),
                rtt_us: link.connection.rtt().as_micros() as u64,
                role: if parent == Some(*id) {
                    "parent"
                } else if self.overlay.is_child(*id) {
                    "child"
                } else {
                    "peer"
                }
                .to_string(),
                queued_bytes: link.backlog.bytes() as u64,
                events_dropped: link.dropped.total,
            })
            .collect();
        peers.sort_by_key(|p| p.id);
        let position = self.overlay.position();
        let (outbox, outbox_unreachable) = self.delivery.outbox_len();
        let delivered = self.delivery.counters();
        NodeStatus {
            id: self.overlay.id(),
            name: self.shared.name.clone(),
            cluster: self.shared.cluster.clone(),
            addr: self.addr.to_string(),
            root: position.root,
            root_addrs: self.overlay.root_addrs().map(|r| r.addrs.clone()),
            parent,
            depth: position.depth,
            subtree: self.overlay.subtree_size(),
            peers,
            subscriptions: self.overlay.subscriptions(),
            durables: self.delivery.durable_status(),
            outbox: outbox as u64,
            outbox_unreachable: outbox_unreachable as u64,
            connections: self.shared.endpoint.open_connections() as u64,
            clients: self.sessions.len() as u64,
            congested: self.shared.pressure.congested() as u64,
            counters: Counters {
                events_stored: delivered.events_stored,
                events_refused: self.counters.events_refused + delivered.events_refused,
                events_redelivered: delivered.events_redelivered,
                operations_denied: self.shared.operations_denied.load(Ordering::Relaxed),
                publishes_throttled: self.shared.publishes_throttled.load(Ordering::Relaxed),
                ..self.counters.clone()
            },
        }
    }
}

/// Frames for one link gathered while handling one input, and the custody
/// tokens among them: a batch dropped for a full queue sends those again.
struct LinkFrames {
    frames: FrameBatch,
    custody: Vec<u64>,
}

/// The batch of deliveries for `session`, begun with room for as many bytes
/// as its last one held.
fn deliveries_for<'a>(
    deliveries: &'a mut BTreeMap<u64, FrameBatch>,
    sessions: &BTreeMap<u64, SessionHandle>,
    session: u64,
) -> &'a mut FrameBatch {
    deliveries.entry(session).or_insert_with(|| {
        FrameBatch::with_room(sessions.get(&session).map_or(0, |s| s.last_batch))
    })
}

/// Closes a client's connection with `SLOW_CONSUMER`, saying `why`; what
/// was queued for it no longer holds publishers back.
fn disconnect_slow_consumer(session: u64, handle: &mut SessionHandle, why: &str) {
    tracing::warn!(
        session,
        "client does not read its deliveries; disconnecting it: {why}"
    );
    let reason = format!("slow consumer: {why}");
    handle
        .connection
        .close(ErrorCode::SlowConsumer.varint(), reason.as_bytes());
    handle.slow = true;
    handle.backlog.abandon();
}

/// The frame that forwards `event` to a neighbour: a request carries its
/// answer's address beside the event.
fn event_frame(mut event: Event, groups: Vec<GroupKey>) -> NodeEventFrame {
    match event.reply.take() {
        None => NodeEventFrame::Event { event, groups },
        Some(reply) => NodeEventFrame::Request {
            event,
            groups,
            reply: *reply,
        },
    }
}

/// A byte count for people.
fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn error_reply(request: u64, error: RequestError, message: String) -> ClientReply {
    ClientReply::Error {
        request,
        error,
        message,
    }
}
