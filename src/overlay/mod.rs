//! The overlay core: membership, the tree, per-edge interest and the
//! directory, as a state machine with no I/O.
//!
//! It reads no socket and no clock, and its only randomness comes from the
//! seed it is given. The driver feeds it inputs through the `handle_*`
//! methods, each with the current time, then drains [`Overlay::poll_action`]
//! until it returns `None`; it arms a timer for [`Overlay::poll_timeout`]
//! and calls [`Overlay::handle_timeout`] when that fires. Events are routed
//! synchronously by [`Overlay::route`] and [`Overlay::next_hop`].
//!
//! # The tree
//!
//! The tree is heap-ordered: a node only ever takes a parent whose id is
//! smaller than its own. A cycle would need ids that decrease all the way
//! round, so the parent graph is loop-free at every instant, whatever
//! messages are in flight. The node with the smallest id in a connected
//! component is its root.
//!
//! A node joins by sending `Join` to the smallest node it knows of (usually
//! the root). A node with room (fewer than `max_children` children) accepts.
//! A full node redirects the joiner to the child with the smallest subtree
//! among those whose id is smaller than the joiner's; if it has no such
//! child, it accepts the joiner and moves one child under it. So joins sink
//! down the tree and depth stays near log_k(N). A node whose parent fails
//! re-joins at its grandparent (then the next ancestor, then the smallest
//! node it knows), taking its whole subtree along. A root that knows a
//! smaller node keeps trying to join it, which merges trees after a
//! partition heals.
//!
//! Nodes announce their root on discovery. A node that sees another tree
//! with a smaller root, through a node it could not join itself, asks that
//! node for its root's address (a probe) and passes the root up: so trees
//! whose nodes meet only on some LAN segments still become one.
#![warn(missing_docs)]

mod candidates;
mod directory;
mod interest;
mod moves;
pub mod replay;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use candidates::{Backoff, Candidates};
use directory::Directory;
pub use directory::NextHop;
use interest::InterestTable;
pub use interest::{Arrival, Hop, LocalSub, Route};
use moves::{Moving, Repeats};
pub use replay::ReplayWindow;

use crate::identity::NodeId;
use crate::topic::{Pattern, Topic};
use crate::wire::{
    Destination, DirectoryEntry, DirectoryUpdate, EventId, InterestUpdate, OverlayMessage,
    PeerAddrs, SubscriptionStatus, SubtreeShape,
};

/// Tunables of the core; the defaults suit a LAN.
#[derive(Debug, Clone)]
pub struct OverlayConfig {
    /// Most children a node accepts; the tree's degree bound is this plus one.
    pub max_children: usize,
    /// First retry delay after a failed dial or join; doubles per failure.
    pub backoff_initial: Duration,
    /// Cap of the retry delay; also how often a root retries the smaller
    /// nodes it remembers, so trees merge this soon after a partition heals.
    pub backoff_max: Duration,
    /// A join not answered within this is abandoned for another target.
    pub join_timeout: Duration,
    /// How many discovered nodes to remember: this many of the smallest
    /// ids, and as many sampled ones.
    pub max_candidates: usize,
    /// How long a node's first join waits after it first could join, so
    /// that discovery shows it more than the first node to answer (mDNS
    /// responders wait 20–120 ms at random): the join then goes to a
    /// sampled node, and a LAN that starts at once does not funnel into
    /// its first answers.
    pub first_join_after: Duration,
    /// When this run of the node started, in ms since the UNIX epoch (or
    /// any clock that grows across restarts): its directory entries
    /// supersede those of its earlier runs.
    pub started_ms: u64,
}

impl Default for OverlayConfig {
    fn default() -> Self {
        OverlayConfig {
            max_children: 8,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            join_timeout: Duration::from_secs(2),
            max_candidates: 32,
            first_join_after: Duration::from_millis(150),
            started_ms: 0,
        }
    }
}

/// What to do with a connection that passed its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewConnection {
    /// The first to its peer: it is the link.
    Link,
    /// A second one that lost the tie-break: close it; the link stays.
    CloseDuplicate,
    /// A second one that won: close the old connection. The link's state
    /// was dropped and starts again on this one.
    ReplaceOld,
}

/// Whom a dial is for: a known node, or a static address whose node is
/// unknown until the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DialTarget {
    /// A node found by discovery or named by another node.
    Node(NodeId),
    /// An address given with `--peer`.
    Static(SocketAddr),
}

/// What the core asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open a connection; report back with `handle_link_up` or `handle_dial_failed`.
    Dial {
        /// Whom the dial is for, to say in the report.
        target: DialTarget,
        /// Where to try, in order.
        addrs: Vec<SocketAddr>,
    },
    /// Send a control message on the link to `peer`.
    Send {
        /// The neighbour.
        peer: NodeId,
        /// The message.
        message: OverlayMessage,
    },
    /// Close the link to `peer`: it is no longer needed.
    Disconnect {
        /// The neighbour.
        peer: NodeId,
    },
    /// Send `peer` the events of the replay window that `pattern` matches
    /// ([`ReplayWindow::replay`]): interest in them came back over that
    /// edge after a repair, and what was published meanwhile met a dead
    /// link.
    Replay {
        /// The neighbour.
        peer: NodeId,
        /// The interest that came back.
        pattern: Pattern,
    },
}

/// The node's place in its tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The root of the tree this node is in.
    pub root: NodeId,
    /// Edges between this node and the root; 0 at the root.
    pub depth: u32,
}

/// What a linked node is to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Linked, but not a tree edge: a static peer, or a join in progress.
    Peer,
    Parent,
    Child,
    /// Accepted us while we keep our parent: a planned move under way
    /// ([`moves::Moving`]).
    NewParent,
}

#[derive(Debug)]
struct Link {
    /// The peer's address as seen on the connection.
    addr: SocketAddr,
    /// The peer's ancestors, parent first, as it last told us.
    path: Option<Vec<PeerAddrs>>,
    role: Role,
    /// We dialled it; only the dialling side closes a link it no longer needs.
    dialed_by_me: bool,
}

/// A join in progress.
#[derive(Debug, Clone, Copy)]
struct Joining {
    target: NodeId,
    deadline: Instant,
    /// Redirects followed so far, to stop a redirect loop.
    hops: u32,
}

/// Redirects followed before a join is abandoned: far more than any
/// depth a bounded-degree tree reaches.
const MAX_REDIRECTS: u32 = 64;

/// How long after a tree edge here failed, we joined again after a
/// failure, or interest marked as coming back reached us, all interest we
/// are told of counts as coming back after a repair. Re-joins, moves and
/// new subscribers race each other around a failure, and whichever first
/// brings interest back to an edge must bring the events the failure cost.
const REPAIR_ERA: Duration = Duration::from_secs(2);

/// How long a node whose link broke is not joined: long enough for its
/// neighbours to notice the failure too (the idle timeout).
const SUSPECT_FOR: Duration = Duration::from_secs(3);

/// Other nodes a re-joining node dials while its join is pending, so that
/// after a partition it pays one dial timeout for the nodes it cannot
/// reach, not one each.
const SCOUTS: usize = 7;

/// How long a node's parent and children must stay unchanged before it
/// moves nodes to rebalance.
const REBALANCE_AFTER: Duration = Duration::from_secs(5);

/// How often group edges whose members went stop lingering: each lingers
/// one to two ticks, about as long as a moved node takes what comes down
/// its old path ([`moves::DRAIN_FOR`]).
const LINGER_TICK: Duration = Duration::from_secs(1);

/// A node this deep or deeper asks its ancestors for a shallower slot once
/// its part of the tree is quiet. Shallower ones could only rise to the
/// root, whose free slots its pulls fill.
const CLIMB_FROM_DEPTH: u32 = 3;

/// When a node that was offered no shallower slot asks again at the same
/// depth (slots open as nodes leave): after this, doubling each time up to
/// [`CLIMB_RETRY_MAX`], so a settled tree soon falls quiet.
const CLIMB_RETRY: Duration = Duration::from_secs(60);
const CLIMB_RETRY_MAX: Duration = Duration::from_secs(600);

/// Discovered nodes whose announced root is remembered, at most; more are
/// not probed (forged announcements must not grow the map without bound).
const MAX_SIGHTINGS: usize = 4096;

/// Probes under way at once, at most: however many nodes announce smaller
/// roots (forged announcements included), a node dials only a few.
const MAX_PROBES: usize = 4;

/// How long after our root changed a known node smaller than a root that
/// discovery shows stands in for a probe. Past it, the known node has not
/// led our root to a smaller tree (a flat LAN merges well within it), so
/// it may be dead without our knowing, and the announcer is probed.
const TRUST_LEAD_FOR: Duration = Duration::from_secs(3);

/// Failed probes of one node, for one root it announced, after which it is
/// left alone until it announces another.
const MAX_PROBE_FAILURES: u32 = 3;

/// What discovery showed of a node's tree: the root it announced.
#[derive(Debug, Clone)]
struct Sighting {
    root: NodeId,
    addrs: Vec<SocketAddr>,
    /// Probes of it that failed since it announced this root.
    failures: u32,
    /// When it may be probed again after a failure.
    retry_at: Option<Instant>,
}

