//! The client library: connect to a node, then publish and subscribe.
//!
//! ```no_run
//! # async fn example() -> Result<(), treescale::ClientError> {
//! use treescale::{Client, ClientOptions};
//!
//! // Connect to a node by address; `ClientOptions::default()` with no
//! // address finds one over mDNS instead.
//! let client = Client::connect(ClientOptions::to_node("127.0.0.1:7700".parse().unwrap())).await?;
//!
//! let mut orders = client.subscribe("orders.>").await?;
//! client.publish("orders.eu", "one pizza").await?;
//! client.flush().await?;
//!
//! if let Some(event) = orders.next().await {
//!     println!("{}: {}", event.topic, String::from_utf8_lossy(&event.payload));
//! }
//! client.close().await;
//! # Ok(())
//! # }
//! ```
//!
//! Publishing is buffered and batched into stream writes by a background
//! task; [`Client::flush`] returns once the node has routed everything
//! published before it. A topic given as text is checked on every publish;
//! a publisher that sends to one topic again and again can parse it once
//! ([`Topic::new`]) and pass the `Topic` instead (see [`IntoTopic`]).
//! Events handed out by a subscription are copies, not views of the
//! connection's receive buffers; neighbouring events' payloads share
//! blocks of up to 4 KiB, so an application that keeps a few events for
//! long (a last value per topic, say) should call [`Event::compact`] on
//! them to keep only their own bytes. A consumer that handles events in bulk can
//! take all that arrived together with [`Subscription::next_batch`]: one
//! wake-up for many events.
//!
//! For delivery guarantees, publish with [`Client::publish_at_least_once`]
//! (the node confirms once the event is on its disk) and receive with
//! [`Client::subscribe_durable`] (events wait in the store while the
//! subscriber is away, and each is acknowledged with
//! [`DurableSubscription::ack`]).

mod publish_buffer;
mod request;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::discovery::{self, DiscoveryError};
use crate::identity::NodeId;
use crate::node::DEFAULT_CLUSTER;
use crate::tls::{self, Liveness};
use crate::topic::{IntoTopic, Topic, TopicError};
use crate::trust::{self, Grant, Operation, TrustConfig, TrustError};
use crate::wire::stream::{write_each, FrameReader, FrameWriter};
use crate::wire::{
    compact_events, ClientReply, ClientRequest, Delivery, Destination, DirectoryEntry, ErrorCode,
    Event, EventId, NodeStatus, PublishFrame, PublishRefusal, PublishReply, Published,
    RequestError, RetentionLimits, DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};
use publish_buffer::PublishBuffer;
use request::Answer;

/// Events buffered for one durable subscription before the delivery stream
/// waits, which in turn slows the node's sending through QUIC flow control.
const SUBSCRIPTION_BUFFER: usize = 8192;
/// The same for a plain subscription, in bytes (payload, topic and 64 per
/// event), so big events cannot pile up without bound either. Its events
/// travel in batches (those of one read of the delivery stream), so one
/// channel operation serves many.
const SUBSCRIPTION_BUFFER_BYTES: usize = 8 << 20;
/// Largest payload: a node's default frame limit, less room for the
/// event's other fields.
pub const MAX_PAYLOAD: usize = 1024 * 1024;
/// At-least-once events sent and not yet confirmed, at most; past it,
/// publishing waits. Large enough to keep the node's group commits full.
const MAX_UNCONFIRMED: usize = 16384;
/// Default wait for a durable delivery's ack before it is sent again.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

/// How an event is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Qos {
    /// In memory only: fast, and lost if a link or node fails on the way.
    #[default]
    AtMostOnce,
    /// Stored on disk at every hop before it is confirmed; durable
    /// subscriptions receive it exactly once, whatever fails.
    AtLeastOnce,
}

/// Options of a durable subscription.
#[derive(Debug, Clone, Copy)]
pub struct DurableOptions {
    /// What its queue may hold while the subscriber is slow or away.
    pub limits: RetentionLimits,
    /// How long a delivered event may go unacknowledged before it is sent
    /// again.
    pub ack_wait: Duration,
    /// The last position this subscriber has already handled (0 for none):
    /// redelivered events up to it are skipped. Pass the last position of
    /// a previous connection when reconnecting.
    pub handled: u64,
}

impl Default for DurableOptions {
    fn default() -> Self {
        DurableOptions {
            limits: RetentionLimits::default(),
            ack_wait: DEFAULT_ACK_WAIT,
            handled: 0,
        }
    }
}

