//! Every message of every stream. Each enum is the set of messages one kind
//! of stream carries; its variant order is the message kind on the wire, so
//! only ever append variants.

use std::fmt;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::frame::Message;
use crate::identity::NodeId;
use crate::topic::{Pattern, Topic};
use crate::trust::Grant;

/// Identifies an event across the whole overlay: the publisher that made it
/// and that publisher's sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EventId {
    /// Chosen at random by each client, kept across its reconnects.
    pub publisher: u64,
    /// Counts up from 1 per publisher, so order and gaps are visible.
    pub seq: u64,
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}-{}", self.publisher, self.seq)
    }
}

/// One published event, as it travels from publisher to subscribers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub id: EventId,
    /// The node where the event entered the overlay; set by that node.
    pub origin: NodeId,
    pub topic: Topic,
    /// Application metadata, carried untouched.
    pub headers: Vec<(String, String)>,
    /// Received by a node, a view of the frame it came in (see
    /// [`Event::compact`]); the client library hands out copies.
    #[serde(deserialize_with = "super::shared::bytes")]
    pub payload: Bytes,
    /// Where the answer to this event goes, when it is a request. Not part
    /// of the event's encoding: the frames that carry requests carry it
    /// beside the event ([`NodeEventFrame::Request`], [`Delivery::Request`]).
    /// Boxed, as most events have none and events move between stages.
    #[serde(skip)]
    pub reply: Option<Box<ReplyTo>>,
}

/// The address a request's answer goes to: straight back along the tree to
/// the requester's node, then to the client connection holding `inbox`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReplyTo {
    /// The node the requester is connected to.
    pub node: NodeId,
    /// Drawn at random by that node for the requester's connection, so only
    /// who received a request can answer it.
    pub inbox: u64,
    /// The requester's number for the request.
    pub request: u64,
}

impl Event {
    /// Copies the payload out of the buffer it may share with other events
    /// (a receive buffer, or a block of [`compact_events`]), so that
    /// keeping this event for long keeps only its own bytes.
    pub fn compact(&mut self) {
        compact_events(std::slice::from_mut(self), |event| Some(event));
    }
}

/// Events copied by [`compact_events`] share blocks of about this size:
/// allocations per block (the block, and its shared count) instead of per
/// event, and an event kept for long keeps at most one block, not a whole
/// receive buffer.
const COMPACT_BLOCK: usize = 4 << 10;

/// Compacts the event of each item that has one (see [`Event::compact`]),
/// copying neighbours' payloads into shared blocks of about
/// [`COMPACT_BLOCK`] bytes.
pub fn compact_events<T>(items: &mut [T], mut event_of: impl FnMut(&mut T) -> Option<&mut Event>) {
    let mut rest = items;
    while !rest.is_empty() {
        // A block: at least one event, then as many as fit.
        let (mut end, mut size) = (0, 0);
        while let Some(item) = rest.get_mut(end) {
            let len = event_of(item).map_or(0, |event| event.payload.len());
            if size > 0 && size + len > COMPACT_BLOCK {
                break;
            }
            size += len;
            end += 1;
        }
        let (block_items, after) = rest.split_at_mut(end);
        let mut block = BytesMut::with_capacity(size);
        for event in block_items.iter_mut().filter_map(&mut event_of) {
            block.extend_from_slice(&event.payload);
        }
        let mut block = block.freeze();
        for event in block_items.iter_mut().filter_map(&mut event_of) {
            event.payload = block.split_to(event.payload.len());
        }
        rest = after;
    }
}

/// A queue group is named per pattern: members of `workers` on `jobs.>` and
/// on `jobs.eu` are two groups.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GroupKey {
    pub pattern: Pattern,
    pub group: String,
}

/// Sent first by both ends of a node connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHello {
    pub version: u32,
    pub id: NodeId,
    pub name: String,
    pub cluster: String,
}

