//! Every message of every stream. Each enum is the set of messages one kind
//! of stream carries; its variant order is the message kind on the wire, so
//! only ever append variants.

use std::fmt;
use std::net::SocketAddr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::frame::Message;
use crate::identity::NodeId;
use crate::topic::{Pattern, Topic};

/// Identifies an event across the whole overlay: the publisher that made it
/// and that publisher's sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EventId {
    /// Chosen at random by each publishing client connection.
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
    pub payload: Bytes,
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
}

/// The control stream between two nodes (bidirectional, opened by the dialer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeMessage {
    Hello(NodeHello),
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
}

impl Message for NodeMessage {
    const KINDS: u32 = 12;
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
}

impl Message for NodeEventFrame {
    const KINDS: u32 = 2;
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
}

impl Message for ClientRequest {
    const KINDS: u32 = 6;
}

/// Why a client request was refused; the connection stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestError {
    InvalidPattern,
    InvalidTopic,
    InvalidGroup,
    DuplicateSubscription,
    UnknownSubscription,
}

/// The client's control stream, node to client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientReply {
    Welcome {
        version: u32,
        node: NodeId,
        name: String,
        cluster: String,
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
}

impl Message for ClientReply {
    const KINDS: u32 = 7;
}

/// A client's publish stream, client to node (bidirectional, opened by the
/// client after hello). A flush is answered once every event before it has
/// been routed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PublishFrame {
    Event(Event),
    Flush(u64),
    /// An event for the subscribers of one node only.
    Directed {
        event: Event,
        to: Destination,
    },
}

impl Message for PublishFrame {
    const KINDS: u32 = 3;
}

/// A client's publish stream, node to client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PublishReply {
    Flushed(u64),
}

impl Message for PublishReply {
    const KINDS: u32 = 1;
}

/// The delivery stream, node to client (unidirectional, opened by the node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Delivery {
    Event { sub: u64, event: Event },
}

impl Message for Delivery {
    const KINDS: u32 = 1;
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
    pub counters: Counters,
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
        }
    }

    #[test]
    fn kinds_match_variant_counts() {
        assert_last_kind(NodeMessage::Pull);
        assert_last_kind(NodeEventFrame::Directed {
            event: sample_event(),
            to: Destination::Named("n1".into()),
        });
        assert_last_kind(ClientRequest::Tree { request: 1 });
        assert_last_kind(ClientReply::Tree {
            request: 1,
            nodes: vec![DirectoryEntry {
                id: NodeId::from_bytes([2; 32]),
                name: "n2".into(),
                parent: None,
                rtt_us: 120,
                max_children: 8,
                addrs: vec!["127.0.0.1:7700".parse().unwrap()],
            }],
        });
        assert_last_kind(PublishFrame::Directed {
            event: sample_event(),
            to: Destination::Node(NodeId::from_bytes([4; 32])),
        });
        assert_last_kind(PublishReply::Flushed(9));
        assert_last_kind(Delivery::Event {
            sub: 1,
            event: sample_event(),
        });
    }
}