/// How to reach a node.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The node's address; `None` finds one over mDNS.
    pub node: Option<SocketAddr>,
    /// Connect from this endpoint instead of a new UDP socket: how the
    /// simulator puts clients on its virtual network.
    pub endpoint: Option<quinn::Endpoint>,
    /// With discovery: only nodes of this cluster.
    pub cluster: String,
    /// With discovery: interfaces mDNS may use; empty means all.
    pub interfaces: Vec<String>,
    /// Shown in the node's logs.
    pub name: String,
    /// How long to look for and connect to a node.
    pub connect_timeout: Duration,
    pub liveness: Liveness,
    /// Where the client's certificate and the cluster CA are.
    pub trust: TrustConfig,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            node: None,
            endpoint: None,
            cluster: DEFAULT_CLUSTER.to_string(),
            interfaces: Vec::new(),
            name: "client".to_string(),
            connect_timeout: Duration::from_secs(5),
            // A dead node is noticed in seconds, so a durable subscriber
            // can reconnect soon after its node restarts.
            liveness: Liveness {
                keep_alive: Duration::from_millis(500),
                idle_timeout: Duration::from_secs(3),
            },
            trust: TrustConfig::UserDefault,
        }
    }
}

impl ClientOptions {
    pub fn to_node(addr: SocketAddr) -> Self {
        ClientOptions {
            node: Some(addr),
            ..Default::default()
        }
    }
}

/// What went wrong talking to a node.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no node of cluster {cluster:?} answered on mDNS within {waited:?}; is `treescale node` running on this network? pass --node ADDR to connect directly")]
    NoNodeFound { cluster: String, waited: Duration },
    #[error("cannot reach a node at {addr} within {waited:?}; is `treescale node` running there?")]
    Unreachable { addr: SocketAddr, waited: Duration },
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("the node closed the connection: {0}")]
    Closed(String),
    #[error("the node disconnected this client as a slow consumer: {reason}; read events faster (or in bulk with Subscription::next_batch), or raise that limit on the node")]
    SlowConsumer { reason: String },
    #[error("node {node} stopped answering (nothing heard from it for the connection's idle timeout): it stopped, crashed, or the network to it is down")]
    NotAnswering { node: String },
    #[error("the connection to node {node} was lost: {reason}")]
    ConnectionLost { node: String, reason: String },
    #[error("the node answered out of protocol: {0}")]
    UnexpectedReply(String),
    #[error("the node refused: {message}")]
    Refused {
        error: RequestError,
        message: String,
    },
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error("payload of {0} bytes is over the {MAX_PAYLOAD} bytes an event may carry")]
    PayloadTooLarge(usize),
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error("the node refused the event: {message}")]
    PublishRefused {
        reason: PublishRefusal,
        message: String,
    },
    #[error("the connection closed before the node confirmed event {0}; it may or may not be stored, so publish it again if it must arrive")]
    Unconfirmed(EventId),
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("no responders for {topic}: no subscription anywhere in the overlay matches it")]
    NoResponders { topic: String },
    #[error("no answer to the request on {topic} within {timeout:?}")]
    Timeout { topic: String, timeout: Duration },
    #[error("event {0} is not a request: it carries no address to answer")]
    NotARequest(EventId),
}

/// Why the connection to `node` (a description for people) ended.
fn closed_error(error: &quinn::ConnectionError, node: String) -> ClientError {
    match error {
        // The node judges a client certificate once the client's side of
        // the handshake is done, so a refusal arrives as a close.
        quinn::ConnectionError::ConnectionClosed(close) if is_tls_alert(close.error_code) => {
            ClientError::Closed(format!(
                "the node refused this client's certificate ({}): the client is of another cluster, shows no certificate, or its certificate expired; check the certs dir (--certs, docs/security.md)",
                close.reason.escape_ascii()
            ))
        }
        quinn::ConnectionError::ApplicationClosed(close)
            if ErrorCode::from_varint(close.error_code) == Some(ErrorCode::SlowConsumer) =>
        {
            let reason = String::from_utf8_lossy(&close.reason);
            ClientError::SlowConsumer {
                reason: reason.trim_start_matches("slow consumer: ").to_string(),
            }
        }
        quinn::ConnectionError::ApplicationClosed(close) => {
            let code = ErrorCode::from_varint(close.error_code)
                .map(|c| format!("{c:?}"))
                .unwrap_or_else(|| close.error_code.to_string());
            ClientError::Closed(format!(
                "{code} ({})",
                String::from_utf8_lossy(&close.reason)
            ))
        }
        quinn::ConnectionError::TimedOut => ClientError::NotAnswering { node },
        other => ClientError::ConnectionLost {
            node,
            reason: other.to_string(),
        },
    }
}

/// What the reader tasks share with the client.
#[derive(Default)]
struct Pending {
    /// Requests (subscribe, status…) waiting for their reply, by number.
    replies: HashMap<u64, oneshot::Sender<ClientReply>>,
    /// Flushes waiting for the node's answer.
    flushes: HashMap<u64, oneshot::Sender<()>>,
    /// Requests waiting for their answer, by number.
    requests: HashMap<u64, oneshot::Sender<Answer>>,
    /// Answers that came for no waiting request.
    late_replies: u64,
    /// Where each subscription's events go.
    subscriptions: HashMap<u64, BatchSender>,
    /// Where each durable subscription's events go, with their positions.
    durables: HashMap<u64, mpsc::Sender<(u64, Event)>>,
    /// Set when the connection is gone: nothing more is registered, so
    /// nothing waits for an answer that cannot come.
    closed: bool,
    /// At-least-once events waiting for the node's confirmation, by
    /// sequence number; each holds a permit of the unconfirmed window.
    confirmations: BTreeMap<
        u64,
        (
            oneshot::Sender<Result<(), ClientError>>,
            OwnedSemaphorePermit,
        ),
    >,
}