/// How much interest in one pattern (or one queue group) lies behind the
/// sender, on its side of the edge. Replaces any earlier count for the same
/// key; 0 withdraws it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterestUpdate {
    pub pattern: Pattern,
    /// `None` for plain subscriptions, whose count is only ever 0 or 1.
    pub group: Option<String>,
    pub count: u32,
    /// The interest comes back after a repair (a node re-joined after its
    /// parent failed): a receiver whose edge had none sends the matching
    /// events of its replay window ([`crate::overlay::ReplayWindow`]).
    pub repair: bool,
}

/// The control stream between two nodes (bidirectional, opened by the
/// dialer): a hello, then messages for one of the node's two cores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeMessage {
    Hello(NodeHello),
    /// For the overlay core: the tree, interest and the directory.
    Overlay(OverlayMessage),
    /// For the delivery core: durable subscriptions and custody.
    Delivery(DeliveryMessage),
}

impl Message for NodeMessage {
    const KINDS: u32 = 3;
}

/// What two nodes' overlay cores tell each other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OverlayMessage {
    /// The sender's ancestors, parent first, the root last; empty when the
    /// sender is a root. Sent on link-up, and to children on every change.
    Position(Vec<PeerAddrs>),
    /// The sender asks to become the receiver's child.
    Join,
    /// The receiver of a join takes the sender as its child.
    Accept,
    /// The receiver of a join is full: ask this node instead.
    Redirect(PeerAddrs),
    /// The sender is no longer the receiver's child.
    Leave,
    /// From a parent: join this node instead of me, subtree and all.
    Move(PeerAddrs),
    Interest(InterestUpdate),
    /// From a child: changes to the set of nodes in its subtree.
    Directory(DirectoryUpdate),
    /// Nodes with ids smaller than the receiver's root, passed up so the
    /// root can join them and two trees become one.
    Roots(Vec<PeerAddrs>),
    /// From a child: the shape of its subtree, which keeps the tree
    /// shallow. Joins are sent towards the shallowest free slot, and a node
    /// with a free slot pulls nodes up from its tallest subtree.
    Shape(SubtreeShape),
    /// From a parent that has a free slot: send one of your children (with
    /// its subtree) up to me.
    Pull,
    /// Up the tree from `node`, at `depth`: it would rise with its subtree
    /// if it could join a node at depth `depth - 2` or less. The first
    /// ancestor that knows such a slot answers with `ClimbTo`.
    Climb {
        node: NodeId,
        depth: u32,
    },
    /// Down the tree towards `node`: join `slot`, which is shallower than
    /// your parent. Empty `addrs` mean the slot is the sender of this
    /// `ClimbTo`, one of `node`'s ancestors, whose address it knows.
    ClimbTo {
        node: NodeId,
        slot: PeerAddrs,
    },
    /// Up the new path of `node`, which a new parent just accepted while
    /// it keeps its old parent `old_parent`: after the interest `node`
    /// announced on it. The first node that has `old_parent` in its
    /// subtree (or is it) is where the old and new paths meet, and answers
    /// with `Settled`: events from anywhere now take the new path too.
    Settle {
        node: NodeId,
        old_parent: NodeId,
        new_parent: NodeId,
    },
    /// Down the tree towards `node`: your new path (to `new_parent`, as
    /// `Settle` said) carries your subtree's interest to where it meets the
    /// old one; leave the old parent. A late answer to an earlier move
    /// names another new parent and is ignored.
    Settled {
        node: NodeId,
        new_parent: NodeId,
    },
}

/// What two nodes' delivery cores tell each other on the control stream
/// (the custody frames themselves travel on event streams).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryMessage {
    /// Durable subscriptions the sender knows of: all of them on link-up,
    /// then each change. Every node keeps the whole set.
    Durables(Vec<DurableRecord>),
    /// The sender has committed the custody frames with these tokens; the
    /// receiver may forget them.
    CustodyAck(Vec<u64>),
    /// Between a durable subscription's home and a node whose client
    /// attached to it there, relayed along the tree. Events travel as
    /// [`NodeEventFrame::Remote`] instead.
    Remote(Remote),
}

