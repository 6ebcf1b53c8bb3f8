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
//! long (a last value per topic, say) should call [`crate::wire::Event::compact`] on
//! them to keep only their own bytes. A consumer that handles events in bulk can
//! take all that arrived together with [`Subscription::next_batch`]: one
//! wake-up for many events.
//!
//! For delivery guarantees, publish with [`Client::publish_at_least_once`]
//! (the node confirms once the event is on its disk) and receive with
//! [`Client::subscribe_durable`] (events wait in the store while the
//! subscriber is away, and each is acknowledged with
//! [`DurableSubscription::ack`]).

mod connect;
mod deliveries;
mod pending;
mod publish_buffer;
mod request;
mod subscription;
mod supervisor;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, watch, Semaphore};

use crate::discovery::DiscoveryError;
use crate::identity::NodeId;
use crate::node::DEFAULT_CLUSTER;
use crate::tls::Liveness;
use crate::topic::{IntoTopic, Topic, TopicError};
use crate::trust::{Grant, Operation, TrustConfig, TrustError};
use crate::wire::{
    ClientReply, ClientRequest, Destination, DirectoryEntry, ErrorCode, EventId, NodeStatus,
    PublishFrame, PublishRefusal, Published, Question, RequestError, RetentionLimits,
};
use connect::{Dialer, NodeLink};
use deliveries::BatchSender;
use pending::{ack_wait_ms, DurableSpec, Pending};
use publish_buffer::{Offline, PublishBuffer, Refused};
pub use subscription::{
    Confirmation, DurableAcker, DurableEvent, DurableSubscription, Subscription,
};
pub use supervisor::Reconnect;
use supervisor::{Link, Shared};

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

/// How long [`Client::status_of`] and [`Client::tree_of`] wait for a
/// node's answer.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(5);
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
    /// subscriptions receive it exactly once, whatever fails (sent again
    /// through another node after a reconnect, possibly twice).
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
    /// redelivered events up to it are skipped and acknowledged. Pass the
    /// last position of a previous connection when reconnecting.
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
    /// Nodes of the cluster to connect to, the first that answers (the
    /// others are dialled a moment later each); after losing one, the
    /// client reconnects to any of them. Empty finds one over mDNS.
    pub nodes: Vec<SocketAddr>,
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
    /// A token from `treescale certs issue token`, shown instead of a
    /// certificate: the certs dir then needs only the cluster's `ca.crt`.
    pub token: Option<String>,
    /// What to do when the connection is lost.
    pub reconnect: Reconnect,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            nodes: Vec::new(),
            endpoint: None,
            cluster: DEFAULT_CLUSTER.to_string(),
            interfaces: Vec::new(),
            name: "client".to_string(),
            connect_timeout: Duration::from_secs(5),
            // A dead node is noticed within 1.5 s, so a client holding
            // several nodes is on another one within about 2 s.
            liveness: Liveness {
                keep_alive: Duration::from_millis(300),
                idle_timeout: Duration::from_millis(1500),
            },
            trust: TrustConfig::UserDefault,
            token: None,
            reconnect: Reconnect::default(),
        }
    }
}

impl ClientOptions {
    pub fn to_node(addr: SocketAddr) -> Self {
        Self::to_nodes(vec![addr])
    }

    /// Any of `addrs`, and any of them again after losing one.
    pub fn to_nodes(addrs: Vec<SocketAddr>) -> Self {
        ClientOptions {
            nodes: addrs,
            ..Default::default()
        }
    }
}

/// A change of a client's connection, from [`Client::connection_events`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionEvent {
    /// The connection was lost; the client is reconnecting. Publishing
    /// buffers meanwhile; requests fail with [`ClientError::Disconnected`].
    Disconnected { reason: String },
    /// Connected again, to this node, with every subscription restored.
    Reconnected {
        node: NodeId,
        name: String,
        addr: SocketAddr,
    },
    /// The client closed for good: it gave up reconnecting, the node
    /// refused it, or it was closed.
    Closed { reason: String },
}

/// What went wrong talking to a node.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no node of cluster {cluster:?} answered on mDNS within {waited:?}; is `treescale node` running on this network? pass --node ADDR to connect directly")]
    NoNodeFound { cluster: String, waited: Duration },
    #[error("cannot reach a node at {addr} within {waited:?}; is `treescale node` running there?")]
    Unreachable { addr: SocketAddr, waited: Duration },
    #[error("cannot reach any node at {} within {waited:?}; is `treescale node` running there?", list_addrs(.addrs))]
    NoneReachable {
        addrs: Vec<SocketAddr>,
        waited: Duration,
    },
    #[error("not connected to a node ({reason}); reconnecting")]
    Disconnected { reason: String },
    #[error("the client stays disconnected while the buffer for publishing offline holds {bound} bytes; wait for the reconnect or raise ClientOptions::reconnect.buffer_bytes")]
    BufferFull { bound: usize },
    #[error("gave up reconnecting: no node answered for {waited:?} (last: {last})")]
    GaveUp { waited: Duration, last: String },
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
    #[error(
        "node {node} did not answer within {timeout:?}: the way to it may have changed; ask again"
    )]
    NoAnswer { node: String, timeout: Duration },
}