/// A connection to one node.
pub struct Client {
    connection: quinn::Connection,
    endpoint: quinn::Endpoint,
    node: NodeId,
    node_name: String,
    /// Who the node knows this client as; `None` in insecure mode.
    user: Option<String>,
    /// What the node lets this client do; at-most-once events are checked
    /// here before sending, so a denied one fails at once rather than vanish.
    grant: Grant,
    requests: mpsc::UnboundedSender<ClientRequest>,
    publishes: Arc<PublishBuffer>,
    pending: Arc<Mutex<Pending>>,
    /// Numbers requests, subscriptions and flushes alike, so a reply's
    /// number is never ambiguous.
    next_number: AtomicU64,
    /// This connection's publisher id, random, so event ids are unique.
    publisher: u64,
    next_seq: AtomicU64,
    /// Bounds the at-least-once events awaiting confirmation.
    unconfirmed: Arc<Semaphore>,
    /// Held from numbering an at-least-once event to queueing it.
    at_least_once_order: tokio::sync::Mutex<()>,
}

impl Client {
    pub async fn connect(options: ClientOptions) -> Result<Client, ClientError> {
        let (identity, trust) = trust::client_credentials(&options.trust)?;
        let (addr, expected) = match options.node {
            Some(addr) => (addr, None),
            None => {
                let found = discovery::find_node(
                    &options.cluster,
                    &trust.fingerprint(),
                    &options.interfaces,
                    options.connect_timeout,
                )
                .await?;
                let Some((id, addrs)) = found else {
                    return Err(ClientError::NoNodeFound {
                        cluster: options.cluster.clone(),
                        waited: options.connect_timeout,
                    });
                };
                (addrs[0], Some(id))
            }
        };
        let config = tls::client_dial_config(identity.as_ref(), &trust, expected, options.liveness);
        let deadline = tokio::time::Instant::now() + options.connect_timeout;
        let attempts = async {
            loop {
                match Self::connect_to(addr, config.clone(), &options).await {
                    // A handshake gives up after the idle timeout, which may
                    // be shorter than the connect timeout: a node that is
                    // still starting gets the whole wait.
                    Err(ClientError::Unreachable { .. })
                        if tokio::time::Instant::now() < deadline => {}
                    other => return other,
                }
            }
        };
        tokio::time::timeout_at(deadline, attempts)
            .await
            .map_err(|_| ClientError::Unreachable {
                addr,
                waited: options.connect_timeout,
            })?
    }

    async fn connect_to(
        addr: SocketAddr,
        config: quinn::ClientConfig,
        options: &ClientOptions,
    ) -> Result<Client, ClientError> {
        let connect_error = |reason: String| ClientError::Connect { addr, reason };
        let endpoint = match &options.endpoint {
            Some(endpoint) => endpoint.clone(),
            None => {
                let bind: SocketAddr = if addr.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                crate::tls::endpoint(bind, None).map_err(|e| connect_error(e.to_string()))?
            }
        };
        let connection = endpoint
            .connect_with(config, addr, trust::NODE_SERVER_NAME)
            .map_err(|e| connect_error(e.to_string()))?
            .await
            .map_err(|e| match e {
                quinn::ConnectionError::TimedOut => ClientError::Unreachable {
                    addr,
                    waited: options.connect_timeout,
                },
                quinn::ConnectionError::ConnectionClosed(close)
                    if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
                {
                    connect_error(
                        "the node refused the connection: this address holds as many as it allows (its --max-connections-per-address)".into(),
                    )
                }
                quinn::ConnectionError::TransportError(error) if is_tls_alert(error.code) => {
                    connect_error(format!(
                        "this client does not trust the node's certificate ({}): the node is of another cluster, or its certificate expired; check the certs dir (--certs, docs/security.md)",
                        error.reason
                    ))
                }
                quinn::ConnectionError::ConnectionClosed(close) if is_tls_alert(close.error_code) => {
                    closed_error(&quinn::ConnectionError::ConnectionClosed(close), addr.to_string())
                }
                other => connect_error(other.to_string()),
            })?;
        let closed = |e: &quinn::ConnectionError| closed_error(e, addr.to_string());
        let (send, recv) = connection.open_bi().await.map_err(|e| closed(&e))?;
        let mut control = FrameWriter::new(send);
        let hello = ClientRequest::Hello {
            version: PROTOCOL_VERSION,
            name: options.name.clone(),
        };
        let mut replies = FrameReader::new(recv, DEFAULT_MAX_FRAME);
        let welcome = async {
            control.send(&hello).await.map_err(|e| e.to_string())?;
            replies
                .next::<ClientReply>()
                .await
                .map_err(|e| e.to_string())
        };
        let (node, node_name, user, grant) = match welcome.await {
            Ok(Some(ClientReply::Welcome {
                node,
                name,
                user,
                grant,
                ..
            })) => (node, name, user, grant),
            Ok(_) | Err(_) => {
                let reason = connection.closed().await;
                return Err(closed(&reason));
            }
        };
        let (publish_send, publish_recv) = connection.open_bi().await.map_err(|e| closed(&e))?;
        let pending = Arc::new(Mutex::new(Pending::default()));
        let (requests_tx, requests_rx) = mpsc::unbounded_channel();
        let publishes = PublishBuffer::new();
        tokio::spawn(write_each(control.into_stream(), requests_rx));
        tokio::spawn(publish_buffer::write(publishes.clone(), publish_send));
        tokio::spawn(read_replies(replies, pending.clone()));
        tokio::spawn(read_publish_replies(
            FrameReader::new(publish_recv, DEFAULT_MAX_FRAME),
            pending.clone(),
        ));
        tokio::spawn(read_deliveries(
            connection.clone(),
            pending.clone(),
            publishes.clone(),
        ));
        Ok(Client {
            connection,
            endpoint,
            node,
            node_name,
            user,
            grant,
            requests: requests_tx,
            publishes,
            pending,
            next_number: AtomicU64::new(1),
            publisher: rand::random(),
            next_seq: AtomicU64::new(1),
            unconfirmed: Arc::new(Semaphore::new(MAX_UNCONFIRMED)),
            at_least_once_order: tokio::sync::Mutex::new(()),
        })
    }