/// A message between a durable subscription's home and the node where its
/// client attached, relayed hop by hop along the tree towards `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remote {
    pub to: NodeId,
    pub from: NodeId,
    /// Names the attachment: drawn by the attaching node.
    pub attach: u64,
    pub message: RemoteMessage,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteMessage {
    /// To the home: attach to durable `name`, delivering from after
    /// `acked`. Sent again when the path may have changed: the home then
    /// sends again what was not acknowledged.
    Attach {
        name: String,
        pattern: Pattern,
        acked: u64,
        ack_wait_ms: u32,
    },
    /// To the attaching node: attached, with what the queue holds.
    Attached { first: u64, backlog: u64 },
    /// To the attaching node: not attached, and why.
    Refused {
        error: RequestError,
        message: String,
    },
    /// To the attaching node: events by queue position.
    Events(Vec<(u64, Event)>),
    /// To the home: the client handled everything up to `position`. Sent
    /// every 2 s even without progress, so the home knows it is there.
    Ack { position: u64 },
    /// To the home: the client detached.
    Detach,
}

/// Limits on what a durable subscription holds while its client is slow or
/// away. Reaching one refuses new at-least-once events for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionLimits {
    pub max_events: u64,
    pub max_bytes: u64,
    /// Oldest event it may hold, in milliseconds; 0 means no age limit.
    pub max_age_ms: u64,
}

impl Default for RetentionLimits {
    fn default() -> Self {
        RetentionLimits {
            max_events: 1_000_000,
            max_bytes: 1 << 30,
            max_age_ms: 0,
        }
    }
}

/// A durable subscription, as every node of the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurableRecord {
    pub name: String,
    pub pattern: Pattern,
    /// The node that stores its events and serves its client.
    pub home: NodeId,
    /// Raised by the home on each change; the higher version wins.
    pub version: u64,
    pub limits: RetentionLimits,
    /// Its queue is at a retention limit: publishers are refused.
    pub full: bool,
}

impl DurableRecord {
    /// Whether `self` should replace `other` when both describe one name.
    pub fn supersedes(&self, other: &DurableRecord) -> bool {
        (self.version, self.home) > (other.version, other.home)
    }
}

/// One durable subscription an at-least-once event is for, with the
/// event's number in the sequence its origin node keeps for that
/// subscription. The number lets the home drop duplicates and restore order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DurableTarget {
    pub durable: String,
    pub seq: u64,
}

/// What a parent needs to know of a child's subtree to balance the tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubtreeShape {
    /// Levels below the child to the nearest free slot: 0 when the child
    /// has fewer children than it accepts.
    pub room: u32,
    /// Levels below the child to its deepest descendant: 0 for a leaf.
    pub height: u32,
}

/// Where one node can be reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAddrs {
    pub id: NodeId,
    pub addrs: Vec<SocketAddr>,
}

/// One node as the directory knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryEntry {
    pub id: NodeId,
    pub name: String,
    pub parent: Option<NodeId>,
    /// Round-trip time of the link to its parent; 0 until measured.
    pub rtt_us: u64,
    /// Most children it accepts, so ancestors can place joiners in its
    /// free slots.
    pub max_children: u32,
    /// Where it can be reached, as its parent sees it; filled in by the
    /// parent, empty in a node's own report.
    pub addrs: Vec<SocketAddr>,
    /// Grows each time the node changes parents, and starts from its start
    /// time in ms × 2¹⁰ (under 2⁵³ until the year 2248, so a JavaScript
    /// number holds it), so a report with a smaller epoch than one already
    /// filed is stale: a node moved away from a subtree that still listed
    /// it does not come back from that subtree's late report.
    pub epoch: u64,
}

/// Additions, changes and removals in a subtree's directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryUpdate {
    pub upsert: Vec<DirectoryEntry>,
    pub remove: Vec<NodeId>,
}