/// The overlay state of one node.
#[derive(Debug)]
pub struct Overlay {
    me: NodeId,
    config: OverlayConfig,
    candidates: Candidates,
    links: BTreeMap<NodeId, Link>,
    parent: Option<NodeId>,
    children: BTreeSet<NodeId>,
    /// Our ancestors, parent first; empty while we are a root.
    path: Vec<PeerAddrs>,
    joining: Option<Joining>,
    /// Ancestors from before our parent was lost, tried first on re-join.
    rejoin: Vec<PeerAddrs>,
    /// Nodes whose link to us broke, and when: probably dead, so not worth
    /// joining for a while, even when a node that has not noticed yet
    /// redirects us there.
    lost: BTreeMap<NodeId, Instant>,
    /// Smaller roots already reported to our parent.
    reported_roots: BTreeSet<NodeId>,
    /// The shape of each child's subtree, as it reported.
    child_shapes: BTreeMap<NodeId, SubtreeShape>,
    /// The shape last reported to our parent.
    reported_shape: Option<SubtreeShape>,
    /// Discovered nodes that announced a root other than themselves.
    sightings: BTreeMap<NodeId, Sighting>,
    /// Nodes dialled only to learn their tree's root from their
    /// `Position`, with the root each announced.
    probes: BTreeMap<NodeId, NodeId>,
    /// Sightings (node, announced root) probed while our root was
    /// `probed_under`; forgotten when our root changes.
    probed: BTreeSet<(NodeId, NodeId)>,
    probed_under: NodeId,
    /// When our root became `probed_under`.
    root_since: Option<Instant>,
    /// When a probe that failed may be tried again.
    probe_retry_at: Option<Instant>,
    /// The child asked to send a node up, until that node arrives or the
    /// deadline passes; one pull at a time.
    pulling: Option<(NodeId, Instant)>,
    /// When our parent or children last changed. Rebalancing waits for a
    /// quiet spell, so it never moves nodes while a tree is still forming
    /// or merging (a move can drop at-most-once events in flight).
    last_tree_change: Option<Instant>,
    /// A planned change of parents under way.
    moving: Option<Moving>,
    /// Children we asked to move elsewhere: they stay our children, over
    /// `max_children` if need be, until they leave.
    sent_away: BTreeSet<NodeId>,
    /// Our parent before a change of parents, until copies of events on
    /// their way down from it have arrived: those go only down.
    former_parent: Option<(NodeId, Instant)>,
    /// Events routed while copies can come by two paths.
    repeats: Option<Repeats>,
    /// Our parent's link broke and we have not joined again: the interest
    /// we bring to the next parent comes back after a repair.
    parent_failed: bool,
    /// Until when interest we are told of counts as coming back after a
    /// repair ([`REPAIR_ERA`]).
    repairing_until: Option<Instant>,
    /// When lingering group edges next age ([`LINGER_TICK`]).
    linger_tick: Option<Instant>,
    /// Until when our first join waits, once it started waiting.
    first_join_until: Option<Instant>,
    /// Our first join waited its `first_join_after`.
    first_join_waited: bool,
    /// Our depth when we last asked our ancestors for a shallower slot (or
    /// a climb failed), when we may ask again at that depth, and how often
    /// we asked at it.
    climb_asked: Option<(u32, Instant, u32)>,
    /// The slot we offered each climber, until its join would have timed
    /// out, so that one free slot is not offered to many (and a climber
    /// asking again meanwhile is not offered another).
    promised: BTreeMap<NodeId, (NodeId, Instant)>,
    interest: InterestTable,
    directory: Directory,
    actions: VecDeque<Action>,
}

impl Overlay {
    /// A node named `name` (used for directed delivery); `seed` drives all
    /// of its randomness.
    pub fn new(me: NodeId, name: String, config: OverlayConfig, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let backoff = Backoff {
            initial: config.backoff_initial,
            max: config.backoff_max,
        };
        let candidates = Candidates::new(
            me,
            config.max_candidates,
            backoff,
            StdRng::seed_from_u64(rng.next_u64()),
        );
        let directory = Directory::new(DirectoryEntry {
            id: me,
            name,
            parent: None,
            rtt_us: 0,
            max_children: config.max_children as u32,
            addrs: Vec::new(),
            epoch: config.started_ms << 10,
        });
        Overlay {
            me,
            config,
            candidates,
            links: BTreeMap::new(),
            parent: None,
            children: BTreeSet::new(),
            path: Vec::new(),
            joining: None,
            rejoin: Vec::new(),
            lost: BTreeMap::new(),
            reported_roots: BTreeSet::new(),
            child_shapes: BTreeMap::new(),
            reported_shape: None,
            sightings: BTreeMap::new(),
            probes: BTreeMap::new(),
            probed: BTreeSet::new(),
            probed_under: me,
            root_since: None,
            probe_retry_at: None,
            pulling: None,
            last_tree_change: None,
            moving: None,
            sent_away: BTreeSet::new(),
            former_parent: None,
            repeats: None,
            parent_failed: false,
            repairing_until: None,
            linger_tick: None,
            first_join_until: None,
            first_join_waited: false,
            climb_asked: None,
            promised: BTreeMap::new(),
            interest: InterestTable::new(rng.next_u64()),
            directory,
            actions: VecDeque::new(),
        }
    }

    /// Whether the events routed here may be wanted again after a repair:
    /// the node is in a tree with others, is joining one again, or lost a
    /// tree edge moments ago ([`REPAIR_ERA`]). A root whose only child
    /// failed routes to no one until that child's subtree joins again, and
    /// then owes it what was published meanwhile.
    pub fn keeps_replays(&self, now: Instant) -> bool {
        self.parent.is_some()
            || !self.children.is_empty()
            || self.parent_failed
            || self.repairing_until.is_some_and(|until| now < until)
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.me
    }

    /// Where this node is in its tree.
    pub fn position(&self) -> Position {
        Position {
            root: self.path.last().map_or(self.me, |p| p.id),
            depth: self.path.len() as u32,
        }
    }

    /// This node's parent; `None` at a root.
    pub fn parent(&self) -> Option<NodeId> {
        self.parent
    }

    /// How many nodes this node holds a connection to: tree edges, static
    /// peers, joins and probes in progress.
    pub fn link_count(&self) -> usize {
        self.links.len()
    }

    /// This node's children.
    pub fn children(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.children.iter().copied()
    }

    /// Of this node's children, how many it asked to move elsewhere and
    /// have not left yet: the degree bound holds for the others.
    pub fn children_sent_away(&self) -> usize {
        self.sent_away.len()
    }

    /// Whether this node is moving to another parent (a climb, or its
    /// parent sent it away): until the move ends, its new parent may
    /// already list it as a child.
    pub fn is_moving(&self) -> bool {
        self.moving.is_some()
    }

    /// Whether `peer` is one of this node's children.
    pub fn is_child(&self, peer: NodeId) -> bool {
        self.children.contains(&peer)
    }

    /// The root's address, when we are not the root and know it.
    pub fn root_addrs(&self) -> Option<&PeerAddrs> {
        self.path.last()
    }