    /// The id of the node this client is connected to.
    pub fn node_id(&self) -> NodeId {
        self.node
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The user name in this client's certificate; `None` in insecure mode.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// What the node lets this client publish and subscribe to.
    pub fn grant(&self) -> &Grant {
        &self.grant
    }

    /// The address of the node this client is connected to.
    pub fn node_addr(&self) -> SocketAddr {
        self.connection.remote_address()
    }

    /// The node as people know it: name, short id and address.
    pub fn describe_node(&self) -> String {
        let short = self.node.short();
        if self.node_name == short {
            format!("{short} at {}", self.node_addr())
        } else {
            format!("{} ({short}) at {}", self.node_name, self.node_addr())
        }
    }

    /// Why the connection closed, once it has (the node's error code and
    /// reason when it closed it); `None` while it is open.
    pub fn close_reason(&self) -> Option<ClientError> {
        self.connection
            .close_reason()
            .map(|error| closed_error(&error, self.describe_node()))
    }

    /// Waits until the connection is gone, and says why.
    pub async fn closed(&self) -> ClientError {
        let error = self.connection.closed().await;
        closed_error(&error, self.describe_node())
    }

    /// Receives every event whose topic matches `pattern`.
    pub async fn subscribe(&self, pattern: &str) -> Result<Subscription, ClientError> {
        self.subscribe_inner(pattern, None).await
    }

    /// Joins queue group `group` on `pattern`: each matching event goes to
    /// exactly one member of the group across the overlay.
    pub async fn subscribe_group(
        &self,
        pattern: &str,
        group: &str,
    ) -> Result<Subscription, ClientError> {
        self.subscribe_inner(pattern, Some(group.to_string())).await
    }

    async fn subscribe_inner(
        &self,
        pattern: &str,
        group: Option<String>,
    ) -> Result<Subscription, ClientError> {
        let sub = self.number();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let room = Arc::new(Semaphore::new(SUBSCRIPTION_BUFFER_BYTES));
        let sender = BatchSender {
            events: events_tx,
            room: room.clone(),
        };
        self.register(|p| p.subscriptions.insert(sub, sender))?;
        let request = ClientRequest::Subscribe {
            sub,
            pattern: pattern.to_string(),
            group,
        };
        match self.call(sub, request).await {
            Ok(ClientReply::Subscribed { .. }) => Ok(Subscription {
                sub,
                events: events_rx,
                room,
                ready: Vec::new().into_iter(),
                requests: self.requests.clone(),
                pending: self.pending.clone(),
            }),
            Ok(other) => Err(unexpected(other)),
            Err(e) => {
                self.lock().subscriptions.remove(&sub);
                Err(e)
            }
        }
    }

    /// Queues an event for `topic`; returns its id. Waits only when the
    /// publish queue is full.
    pub async fn publish(
        &self,
        topic: impl IntoTopic,
        payload: impl Into<Bytes>,
    ) -> Result<EventId, ClientError> {
        self.publish_with_headers(topic, Vec::new(), payload).await
    }

    pub async fn publish_with_headers(
        &self,
        topic: impl IntoTopic,
        headers: Vec<(String, String)>,
        payload: impl Into<Bytes>,
    ) -> Result<EventId, ClientError> {
        let event = self.event(topic, headers, payload.into())?;
        self.check_publish(&event.topic)?;
        let id = event.id;
        self.send(&PublishFrame::Event(event)).await?;
        Ok(id)
    }

    /// Publishes `event` so that it survives failures: the returned
    /// [`Confirmation`] resolves once the node has stored it on disk (or
    /// refused it, e.g. when a durable subscription is at its retention
    /// limit). Waits only when many events are unconfirmed.
    pub async fn publish_at_least_once(
        &self,
        topic: impl IntoTopic,
        headers: Vec<(String, String)>,
        payload: impl Into<Bytes>,
    ) -> Result<Confirmation, ClientError> {
        let payload = payload.into();
        let permit = self
            .unconfirmed
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        // The node confirms cumulatively (every sequence number up to one),
        // so events must go out in the order of their numbers, even when
        // several tasks publish through this client at once.
        let _in_order = self.at_least_once_order.lock().await;
        let event = self.event(topic, headers, payload)?;
        let id = event.id;
        let (tx, rx) = oneshot::channel();
        self.register(|p| p.confirmations.insert(id.seq, (tx, permit)))?;
        self.send(&PublishFrame::AtLeastOnce(event)).await?;
        Ok(Confirmation { id, rx })
    }

    /// Publishes with the given delivery mode; for at-least-once, waits for
    /// the node's confirmation.
    pub async fn publish_with_qos(
        &self,
        qos: Qos,
        topic: impl IntoTopic,
        headers: Vec<(String, String)>,
        payload: impl Into<Bytes>,
    ) -> Result<EventId, ClientError> {
        match qos {
            Qos::AtMostOnce => self.publish_with_headers(topic, headers, payload).await,
            Qos::AtLeastOnce => {
                self.publish_at_least_once(topic, headers, payload)
                    .await?
                    .confirmed()
                    .await
            }
        }
    }

    /// Receives the events of durable subscription `name`, creating it on
    /// this node (with `pattern`) if it does not exist. Its events are kept
    /// on this node while no client is attached, and are delivered in order.
    pub async fn subscribe_durable(
        &self,
        name: &str,
        pattern: &str,
        options: DurableOptions,
    ) -> Result<DurableSubscription, ClientError> {
        let sub = self.number();
        let (events_tx, events_rx) = mpsc::channel(SUBSCRIPTION_BUFFER);
        self.register(|p| p.durables.insert(sub, events_tx))?;
        let request = ClientRequest::SubscribeDurable {
            sub,
            name: name.to_string(),
            pattern: pattern.to_string(),
            limits: options.limits,
            ack_wait_ms: options.ack_wait.as_millis().clamp(1, u32::MAX as u128) as u32,
        };
        match self.call(sub, request).await {
            Ok(ClientReply::DurableAttached { first, backlog, .. }) => Ok(DurableSubscription {
                sub,
                next: first.max(options.handled + 1),
                backlog,
                events: events_rx,
                requests: self.requests.clone(),
                pending: self.pending.clone(),
            }),
            Ok(other) => Err(unexpected(other)),
            Err(e) => {
                self.lock().durables.remove(&sub);
                Err(e)
            }
        }
    }

    fn event(
        &self,
        topic: impl IntoTopic,
        headers: Vec<(String, String)>,
        payload: Bytes,
    ) -> Result<Published, ClientError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(ClientError::PayloadTooLarge(payload.len()));
        }
        let topic = topic.into_topic()?;
        Ok(Published {
            id: EventId {
                publisher: self.publisher,
                seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            },
            topic,
            headers,
            payload,
        })
    }

    /// Returns once the node has routed every event published before.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let token = self.number();
        let (tx, rx) = oneshot::channel();
        self.register(|p| p.flushes.insert(token, tx))?;
        self.send(&PublishFrame::Flush(token)).await?;
        rx.await.map_err(|_| self.gone())
    }

    /// The node's view of itself: id, peers, tree position, subscriptions.
    pub async fn status(&self) -> Result<NodeStatus, ClientError> {
        let request = self.number();
        match self
            .call(request, ClientRequest::Status { request })
            .await?
        {
            ClientReply::Status { status, .. } => Ok(*status),
            other => Err(unexpected(other)),
        }
    }

    /// The node's subtree, itself first: at the root, the whole tree.
    pub async fn tree(&self) -> Result<Vec<DirectoryEntry>, ClientError> {
        let request = self.number();
        match self.call(request, ClientRequest::Tree { request }).await? {
            ClientReply::Tree { nodes, .. } => Ok(nodes),
            other => Err(unexpected(other)),
        }
    }

    /// Sends an event to the subscribers of one node only (by node id or
    /// `--name`); it travels the tree path to that node.
    pub async fn publish_to(
        &self,
        to: Destination,
        topic: impl IntoTopic,
        payload: impl Into<Bytes>,
    ) -> Result<EventId, ClientError> {
        self.publish_to_with_headers(to, topic, Vec::new(), payload)
            .await
    }

    pub async fn publish_to_with_headers(
        &self,
        to: Destination,
        topic: impl IntoTopic,
        headers: Vec<(String, String)>,
        payload: impl Into<Bytes>,
    ) -> Result<EventId, ClientError> {
        let event = self.event(topic, headers, payload.into())?;
        self.check_publish(&event.topic)?;
        let id = event.id;
        self.send(&PublishFrame::Directed { event, to }).await?;
        Ok(id)
    }

    /// Waits until some subscription anywhere in the overlay matches
    /// `topic`; `false` if none appeared within `timeout`.
    pub async fn wait_for_interest(
        &self,
        topic: &str,
        timeout: Duration,
    ) -> Result<bool, ClientError> {
        let topic = Topic::new(topic)?;
        let request = self.number();
        let wait = ClientRequest::WaitInterest {
            request,
            topic: topic.to_string(),
            timeout_ms: timeout.as_millis().min(u32::MAX as u128) as u32,
        };
        match self.call(request, wait).await? {
            ClientReply::Interest { present, .. } => Ok(present),
            other => Err(unexpected(other)),
        }
    }

    /// Flushes, then closes the connection.
    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.flush()).await;
        self.connection
            .close(ErrorCode::Closed.varint(), ErrorCode::Closed.reason());
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }

    async fn call(&self, number: u64, request: ClientRequest) -> Result<ClientReply, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.register(|p| p.replies.insert(number, tx))?;
        self.requests.send(request).map_err(|_| self.gone())?;
        match rx.await {
            Ok(ClientReply::Error { error, message, .. }) => {
                Err(ClientError::Refused { error, message })
            }
            Ok(reply) => Ok(reply),
            Err(_) => Err(self.gone()),
        }
    }

    /// Refuses an at-most-once event the grant does not allow: the node
    /// would drop it without an answer. Subscriptions and at-least-once
    /// events go to the node, which answers (and logs) a denial itself.
    fn check_publish(&self, topic: &Topic) -> Result<(), ClientError> {
        if self.grant.may_publish(topic) {
            return Ok(());
        }
        let user = self.user.as_deref().unwrap_or("anonymous");
        Err(ClientError::PermissionDenied(self.grant.denial(
            user,
            Operation::Publish,
            topic.as_str(),
        )))
    }

    fn number(&self) -> u64 {
        self.next_number.fetch_add(1, Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .expect("no panics while holding the lock")
    }

    /// Records something that waits for the node, unless the connection
    /// is gone: then nothing would ever answer it.
    fn register<T>(&self, insert: impl FnOnce(&mut Pending) -> T) -> Result<(), ClientError> {
        let mut pending = self.lock();
        if pending.closed {
            drop(pending);
            return Err(self.gone());
        }
        insert(&mut pending);
        Ok(())
    }

    /// Queues `frame` on the publish stream.
    async fn send(&self, frame: &PublishFrame) -> Result<(), ClientError> {
        self.publishes.send(frame).await.map_err(|_| self.gone())
    }

    fn gone(&self) -> ClientError {
        match self.connection.close_reason() {
            Some(reason) => closed_error(&reason, self.describe_node()),
            None => ClientError::ConnectionLost {
                node: self.describe_node(),
                reason: "its streams ended".into(),
            },
        }
    }
}