/// The node a directed event is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Destination {
    Node(NodeId),
    /// A node's `--name`; the first match on the way wins.
    Named(String),
}

/// An event stream between two nodes (unidirectional, one per direction).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeEventFrame {
    /// `groups` lists the queue groups whose one chosen member lies on the
    /// receiver's side; the receiver picks among them.
    Event { event: Event, groups: Vec<GroupKey> },
    /// An event for one node, travelling the tree path to it.
    Directed { event: Event, to: Destination },
    /// An at-least-once event for durable subscriptions. The receiver
    /// takes custody: it commits the event, then acknowledges `token` with
    /// [`DeliveryMessage::CustodyAck`]. `epoch` is the sequence number
    /// of the first at-least-once event the publisher sent on the
    /// connection that brought this one in. With it the home drops, by
    /// publisher, what another connection already brought.
    Custody {
        token: u64,
        event: Event,
        epoch: u64,
        targets: Vec<DurableTarget>,
    },
    /// A request: routed as [`NodeEventFrame::Event`] is, with the address
    /// its answers go to.
    Request {
        event: Event,
        groups: Vec<GroupKey>,
        reply: ReplyTo,
    },
    /// An answer to a request, travelling the tree path to `to.node`.
    Reply { event: Event, to: ReplyTo },
    /// Events of a durable subscription for a client attached at another
    /// node than its home ([`RemoteMessage::Events`]).
    Remote(Remote),
    /// A client of node `from` asks node `to` about itself
    /// ([`ClientRequest::Ask`]); travels the tree path to `to`.
    Ask {
        to: NodeId,
        from: NodeId,
        /// Names the question at `from`.
        ask: u64,
        question: Question,
    },
    /// The answer to ask `ask`, travelling the tree path back to `to`.
    Answer {
        to: NodeId,
        ask: u64,
        answer: Answer,
    },
    /// A copy of an event (or request, with `reply`) whose plain
    /// subscribers on the receiver's side already have it: it arrived twice
    /// while a node changed parents. Only for the queue groups listed.
    Assigned {
        event: Event,
        groups: Vec<GroupKey>,
        reply: Option<ReplyTo>,
    },
    /// An event sent again from a replay window, to interest that came
    /// back after a repair (see [`InterestUpdate::repair`]), published
    /// `age_ms` milliseconds before it was sent. For plain subscriptions
    /// that began before it was published; a receiver that has seen it
    /// drops it.
    Replayed { event: Event, age_ms: u32 },
}

impl Message for NodeEventFrame {
    const KINDS: u32 = 10;

    fn decode_hot(body: &[u8], out: &mut Vec<Self>) -> bool {
        super::hot::node_event(body, out)
    }
}

/// What a client may ask of any node of the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Question {
    /// Its status, as [`ClientRequest::Status`] asks it of the client's node.
    Status,
    /// Its subtree, as [`ClientRequest::Tree`]: the whole tree at the root.
    Tree,
}

/// A node's answer to a [`Question`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    Status(Box<NodeStatus>),
    Tree(Vec<DirectoryEntry>),
    /// From the node where the way to the one asked ends: the tree holds
    /// no such node.
    Unknown,
}