    /// The next action for the driver, in the order decided.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When the core next wants `handle_timeout`.
    pub fn poll_timeout(&self) -> Option<Instant> {
        // A root (or a node whose join failed) retries the smaller nodes it
        // knows, each once its backoff and any suspicion have passed.
        let retry = (self.parent.is_none() && self.joining.is_none())
            .then(|| {
                self.candidates
                    .smaller_than(self.me)
                    .filter_map(|id| {
                        let at = self.candidates.retry_at(DialTarget::Node(id))?;
                        Some(match self.lost.get(&id) {
                            Some(lost) => at.max(*lost + SUSPECT_FOR),
                            None => at,
                        })
                    })
                    .min()
            })
            .flatten();
        // Nothing is retried before the first join's wait is over.
        let retry = retry.map(|at| self.first_join_until.map_or(at, |until| at.max(until)));
        let statics = self
            .candidates
            .next_static_dial(|id| self.links.contains_key(&id));
        let join = self.joining.map(|j| j.deadline);
        let pull = match self.pulling {
            Some((_, deadline)) => Some(deadline),
            None => self.child_to_pull().and(self.rebalance_at()),
        };
        let climb = self.climb_at();
        [
            retry,
            statics,
            join,
            pull,
            climb,
            self.move_timeout(),
            self.linger_tick,
            self.probe_retry_at,
            self.first_join_until
                .filter(|_| self.parent.is_none() && self.joining.is_none()),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Time has reached `now`: dials, joins, probes and rebalancing that
    /// were waiting for it go on.
    pub fn handle_timeout(&mut self, now: Instant) {
        for target in self
            .candidates
            .static_due(now, |id| self.links.contains_key(&id))
        {
            self.dial(target);
        }
        if let Some(joining) = self.joining {
            if joining.deadline <= now {
                tracing::debug!(target = %joining.target.short(), "join timed out");
                self.join_failed(now);
            }
        }
        if self.parent.is_none() && self.joining.is_none() {
            self.start_join(now);
        }
        self.move_timeouts(now);
        if self.linger_tick.is_some_and(|tick| tick <= now) {
            self.linger_tick = None;
            self.interest.age_lingering();
        }
        self.probe_smaller_trees(now);
        self.rebalance(now);
        self.arm_linger(now);
    }

    /// Starts the ticks that age lingering group edges, if some linger.
    fn arm_linger(&mut self, now: Instant) {
        if self.linger_tick.is_none() && self.interest.lingers() {
            self.linger_tick = Some(now + LINGER_TICK);
        }
    }

    /// Discovery saw `peer` at `addrs` (first sighting or a refresh),
    /// announcing `root` as its tree's root when it said.
    pub fn handle_discovered(
        &mut self,
        peer: NodeId,
        addrs: Vec<SocketAddr>,
        root: Option<NodeId>,
        now: Instant,
    ) {
        if peer == self.me {
            return;
        }
        self.candidates.learn(peer, addrs.clone(), now);
        let room = self.sightings.len() < MAX_SIGHTINGS;
        match (root, self.sightings.get_mut(&peer)) {
            (Some(root), _) if root == peer => {
                self.sightings.remove(&peer);
            }
            // A refresh of the same announcement keeps its failed probes.
            (Some(root), Some(seen)) if seen.root == root => seen.addrs = addrs.clone(),
            (Some(root), seen) if seen.is_some() || room => {
                let seen = Sighting {
                    root,
                    addrs: addrs.clone(),
                    failures: 0,
                    retry_at: None,
                };
                self.sightings.insert(peer, seen);
            }
            (Some(_), _) => {}
            (None, _) => {
                self.sightings.remove(&peer);
            }
        }
        self.report_smaller_root(PeerAddrs { id: peer, addrs });
        self.handle_timeout(now);
    }

    /// Discovery says `peer` is gone. A live link is kept until it fails.
    pub fn handle_vanished(&mut self, peer: NodeId) {
        self.candidates.forget(peer);
        self.sightings.remove(&peer);
    }

    /// A configured peer address, dialled until reached and after every loss.
    pub fn add_static_peer(&mut self, addr: SocketAddr, now: Instant) {
        self.candidates.add_static(addr, now);
        self.handle_timeout(now);
    }

    /// A dial asked for by [`Action::Dial`] reached no one.
    pub fn handle_dial_failed(&mut self, target: DialTarget, now: Instant) {
        self.candidates.failed(target, now);
        if let DialTarget::Node(id) = target {
            if self.probes.remove(&id).is_some() {
                if let Some(seen) = self.sightings.get_mut(&id) {
                    seen.failures += 1;
                    let factor = 1u32 << seen.failures.min(4);
                    let delay = (self.config.backoff_initial * factor).min(self.config.backoff_max);
                    seen.retry_at = Some(now + delay);
                }
                self.probe_smaller_trees(now);
            }
        }
        if let (DialTarget::Node(id), Some(joining)) = (target, self.joining) {
            if joining.target == id {
                self.join_failed(now);
            }
        }
        // A dial to the node we move to, not one to it after it took us.
        if let (DialTarget::Node(id), None) = (target, self.new_parent()) {
            self.move_failed(id, now);
        }
    }

    /// A connection to `peer`, reachable at `addr`, passed its handshake.
    /// `dialed` is set when it was our dial. Of two connections to one
    /// peer, the one dialled by the smaller id survives, on both sides
    /// alike; of two dialled by the same node, the newer. The answer says
    /// which to keep.
    pub fn handle_link_up(
        &mut self,
        peer: NodeId,
        addr: SocketAddr,
        dialed: Option<DialTarget>,
        now: Instant,
    ) -> NewConnection {
        if let Some(existing) = self.links.get(&peer) {
            let dialer = |by_me: bool| if by_me { self.me } else { peer };
            let preferred = self.me.min(peer);
            if dialer(existing.dialed_by_me) == preferred && dialer(dialed.is_some()) != preferred {
                // Only our dial is settled; the link is untouched.
                self.candidates.connected(peer, dialed, now);
                return NewConnection::CloseDuplicate;
            }
            self.replace_link(peer, addr, dialed, now);
            return NewConnection::ReplaceOld;
        }
        self.candidates.connected(peer, dialed, now);
        self.links.insert(
            peer,
            Link {
                addr,
                path: None,
                role: Role::Peer,
                dialed_by_me: dialed.is_some(),
            },
        );
        self.send(peer, OverlayMessage::Position(self.path.clone()));
        let joins = |j: Option<Joining>| j.is_some_and(|j| j.target == peer);
        if joins(self.joining) || self.moving.as_ref().is_some_and(|m| m.to == peer) {
            self.send(peer, OverlayMessage::Join);
        } else if self.parent.is_some() {
            // A scout that answered after we joined elsewhere.
            self.close_if_unneeded(peer);
        }
        NewConnection::Link
    }

    /// The connection to `peer` is gone.
    pub fn handle_link_down(&mut self, peer: NodeId, now: Instant) {
        let Some(role) = self.drop_link(peer, now) else {
            return;
        };
        self.candidates.link_lost(peer, now);
        self.probes.remove(&peer);
        self.lost
            .retain(|_, at| now.duration_since(*at) < SUSPECT_FOR);
        self.lost.insert(peer, now);
        if role == Role::Parent {
            tracing::info!(parent = %peer.short(), "parent lost; re-joining");
        }
        if self.joining.is_some_and(|j| j.target == peer) {
            self.join_failed(now);
        }
        self.move_failed(peer, now);
        self.after_link_change(now);
    }

    /// The peer closed the link to `peer` because it no longer needed it
    /// (a probe answered, a scout not needed, a join redirected): it is
    /// alive and as fine a node to join as before.
    pub fn handle_link_closed(&mut self, peer: NodeId, now: Instant) {
        if self.drop_link(peer, now).is_none() {
            return;
        }
        self.probes.remove(&peer);
        if self.joining.is_some_and(|j| j.target == peer) {
            self.join_failed(now);
        }
        self.move_failed(peer, now);
        self.after_link_change(now);
    }

    /// The connection to `peer` gave way to a new one (two nodes reached
    /// each other twice). Not a failure: the state of the old link is
    /// dropped and built again on the new one, and the peer stays a fine
    /// node to join.
    fn replace_link(
        &mut self,
        peer: NodeId,
        addr: SocketAddr,
        dialed: Option<DialTarget>,
        now: Instant,
    ) {
        self.drop_link(peer, now);
        if self.joining.is_some_and(|j| j.target == peer) {
            self.joining = None;
        }
        let new = self.handle_link_up(peer, addr, dialed, now);
        debug_assert_eq!(new, NewConnection::Link, "the old link was dropped");
        self.after_link_change(now);
    }

    /// Forgets the link to `peer` and the tree edge over it; returns what
    /// the peer was to us.
    fn drop_link(&mut self, peer: NodeId, now: Instant) -> Option<Role> {
        let link = self.links.remove(&peer)?;
        match link.role {
            // The new parent accepted us: it takes over at once, and gets
            // what we sent the old one that may not have arrived.
            Role::Parent if self.moving.as_ref().is_some_and(|m| m.accepted) => {
                self.switch_parent(now);
                if let Some(parent) = self.parent {
                    for pattern in self.interest.plain_patterns_of(parent) {
                        self.actions.push_back(Action::Replay {
                            peer: parent,
                            pattern,
                        });
                    }
                }
            }
            Role::Parent => {
                self.parent_failed = true;
                self.leave_parent(now)
            }
            Role::Child => self.remove_child(peer),
            Role::NewParent => self.move_failed(peer, now),
            Role::Peer => {}
        }
        if link.role != Role::Peer {
            self.repairing_until = Some(now + REPAIR_ERA);
        }
        Some(link.role)
    }

    /// After losing a link: re-join if it was our parent, fill a freed slot.
    fn after_link_change(&mut self, now: Instant) {
        self.arm_linger(now);
        self.tree_changed(now);
        if self.parent.is_none() && self.joining.is_none() {
            self.start_join(now);
        }
        self.probe_smaller_trees(now);
        self.rebalance(now);
    }

    /// A control message from the linked node `peer`.
    pub fn handle_message(&mut self, peer: NodeId, message: OverlayMessage, now: Instant) {
        let before = (self.parent, self.children.clone(), self.path.len());
        self.apply_message(peer, message, now);
        // A new depth counts too: a node whose ancestor just climbed waits
        // for the quiet spell before it asks to climb itself.
        if (self.parent, &self.children, self.path.len()) != (before.0, &before.1, before.2) {
            self.tree_changed(now);
        }
        if self.position().root != self.probed_under {
            self.probe_smaller_trees(now);
        }
        self.rebalance(now);
        self.arm_linger(now);
    }

    fn apply_message(&mut self, peer: NodeId, message: OverlayMessage, now: Instant) {
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        match message {
            OverlayMessage::Position(path) => {
                let root = path.last().map_or(peer, |p| p.id);
                let root_addrs = path.last().cloned().unwrap_or(PeerAddrs {
                    id: peer,
                    addrs: vec![link.addr],
                });
                link.path = Some(path.clone());
                for ancestor in &path {
                    self.candidates
                        .learn(ancestor.id, ancestor.addrs.clone(), now);
                }
                if self.parent == Some(peer) {
                    self.adopt_path(peer, path);
                }
                if root < self.position().root {
                    self.candidates.learn(root, root_addrs.addrs.clone(), now);
                    self.report_smaller_root(root_addrs);
                    if self.parent.is_none() && self.joining.is_none() {
                        self.start_join(now);
                    }
                }
                if let Some(announced) = self.probes.remove(&peer) {
                    tracing::debug!(peer = %peer.short(), root = %root.short(), "probed another tree");
                    self.probed.insert((peer, announced));
                    self.close_if_unneeded(peer);
                }
            }
            OverlayMessage::Join => self.handle_join(peer),
            OverlayMessage::Accept => self.handle_accept(peer, now),
            OverlayMessage::Redirect(to) => {
                if self.joining.is_some_and(|j| j.target == peer) {
                    self.follow_redirect(peer, to, now);
                } else {
                    self.move_redirected(peer, to, now);
                }
            }
            OverlayMessage::Leave => {
                if self.children.contains(&peer) {
                    self.remove_child(peer);
                    self.prune_links();
                }
            }
            OverlayMessage::Move(to) => {
                if self.parent == Some(peer) {
                    self.handle_move(to, now);
                } else if self.new_parent() == Some(peer) {
                    // Sent on as soon as it took us: go once it is ours.
                    if let Some(moving) = self.moving.as_mut() {
                        moving.then = Some(to);
                    }
                }
            }
            OverlayMessage::Interest(mut update) => {
                let mut out = Vec::new();
                let child = self.children.contains(&peer);
                if update.repair {
                    self.repairing_until = Some(now + REPAIR_ERA);
                }
                update.repair |= self.repairing_until.is_some_and(|until| now < until);
                let gained = self
                    .interest
                    .set_edge_interest(peer, child, &update, &mut out);
                self.send_interest(out);
                if gained && update.repair {
                    let pattern = update.pattern;
                    self.actions.push_back(Action::Replay { peer, pattern });
                }
            }
            OverlayMessage::Directory(update) => {
                if self.children.contains(&peer) {
                    let passed = self.directory.apply(peer, link.addr, update);
                    self.send_directory(passed);
                }
            }
            OverlayMessage::Shape(shape) => {
                if self.children.contains(&peer) {
                    self.child_shapes.insert(peer, shape);
                    self.report_shape();
                }
            }
            OverlayMessage::Pull => {
                if self.parent == Some(peer) {
                    self.send_one_up(peer);
                }
            }
            OverlayMessage::Climb { node, .. } => {
                if self.children.contains(&peer) {
                    self.handle_climb(peer, node, now);
                }
            }
            OverlayMessage::ClimbTo { node, slot } => {
                // Offers come down the way our directory went up.
                if self.parent != Some(peer) && self.new_parent() != Some(peer) {
                    return;
                }
                if node == self.me {
                    self.start_climb(slot, now);
                } else {
                    self.send_down_towards(node, OverlayMessage::ClimbTo { node, slot });
                }
            }
            OverlayMessage::Settle {
                node,
                old_parent,
                new_parent,
            } => {
                if self.children.contains(&peer) {
                    self.handle_settle(node, old_parent, new_parent);
                }
            }
            OverlayMessage::Settled { node, new_parent } => {
                // It comes down the way our directory went up: from the new
                // parent while we move, or, when our directory's way and
                // the new path parted above us, the old one.
                let from_above = self.parent == Some(peer) || self.new_parent() == Some(peer);
                if !from_above {
                    return;
                }
                if node != self.me {
                    let settled = OverlayMessage::Settled { node, new_parent };
                    self.send_down_towards(node, settled);
                } else if self.new_parent() == Some(new_parent) {
                    self.switch_parent(now);
                }
            }
            OverlayMessage::Roots(roots) => {
                for root in roots {
                    self.candidates.learn(root.id, root.addrs.clone(), now);
                    self.report_smaller_root(root);
                }
                if self.parent.is_none() && self.joining.is_none() {
                    self.start_join(now);
                }
            }
        }
    }

    /// Records the RTT of the link to our parent, shown in the tree picture.
    /// Only changes of a quarter or more travel up the tree.
    pub fn handle_parent_rtt(&mut self, rtt: Duration) {
        // 0 means "not measured": a loopback RTT under 1 µs is 1.
        let rtt_us = (rtt.as_micros() as u64).max(1);
        let old = self.directory.own().rtt_us;
        let changed = old == 0 || rtt_us.abs_diff(old) * 4 >= old;
        // While we change parents, our entry names the new one already.
        if self.parent.is_some() && self.new_parent().is_none() && changed {
            let update = self.directory.set_own(self.parent, rtt_us);
            self.send_directory(update.unwrap_or_default());
        }
    }

    /// A client of this node subscribes (in `group`, if given); interest
    /// changes go to the neighbours.
    pub fn subscribe(&mut self, pattern: &Pattern, group: Option<&str>, sub: LocalSub) {
        let mut out = Vec::new();
        self.interest.add_local(pattern, group, sub, &mut out);
        self.send_interest(out);
    }

    /// A client's subscription ends.
    pub fn unsubscribe(&mut self, pattern: &Pattern, group: Option<&str>, sub: LocalSub) {
        let mut out = Vec::new();
        self.interest.remove_local(pattern, group, sub, &mut out);
        self.send_interest(out);
    }

    /// Where event `id` on `topic` goes from here. While a change of
    /// parents can bring copies by two paths, a copy routed here before
    /// goes only to queue groups ([`Route::only_groups`]), and what comes
    /// down the old path after the change goes only down. A copy for the
    /// groups only (`Assigned`) is not remembered: the plain subscribers'
    /// copy may still be on its way by the other path.
    pub fn route(&mut self, id: EventId, arrival: Arrival<'_>, topic: &Topic, route: &mut Route) {
        let repeat =
            !arrival.only_groups && self.repeats.as_mut().is_some_and(|r| r.seen_before(id));
        let from_former = matches!((arrival.from, self.former_parent),
            (Hop::Edge(from), Some((former, _))) if from == former);
        let not_to = if from_former { self.parent } else { None };
        let arrival = Arrival {
            only_groups: arrival.only_groups || repeat,
            ..arrival
        };
        self.interest.route(arrival, not_to, topic, route);
    }

    /// Where an event directed to `to` that came from `from` goes next.
    /// [`NextHop::Unknown`] when the tree does not hold `to`, or when the
    /// way there is back where it came from: an event never turns back, so
    /// stale directories cannot make it loop.
    pub fn next_hop(&self, from: Hop, to: &Destination) -> NextHop {
        match self.directory.next_hop(to, self.parent) {
            NextHop::Edge(peer) if from == Hop::Edge(peer) => NextHop::Unknown,
            next => next,
        }
    }

    /// Where a directed event that arrived here is delivered locally: each
    /// matching plain subscription, and one member per matching group.
    pub fn route_here(&mut self, topic: &Topic, route: &mut Route) {
        self.interest.route_local(topic, route);
    }

    /// Whether anyone in the tree, here or behind an edge, subscribes to
    /// `topic`.
    pub fn has_interest(&mut self, topic: &Topic) -> bool {
        self.interest.has_interest(topic)
    }

    /// This node's subscriptions and the interest behind each edge, for
    /// `treescale status`.
    pub fn subscriptions(&mut self) -> Vec<SubscriptionStatus> {
        self.interest.status()
    }

    /// Every node of our subtree, ourselves first; the whole tree at the root.
    pub fn tree(&self) -> Vec<DirectoryEntry> {
        self.directory.entries()
    }

    /// Where `id` can be reached, as far as this node knows: a link, an
    /// ancestor, a node of its subtree, or one discovery showed.
    pub fn known_addrs(&self, id: NodeId) -> Option<Vec<SocketAddr>> {
        if let Some(link) = self.links.get(&id) {
            return Some(vec![link.addr]);
        }
        if let Some(ancestor) = self.path.iter().find(|p| p.id == id) {
            return Some(ancestor.addrs.clone());
        }
        if let Some(addrs) = self.directory.addrs_below(id) {
            return Some(addrs.to_vec());
        }
        self.candidates.addrs(id).map(<[_]>::to_vec)
    }

    /// Nodes in our subtree, ourselves included.
    pub fn subtree_size(&self) -> u32 {
        self.directory.size()
    }

    // ---- joining -------------------------------------------------------

    /// Picks a node to join and asks it: the remembered ancestors first,
    /// then the smallest node known that has failed least. With none, we
    /// stay a root. A node re-joining after a loss, or after a failed
    /// attempt, also dials the next few choices at once (scouts): by the
    /// time the first choice times out, the reachable ones are linked and
    /// the next join is immediate.
    fn start_join(&mut self, now: Instant) {
        if !self.first_join() {
            // A later join (something failed meanwhile): no wait, and no
            // timer left for it.
            self.first_join_until = None;
            self.first_join_waited = true;
        }
        if !self.first_join_waited {
            let until = *self
                .first_join_until
                .get_or_insert(now + self.config.first_join_after);
            if until > now {
                return;
            }
            self.first_join_until = None;
            self.first_join_waited = true;
        }
        let choices = self.join_choices(now);
        let Some(&target) = choices.first() else {
            return;
        };
        self.ask_to_join(target, 0, now);
        if !self.first_join() {
            for &scout in choices[1..].iter().take(SCOUTS) {
                if !self.links.contains_key(&scout) {
                    self.dial(DialTarget::Node(scout));
                }
            }
        }
    }

    /// Nodes we could join now, best first: remembered ancestors, then by
    /// fewest failures and smallest id (so a node cut off from the smallest
    /// ids joins one it can reach instead of cycling through unreachable
    /// ones whose backoff keeps expiring). A first join spreads instead.
    fn join_choices(&self, now: Instant) -> Vec<NodeId> {
        let ready = |id: NodeId| {
            id < self.me
                && !self.suspected(id, now)
                && (self.links.contains_key(&id)
                    || self.candidates.ready(DialTarget::Node(id), now))
        };
        let mut choices: Vec<NodeId> = self
            .rejoin
            .iter()
            .map(|p| p.id)
            .filter(|id| ready(*id))
            .collect();
        let mut others: Vec<NodeId> = self
            .candidates
            .smaller_than(self.me)
            .filter(|id| ready(*id) && !choices.contains(id))
            .collect();
        others.sort_by_key(|id| (self.candidates.failures(*id), *id));
        // A first join, with nothing failed yet, goes to a sampled node
        // rather than the smallest: when a whole LAN starts at once, the
        // root sees a few joiners, not all of them.
        let spread = self
            .first_join()
            .then(|| self.candidates.spread_smaller_than(self.me));
        if let Some(spread) = spread.flatten() {
            others = spread.into_iter().filter(|id| ready(*id)).collect();
        }
        choices.extend(others);
        choices
    }

    /// Whether we are joining for the first time: no ancestors to return
    /// to, and no known node failed us yet.
    fn first_join(&self) -> bool {
        self.rejoin.is_empty()
            && self
                .candidates
                .smaller_than(self.me)
                .all(|id| self.candidates.failures(id) == 0)
    }

    /// Whether our link to `id` broke within the last [`SUSPECT_FOR`].
    fn suspected(&self, id: NodeId, now: Instant) -> bool {
        self.lost
            .get(&id)
            .is_some_and(|at| now.duration_since(*at) < SUSPECT_FOR)
    }

    fn ask_to_join(&mut self, target: NodeId, hops: u32, now: Instant) {
        self.joining = Some(Joining {
            target,
            deadline: now + self.config.join_timeout,
            hops,
        });
        if self.links.contains_key(&target) {
            self.send(target, OverlayMessage::Join);
        } else if !self.candidates.is_dialing(DialTarget::Node(target)) {
            self.dial(DialTarget::Node(target));
        }
    }

    fn follow_redirect(&mut self, from: NodeId, to: PeerAddrs, now: Instant) {
        let hops = self.joining.map_or(0, |j| j.hops) + 1;
        if to.id >= self.me || hops > MAX_REDIRECTS {
            tracing::warn!(to = %to.id.short(), hops, "unusable redirect; trying another node");
            self.join_failed(now);
            return;
        }
        // The redirecting node may not know yet that `to` died: we lost
        // our link to it moments ago. Ask again shortly, or elsewhere,
        // rather than wait out a dial to a dead node.
        if self.suspected(to.id, now) {
            tracing::debug!(to = %to.id.short(), "redirected to a node that just failed; trying again");
            self.join_failed(now);
            return;
        }
        self.candidates.remember(to.id, to.addrs, now);
        self.ask_to_join(to.id, hops, now);
        self.close_if_unneeded(from);
    }

    fn join_failed(&mut self, now: Instant) {
        let Some(joining) = self.joining.take() else {
            return;
        };
        self.candidates
            .failed(DialTarget::Node(joining.target), now);
        self.rejoin.retain(|p| p.id != joining.target);
        self.close_if_unneeded(joining.target);
        self.start_join(now);
    }

    /// A node asks to become our child.
    fn handle_join(&mut self, peer: NodeId) {
        if peer < self.me {
            // Only larger ids may join us; point it at our root instead.
            if let Some(root) = self.path.last().filter(|r| r.id < peer).cloned() {
                self.send(peer, OverlayMessage::Redirect(root));
            }
            return;
        }
        if self.children.contains(&peer) || self.children.len() < self.config.max_children {
            self.accept(peer);
            return;
        }
        // Full: send the joiner straight to the shallowest free slot below
        // us that it may take (the owner's id is smaller than the joiner's).
        if let Some((slot, addrs)) = self.directory.slot_for(peer) {
            self.send(
                peer,
                OverlayMessage::Redirect(PeerAddrs { id: slot, addrs }),
            );
            return;
        }
        // None known: send it towards the shallowest free slot, through a
        // child with a smaller id than the joiner's. When every child is
        // larger, the joiner takes the place of the child with the most
        // room, which moves under the joiner with its subtree.
        let eligible = self
            .children
            .iter()
            .filter(|c| **c < peer)
            .min_by_key(|c| (self.room_below(**c), self.directory.subtree_size(**c), **c))
            .copied();
        let Some(lowest) = eligible else {
            let moved = self.children.difference(&self.sent_away).min_by_key(|c| {
                let size = self.directory.subtree_size(**c);
                (self.room_below(**c), size, std::cmp::Reverse(**c))
            });
            // With `max_children` 0 there is no child to move: no answer.
            let Some(moved) = moved.copied() else {
                return;
            };
            let addrs = self.link_addrs(peer);
            self.send_away(moved, PeerAddrs { id: peer, addrs });
            self.accept(peer);
            return;
        };
        let addrs = self.link_addrs(lowest);
        self.send(
            peer,
            OverlayMessage::Redirect(PeerAddrs { id: lowest, addrs }),
        );
    }

    fn accept(&mut self, peer: NodeId) {
        let newly = self.children.insert(peer);
        if let Some(link) = self.links.get_mut(&peer) {
            link.role = Role::Child;
        }
        self.send(peer, OverlayMessage::Accept);
        self.send(peer, OverlayMessage::Position(self.path.clone()));
        if newly {
            tracing::debug!(child = %peer.short(), "accepted child");
            self.add_edge(peer, false);
            self.report_shape();
            // The pulled node arrived (or another did): pull on.
            self.pulling = None;
        }
    }

    fn handle_accept(&mut self, peer: NodeId, now: Instant) {
        // A repeated accept (a join sent again over a new connection): we
        // are its child already, and a `Leave` would make us not.
        if self.parent == Some(peer) || self.new_parent() == Some(peer) {
            return;
        }
        let moved = self
            .moving
            .as_ref()
            .is_some_and(|m| m.to == peer && !m.accepted);
        if moved && peer < self.me && self.parent.is_some() {
            self.overlap(peer, now);
            return;
        }
        let expected = self.joining.is_some_and(|j| j.target == peer);
        if !expected || peer > self.me || self.parent.is_some() {
            self.send(peer, OverlayMessage::Leave);
            return;
        }
        tracing::debug!(parent = %peer.short(), "joined");
        self.joining = None;
        self.rejoin.clear();
        self.parent = Some(peer);
        if let Some(link) = self.links.get_mut(&peer) {
            link.role = Role::Parent;
            if let Some(path) = link.path.clone() {
                self.adopt_path(peer, path);
            }
        }
        let repair = std::mem::take(&mut self.parent_failed);
        if repair {
            self.repairing_until = Some(now + REPAIR_ERA);
        }
        self.add_edge(peer, repair);
        // The last RTT was to the old parent: unknown until measured.
        self.directory.set_own(Some(peer), 0);
        self.send(
            peer,
            OverlayMessage::Directory(self.directory.full_listing()),
        );
        self.reported_shape = None;
        self.report_shape();
        self.candidates.connected(peer, None, now);
        self.prune_links();
    }

    /// Our parent is gone (lost or moved us): we are the root of our
    /// subtree until we join again.
    fn leave_parent(&mut self, now: Instant) {
        let Some(parent) = self.parent.take() else {
            return;
        };
        if let Some(link) = self.links.get_mut(&parent) {
            link.role = Role::Peer;
        }
        self.drop_edge(parent, false);
        if let Some(moving) = self.moving.take() {
            self.close_if_unneeded(moving.to);
        }
        // Re-join at the grandparent first: it is the nearest node that is
        // certainly not below us.
        self.rejoin = self.path.iter().skip(1).cloned().collect();
        for ancestor in &self.rejoin {
            self.candidates
                .remember(ancestor.id, ancestor.addrs.clone(), now);
        }
        let rtt = self.directory.own().rtt_us;
        self.directory.set_own(None, rtt);
        self.set_path(Vec::new());
        self.reported_roots.clear();
    }

    fn shape_of(&self, child: NodeId) -> SubtreeShape {
        self.child_shapes.get(&child).copied().unwrap_or_default()
    }

    /// Levels below `child` to its subtree's shallowest free slot.
    fn room_below(&self, child: NodeId) -> u32 {
        self.shape_of(child).room
    }

    /// Tells our parent the shape of our subtree when it changed.
    fn report_shape(&mut self) {
        let room = if self.children.len() < self.config.max_children {
            0
        } else {
            self.children
                .iter()
                .map(|c| self.room_below(*c) + 1)
                .min()
                .unwrap_or(0)
        };
        let height = self
            .children
            .iter()
            .map(|c| self.shape_of(*c).height + 1)
            .max()
            .unwrap_or(0);
        let shape = SubtreeShape { room, height };
        if let Some(parent) = self.parent {
            if self.reported_shape != Some(shape) {
                self.reported_shape = Some(shape);
                self.send(parent, OverlayMessage::Shape(shape));
            }
        }
    }

    /// Notes a change of parent or children, which restarts the quiet spell.
    fn tree_changed(&mut self, now: Instant) {
        self.last_tree_change = Some(now);
    }

    fn remove_child(&mut self, child: NodeId) {
        if !self.children.remove(&child) {
            return;
        }
        self.sent_away.remove(&child);
        self.child_shapes.remove(&child);
        self.report_shape();
        if let Some(link) = self.links.get_mut(&child) {
            link.role = Role::Peer;
        }
        self.drop_edge(child, true);
        let removed = self.directory.remove_child(child);
        self.send_directory(removed);
    }

    /// Takes our parent's ancestors as ours, and tells our children.
    fn adopt_path(&mut self, parent: NodeId, parent_path: Vec<PeerAddrs>) {
        let addrs = self.link_addrs(parent);
        let mut path = Vec::with_capacity(parent_path.len() + 1);
        path.push(PeerAddrs { id: parent, addrs });
        path.extend(parent_path);
        self.set_path(path);
    }

    fn set_path(&mut self, path: Vec<PeerAddrs>) {
        if path == self.path {
            return;
        }
        self.path = path;
        // Children need it for their own path; other linked nodes (static
        // peers, joiners) to see which tree we are in now.
        let linked: Vec<NodeId> = self
            .links
            .keys()
            .copied()
            .filter(|id| Some(*id) != self.parent)
            .collect();
        for peer in linked {
            self.send(peer, OverlayMessage::Position(self.path.clone()));
        }
        self.report_known_smaller_roots();
    }

    /// Passes a node with an id smaller than our root's up to our root,
    /// which should join it: that is how trees find each other when only
    /// some of their nodes can see the other tree.
    fn report_smaller_root(&mut self, node: PeerAddrs) {
        let Some(parent) = self.parent else {
            return;
        };
        if node.id >= self.position().root || self.reported_roots.contains(&node.id) {
            return;
        }
        self.reported_roots.insert(node.id);
        self.send(parent, OverlayMessage::Roots(vec![node]));
    }

    /// Our root changed: report again every smaller root a linked node
    /// told us of, and every smaller node we know, since we may have heard
    /// of them while we had no parent or while our root was smaller.
    fn report_known_smaller_roots(&mut self) {
        let mut roots: Vec<PeerAddrs> = self
            .links
            .iter()
            .filter_map(|(id, link)| {
                let path = link.path.as_ref()?;
                Some(path.last().cloned().unwrap_or(PeerAddrs {
                    id: *id,
                    addrs: vec![link.addr],
                }))
            })
            .collect();
        let root = self.position().root;
        for id in self.candidates.smaller_than(root) {
            let addrs = self.candidates.addrs(id).unwrap_or_default().to_vec();
            roots.push(PeerAddrs { id, addrs });
        }
        for root in roots {
            self.report_smaller_root(root);
        }
    }

    /// Dials the nodes seen on discovery whose tree has a root smaller
    /// than ours that no node we know leads to: their `Position` names
    /// that root with its address, and we pass it up. Where two trees meet
    /// only through nodes larger than both roots (LAN segments joined by a
    /// backbone), this is how they find each other. One probe per root at
    /// a time, smallest root first, at most [`MAX_PROBES`].
    fn probe_smaller_trees(&mut self, now: Instant) {
        let root = self.position().root;
        if root != self.probed_under || self.root_since.is_none() {
            self.probed.clear();
            self.probed_under = root;
            self.root_since = Some(now);
        }
        // A live known node as small as an announced root leads to a tree
        // at least as small: it is passed up and joined without a probe.
        // This keeps a flat LAN, where every node sees the smallest,
        // probe-free. A node that failed us (a root that died) leads
        // nowhere; nor does one that did not bring us a smaller root
        // within TRUST_LEAD_FOR (it died unseen: we had no link to it).
        let lead_until = self.root_since.map(|since| since + TRUST_LEAD_FOR);
        let smallest_known = self
            .candidates
            .smaller_than(root)
            .find(|id| self.candidates.failures(*id) == 0 && !self.suspected(*id, now))
            .filter(|_| lead_until.is_some_and(|until| until > now));
        let mut targets: Vec<(NodeId, &Sighting)> = self
            .sightings
            .iter()
            .filter(|(via, seen)| {
                seen.root < root
                    && **via >= root
                    && seen.failures < MAX_PROBE_FAILURES
                    && smallest_known.is_none_or(|known| known > seen.root)
                    && !self.links.contains_key(via)
                    && !self.probes.contains_key(via)
                    && !self.candidates.is_dialing(DialTarget::Node(**via))
                    && !self.probed.contains(&(**via, seen.root))
            })
            .map(|(via, seen)| (*via, seen))
            .collect();
        targets.sort_by_key(|(via, seen)| (seen.root, *via));
        let mut probing: BTreeSet<NodeId> = self.probes.values().copied().collect();
        let mut dials = Vec::new();
        let mut retry_at = None;
        for (via, seen) in targets {
            if let Some(at) = seen.retry_at.filter(|at| *at > now) {
                retry_at = Some(retry_at.map_or(at, |t: Instant| t.min(at)));
                continue;
            }
            if self.probes.len() + dials.len() >= MAX_PROBES || !probing.insert(seen.root) {
                continue;
            }
            dials.push((via, seen.root, seen.addrs.clone()));
        }
        // Where a known node held a probe back, look again once it no
        // longer does.
        let held_back =
            smallest_known.is_some() && self.sightings.values().any(|seen| seen.root < root);
        if held_back {
            retry_at = retry_at.min(lead_until).or(lead_until);
        }
        self.probe_retry_at = retry_at;
        for (via, announced, addrs) in dials {
            tracing::debug!(via = %via.short(), root = %announced.short(), "probing a smaller tree");
            self.probes.insert(via, announced);
            // Not through the candidates: probed nodes are often large ids,
            // which the candidates do not keep.
            self.actions.push_back(Action::Dial {
                target: DialTarget::Node(via),
                addrs,
            });
        }
    }

    // ---- links ---------------------------------------------------------

    fn dial(&mut self, target: DialTarget) {
        // One dial at a time per node: two would race each other to a
        // duplicate connection, and the loser would fail the join.
        if self.candidates.is_dialing(target) {
            return;
        }
        if let Some(addrs) = self.candidates.start_dial(target) {
            self.actions.push_back(Action::Dial { target, addrs });
        }
    }

    fn link_addrs(&self, peer: NodeId) -> Vec<SocketAddr> {
        match self.links.get(&peer) {
            Some(link) => vec![link.addr],
            None => self
                .candidates
                .addrs(peer)
                .map(<[_]>::to_vec)
                .unwrap_or_default(),
        }
    }

    /// Closes a link we dialled that is neither a tree edge, a static peer,
    /// nor the node we are joining.
    fn close_if_unneeded(&mut self, peer: NodeId) {
        let Some(link) = self.links.get(&peer) else {
            return;
        };
        let needed = link.role != Role::Peer
            || !link.dialed_by_me
            || self.candidates.is_static(peer)
            || self.probes.contains_key(&peer)
            || self.joining.is_some_and(|j| j.target == peer)
            || self.moving.as_ref().is_some_and(|m| m.to == peer)
            || self.former_parent.is_some_and(|(former, _)| former == peer);
        if !needed {
            self.links.remove(&peer);
            self.actions.push_back(Action::Disconnect { peer });
        }
    }

    fn prune_links(&mut self) {
        let peers: Vec<NodeId> = self.links.keys().copied().collect();
        for peer in peers {
            self.close_if_unneeded(peer);
        }
    }

    // ---- interest and directory ------------------------------------------

    /// Adds a tree edge; what we announce on it comes back after a
    /// `repair` if it does.
    fn add_edge(&mut self, peer: NodeId, repair: bool) {
        let mut out = Vec::new();
        self.interest.add_edge(peer, repair, &mut out);
        self.send_interest(out);
    }

    fn drop_edge(&mut self, peer: NodeId, child: bool) {
        let mut out = Vec::new();
        self.interest.remove_edge(peer, child, &mut out);
        self.send_interest(out);
    }

    fn send_interest(&mut self, updates: Vec<(NodeId, InterestUpdate)>) {
        for (peer, update) in updates {
            self.send(peer, OverlayMessage::Interest(update));
        }
    }

    /// Sends `update` up: to the new parent during a change of parents,
    /// which our subtree is filed behind from its start.
    fn send_directory(&mut self, update: DirectoryUpdate) {
        if update.upsert.is_empty() && update.remove.is_empty() {
            return;
        }
        // Removals go to the old parent too: should the move fail, its
        // directory must not keep nodes that left meanwhile.
        if let (Some(old), Some(new)) = (self.parent, self.new_parent()) {
            if !update.remove.is_empty() {
                let removed = DirectoryUpdate {
                    upsert: Vec::new(),
                    remove: update.remove.clone(),
                };
                self.send(old, OverlayMessage::Directory(removed));
            }
            self.send(new, OverlayMessage::Directory(update));
            return;
        }
        if let Some(parent) = self.parent {
            self.send(parent, OverlayMessage::Directory(update));
        }
    }

    fn send(&mut self, peer: NodeId, message: OverlayMessage) {
        self.actions.push_back(Action::Send { peer, message });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A core that joins as soon as it can: most tests are not about the
    /// first join's wait.
    fn core(me: u8) -> Overlay {
        let config = OverlayConfig {
            first_join_after: Duration::ZERO,
            ..OverlayConfig::default()
        };
        Overlay::new(id(me), "me".into(), config, 1)
    }

    pub(super) fn id(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }

    pub(super) fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1000 + u16::from(n)))
    }