impl Drop for Client {
    /// Ends the publish stream once what is queued on it is written.
    fn drop(&mut self) {
        self.publishes.close();
    }
}

/// Whether a QUIC error code carries a TLS alert: the handshake refused a
/// certificate.
fn is_tls_alert(code: impl Into<u64>) -> bool {
    (0x100..0x200).contains(&code.into())
}

fn unexpected(reply: ClientReply) -> ClientError {
    ClientError::UnexpectedReply(format!("{reply:?}"))
}

/// The events of one subscription, in the order the node sent them.
pub struct Subscription {
    sub: u64,
    events: mpsc::UnboundedReceiver<(Vec<Event>, u32)>,
    /// Room in the buffer, returned as batches are taken.
    room: Arc<Semaphore>,
    /// What is left of the batch received last.
    ready: std::vec::IntoIter<Event>,
    requests: mpsc::UnboundedSender<ClientRequest>,
    pending: Arc<Mutex<Pending>>,
}

impl Subscription {
    /// The next event; `None` once the connection is gone.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.ready.next() {
                return Some(event);
            }
            let (batch, room) = self.events.recv().await?;
            self.room.add_permits(room as usize);
            self.ready = batch.into_iter();
        }
    }

    /// The events that arrived together: what is left of the batch the
    /// last [`Subscription::next`] came from, else the next batch, in
    /// order and never empty; `None` once the connection is gone. For
    /// consumers that handle events in bulk: one wake-up for many events.
    pub async fn next_batch(&mut self) -> Option<Vec<Event>> {
        // Collecting a vec's own iterator reuses its allocation.
        let rest: Vec<Event> = std::mem::take(&mut self.ready).collect();
        if !rest.is_empty() {
            return Some(rest);
        }
        let (batch, room) = self.events.recv().await?;
        self.room.add_permits(room as usize);
        Some(batch)
    }

    /// Stops the subscription; events already received are discarded.
    /// Dropping the subscription does the same.
    pub fn unsubscribe(self) {
        drop(self);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.room.close();
        detach(&self.pending, &self.requests, self.sub, |p| {
            p.subscriptions.remove(&self.sub);
        });
    }
}