/// The client's control stream, client to node (bidirectional, opened by the
/// client, hello first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    Hello {
        version: u32,
        /// Shown in logs and status; free text.
        name: String,
    },
    /// `pattern` is validated by the node, which answers `Subscribed` or `Error`.
    Subscribe {
        sub: u64,
        pattern: String,
        group: Option<String>,
    },
    Unsubscribe {
        sub: u64,
    },
    Status {
        request: u64,
    },
    /// Answers once a subscription matching `topic` exists anywhere in the
    /// overlay, or once the timeout passes, whichever is first.
    WaitInterest {
        request: u64,
        topic: String,
        timeout_ms: u32,
    },
    /// The node's subtree; at the root, the whole tree.
    Tree {
        request: u64,
    },
    /// Creates durable subscription `name` on this node, or attaches to it
    /// again. Answered with `DurableAttached` or `Error`.
    SubscribeDurable {
        sub: u64,
        name: String,
        pattern: String,
        limits: RetentionLimits,
        /// How long a delivered event may stay unacknowledged before it is
        /// sent again.
        ack_wait_ms: u32,
    },
    /// The client has handled every event of durable `sub` up to and
    /// including `position`.
    AckDurable {
        sub: u64,
        position: u64,
    },
    /// A hello from a client that shows no certificate: `token` (from
    /// `treescale certs issue token`) names its user instead.
    HelloWithToken {
        version: u32,
        name: String,
        token: String,
    },
    /// Asks `node`, anywhere in the tree, a question; the answer comes as
    /// `Status` or `Tree`, as if asked of the client's own node, or as
    /// `Error` with `UnknownNode`.
    Ask {
        request: u64,
        node: NodeId,
        question: Question,
    },
}

impl ClientRequest {
    /// Whether this is a hello, of either kind.
    pub fn is_hello(&self) -> bool {
        matches!(
            self,
            ClientRequest::Hello { .. } | ClientRequest::HelloWithToken { .. }
        )
    }
}

impl Message for ClientRequest {
    const KINDS: u32 = 10;
}

/// Why a client request was refused; the connection stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestError {
    InvalidPattern,
    InvalidTopic,
    InvalidGroup,
    DuplicateSubscription,
    UnknownSubscription,
    InvalidDurableName,
    /// Another client is attached to this durable subscription.
    DurableInUse,
    /// The durable subscription exists with another pattern.
    DurableMismatch,
    /// The durable subscription's home is another node.
    DurableElsewhere,
    /// The node's store could not commit.
    Store,
    /// The client holds as many subscriptions as the node allows.
    TooManySubscriptions,
    /// The client's permissions do not allow subscribing to the pattern.
    PermissionDenied,
    /// The tree holds no node with the id asked about.
    UnknownNode,
    /// The client has as many questions to other nodes unanswered as a
    /// node allows.
    TooManyQuestions,
}

/// The client's control stream, node to client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientReply {
    Welcome {
        version: u32,
        node: NodeId,
        name: String,
        cluster: String,
        /// The name in the client's certificate; `None` in insecure mode.
        user: Option<String>,
        /// What the client may publish and subscribe to.
        grant: Grant,
    },
    Subscribed {
        sub: u64,
    },
    Unsubscribed {
        sub: u64,
    },
    Status {
        request: u64,
        status: Box<NodeStatus>,
    },
    Interest {
        request: u64,
        present: bool,
    },
    /// `request` is the `sub` or `request` number of what was refused.
    Error {
        request: u64,
        error: RequestError,
        message: String,
    },
    Tree {
        request: u64,
        nodes: Vec<DirectoryEntry>,
    },
    /// The durable subscription is attached; delivery starts at `first`.
    DurableAttached {
        sub: u64,
        /// Position of the oldest event it holds, or of the next one.
        first: u64,
        /// Events it holds now.
        backlog: u64,
    },
}

impl Message for ClientReply {
    const KINDS: u32 = 8;
}

/// A client's publish stream, client to node (bidirectional, opened by the
/// client after hello). A flush is answered once every event before it has
/// been routed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PublishFrame {
    Event(Published),
    Flush(u64),
    /// An event for the subscribers of one node only.
    Directed {
        event: Published,
        to: Destination,
    },
    /// An at-least-once event: the node answers `Acked` once it has
    /// committed the event, or `Refused`.
    AtLeastOnce(Published),
    /// A request, routed as an event is; its subscribers' answers come back
    /// as [`Delivery::Reply`] with this `request` number. When no
    /// subscription anywhere matches, the node answers `RequestFailed`.
    Request {
        event: Published,
        request: u64,
    },
    /// An answer to the request that carried `to`.
    Reply {
        event: Published,
        to: ReplyTo,
    },
}

