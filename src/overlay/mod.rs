//! The overlay core: membership, the tree, and per-edge interest, as a
//! state machine with no I/O.
//!
//! It reads no socket, clock or RNG. The driver feeds it inputs through the
//! `handle_*` methods, each with the current time, and then drains
//! [`Overlay::poll_action`] until it returns `None`; it arms a timer for
//! [`Overlay::poll_timeout`] and calls [`Overlay::handle_timeout`] when it
//! fires. Events are routed synchronously by [`Overlay::route`].
//!
//! The tree is heap-ordered: a node only ever takes a parent whose id is
//! smaller than its own. A cycle would need ids that decrease all the way
//! round, so the parent graph is loop-free at every instant, whatever
//! messages are in flight. The node with the smallest id in a connected
//! component is its root.

mod interest;
mod trie;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use interest::InterestTable;
pub use interest::{Hop, LocalSub, Route};

use crate::identity::NodeId;
use crate::topic::{Pattern, Topic};
use crate::wire::{GroupKey, InterestUpdate, NodeMessage, PeerAddrs, SubscriptionStatus};

/// Tunables of the core; the defaults suit a LAN.
#[derive(Debug, Clone)]
pub struct OverlayConfig {
    /// First retry delay after a failed dial or a lost link; doubles per failure.
    pub backoff_initial: Duration,
    /// Cap of the retry delay.
    pub backoff_max: Duration,
    /// A discovered peer that stays unreachable this long is forgotten.
    pub candidate_expiry: Duration,
}

impl Default for OverlayConfig {
    fn default() -> Self {
        OverlayConfig {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            candidate_expiry: Duration::from_secs(10),
        }
    }
}

/// Whom a dial is for: a discovered node, or a static address whose node
/// is unknown until the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DialTarget {
    Node(NodeId),
    Static(SocketAddr),
}

/// What the core asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open a connection; report back with `handle_link_up` or `handle_dial_failed`.
    Dial {
        target: DialTarget,
        addrs: Vec<SocketAddr>,
    },
    /// Send a control message on the link to `peer`.
    Send { peer: NodeId, message: NodeMessage },
}

/// The node's place in its tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub root: NodeId,
    pub depth: u32,
}

/// A peer this node may connect to.
#[derive(Debug)]
struct Candidate {
    addrs: Vec<SocketAddr>,
    /// Earliest time of the next dial.
    next_dial: Instant,
    dialing: bool,
    failures: u32,
    /// Start of the current run of failures, for expiry.
    failing_since: Option<Instant>,
    /// Static peers are never expired.
    is_static: bool,
}

/// A live connection to another node.
#[derive(Debug)]
struct Link {
    /// Where the peer said it is in its tree; `None` until it tells us.
    position: Option<Position>,
    /// The peer attached to us as its parent.
    is_child: bool,
}

/// The overlay state of one node.
#[derive(Debug)]
pub struct Overlay {
    me: NodeId,
    config: OverlayConfig,
    candidates: BTreeMap<DialTarget, Candidate>,
    links: BTreeMap<NodeId, Link>,
    parent: Option<NodeId>,
    position: Position,
    interest: InterestTable,
    actions: VecDeque<Action>,
}

impl Overlay {
    pub fn new(me: NodeId, config: OverlayConfig) -> Self {
        Overlay {
            me,
            config,
            candidates: BTreeMap::new(),
            links: BTreeMap::new(),
            parent: None,
            position: Position { root: me, depth: 0 },
            interest: InterestTable::default(),
            actions: VecDeque::new(),
        }
    }

    pub fn id(&self) -> NodeId {
        self.me
    }

    pub fn position(&self) -> Position {
        self.position
    }

    pub fn parent(&self) -> Option<NodeId> {
        self.parent
    }

    pub fn is_child(&self, peer: NodeId) -> bool {
        self.links.get(&peer).is_some_and(|l| l.is_child)
    }