/// The node's answer to one at-least-once event.
pub struct Confirmation {
    id: EventId,
    rx: oneshot::Receiver<Result<(), ClientError>>,
}

impl Confirmation {
    pub fn id(&self) -> EventId {
        self.id
    }

    /// Waits until the node has stored the event, or refused it.
    pub async fn confirmed(self) -> Result<EventId, ClientError> {
        match self.rx.await {
            Ok(Ok(())) => Ok(self.id),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClientError::Unconfirmed(self.id)),
        }
    }
}

/// One event of a durable subscription, at its position in the queue.
#[derive(Debug, Clone)]
pub struct DurableEvent {
    pub position: u64,
    pub event: Event,
}

/// The events of a durable subscription, each exactly once and in order.
/// Acknowledge what is handled with [`DurableSubscription::ack`]; what is
/// not acknowledged within the ack wait is delivered again (and skipped
/// here if it was already handed out).
pub struct DurableSubscription {
    sub: u64,
    /// The position the next event handed out must have.
    next: u64,
    backlog: u64,
    events: mpsc::Receiver<(u64, Event)>,
    requests: mpsc::UnboundedSender<ClientRequest>,
    pending: Arc<Mutex<Pending>>,
}

impl DurableSubscription {
    /// Events the node held for this subscription when it attached.
    pub fn backlog(&self) -> u64 {
        self.backlog
    }