/// An event as a client publishes it: without its origin, which is the
/// node it is published to (32 bytes less per event on the wire).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub id: EventId,
    pub topic: Topic,
    pub headers: Vec<(String, String)>,
    /// A view of the frame it came in, as [`Event::payload`] is.
    #[serde(deserialize_with = "super::shared::bytes")]
    pub payload: Bytes,
}

impl Published {
    /// The event, entering the overlay at `origin`.
    pub fn at(self, origin: NodeId) -> Event {
        Event {
            id: self.id,
            origin,
            topic: self.topic,
            headers: self.headers,
            payload: self.payload,
            reply: None,
        }
    }
}

impl Message for PublishFrame {
    const KINDS: u32 = 6;

    fn decode_hot(body: &[u8], out: &mut Vec<Self>) -> bool {
        super::hot::publish_event(body, out)
    }
}

/// A client's publish stream, node to client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PublishReply {
    Flushed(u64),
    /// Every at-least-once event of this stream with a sequence number up
    /// to `up_to`, except those refused, is committed.
    Acked {
        up_to: u64,
    },
    /// This at-least-once event was not taken; it was not stored anywhere.
    Refused {
        seq: u64,
        reason: PublishRefusal,
        message: String,
    },
    /// Request `request` went nowhere: no answer will come.
    RequestFailed {
        request: u64,
        reason: RequestFailure,
        message: String,
    },
    /// Every at-least-once event of this stream up to `up_to` is in the
    /// custody of the next node on its way (or queued here): this node's
    /// loss no longer loses it, and the client may forget it. Follows the
    /// `Acked` of the same events.
    Released {
        up_to: u64,
    },
}

impl Message for PublishReply {
    const KINDS: u32 = 5;
}

/// Why a request went nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestFailure {
    /// No subscription anywhere in the overlay matches its topic.
    NoResponders,
    /// The client's permissions do not allow publishing to its topic.
    PermissionDenied,
}

/// Why a node refused an at-least-once event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PublishRefusal {
    /// A durable subscription it is for holds as much as its limits allow.
    RetentionLimit,
    /// The node's store is out of room (map or disk).
    StoreFull,
    /// The node's store failed otherwise.
    StoreError,
    /// The client's permissions do not allow publishing to the topic.
    PermissionDenied,
}

/// The delivery stream, node to client (unidirectional, opened by the node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Delivery {
    Event {
        sub: u64,
        event: Event,
    },
    /// An event of a durable subscription, at its place in the queue.
    /// Positions count up by one; the client acknowledges with
    /// [`ClientRequest::AckDurable`].
    Durable {
        sub: u64,
        position: u64,
        event: Event,
    },
    /// A request for subscription `sub`: an event with the address its
    /// answer goes to.
    Request {
        sub: u64,
        event: Event,
        reply: ReplyTo,
    },
    /// An answer to this client's request `request`.
    Reply {
        request: u64,
        event: Event,
    },
}

impl Message for Delivery {
    const KINDS: u32 = 4;

    fn decode_hot(body: &[u8], out: &mut Vec<Self>) -> bool {
        super::hot::delivery_event(body, out)
    }
}

/// What `treescale status` shows of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: NodeId,
    pub name: String,
    pub cluster: String,
    pub addr: String,
    pub root: NodeId,
    /// Where the root can be reached; `None` at the root itself.
    pub root_addrs: Option<Vec<SocketAddr>>,
    pub parent: Option<NodeId>,
    pub depth: u32,
    /// Nodes in this node's subtree, itself included.
    pub subtree: u32,
    pub peers: Vec<PeerStatus>,
    pub subscriptions: Vec<SubscriptionStatus>,
    pub durables: Vec<DurableStatus>,
    /// At-least-once events held for durable subscriptions homed elsewhere.
    pub outbox: u64,
    /// Of those, events whose durable subscription cannot be reached now
    /// (across a partition): they wait here for the heal.
    pub outbox_unreachable: u64,
    /// Open QUIC connections, of nodes and clients.
    pub connections: u64,
    /// Connected clients.
    pub clients: u64,
    /// Clients and links congested now (a quarter of their bound waits for
    /// them): while any is, publishers are held back.
    pub congested: u64,
    pub counters: Counters,
}