    /// The next action for the driver, in the order decided.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When the core next wants `handle_timeout`.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.candidates
            .iter()
            .filter(|(target, c)| self.should_dial(target, c))
            .map(|(_, c)| c.next_dial)
            .min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<DialTarget> = self
            .candidates
            .iter()
            .filter(|(target, c)| self.should_dial(target, c) && c.next_dial <= now)
            .map(|(target, _)| *target)
            .collect();
        for target in due {
            let candidate = self.candidates.get_mut(&target).expect("listed above");
            candidate.dialing = true;
            self.actions.push_back(Action::Dial {
                target,
                addrs: candidate.addrs.clone(),
            });
        }
    }

    /// Discovery saw `peer` at `addrs` (first sighting or a refresh).
    pub fn handle_discovered(&mut self, peer: NodeId, addrs: Vec<SocketAddr>, now: Instant) {
        self.learn(peer, addrs, now);
        self.handle_timeout(now);
    }

    /// Records a candidate from discovery or from a peer's list.
    fn learn(&mut self, peer: NodeId, addrs: Vec<SocketAddr>, now: Instant) {
        if peer == self.me || addrs.is_empty() {
            return;
        }
        let candidate = self
            .candidates
            .entry(DialTarget::Node(peer))
            .or_insert_with(|| Candidate {
                addrs: Vec::new(),
                next_dial: now,
                dialing: false,
                failures: 0,
                failing_since: None,
                is_static: false,
            });
        candidate.addrs = addrs;
        candidate.failing_since = None;
    }

    /// Discovery says `peer` is gone. A live link is kept until it fails.
    pub fn handle_vanished(&mut self, peer: NodeId) {
        let target = DialTarget::Node(peer);
        if self.candidates.get(&target).is_some_and(|c| !c.dialing) {
            self.candidates.remove(&target);
        }
    }

    /// A configured peer address, dialled until reached and after every loss.
    pub fn add_static_peer(&mut self, addr: SocketAddr, now: Instant) {
        self.candidates
            .entry(DialTarget::Static(addr))
            .or_insert_with(|| Candidate {
                addrs: vec![addr],
                next_dial: now,
                dialing: false,
                failures: 0,
                failing_since: None,
                is_static: true,
            });
        self.handle_timeout(now);
    }

    pub fn handle_dial_failed(&mut self, target: DialTarget, now: Instant) {
        let expiry = self.config.candidate_expiry;
        let Some(candidate) = self.candidates.get_mut(&target) else {
            return;
        };
        candidate.dialing = false;
        candidate.failures += 1;
        let since = *candidate.failing_since.get_or_insert(now);
        if !candidate.is_static && now.duration_since(since) >= expiry {
            tracing::info!(peer = ?target, "peer unreachable for {expiry:?}; forgetting it");
            self.candidates.remove(&target);
            return;
        }
        candidate.next_dial = now + backoff(&self.config, candidate.failures);
    }

    /// A connection to `peer`, reachable at `addr`, passed its handshake.
    /// `dialed` is set when it was our dial. For a peer already linked (a
    /// duplicate connection lost the tie-break) only the dial is settled.
    pub fn handle_link_up(
        &mut self,
        peer: NodeId,
        addr: SocketAddr,
        dialed: Option<DialTarget>,
        now: Instant,
    ) {
        for target in dialed.into_iter().chain([DialTarget::Node(peer)]) {
            if let Some(candidate) = self.candidates.get_mut(&target) {
                candidate.dialing = false;
                candidate.failures = 0;
                candidate.failing_since = None;
            }
        }
        if let Some(DialTarget::Static(static_addr)) = dialed {
            // Remember which node the static address leads to, so that it is
            // not dialled again while that node is linked, and is redialled
            // (never expired) after.
            if let Some(candidate) = self.candidates.remove(&DialTarget::Static(static_addr)) {
                self.candidates
                    .entry(DialTarget::Node(peer))
                    .and_modify(|c| c.is_static = true)
                    .or_insert(Candidate {
                        next_dial: now,
                        ..candidate
                    });
            }
        }
        if self.links.contains_key(&peer) {
            return;
        }
        self.learn(peer, vec![addr], now);
        // Tell the newcomer everyone we know, and everyone else about it.
        let known: Vec<PeerAddrs> = self
            .candidates
            .iter()
            .filter_map(|(target, c)| match target {
                DialTarget::Node(id) if *id != peer => Some(PeerAddrs {
                    id: *id,
                    addrs: c.addrs.clone(),
                }),
                _ => None,
            })
            .collect();
        let newcomer = PeerAddrs {
            id: peer,
            addrs: vec![addr],
        };
        let others: Vec<NodeId> = self.links.keys().copied().collect();
        for other in others {
            self.send(other, NodeMessage::Peers(vec![newcomer.clone()]));
        }
        self.links.insert(
            peer,
            Link {
                position: None,
                is_child: false,
            },
        );
        self.send(peer, self.position_message());
        if !known.is_empty() {
            self.send(peer, NodeMessage::Peers(known));
        }
    }

    /// The connection to `peer` is gone. It is redialled after a backoff.
    pub fn handle_link_down(&mut self, peer: NodeId, now: Instant) {
        let Some(link) = self.links.remove(&peer) else {
            return;
        };
        if let Some(candidate) = self.candidates.get_mut(&DialTarget::Node(peer)) {
            candidate.dialing = false;
            candidate.failures += 1;
            candidate.failing_since.get_or_insert(now);
            candidate.next_dial = now + backoff(&self.config, candidate.failures);
        }
        if link.is_child {
            self.drop_edge(peer);
        }
        if self.parent == Some(peer) {
            self.parent = None;
            self.drop_edge(peer);
        }
        self.choose_parent();
    }

    pub fn handle_message(&mut self, peer: NodeId, message: NodeMessage, now: Instant) {
        if !self.links.contains_key(&peer) {
            return;
        }
        match message {
            // The driver consumes hellos; a late one changes nothing.
            NodeMessage::Hello(_) => {}
            NodeMessage::Position { root, depth } => {
                self.links.get_mut(&peer).expect("checked above").position =
                    Some(Position { root, depth });
                self.choose_parent();
            }
            NodeMessage::Attach => {
                if peer < self.me {
                    tracing::warn!(peer = %peer.short(), "a smaller id tried to attach as our child; ignored");
                    return;
                }
                let link = self.links.get_mut(&peer).expect("checked above");
                if !link.is_child {
                    link.is_child = true;
                    self.add_edge(peer);
                }
            }
            NodeMessage::Detach => {
                let link = self.links.get_mut(&peer).expect("checked above");
                if link.is_child {
                    link.is_child = false;
                    self.drop_edge(peer);
                }
            }
            NodeMessage::Interest(update) => {
                let mut out = Vec::new();
                self.interest.set_edge_interest(peer, &update, &mut out);
                self.send_interest(out);
            }
            NodeMessage::Peers(peers) => {
                for PeerAddrs { id, addrs } in peers {
                    self.learn(id, addrs, now);
                }
                self.handle_timeout(now);
            }
        }
    }

    pub fn subscribe(&mut self, pattern: &Pattern, group: Option<&str>, sub: LocalSub) {
        let mut out = Vec::new();
        self.interest.add_local(pattern, group, sub, &mut out);
        self.send_interest(out);
    }

    pub fn unsubscribe(&mut self, pattern: &Pattern, group: Option<&str>, sub: LocalSub) {
        let mut out = Vec::new();
        self.interest.remove_local(pattern, group, sub, &mut out);
        self.send_interest(out);
    }

    /// Where an event goes from here. `assigned` lists the queue groups this
    /// node picks a member for; `None` for an event published here.
    pub fn route(
        &mut self,
        from: Hop,
        topic: &Topic,
        assigned: Option<&[GroupKey]>,
        route: &mut Route,
    ) {
        self.interest.route(from, topic, assigned, route);
    }

    pub fn has_interest(&mut self, topic: &Topic) -> bool {
        self.interest.has_interest(topic)
    }

    pub fn subscriptions(&mut self) -> Vec<SubscriptionStatus> {
        self.interest.status()
    }

    /// Of two discovered nodes only the one with the larger id dials, so
    /// two nodes never dial each other at once. Static peers, whose id is
    /// unknown until reached, are always dialled.
    fn should_dial(&self, target: &DialTarget, candidate: &Candidate) -> bool {
        let ours_to_dial = match target {
            DialTarget::Node(id) => *id < self.me || candidate.is_static,
            DialTarget::Static(_) => true,
        };
        ours_to_dial && !candidate.dialing && !self.is_linked(target)
    }

    fn is_linked(&self, target: &DialTarget) -> bool {
        match target {
            DialTarget::Node(id) => self.links.contains_key(id),
            DialTarget::Static(_) => false,
        }
    }

    /// Takes as parent the linked peer with a smaller id that is closest to
    /// the best root, and tells every link when our position changes.
    fn choose_parent(&mut self) {
        let best = self
            .links
            .iter()
            .filter(|(id, _)| **id < self.me)
            .filter_map(|(id, link)| link.position.map(|p| (p.root, p.depth, *id)))
            .min();
        let new_parent = best.map(|(_, _, id)| id);
        if new_parent != self.parent {
            if let Some(old) = self.parent.take() {
                self.send(old, NodeMessage::Detach);
                self.drop_edge(old);
            }
            if let Some(parent) = new_parent {
                tracing::debug!(parent = %parent.short(), "attaching to parent");
                self.send(parent, NodeMessage::Attach);
                self.parent = Some(parent);
                self.add_edge(parent);
            }
        }
        let position = match best {
            Some((root, depth, _)) => Position {
                root,
                depth: depth + 1,
            },
            None => Position {
                root: self.me,
                depth: 0,
            },
        };
        if position != self.position {
            self.position = position;
            let peers: Vec<NodeId> = self.links.keys().copied().collect();
            for peer in peers {
                self.send(peer, self.position_message());
            }
        }
    }

    fn add_edge(&mut self, peer: NodeId) {
        let mut out = Vec::new();
        self.interest.add_edge(peer, &mut out);
        self.send_interest(out);
    }

    fn drop_edge(&mut self, peer: NodeId) {
        let mut out = Vec::new();
        self.interest.remove_edge(peer, &mut out);
        self.send_interest(out);
    }

    fn send_interest(&mut self, updates: Vec<(NodeId, InterestUpdate)>) {
        for (peer, update) in updates {
            self.send(peer, NodeMessage::Interest(update));
        }
    }

    fn send(&mut self, peer: NodeId, message: NodeMessage) {
        self.actions.push_back(Action::Send { peer, message });
    }

    fn position_message(&self) -> NodeMessage {
        NodeMessage::Position {
            root: self.position.root,
            depth: self.position.depth,
        }
    }
}

fn backoff(config: &OverlayConfig, failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    (config.backoff_initial * factor).min(config.backoff_max)
}

#[cfg(test)]
mod tests;