    /// The next event; `None` once the connection is gone.
    pub async fn next(&mut self) -> Option<DurableEvent> {
        loop {
            let (position, event) = self.events.recv().await?;
            // Positions count up by one: an earlier one is a redelivery of
            // what was handed out, a later one follows a delivery the node
            // dropped and will send again.
            if position == self.next {
                self.next += 1;
                return Some(DurableEvent { position, event });
            }
        }
    }

    /// Whether every event received so far has been handed out.
    pub fn is_caught_up(&self) -> bool {
        self.events.is_empty()
    }

    /// Confirms every event up to and including `position`: the node may
    /// delete them.
    pub fn ack(&self, position: u64) {
        let _ = self.requests.send(ClientRequest::AckDurable {
            sub: self.sub,
            position,
        });
    }
}

impl Drop for DurableSubscription {
    /// Detaches; the subscription and its stored events stay on the node.
    fn drop(&mut self) {
        detach(&self.pending, &self.requests, self.sub, |p| {
            p.durables.remove(&self.sub);
        });
    }
}

/// What dropping either kind of subscription does: forget its channel
/// (`forget` removes it from `pending`), then tell the node.
fn detach(
    pending: &Mutex<Pending>,
    requests: &mpsc::UnboundedSender<ClientRequest>,
    sub: u64,
    forget: impl FnOnce(&mut Pending),
) {
    forget(&mut pending.lock().expect("no panics while holding the lock"));
    let _ = requests.send(ClientRequest::Unsubscribe { sub });
}

async fn read_replies(mut reader: FrameReader, pending: Arc<Mutex<Pending>>) {
    while let Ok(Some(reply)) = reader.next::<ClientReply>().await {
        let number = match &reply {
            ClientReply::Subscribed { sub }
            | ClientReply::Unsubscribed { sub }
            | ClientReply::DurableAttached { sub, .. } => *sub,
            ClientReply::Status { request, .. }
            | ClientReply::Interest { request, .. }
            | ClientReply::Tree { request, .. }
            | ClientReply::Error { request, .. } => *request,
            ClientReply::Welcome { .. } => continue,
        };
        let waiter = pending
            .lock()
            .expect("no panics while holding the lock")
            .replies
            .remove(&number);
        if let Some(waiter) = waiter {
            let _ = waiter.send(reply);
        }
    }
}

async fn read_publish_replies(mut reader: FrameReader, pending: Arc<Mutex<Pending>>) {
    while let Ok(Some(reply)) = reader.next::<PublishReply>().await {
        let mut pending = pending.lock().expect("no panics while holding the lock");
        match reply {
            PublishReply::Flushed(token) => {
                if let Some(waiter) = pending.flushes.remove(&token) {
                    let _ = waiter.send(());
                }
            }
            PublishReply::Acked { up_to } => {
                let later = pending.confirmations.split_off(&(up_to + 1));
                for (_, (waiter, _permit)) in std::mem::replace(&mut pending.confirmations, later) {
                    let _ = waiter.send(Ok(()));
                }
            }
            PublishReply::Refused {
                seq,
                reason,
                message,
            } => {
                if let Some((waiter, _permit)) = pending.confirmations.remove(&seq) {
                    let _ = waiter.send(Err(ClientError::PublishRefused { reason, message }));
                }
            }
            PublishReply::RequestFailed {
                request,
                reason,
                message,
            } => {
                if let Some(waiter) = pending.requests.remove(&request) {
                    let _ = waiter.send(Answer::Failed(reason, message));
                }
            }
        }
    }
}