/// A durable subscription as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurableStatus {
    pub name: String,
    pub pattern: Pattern,
    pub home: NodeId,
    /// At a retention limit: publishers are refused.
    pub full: bool,
    /// A client is attached: on its home, here or through another node;
    /// elsewhere, a client of this node through it.
    pub attached: bool,
    /// A client of this node asked to attach, and the home has not
    /// answered yet (it may be unreachable): the client waits.
    pub waiting_for_home: bool,
    /// Events and payload bytes its queue holds; only on its home.
    pub held: Option<u64>,
    pub held_bytes: Option<u64>,
}

impl NodeStatus {
    /// Members of queue group `group` this node knows of: its own and
    /// those behind its tree edges.
    pub fn group_members(&self, group: &str) -> u32 {
        self.subscriptions
            .iter()
            .filter(|s| s.group.as_deref() == Some(group))
            .map(|s| s.local + s.edges.iter().map(|(_, n)| n).sum::<u32>())
            .sum()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub id: NodeId,
    pub name: String,
    pub addr: String,
    /// Smoothed round-trip time of the QUIC connection.
    pub rtt_us: u64,
    /// `parent`, `child` or `peer` (linked but not a tree edge: a static
    /// peer, or a join in progress).
    pub role: String,
    /// Bytes of events waiting to be written to it.
    pub queued_bytes: u64,
    /// Events dropped because it fell `--max-link-bytes` behind.
    pub events_dropped: u64,
}

/// One pattern (or queue group) this node routes, with where its interest lies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionStatus {
    pub pattern: Pattern,
    pub group: Option<String>,
    /// Subscriptions of this node's own clients.
    pub local: u32,
    /// Interest announced by each tree neighbour.
    pub edges: Vec<(NodeId, u32)>,
}