    pub(super) fn dials(overlay: &mut Overlay) -> Vec<NodeId> {
        let mut dialed = Vec::new();
        while let Some(action) = overlay.poll_action() {
            if let Action::Dial {
                target: DialTarget::Node(peer),
                ..
            } = action
            {
                dialed.push(peer);
            }
        }
        dialed
    }

    pub(super) fn peer(n: u8) -> PeerAddrs {
        PeerAddrs {
            id: id(n),
            addrs: vec![addr(n)],
        }
    }

    pub(super) fn drain(overlay: &mut Overlay) -> Vec<Action> {
        std::iter::from_fn(|| overlay.poll_action()).collect()
    }

    pub(super) fn sent(actions: &[Action], to: NodeId) -> Vec<&OverlayMessage> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { peer, message } if *peer == to => Some(message),
                _ => None,
            })
            .collect()
    }

    /// Links `me` under `parent`, whose own ancestors are `above`.
    pub(super) fn joined(me: u8, parent: u8, above: Vec<PeerAddrs>, now: Instant) -> Overlay {
        let mut overlay = core(me);
        overlay.handle_discovered(id(parent), vec![addr(parent)], None, now);
        let target = DialTarget::Node(id(parent));
        overlay.handle_link_up(id(parent), addr(parent), Some(target), now);
        overlay.handle_message(id(parent), OverlayMessage::Position(above), now);
        overlay.handle_message(id(parent), OverlayMessage::Accept, now);
        assert_eq!(overlay.parent(), Some(id(parent)));
        drain(&mut overlay);
        overlay
    }

    #[test]
    fn a_directed_event_never_turns_back() {
        let now = Instant::now();
        let overlay = joined(5, 1, Vec::new(), now);
        // A node this one does not hold below it lies beyond the parent...
        let far = Destination::Node(id(9));
        assert_eq!(overlay.next_hop(Hop::Local, &far), NextHop::Edge(id(1)));
        // ...unless the event came from the parent: then no one has it.
        assert_eq!(overlay.next_hop(Hop::Edge(id(1)), &far), NextHop::Unknown);
        let here = Destination::Node(id(5));
        assert_eq!(overlay.next_hop(Hop::Edge(id(1)), &here), NextHop::Here);
    }

    #[test]
    fn of_two_connections_the_one_dialled_by_the_smaller_id_survives() {
        let now = Instant::now();
        let mut overlay = core(5);
        // Each connection in turn: the peer, whether we dialled it, and
        // what becomes of it.
        let steps = [
            // To a smaller peer: its dial beats ours, ours never beats its.
            (3, true, NewConnection::Link),
            (3, false, NewConnection::ReplaceOld),
            (3, true, NewConnection::CloseDuplicate),
            // The peer redialling replaces its own older connection.
            (3, false, NewConnection::ReplaceOld),
            // To a larger peer: our dial wins.
            (7, false, NewConnection::Link),
            (7, true, NewConnection::ReplaceOld),
            (7, false, NewConnection::CloseDuplicate),
        ];
        for (n, we_dialled, expected) in steps {
            let dialed = we_dialled.then_some(DialTarget::Node(id(n)));
            assert_eq!(
                overlay.handle_link_up(id(n), addr(n), dialed, now),
                expected,
                "connection to {n}, dialled by us: {we_dialled}"
            );
        }
    }

    #[test]
    fn a_root_probes_a_larger_node_that_announces_a_smaller_root_then_joins_that_root() {
        let now = Instant::now();
        let mut overlay = core(50);
        // Node 60 is of another tree, whose root 10 this node cannot see.
        overlay.handle_discovered(id(60), vec![addr(60)], Some(id(10)), now);
        assert_eq!(dials(&mut overlay), vec![id(60)]);
        overlay.handle_link_up(id(60), addr(60), Some(DialTarget::Node(id(60))), now);
        let actions = drain(&mut overlay);
        assert!(
            !actions.contains(&Action::Disconnect { peer: id(60) }),
            "the probe is kept until it answers: {actions:?}"
        );
        // Its position names the root and how to reach it.
        overlay.handle_message(id(60), OverlayMessage::Position(vec![peer(10)]), now);
        let actions = drain(&mut overlay);
        assert!(
            actions.contains(&Action::Dial {
                target: DialTarget::Node(id(10)),
                addrs: vec![addr(10)],
            }),
            "{actions:?}"
        );
        assert!(actions.contains(&Action::Disconnect { peer: id(60) }));
        // Answered: not probed again while our root stays the same.
        overlay.handle_discovered(id(60), vec![addr(60)], Some(id(10)), now);
        assert!(!dials(&mut overlay).contains(&id(60)));
    }

    #[test]
    fn an_inner_node_passes_the_root_a_probe_found_up_to_its_parent() {
        let now = Instant::now();
        let mut overlay = joined(50, 30, Vec::new(), now);
        overlay.handle_discovered(id(60), vec![addr(60)], Some(id(10)), now);
        assert_eq!(dials(&mut overlay), vec![id(60)]);
        overlay.handle_link_up(id(60), addr(60), Some(DialTarget::Node(id(60))), now);
        overlay.handle_message(id(60), OverlayMessage::Position(vec![peer(10)]), now);
        let actions = drain(&mut overlay);
        assert_eq!(
            sent(&actions, id(30)),
            vec![&OverlayMessage::Roots(vec![peer(10)])]
        );
        assert!(actions.contains(&Action::Disconnect { peer: id(60) }));
    }

    #[test]
    fn no_probe_where_a_known_node_leads_to_the_smaller_tree() {
        let now = Instant::now();
        let mut overlay = joined(50, 30, Vec::new(), now);
        // On a flat LAN the smaller root itself is seen: passed up at once.
        overlay.handle_discovered(id(10), vec![addr(10)], None, now);
        overlay.handle_discovered(id(60), vec![addr(60)], Some(id(10)), now);
        overlay.handle_discovered(id(70), vec![addr(70)], Some(id(10)), now);
        let actions = drain(&mut overlay);
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Dial { .. })),
            "{actions:?}"
        );
        assert_eq!(
            sent(&actions, id(30)),
            vec![&OverlayMessage::Roots(vec![peer(10)])]
        );
        // A node of our own tree, or of a larger one, is no reason either.
        overlay.handle_discovered(id(80), vec![addr(80)], Some(id(30)), now);
        overlay.handle_discovered(id(90), vec![addr(90)], Some(id(40)), now);
        assert!(dials(&mut overlay).is_empty());
    }

    #[test]
    fn one_probe_per_announced_root_at_a_time_and_few_in_all() {
        let now = Instant::now();
        let mut overlay = core(50);
        for n in 60..70 {
            overlay.handle_discovered(id(n), vec![addr(n)], Some(id(10)), now);
        }
        assert_eq!(dials(&mut overlay), vec![id(60)], "one probe for root 10");
        // Announcements of many roots (forged ones, say): a few at a time.
        for n in 70..90 {
            overlay.handle_discovered(id(n), vec![addr(n)], Some(id(n - 60)), now);
        }
        assert_eq!(
            dials(&mut overlay).len(),
            MAX_PROBES - 1,
            "at most {MAX_PROBES} under way"
        );
    }

    #[test]
    fn a_probe_that_fails_is_retried_later_then_given_up() {
        let mut now = Instant::now();
        let mut overlay = core(50);
        overlay.handle_discovered(id(60), vec![addr(60)], Some(id(10)), now);
        assert_eq!(dials(&mut overlay), vec![id(60)]);
        for _ in 1..MAX_PROBE_FAILURES {
            overlay.handle_dial_failed(DialTarget::Node(id(60)), now);
            assert!(dials(&mut overlay).is_empty(), "not at once");
            let retry = overlay.poll_timeout().expect("a retry is due later");
            assert!(retry > now);
            now = retry;
            overlay.handle_timeout(now);
            assert_eq!(dials(&mut overlay), vec![id(60)]);
        }
        overlay.handle_dial_failed(DialTarget::Node(id(60)), now);
        now += Duration::from_secs(60);
        overlay.handle_timeout(now);
        assert!(
            dials(&mut overlay).is_empty(),
            "given up after {MAX_PROBE_FAILURES}"
        );
        // Until it announces another root.
        overlay.handle_discovered(id(60), vec![addr(60)], Some(id(20)), now);
        assert_eq!(dials(&mut overlay), vec![id(60)]);
    }

    #[test]
    fn a_remembered_node_that_failed_does_not_stop_a_probe() {
        let now = Instant::now();
        // Our old root 5 died: remembered, but failing.
        let mut overlay = joined(50, 30, vec![peer(5)], now);
        overlay.handle_link_down(id(30), now);
        drain(&mut overlay);
        overlay.handle_dial_failed(DialTarget::Node(id(5)), now);
        drain(&mut overlay);
        // Another segment's tree, rooted at 10, seen only through 60.
        overlay.handle_discovered(id(60), vec![addr(60)], Some(id(10)), now);
        assert!(dials(&mut overlay).contains(&id(60)));
    }

    #[test]
    fn a_node_learned_before_its_root_grew_is_passed_up_after() {
        let now = Instant::now();
        let mut overlay = joined(50, 30, vec![peer(10)], now);
        // Larger than our root 10 when seen: nothing to tell.
        overlay.handle_discovered(id(20), vec![addr(20)], None, now);
        assert!(sent(&drain(&mut overlay), id(30)).is_empty());
        // Our parent's tree is now rooted at 25: 20 is worth joining.
        overlay.handle_message(id(30), OverlayMessage::Position(vec![peer(25)]), now);
        let actions = drain(&mut overlay);
        assert!(
            sent(&actions, id(30)).contains(&&OverlayMessage::Roots(vec![peer(20)])),
            "{actions:?}"
        );
    }

    #[test]
    fn a_link_closed_cleanly_leaves_its_peer_fit_to_join_and_a_broken_one_does_not() {
        let now = Instant::now();
        for (parted, joined_at_once) in [(true, true), (false, false)] {
            let mut overlay = core(50);
            // 30 dialled us (a probe, a scout) and is done with the link.
            overlay.handle_link_up(id(30), addr(30), None, now);
            drain(&mut overlay);
            if parted {
                overlay.handle_link_closed(id(30), now);
            } else {
                overlay.handle_link_down(id(30), now);
            }
            overlay.handle_discovered(id(30), vec![addr(30)], None, now);
            assert_eq!(
                dials(&mut overlay) == vec![id(30)],
                joined_at_once,
                "parted: {parted}"
            );
        }
    }

    fn interest(pattern: &str, repair: bool) -> OverlayMessage {
        OverlayMessage::Interest(InterestUpdate {
            pattern: Pattern::new(pattern).unwrap(),
            group: None,
            count: 1,
            repair,
        })
    }

    fn replays(actions: &[Action]) -> Vec<(NodeId, &str)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Replay { peer, pattern } => Some((*peer, pattern.as_str())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_node_whose_parent_failed_brings_its_interest_back_marked_and_replays_up() {
        let now = Instant::now();
        let mut overlay = joined(50, 30, vec![peer(10)], now);
        let sub = LocalSub { session: 1, sub: 1 };
        overlay.subscribe(&Pattern::new("below.>").unwrap(), None, sub);
        drain(&mut overlay);
        overlay.handle_link_down(id(30), now);
        assert!(
            overlay.keeps_replays(now),
            "what it routes meanwhile counts"
        );
        // It joins its grandparent again.
        assert_eq!(dials(&mut overlay), vec![id(10)]);
        let target = Some(DialTarget::Node(id(10)));
        overlay.handle_link_up(id(10), addr(10), target, now);
        overlay.handle_message(id(10), OverlayMessage::Position(Vec::new()), now);
        overlay.handle_message(id(10), OverlayMessage::Accept, now);
        let actions = drain(&mut overlay);
        assert!(
            sent(&actions, id(10)).contains(&&interest("below.>", true)),
            "{actions:?}"
        );
        // What the new parent announces at once comes back: our subtree
        // published for it meanwhile, and our children hear it marked.
        overlay.handle_link_up(id(60), addr(60), None, now);
        overlay.handle_message(id(60), OverlayMessage::Join, now);
        drain(&mut overlay);
        overlay.handle_message(id(10), interest("above.>", false), now);
        let actions = drain(&mut overlay);
        assert_eq!(replays(&actions), vec![(id(10), "above.>")]);
        assert!(sent(&actions, id(60)).contains(&&interest("above.>", true)));
        // Later interest is new interest, not a repair's.
        let later = now + REPAIR_ERA;
        overlay.handle_message(id(10), interest("new.>", false), later);
        assert!(replays(&drain(&mut overlay)).is_empty());
    }

    #[test]
    fn a_root_whose_only_child_failed_keeps_what_it_routes_until_the_subtree_is_back() {
        let now = Instant::now();
        let mut root = core(10);
        root.handle_link_up(id(30), addr(30), None, now);
        root.handle_message(id(30), OverlayMessage::Join, now);
        drain(&mut root);
        assert!(root.keeps_replays(now));
        root.handle_link_down(id(30), now);
        // Alone now, and nobody to route to: but the child's subtree will
        // join again and ask for what it missed.
        assert!(root.keeps_replays(now + REPAIR_ERA / 2));
        assert!(!root.keeps_replays(now + REPAIR_ERA), "alone for good");
    }

    #[test]
    fn only_interest_marked_as_coming_back_is_replayed_to() {
        let now = Instant::now();
        let mut overlay = joined(20, 10, Vec::new(), now);
        overlay.handle_link_up(id(30), addr(30), None, now);
        overlay.handle_message(id(30), OverlayMessage::Join, now);
        drain(&mut overlay);
        assert!(overlay.is_child(id(30)));
        // A first join, or a new subscriber: nothing was missed.
        overlay.handle_message(id(30), interest("fresh.>", false), now);
        let actions = drain(&mut overlay);
        assert!(replays(&actions).is_empty());
        assert!(sent(&actions, id(10)).contains(&&interest("fresh.>", false)));
        // Interest back after a repair: replayed to, and passed on marked.
        overlay.handle_message(id(30), interest("back.>", true), now);
        let actions = drain(&mut overlay);
        assert_eq!(replays(&actions), vec![(id(30), "back.>")]);
        assert!(sent(&actions, id(10)).contains(&&interest("back.>", true)));
        // Known on that edge already: no gap to fill.
        overlay.handle_message(id(30), interest("back.>", true), now);
        assert!(replays(&drain(&mut overlay)).is_empty());
    }

    #[test]
    fn a_repeated_accept_from_our_parent_keeps_us_its_child() {
        let now = Instant::now();
        let mut overlay = joined(50, 30, vec![peer(10)], now);
        // Our join went again over a new connection, and was accepted again.
        overlay.handle_message(id(30), OverlayMessage::Accept, now);
        assert!(!sent(&drain(&mut overlay), id(30)).contains(&&OverlayMessage::Leave));
        assert_eq!(overlay.parent(), Some(id(30)));
    }

    #[test]
    fn a_first_join_waits_for_discovery_then_spreads() {
        let now = Instant::now();
        let config = OverlayConfig::default();
        let mut overlay = Overlay::new(id(250), "me".into(), config.clone(), 1);
        for n in 1..=100 {
            overlay.handle_discovered(id(n), vec![addr(n)], None, now);
        }
        assert!(dials(&mut overlay).is_empty(), "no join before the wait");
        let at = overlay.poll_timeout().expect("a timer for the first join");
        assert_eq!(at, now + config.first_join_after);
        overlay.handle_timeout(at);
        let dialled = dials(&mut overlay);
        assert_eq!(dialled.len(), 1, "one join, no scouts: {dialled:?}");
        assert_ne!(dialled[0], id(1), "a sampled node, not the root");
    }

    #[test]
    fn a_failure_during_the_first_join_s_wait_leaves_no_timer_behind() {
        let start = Instant::now();
        let mut overlay = Overlay::new(id(250), "me".into(), OverlayConfig::default(), 1);
        for n in 1..=100 {
            overlay.handle_discovered(id(n), vec![addr(n)], None, start);
        }
        // A smaller node dials us, then its link breaks, mid-wait.
        overlay.handle_link_up(id(7), addr(7), None, start);
        overlay.handle_link_down(id(7), start);
        let now = start + Duration::from_millis(10);
        overlay.handle_timeout(now);
        let dialled = dials(&mut overlay);
        assert_eq!(
            dialled.first(),
            Some(&id(1)),
            "a later join: the smallest, at once"
        );
        overlay.handle_link_up(id(1), addr(1), Some(DialTarget::Node(id(1))), now);
        overlay.handle_message(id(1), OverlayMessage::Position(Vec::new()), now);
        overlay.handle_message(id(1), OverlayMessage::Accept, now);
        assert_eq!(overlay.parent(), Some(id(1)));
        // Its next timer is not the wait's, long past.
        let later = start + Duration::from_secs(1);
        assert!(
            overlay.poll_timeout().is_none_or(|at| at > later),
            "{:?}",
            overlay.poll_timeout()
        );
    }

    #[test]
    fn after_a_failed_join_the_next_choices_are_dialled_at_once() {
        let now = Instant::now();
        let mut overlay = core(200);
        for n in 1..=5 {
            overlay.handle_discovered(id(n), vec![addr(n)], None, now);
        }
        // A first join is one dial: a mass start must not multiply them.
        assert_eq!(dials(&mut overlay), vec![id(1)]);

        // It fails: the next choice, and every other ready node as a scout.
        overlay.handle_dial_failed(DialTarget::Node(id(1)), now);
        assert_eq!(dials(&mut overlay), vec![id(2), id(3), id(4), id(5)]);

        // A scout answers while the join is still pending: kept, and joined
        // at once when the pending join fails.
        overlay.handle_link_up(id(3), addr(3), Some(DialTarget::Node(id(3))), now);
        overlay.handle_dial_failed(DialTarget::Node(id(2)), now);
        let mut join_to = None;
        while let Some(action) = overlay.poll_action() {
            if let Action::Send {
                peer,
                message: OverlayMessage::Join,
            } = action
            {
                join_to = Some(peer);
            }
        }
        assert_eq!(join_to, Some(id(3)));
    }
}