/// A copy of the channel `pick` finds, so the lock is not held while
/// sending on it.
fn sender<T: Clone>(
    pending: &Mutex<Pending>,
    pick: impl FnOnce(&Pending) -> Option<&T>,
) -> Option<T> {
    pick(&pending.lock().expect("no panics while holding the lock")).cloned()
}

/// Where a plain subscription's batches go. The channel is bounded in
/// bytes, not batches, by `room`: a batch may hold one event or a
/// thousand.
#[derive(Clone)]
struct BatchSender {
    events: mpsc::UnboundedSender<(Vec<Event>, u32)>,
    /// A permit per byte sent and not yet taken by the subscription; each
    /// batch carries how many it took.
    room: Arc<Semaphore>,
}

/// What an event counts against its subscription's buffer.
fn buffered_bytes(event: &Event) -> usize {
    event.payload.len() + event.topic.as_str().len() + 64
}

/// Consecutive events of one delivery batch for the same subscription.
#[derive(Default)]
struct SubscriptionRun {
    sub: Option<u64>,
    target: Option<BatchSender>,
    events: Vec<Event>,
}

impl SubscriptionRun {
    /// Sends the events gathered so far to their subscription, if it
    /// still exists, once it has room for them.
    async fn hand_over(&mut self) {
        let events = std::mem::take(&mut self.events);
        let Some(target) = &self.target else {
            return;
        };
        if events.is_empty() {
            return;
        }
        let bytes: usize = events.iter().map(buffered_bytes).sum();
        // A batch larger than the whole buffer takes all of it.
        let n = bytes.min(SUBSCRIPTION_BUFFER_BYTES) as u32;
        // The subscription returns the permits as it takes the batch, and
        // closes the semaphore when dropped, so this never waits on a
        // subscription that is gone.
        if let Ok(permits) = target.room.acquire_many(n).await {
            permits.forget();
            let _ = target.events.send((events, n));
        }
    }
}

async fn read_deliveries(
    connection: quinn::Connection,
    pending: Arc<Mutex<Pending>>,
    publishes: Arc<PublishBuffer>,
) {
    while let Ok(stream) = connection.accept_uni().await {
        let mut reader = FrameReader::new(stream, DEFAULT_MAX_FRAME);
        let mut batch = Vec::new();
        while let Ok(true) = reader.next_batch::<Delivery>(&mut batch).await {
            // Handed to the application, which may keep them: not views
            // that keep whole receive buffers.
            compact_events(&mut batch, |delivery| match delivery {
                Delivery::Event { event, .. }
                | Delivery::Durable { event, .. }
                | Delivery::Request { event, .. }
                | Delivery::Reply { event, .. } => Some(event),
            });
            // Most of a batch is for one subscription: its events go to it
            // together, and its channel is looked up (under a lock) once.
            let mut run = SubscriptionRun::default();
            let total = batch.len();
            for (i, delivery) in batch.drain(..).enumerate() {
                let (sub, event) = match delivery {
                    Delivery::Event { sub, event } => (sub, event),
                    Delivery::Request {
                        sub,
                        mut event,
                        reply,
                    } => {
                        event.reply = Some(Box::new(reply));
                        (sub, event)
                    }
                    Delivery::Durable {
                        sub,
                        position,
                        event,
                    } => {
                        run.hand_over().await;
                        if let Some(target) = sender(&pending, |p| p.durables.get(&sub)) {
                            let _ = target.send((position, event)).await;
                        }
                        continue;
                    }
                    Delivery::Reply { request, event } => {
                        let mut pending = pending.lock().expect("no panics while holding the lock");
                        match pending.requests.remove(&request) {
                            Some(waiter) => {
                                let _ = waiter.send(Answer::Reply(event));
                            }
                            None => pending.late_replies += 1,
                        }
                        continue;
                    }
                };
                if run.sub != Some(sub) {
                    run.hand_over().await;
                    run.sub = Some(sub);
                    run.target = sender(&pending, |p| p.subscriptions.get(&sub));
                    if i == 0 {
                        // Most batches are one subscription's: room for
                        // all, as growing moves every event.
                        run.events.reserve(total);
                    }
                }
                run.events.push(event);
            }
            run.hand_over().await;
        }
    }
    // The connection is gone: end every subscription, fail every request,
    // flush and confirmation still awaited, and every publish from now on.
    publishes.close();
    let mut pending = pending.lock().expect("no panics while holding the lock");
    *pending = Pending {
        closed: true,
        late_replies: pending.late_replies,
        ..Pending::default()
    };
}