/// Running totals since the node started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub events_published: u64,
    pub events_received: u64,
    pub events_forwarded: u64,
    pub events_delivered: u64,
    /// Events dropped because a link's or client's queue was full.
    pub events_dropped: u64,
    /// Directed events for a node this tree does not hold.
    pub events_unroutable: u64,
    /// Events added to the queues of durable subscriptions homed here.
    pub events_stored: u64,
    /// At-least-once events refused to publishers (retention limit, store
    /// full).
    pub events_refused: u64,
    /// Durable deliveries sent again because their ack did not come in time.
    pub events_redelivered: u64,
    /// Publish operations and subscriptions refused by a client's
    /// permissions.
    pub operations_denied: u64,
    /// Times a client's publish stream was not read further because it had
    /// `--max-pending-publishes` at-least-once events awaiting commit.
    pub publishes_throttled: u64,
    /// Requests answered at once with no responders: nothing matched.
    pub requests_without_responders: u64,
    /// Answers to requests that reached this node after their requester's
    /// connection closed (or with an inbox it never had).
    pub replies_undeliverable: u64,
    /// Events sent again from the replay window, to interest that came
    /// back after a repair.
    pub events_replayed: u64,
    /// Replayed events that were new here: gaps a repair had left.
    pub replays_filled: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame;

    /// The last variant's discriminant must be `KINDS - 1`, or a valid
    /// message would be refused as unknown.
    fn assert_last_kind<T: Message + PartialEq + std::fmt::Debug>(last: T) {
        let bytes = postcard::to_allocvec(&last).unwrap();
        assert_eq!(bytes[0] as u32, T::KINDS - 1);
        let mut buf = bytes::BytesMut::new();
        frame::encode(&last, &mut buf);
        let body = frame::split_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(frame::decode::<T>(&body).unwrap(), last);
    }

    fn sample_event() -> Event {
        Event {
            id: EventId {
                publisher: 7,
                seq: 1,
            },
            origin: NodeId::from_bytes([3; 32]),
            topic: Topic::new("orders.eu").unwrap(),
            headers: vec![("k".into(), "v".into())],
            payload: Bytes::from_static(b"payload"),
            reply: None,
        }
    }

    #[test]
    fn compacted_events_keep_their_bytes_and_share_blocks() {
        let frame = Bytes::from(vec![b'x'; 64 << 10]);
        let event_of_size = |size: usize| Event {
            payload: frame.slice(..size),
            ..sample_event()
        };
        // Small events share blocks; one larger than a block has its own.
        let sizes = [100, 100, COMPACT_BLOCK * 2, 100, 100];
        let mut items: Vec<Option<Event>> = sizes.iter().map(|&n| Some(event_of_size(n))).collect();
        items.insert(1, None);
        compact_events(&mut items, |item| item.as_mut());
        let events: Vec<&Event> = items.iter().flatten().collect();
        for (event, &size) in events.iter().zip(&sizes) {
            assert_eq!(event.payload, frame.slice(..size));
            assert_eq!(event.topic.as_str(), "orders.eu");
            assert!(
                !frame.as_ptr_range().contains(&event.payload.as_ptr()),
                "a copy, not a view"
            );
        }
        let follows = |a: &Event, b: &Event| a.payload.as_ptr_range().end == b.payload.as_ptr();
        assert!(follows(events[0], events[1]), "neighbours share a block");
        assert!(
            !follows(events[1], events[2]),
            "a block ends before it would overflow"
        );
        assert!(follows(events[3], events[4]));
        // Small events fill a block up to its size, not beyond.
        let mut small: Vec<Event> = (0..41).map(|_| event_of_size(100)).collect();
        compact_events(&mut small, |event| Some(event));
        let in_first_block = small
            .windows(2)
            .take_while(|w| follows(&w[0], &w[1]))
            .count()
            + 1;
        assert_eq!(in_first_block, COMPACT_BLOCK / 100);
        // Alone, an event is compacted the same way.
        let mut alone = event_of_size(10);
        alone.compact();
        assert_eq!(alone.payload, frame.slice(..10));
        assert!(!frame.as_ptr_range().contains(&alone.payload.as_ptr()));
    }

    fn sample_published() -> Published {
        let Event {
            id,
            topic,
            headers,
            payload,
            ..
        } = sample_event();
        Published {
            id,
            topic,
            headers,
            payload,
        }
    }

    #[test]
    fn a_published_event_is_the_event_without_its_origin() {
        let event = sample_event();
        assert_eq!(sample_published().at(event.origin), event);
        let published = postcard::to_allocvec(&sample_published()).unwrap();
        let whole = postcard::to_allocvec(&event).unwrap();
        assert_eq!(whole.len() - published.len(), 33, "a length and 32 bytes");
    }

    #[test]
    fn kinds_match_variant_counts() {
        assert_last_kind(NodeMessage::Delivery(DeliveryMessage::CustodyAck(vec![
            1, 2,
        ])));
        let to = ReplyTo {
            node: NodeId::from_bytes([5; 32]),
            inbox: 6,
            request: 7,
        };
        assert_last_kind(NodeEventFrame::Replayed {
            event: sample_event(),
            age_ms: 1500,
        });
        assert_last_kind(ClientRequest::Ask {
            request: 1,
            node: NodeId::from_bytes([3; 32]),
            question: Question::Tree,
        });
        assert_last_kind(ClientReply::DurableAttached {
            sub: 1,
            first: 1,
            backlog: 0,
        });
        assert_last_kind(PublishFrame::Reply {
            event: sample_published(),
            to,
        });
        assert_last_kind(PublishReply::Released { up_to: 9 });
        assert_last_kind(Delivery::Reply {
            request: 1,
            event: sample_event(),
        });
    }
}