/// A connection to a node of the cluster, kept up across node failures:
/// see [`ClientOptions::reconnect`] and [`Client::connection_events`].
pub struct Client {
    shared: Arc<Shared>,
    requests: mpsc::UnboundedSender<ClientRequest>,
    publishes: Arc<PublishBuffer>,
    pending: Arc<Pending>,
    /// Numbers requests, subscriptions and flushes alike, so a reply's
    /// number is never ambiguous.
    next_number: AtomicU64,
    /// This client's publisher id, random and kept across reconnects, so
    /// an event's id is the same however often it is sent.
    publisher: u64,
    next_seq: AtomicU64,
    /// Bounds the at-least-once events awaiting confirmation.
    unconfirmed: Arc<Semaphore>,
}

impl Client {
    /// Connects to one of the nodes `options` names, or to one found over
    /// mDNS, retrying until the connect timeout while none answers; from
    /// then on the client keeps itself connected (see [`Reconnect`]).
    pub async fn connect(options: ClientOptions) -> Result<Client, ClientError> {
        let reconnect = options.reconnect;
        let dialer = Dialer::new(options)?;
        let first = dialer.first().await?;
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let (ended, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            pending: Arc::new(Pending::new(reconnect.retain_bytes)),
            publishes: PublishBuffer::new(reconnect.buffer_bytes),
            at_least_once_order: tokio::sync::Mutex::new(()),
            link: std::sync::Mutex::new(Link {
                node: first.node.clone(),
                down: None,
            }),
            publish_anywhere: AtomicBool::new(false),
            events: broadcast::channel(64).0,
            ended,
            stop: tokio::sync::Notify::new(),
            dialer,
            reconnect,
        });
        let live = supervisor::start(shared.clone(), requests_rx, first);
        live.await;
        Ok(Client {
            requests,
            publishes: shared.publishes.clone(),
            pending: shared.pending.clone(),
            shared,
            next_number: AtomicU64::new(1),
            publisher: rand::random(),
            next_seq: AtomicU64::new(1),
            unconfirmed: Arc::new(Semaphore::new(MAX_UNCONFIRMED)),
        })
    }

    fn node(&self) -> Arc<NodeLink> {
        self.shared.node()
    }

    /// The id of the node this client is connected to (or was, while it
    /// reconnects).
    pub fn node_id(&self) -> NodeId {
        self.node().id
    }

    pub fn node_name(&self) -> String {
        self.node().name.clone()
    }

    /// The user name in this client's certificate; `None` in insecure mode.
    pub fn user(&self) -> Option<String> {
        self.node().user.clone()
    }

    /// What the node lets this client publish and subscribe to.
    pub fn grant(&self) -> Grant {
        self.node().grant.clone()
    }

    /// The address of the node this client is connected to.
    pub fn node_addr(&self) -> SocketAddr {
        self.node().connection.remote_address()
    }

    /// The node as people know it: name, short id and address.
    pub fn describe_node(&self) -> String {
        self.node().describe()
    }

    /// Whether the client is connected now (not reconnecting, not closed).
    pub fn is_connected(&self) -> bool {
        self.shared.ended.borrow().is_none() && self.shared.lock_link().down.is_none()
    }

    /// Changes of the connection from now on: lost, restored, closed.
    pub fn connection_events(&self) -> broadcast::Receiver<ConnectionEvent> {
        self.shared.events.subscribe()
    }

    /// Why the client closed for good, once it has; `None` while it is
    /// connected or reconnecting.
    pub fn close_reason(&self) -> Option<ClientError> {
        self.shared.ended.borrow().as_ref().map(|e| e.error())
    }

    /// Waits until the client has closed for good, and says why.
    pub async fn closed(&self) -> ClientError {
        let mut ended = self.shared.ended.subscribe();
        let error = match ended.wait_for(Option::is_some).await {
            Ok(ended) => ended.as_ref().map(|e| e.error()),
            Err(_) => None,
        };
        error.unwrap_or_else(|| self.gone())
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
        self.pending
            .add_subscription(sub, sender, pattern, group.clone())
            .map_err(|_| self.gone())?;
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
                self.pending.remove_subscription(sub);
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
        self.send(&PublishFrame::Event(event), Offline::Keep)
            .await?;
        Ok(id)
    }

    /// Publishes `event` so that it survives failures: the returned
    /// [`Confirmation`] resolves once the node has stored it on disk (or
    /// refused it, e.g. when a durable subscription is at its retention
    /// limit). Waits only when many events are unconfirmed. If the
    /// connection is lost first, the event is sent again after the
    /// reconnect (to whichever node), under the same id.
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
        let _in_order = self.shared.at_least_once_order.lock().await;
        let event = self.event(topic, headers, payload)?;
        let id = event.id;
        let rx = self
            .pending
            .confirmation(event.clone(), permit)
            .map_err(|_| self.gone())?;
        // Disconnected, it waits with the unconfirmed ones for the next
        // connection.
        self.send(&PublishFrame::AtLeastOnce(event), Offline::Skip)
            .await?;
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
        let spec = DurableSpec {
            name: name.to_string(),
            pattern: pattern.to_string(),
            limits: options.limits,
            ack_wait: options.ack_wait,
        };
        self.pending
            .add_durable(sub, events_tx, spec, options.handled)
            .map_err(|_| self.gone())?;
        let request = ClientRequest::SubscribeDurable {
            sub,
            name: name.to_string(),
            pattern: pattern.to_string(),
            limits: options.limits,
            ack_wait_ms: ack_wait_ms(options.ack_wait),
        };
        match self.call(sub, request).await {
            Ok(ClientReply::DurableAttached { first, backlog, .. }) => Ok(DurableSubscription {
                acker: DurableAcker {
                    sub,
                    requests: self.requests.clone(),
                    pending: self.pending.clone(),
                },
                next: first.max(options.handled + 1),
                backlog,
                events: events_rx,
            }),
            Ok(other) => Err(unexpected(other)),
            Err(e) => {
                self.pending.remove_durable(sub);
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
        let rx = self.pending.flush(token).map_err(|_| self.gone())?;
        self.send(&PublishFrame::Flush(token), Offline::Skip)
            .await?;
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

    /// The status of `node`, anywhere in the tree, asked through this
    /// client's node; fails with `UnknownNode` when the tree holds none.
    pub async fn status_of(&self, node: NodeId) -> Result<NodeStatus, ClientError> {
        match self.ask(node, Question::Status).await? {
            ClientReply::Status { status, .. } => Ok(*status),
            other => Err(unexpected(other)),
        }
    }

    /// The subtree of `node`, anywhere in the tree (the whole tree when it
    /// is the root), asked through this client's node.
    pub async fn tree_of(&self, node: NodeId) -> Result<Vec<DirectoryEntry>, ClientError> {
        match self.ask(node, Question::Tree).await? {
            ClientReply::Tree { nodes, .. } => Ok(nodes),
            other => Err(unexpected(other)),
        }
    }

    async fn ask(&self, node: NodeId, question: Question) -> Result<ClientReply, ClientError> {
        let request = self.number();
        let ask = ClientRequest::Ask {
            request,
            node,
            question,
        };
        // A question lost with a link on the way gets no answer.
        match tokio::time::timeout(ASK_TIMEOUT, self.call(request, ask)).await {
            Ok(answered) => answered,
            Err(_) => {
                self.pending.forget_reply(request);
                Err(ClientError::NoAnswer {
                    node: node.short(),
                    timeout: ASK_TIMEOUT,
                })
            }
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
        self.send(&PublishFrame::Directed { event, to }, Offline::Keep)
            .await?;
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

    /// Flushes, then closes the connection for good: what is called on the
    /// client afterwards fails.
    pub async fn close(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.flush()).await;
        self.shared.stop.notify_one();
        self.node()
            .connection
            .close(ErrorCode::Closed.varint(), ErrorCode::Closed.reason());
        self.shared.dialer.wait_idle(Duration::from_secs(1)).await;
    }

    async fn call(&self, number: u64, request: ClientRequest) -> Result<ClientReply, ClientError> {
        let rx = self.pending.reply_to(number).map_err(|_| self.gone())?;
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
        if self.shared.publish_anywhere.load(Ordering::Relaxed) {
            return Ok(());
        }
        let node = self.node();
        if node.grant.may_publish(topic) {
            return Ok(());
        }
        let user = node.user.as_deref().unwrap_or("anonymous");
        Err(ClientError::PermissionDenied(node.grant.denial(
            user,
            Operation::Publish,
            topic.as_str(),
        )))
    }

    fn number(&self) -> u64 {
        self.next_number.fetch_add(1, Ordering::Relaxed)
    }

    /// Queues `frame` on the publish stream; `offline` says whether it
    /// waits for the next connection while disconnected.
    async fn send(&self, frame: &PublishFrame, offline: Offline) -> Result<(), ClientError> {
        match self.publishes.send(frame, offline).await {
            Ok(_) => Ok(()),
            Err(Refused::Full { bound }) => Err(ClientError::BufferFull { bound }),
            Err(Refused::Closed) => Err(self.gone()),
        }
    }

    fn gone(&self) -> ClientError {
        self.shared.gone()
    }
}

impl Drop for Client {
    /// Stops reconnecting, and ends the publish stream once what is queued
    /// on it is written.
    fn drop(&mut self) {
        self.shared.stop.notify_one();
    }
}

fn list_addrs(addrs: &[SocketAddr]) -> String {
    let addrs: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    addrs.join(", ")
}

fn unexpected(reply: ClientReply) -> ClientError {
    ClientError::UnexpectedReply(format!("{reply:?}"))
}
