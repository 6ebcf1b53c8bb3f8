//! A deterministic simulator of many overlay cores on a virtual network.
//!
//! Links deliver in order after a seeded latency; a crashed node's peers
//! notice after the idle timeout; a partition cuts links between sets and
//! makes dials across it fail. Invariants are checked after every step for
//! the node that stepped: its parent has a smaller id, no cycle runs
//! through it, and it has at most `max_children` children. Violations are
//! recorded, not panicked on, so a run can report them.
//!
//! With [`Sim::enable_delivery`] every node also runs the delivery core
//! with a store in memory (see `delivery`): durable subscriptions,
//! custody hop by hop, and acknowledgements travel the same links.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use treescale::delivery::CustodyFrame;
use treescale::overlay::{
    replay, Action, Arrival, DialTarget, Hop, LocalSub, NewConnection, NextHop, Overlay,
    OverlayConfig, ReplayWindow, Route,
};
use treescale::store::writer::Epoch;
use treescale::store::MemoryStore;
use treescale::topic::{Pattern, Topic};
use treescale::wire::{
    DeliveryMessage, Destination, Event as Published, EventId, GroupKey, NodeEventFrame,
    OverlayMessage,
};
use treescale::NodeId;

use super::delivery::{NodeDelivery, Outgoing, PublishKey, Seen};
use crate::engine::LinkChange;

/// The seed of a run: `SIM_SEED` if set, so a failure can be replayed.
pub fn seed() -> u64 {
    match std::env::var("SIM_SEED") {
        Ok(s) => s.parse().expect("SIM_SEED is a number"),
        Err(_) => rand::random(),
    }
}

/// What a link carries.
enum Wire {
    Overlay(OverlayMessage),
    Delivery(DeliveryMessage),
    Custody { token: u64, frame: NodeEventFrame },
}

enum Event {
    Deliver {
        from: usize,
        to: usize,
        message: Wire,
        epoch: u64,
    },
    DialDone {
        from: usize,
        to: usize,
        target: DialTarget,
    },
    LinkDown {
        node: usize,
        peer: usize,
    },
    Timeout {
        node: usize,
    },
}

pub struct Sim {
    pub now: Instant,
    start: Instant,
    pub nodes: Vec<Option<Overlay>>,
    pub ids: Vec<NodeId>,
    index: HashMap<NodeId, usize>,
    queue: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    events: HashMap<usize, Event>,
    next_seq: u64,
    /// Numbers the events published, so nodes can tell copies apart.
    pub published: u64,
    /// Each node's replay window (what is kept of an event: its id and
    /// topic); a crash loses it.
    windows: Vec<ReplayWindow<(EventId, Topic)>>,
    /// When each local subscription (node, sub) began: a replayed event
    /// published before that is not for it.
    subscribed: HashMap<(usize, u64), Instant>,
    /// Events replays handed to local subscriptions: (node, sub, the
    /// event's number); the caller drains it.
    pub replayed: Vec<(usize, u64, u64)>,
    /// Events sent again from replay windows, across all nodes.
    pub replays_sent: u64,
    rng: StdRng,
    /// Live links, by ordered pair, with the epoch that tells an old link's
    /// messages from a new one's.
    /// Ordered, so crashes and partitions break links in the same order
    /// on every run.
    links: BTreeMap<(usize, usize), u64>,
    next_epoch: u64,
    /// Which side of a partition each node is on; nodes on different
    /// sides cannot reach each other.
    side: Vec<u32>,
    /// When each link direction last delivered, to keep delivery in order.
    last_delivery: HashMap<(usize, usize), Instant>,
    pub latency: Duration,
    pub idle_timeout: Duration,
    pub max_children: usize,
    pub steps: u64,
    pub messages: u64,
    /// Last time any node changed parent or the set of roots changed.
    pub last_change: Instant,
    armed: Vec<Option<Instant>>,
    /// Each node's parent as of its last step, to see changes.
    parents: Vec<Option<NodeId>>,
    /// Broken invariants, in the order seen.
    pub violations: Vec<SimViolation>,
    /// The most connections each node held at once.
    pub peak_links: Vec<usize>,
    /// Changes from one parent straight to another (planned moves, made
    /// before the old edge broke), across all nodes.
    pub direct_moves: u64,
    /// Links nodes saw go down or come up, for detection times; the
    /// caller drains it.
    pub link_log: Vec<LinkChange>,
    config: OverlayConfig,
    /// Each node's delivery core, once enabled.
    delivery: Vec<Option<NodeDelivery>>,
    /// Each node's store: it outlives a crash.
    stores: Vec<Arc<MemoryStore>>,
    /// What the delivery cores did that the caller sees, by node; the
    /// caller drains it.
    pub seen: Vec<(usize, Seen)>,
    /// The last position handed to each durable client, by subscription
    /// number: the client's, so it survives the client moving.
    handed: BTreeMap<u64, u64>,
    /// Each node's count of refused at-least-once events per client
    /// session, as the node's driver keeps it: each ends an epoch.
    refusals: HashMap<(usize, u64), u64>,
}

#[derive(Debug, Clone)]
pub struct SimViolation {
    pub at: Duration,
    pub node: usize,
    /// `loop`, `heap-order` or `degree`.
    pub invariant: &'static str,
    pub detail: String,
}

fn new_window(now: Instant) -> ReplayWindow<(EventId, Topic)> {
    ReplayWindow::new(replay::DEFAULT_KEEP_FOR, replay::DEFAULT_MAX_BYTES, now)
}

/// A made-up address that encodes the node's index in its port; nothing
/// is ever sent to it.
fn addr(index: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1024 + index as u16))
}

fn index_of(addr: SocketAddr) -> usize {
    addr.port() as usize - 1024
}

impl Sim {
    pub fn new(n: usize, max_children: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let start = Instant::now();
        let mut ids: Vec<NodeId> = (0..n).map(|_| NodeId::from_bytes(rng.random())).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n);
        // Shuffle so index order says nothing about id order.
        for i in (1..n).rev() {
            let j = rng.random_range(0..=i);
            ids.swap(i, j);
        }
        let config = OverlayConfig {
            max_children,
            ..OverlayConfig::default()
        };
        let nodes = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                Some(Overlay::new(
                    *id,
                    format!("n{i}"),
                    config.clone(),
                    rng.random(),
                ))
            })
            .collect();
        let index = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        Sim {
            now: start,
            start,
            nodes,
            ids,
            index,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            next_seq: 0,
            published: 0,
            windows: (0..n).map(|_| new_window(start)).collect(),
            subscribed: HashMap::new(),
            replayed: Vec::new(),
            replays_sent: 0,
            rng,
            links: BTreeMap::new(),
            next_epoch: 1,
            side: vec![0; n],
            last_delivery: HashMap::new(),
            latency: Duration::from_micros(500),
            idle_timeout: Duration::from_secs(1),
            max_children,
            steps: 0,
            messages: 0,
            last_change: start,
            armed: vec![None; n],
            parents: vec![None; n],
            violations: Vec::new(),
            peak_links: vec![0; n],
            direct_moves: 0,
            link_log: Vec::new(),
            config,
            delivery: Vec::new(),
            stores: Vec::new(),
            seen: Vec::new(),
            handed: BTreeMap::new(),
            refusals: HashMap::new(),
        }
    }

    /// Runs the delivery core on every node from now on.
    pub fn enable_delivery(&mut self) {
        self.stores = self
            .ids
            .iter()
            .map(|id| Arc::new(MemoryStore::new(*id)))
            .collect();
        self.delivery = (0..self.ids.len())
            .map(|i| {
                self.nodes[i]
                    .is_some()
                    .then(|| NodeDelivery::start(self.ids[i], self.stores[i].clone(), self.now))
            })
            .collect();
    }

    fn delivery_of(&mut self, i: usize) -> Option<&mut NodeDelivery> {
        self.delivery.get_mut(i).and_then(Option::as_mut)
    }

    /// Panics with the first broken invariant, for tests.
    pub fn assert_no_violations(&self) {
        if let Some(v) = self.violations.first() {
            panic!(
                "{} at node {} (t={:?}): {}",
                v.invariant, v.node, v.at, v.detail
            );
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn key(a: usize, b: usize) -> (usize, usize) {
        (a.min(b), a.max(b))
    }

    fn schedule(&mut self, at: Instant, event: Event) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push(Reverse((at, seq, seq as usize)));
        self.events.insert(seq as usize, event);
    }

    fn jitter(&mut self) -> Duration {
        self.latency.mul_f64(self.rng.random_range(0.5..1.5))
    }

    /// Tells every live node about the `k` smallest ids on its side, `k`
    /// smaller than its own drawn at random and up to `k` others, as mDNS
    /// would (it shows every node; the node keeps its smallest candidates
    /// and a sample).
    pub fn discover(&mut self, k: usize) {
        self.discover_some(k, |_| true);
    }

    /// Like [`Sim::discover`], for the nodes `which` selects.
    fn discover_some(&mut self, k: usize, which: impl Fn(usize) -> bool) {
        let mut by_side: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for i in 0..self.nodes.len() {
            if self.nodes[i].is_some() {
                by_side.entry(self.side[i]).or_default().push(i);
            }
        }
        for members in by_side.values_mut() {
            members.sort_by_key(|i| self.ids[*i]);
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].is_none() || !which(i) {
                continue;
            }
            let members = &by_side[&self.side[i]];
            let mut told: Vec<usize> = members
                .iter()
                .copied()
                .filter(|j| *j != i)
                .take(k)
                .collect();
            // The sample: nodes smaller than this one, beyond the smallest
            // (`members` is sorted by id).
            let rank = members
                .iter()
                .position(|j| *j == i)
                .expect("a member of its side");
            let smaller_others = rank.saturating_sub(k);
            for _ in 0..k.min(smaller_others) {
                let j = loop {
                    let j = members[self.rng.random_range(k..rank)];
                    if !told.contains(&j) {
                        break j;
                    }
                };
                told.push(j);
            }
            // And some of the rest, as mDNS shows every node: a node among
            // the smallest learns that the cluster is large.
            for _ in 0..k {
                let j = members[self.rng.random_range(0..members.len())];
                if j != i && !told.contains(&j) {
                    told.push(j);
                }
            }
            // mDNS answers come in no particular order (responders wait
            // 20-120 ms at random), and a first join starts at the first
            // smaller node seen.
            for a in (1..told.len()).rev() {
                let b = self.rng.random_range(0..=a);
                told.swap(a, b);
            }
            let now = self.now;
            let node = self.nodes[i].as_mut().unwrap();
            for j in told {
                node.handle_discovered(self.ids[j], vec![addr(j)], None, now);
            }
            self.after_step(i);
        }
    }

    pub fn subscribe(&mut self, i: usize, pattern: &str, group: Option<&str>, sub: u64) {
        self.change_interest(i, pattern, group, sub, true);
    }

    pub fn unsubscribe(&mut self, i: usize, pattern: &str, group: Option<&str>, sub: u64) {
        self.change_interest(i, pattern, group, sub, false);
    }

    fn change_interest(
        &mut self,
        i: usize,
        pattern: &str,
        group: Option<&str>,
        sub: u64,
        on: bool,
    ) {
        let pattern = Pattern::new(pattern).unwrap();
        let local = LocalSub {
            session: i as u64,
            sub,
        };
        let node = self.nodes[i].as_mut().unwrap();
        if on {
            node.subscribe(&pattern, group, local);
            self.subscribed.insert((i, sub), self.now);
        } else {
            node.unsubscribe(&pattern, group, local);
        }
        self.after_step(i);
    }

    /// Drains a node's actions into the network and re-arms its timer.
    fn after_step(&mut self, i: usize) {
        self.steps += 1;
        let mut actions = Vec::new();
        while let Some(action) = self.nodes[i].as_mut().unwrap().poll_action() {
            actions.push(action);
        }
        for action in actions {
            match action {
                Action::Send { peer, message } => {
                    self.transmit(i, peer, Wire::Overlay(message));
                }
                Action::Dial { target, .. } => {
                    let j = match target {
                        DialTarget::Node(id) => self.index[&id],
                        DialTarget::Static(a) => index_of(a),
                    };
                    let at = self.now + self.jitter() * 2;
                    self.schedule(
                        at,
                        Event::DialDone {
                            from: i,
                            to: j,
                            target,
                        },
                    );
                }
                Action::Disconnect { peer } => {
                    let j = self.index[&peer];
                    if self.links.remove(&Self::key(i, j)).is_some() {
                        let at = self.now + self.jitter();
                        self.schedule(at, Event::LinkDown { node: j, peer: i });
                    }
                }
                Action::Replay { peer, pattern } => self.replay(i, peer, &pattern),
            }
        }
        self.run_delivery(i);
        if let Some(node) = self.nodes[i].as_ref() {
            self.peak_links[i] = self.peak_links[i].max(node.link_count());
            if node.parent() != self.parents[i] {
                if node.parent().is_some() && self.parents[i].is_some() {
                    self.direct_moves += 1;
                }
                self.parents[i] = node.parent();
                self.last_change = self.now;
            }
            self.check_node(i);
            let node = self.nodes[i].as_ref().expect("checked above");
            let delivery_wake = self
                .delivery
                .get(i)
                .and_then(Option::as_ref)
                .map(|d| d.core.poll_timeout());
            let wake = match (node.poll_timeout(), delivery_wake) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let Some(wake) = wake.filter(|w| Some(*w) != self.armed[i]) {
                self.armed[i] = Some(wake);
                let at = wake.max(self.now);
                self.schedule(at, Event::Timeout { node: i });
            }
        }
    }

    /// Sends `wire` on the link from `i` to `peer`, in order after what
    /// went before; returns false if there is no link.
    fn transmit(&mut self, i: usize, peer: NodeId, message: Wire) -> bool {
        let j = self.index[&peer];
        let Some(epoch) = self.links.get(&Self::key(i, j)).copied() else {
            return false;
        };
        self.messages += 1;
        let mut at = self.now + self.jitter();
        let last = self.last_delivery.entry((i, j)).or_insert(at);
        if at < *last {
            at = *last;
        }
        *last = at;
        self.schedule(
            at,
            Event::Deliver {
                from: i,
                to: j,
                message,
                epoch,
            },
        );
        true
    }

    /// Carries out what node `i`'s delivery core asks for.
    fn run_delivery(&mut self, i: usize) {
        let Some(overlay) = self.nodes[i].as_ref() else {
            return;
        };
        let Some(delivery) = self.delivery.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        let (mut out, mut seen) = (Vec::new(), Vec::new());
        let next_hop = |home| match overlay.next_hop(Hop::Local, &Destination::Node(home)) {
            NextHop::Edge(peer) => Some(peer),
            _ => None,
        };
        delivery.run(self.now, next_hop, &mut self.handed, &mut out, &mut seen);
        self.seen.extend(seen.into_iter().map(|s| (i, s)));
        let mut unsent = Vec::new();
        for outgoing in out {
            match outgoing {
                Outgoing::Control(peer, message) => {
                    self.transmit(i, peer, Wire::Delivery(message));
                }
                Outgoing::Custody { peer, token, frame } => {
                    if !self.transmit(i, peer, Wire::Custody { token, frame }) {
                        unsent.push(token);
                    }
                }
            }
        }
        // They go again on a later step, as in the node.
        if !unsent.is_empty() {
            let delivery = self.delivery_of(i).expect("running above");
            delivery.core.handle_unsent(unsent.into_iter());
        }
    }

    /// Invariants that must hold at every instant for node `i`.
    fn check_node(&mut self, i: usize) {
        let node = self.nodes[i].as_ref().unwrap();
        // Children asked to move elsewhere stay until they have left.
        let children = node.children().count() - node.children_sent_away();
        let mut broken = Vec::new();
        if children > self.max_children {
            broken.push((
                "degree",
                format!("{children} children, bound {}", self.max_children),
            ));
        }
        let mut at = self.ids[i];
        let mut hops = 0;
        while let Some(parent) = self.nodes[self.index[&at]]
            .as_ref()
            .and_then(|n| n.parent())
        {
            if parent >= at {
                broken.push((
                    "heap-order",
                    format!("node {} has a parent with a greater id", self.index[&at]),
                ));
                break;
            }
            at = parent;
            hops += 1;
            if hops > self.nodes.len() {
                broken.push(("loop", "parent pointers go round".to_string()));
                break;
            }
        }
        let at = self.elapsed();
        for (invariant, detail) in broken {
            self.violations.push(SimViolation {
                at,
                node: i,
                invariant,
                detail,
            });
        }
    }

    /// Runs events until `until` (virtual) or until the queue is empty.
    pub fn run_until(&mut self, until: Instant) {
        let mut at_this_instant = 0u32;
        while let Some(Reverse((at, _, key))) = self.queue.peek().copied() {
            if at > until {
                break;
            }
            self.queue.pop();
            at_this_instant = if at == self.now {
                at_this_instant + 1
            } else {
                0
            };
            assert!(
                at_this_instant < 1_000_000,
                "livelock: a million events without time passing at {:?}",
                self.elapsed()
            );
            self.now = at;
            let event = self.events.remove(&key).unwrap();
            self.handle(event);
        }
        self.now = until.max(self.now);
    }

    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.nodes[a].is_some() && self.nodes[b].is_some() && self.side[a] == self.side[b]
    }

    fn handle(&mut self, event: Event) {
        let now = self.now;
        match event {
            Event::Deliver {
                from,
                to,
                message,
                epoch,
            } => {
                if self.links.get(&Self::key(from, to)) != Some(&epoch) {
                    return;
                }
                let from_id = self.ids[from];
                if self.nodes[to].is_none() {
                    return;
                }
                match message {
                    Wire::Overlay(message) => {
                        let node = self.nodes[to].as_mut().expect("checked above");
                        node.handle_message(from_id, message, now);
                    }
                    Wire::Delivery(message) => {
                        if let Some(delivery) = self.delivery_of(to) {
                            delivery.core.handle_message(from_id, message, now);
                        }
                    }
                    Wire::Custody { token, frame } => {
                        let NodeEventFrame::Custody {
                            event,
                            epoch,
                            targets,
                            ..
                        } = frame
                        else {
                            unreachable!("only custody frames travel as custody");
                        };
                        if let Some(delivery) = self.delivery_of(to) {
                            let frame = CustodyFrame {
                                token,
                                event,
                                epoch,
                                targets,
                            };
                            delivery.core.handle_custody(from_id, vec![frame], now);
                        }
                    }
                }
                self.after_step(to);
            }
            Event::DialDone { from, to, target } => {
                if self.nodes[from].is_none() {
                    return;
                }
                let key = Self::key(from, to);
                if self.reachable(from, to) && !self.links.contains_key(&key) {
                    let epoch = self.next_epoch;
                    self.next_epoch += 1;
                    self.links.insert(key, epoch);
                    let (from_id, to_id) = (self.ids[from], self.ids[to]);
                    self.nodes[from].as_mut().unwrap().handle_link_up(
                        to_id,
                        addr(to),
                        Some(target),
                        now,
                    );
                    self.nodes[to]
                        .as_mut()
                        .unwrap()
                        .handle_link_up(from_id, addr(from), None, now);
                    if let Some(delivery) = self.delivery_of(from) {
                        delivery.core.handle_link_up(to_id);
                    }
                    if let Some(delivery) = self.delivery_of(to) {
                        delivery.core.handle_link_up(from_id);
                    }
                    self.link_log.push(LinkChange {
                        at: now - self.start,
                        node: from,
                        peer: to,
                        up: true,
                    });
                    self.after_step(from);
                    self.after_step(to);
                } else if self.links.contains_key(&key) {
                    // A second connection between linked nodes: both sides
                    // make the same choice of which survives.
                    let (from_id, to_id) = (self.ids[from], self.ids[to]);
                    let choice = self.nodes[from].as_mut().unwrap().handle_link_up(
                        to_id,
                        addr(to),
                        Some(target),
                        now,
                    );
                    if choice == NewConnection::ReplaceOld {
                        let other = self.nodes[to].as_mut().unwrap().handle_link_up(
                            from_id,
                            addr(from),
                            None,
                            now,
                        );
                        debug_assert_eq!(other, NewConnection::ReplaceOld);
                        // What was in flight on the old connection is lost.
                        self.links.insert(key, self.next_epoch);
                        self.next_epoch += 1;
                        if let Some(delivery) = self.delivery_of(from) {
                            delivery.core.handle_link_replaced(to_id);
                        }
                        if let Some(delivery) = self.delivery_of(to) {
                            delivery.core.handle_link_replaced(from_id);
                        }
                        self.after_step(to);
                    }
                    self.after_step(from);
                } else {
                    self.nodes[from]
                        .as_mut()
                        .unwrap()
                        .handle_dial_failed(target, now);
                    self.after_step(from);
                }
            }
            Event::LinkDown { node, peer } => {
                let peer_id = self.ids[peer];
                if let Some(delivery) = self.delivery_of(node) {
                    delivery.core.handle_link_down(peer_id);
                }
                if let Some(overlay) = self.nodes[node].as_mut() {
                    overlay.handle_link_down(peer_id, now);
                    self.link_log.push(LinkChange {
                        at: now - self.start,
                        node,
                        peer,
                        up: false,
                    });
                    self.after_step(node);
                }
            }
            Event::Timeout { node } => {
                if self.armed[node].is_some_and(|t| t <= now) {
                    self.armed[node] = None;
                }
                if let Some(delivery) = self.delivery_of(node) {
                    delivery.core.handle_timeout(now);
                }
                if let Some(overlay) = self.nodes[node].as_mut() {
                    overlay.handle_timeout(now);
                    self.after_step(node);
                }
            }
        }
    }

    /// Kills node `i`: its peers notice after the idle timeout.
    pub fn crash(&mut self, i: usize) {
        self.nodes[i] = None;
        self.refusals.retain(|(node, _), _| *node != i);
        if let Some(delivery) = self.delivery.get_mut(i) {
            *delivery = None;
        }
        let broken: Vec<(usize, usize)> = self
            .links
            .keys()
            .filter(|(a, b)| *a == i || *b == i)
            .copied()
            .collect();
        for key in broken {
            self.links.remove(&key);
            let peer = if key.0 == i { key.1 } else { key.0 };
            let at = self.now + self.idle_timeout;
            self.schedule(
                at,
                Event::LinkDown {
                    node: peer,
                    peer: i,
                },
            );
        }
        self.last_change = self.now;
    }

    /// Splits the nodes into sides: `side_of(i)` for each node. Links
    /// across sides break, noticed after the idle timeout.
    pub fn partition(&mut self, side_of: impl Fn(usize) -> u32) {
        for i in 0..self.side.len() {
            self.side[i] = side_of(i);
        }
        let broken: Vec<(usize, usize)> = self
            .links
            .keys()
            .filter(|(a, b)| self.side[*a] != self.side[*b])
            .copied()
            .collect();
        for (a, b) in broken {
            self.links.remove(&(a, b));
            let at = self.now + self.idle_timeout;
            self.schedule(at, Event::LinkDown { node: a, peer: b });
            self.schedule(at, Event::LinkDown { node: b, peer: a });
        }
    }

    pub fn heal(&mut self) {
        self.side.iter_mut().for_each(|s| *s = 0);
    }

    /// Starts crashed node `i` again with the same id and no state, and
    /// lets it discover the `k` smallest ids on its side.
    pub fn restart(&mut self, i: usize, k: usize) {
        let seed = self.rng.random();
        // A restarted node's directory entries supersede its old ones.
        let config = OverlayConfig {
            started_ms: self.elapsed().as_millis() as u64,
            ..self.config.clone()
        };
        let overlay = Overlay::new(self.ids[i], format!("n{i}"), config, seed);
        self.nodes[i] = Some(overlay);
        self.windows[i] = new_window(self.now);
        if !self.stores.is_empty() {
            let store = self.stores[i].clone();
            self.delivery[i] = Some(NodeDelivery::start(self.ids[i], store, self.now));
        }
        self.armed[i] = None;
        self.parents[i] = None;
        self.last_change = self.now;
        self.discover_some(k, |j| j == i);
    }

    /// Every node's parent by index (`None` for roots and nodes that are
    /// down).
    pub fn parents(&self) -> Vec<Option<usize>> {
        self.nodes
            .iter()
            .map(|node| {
                node.as_ref()
                    .and_then(|node| node.parent())
                    .map(|p| self.index[&p])
            })
            .collect()
    }

    /// Which side of the partition node `i` is on.
    pub fn side_of(&self, i: usize) -> u32 {
        self.side[i]
    }

    pub fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].is_some())
    }

    /// Roots per side, once the tree has settled.
    pub fn roots(&self) -> Vec<usize> {
        self.live()
            .filter(|i| self.nodes[*i].as_ref().unwrap().parent().is_none())
            .collect()
    }

    pub fn max_depth(&self) -> u32 {
        self.live().map(|i| self.depth_of(i)).max().unwrap_or(0)
    }

    /// Live nodes at each depth, the roots' first.
    pub fn depth_histogram(&self) -> Vec<u32> {
        let mut histogram = Vec::new();
        for i in self.live() {
            let depth = self.depth_of(i) as usize;
            if histogram.len() <= depth {
                histogram.resize(depth + 1, 0);
            }
            histogram[depth] += 1;
        }
        histogram
    }

    fn depth_of(&self, i: usize) -> u32 {
        let mut depth = 0;
        let mut at = i;
        while let Some(parent) = self.nodes[at].as_ref().unwrap().parent() {
            at = self.index[&parent];
            depth += 1;
        }
        depth
    }

    /// Checks that each side holds one tree: one root, the side's smallest
    /// id, every parent and child agreeing, every node's recorded
    /// position true, and the root's directory listing every node.
    pub fn assert_settled_trees(&self) {
        let mut sides: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for i in self.live() {
            sides.entry(self.side[i]).or_default().push(i);
        }
        for (side, members) in sides {
            let smallest = *members.iter().min_by_key(|i| self.ids[**i]).unwrap();
            let listed: BTreeSet<NodeId> = self.nodes[smallest]
                .as_ref()
                .unwrap()
                .tree()
                .iter()
                .map(|entry| entry.id)
                .collect();
            let members_ids: BTreeSet<NodeId> = members.iter().map(|i| self.ids[*i]).collect();
            assert_eq!(
                listed.symmetric_difference(&members_ids).count(),
                0,
                "side {side}: the root's directory is not the tree"
            );
            for &i in &members {
                let node = self.nodes[i].as_ref().unwrap();
                match node.parent() {
                    None => assert_eq!(i, smallest, "side {side}: node {i} is a second root"),
                    Some(parent) => {
                        let p = self.index[&parent];
                        assert_eq!(
                            self.side[p], side,
                            "node {i} has a parent across the partition"
                        );
                        assert!(
                            self.nodes[p].as_ref().unwrap().is_child(self.ids[i]),
                            "node {p} does not list child {i}"
                        );
                    }
                }
                assert_eq!(
                    node.children_sent_away(),
                    0,
                    "node {i} still waits for a child it sent away"
                );
                for child in node.children() {
                    let c = self.index[&child];
                    assert_eq!(
                        self.nodes[c].as_ref().and_then(|n| n.parent()),
                        Some(self.ids[i]),
                        "node {i} lists {c} as child"
                    );
                }
                assert_eq!(
                    node.position().root,
                    self.ids[smallest],
                    "node {i} has a stale root"
                );
                assert_eq!(
                    node.position().depth,
                    self.depth_of(i),
                    "node {i} has a stale depth"
                );
            }
        }
    }

    /// Runs until the tree is whole (one root per side, so every node is
    /// attached), no node changed parent for `quiet` and none is moving, or fails after
    /// `limit`. Returns how long after the call the tree first became
    /// whole: the convergence or repair time. Moves after that only
    /// rebalance it (a moving subtree is briefly on its own).
    pub fn settle(&mut self, quiet: Duration, limit: Duration) -> Duration {
        let deadline = self.now + limit;
        let started = self.now;
        let mut first_whole = None;
        loop {
            self.run_for(Duration::from_millis(10));
            // A node whose parent died is detached until it re-joins.
            let tops = self
                .live()
                .filter(|i| {
                    let parent = self.nodes[*i].as_ref().unwrap().parent();
                    parent.is_none_or(|p| self.nodes[self.index[&p]].is_none())
                })
                .count();
            let sides: BTreeSet<u32> = self.live().map(|i| self.side[i]).collect();
            let whole = tops == sides.len();
            if whole {
                first_whole.get_or_insert(self.now);
                // A move under way is not settled, though no parent changed
                // yet: its new parent already lists it as a child.
                let moving = self
                    .live()
                    .any(|i| self.nodes[i].as_ref().unwrap().is_moving());
                if self.now - self.last_change >= quiet && !moving {
                    self.assert_no_violations();
                    return first_whole.expect("set above") - started;
                }
            }
            assert!(
                self.now < deadline,
                "no convergence within {limit:?}: {tops} node(s) without a parent for {} side(s); last parent change {:?} before the end",
                sides.len(),
                self.now - self.last_change
            );
        }
    }

    /// Publishes from node `origin` and follows the event hop by hop;
    /// returns how often each (node, sub) received it.
    pub fn publish(&mut self, origin: usize, topic: &str) -> BTreeMap<(usize, u64), usize> {
        let topic = Topic::new(topic).unwrap();
        self.published += 1;
        let id = EventId {
            publisher: u64::MAX,
            seq: self.published,
        };
        let start = (origin, Hop::Local, None::<Vec<GroupKey>>, false);
        self.spread(start, id, &topic, None)
    }

    /// Node `i` sends `peer` what its replay window holds for `pattern`,
    /// as the node's driver does.
    fn replay(&mut self, i: usize, peer: NodeId, pattern: &Pattern) {
        let j = self.index[&peer];
        let replays = self.windows[i].replay(pattern, self.now);
        for replay::Replay {
            event: (id, topic),
            age,
        } in replays
        {
            self.replays_sent += 1;
            if !self.links.contains_key(&Self::key(i, j)) {
                continue;
            }
            let published = self.now - age;
            let start = (j, Hop::Edge(self.ids[i]), Some(Vec::new()), false);
            let got = self.spread(start, id, &topic, Some(published));
            for ((node, sub), count) in got {
                let subscribed = self.subscribed.get(&(node, sub));
                if subscribed.is_some_and(|at| *at <= published) {
                    let copies = std::iter::repeat_n((node, sub, id.seq), count);
                    self.replayed.extend(copies);
                }
            }
        }
    }

    /// Routes an event hop by hop from `start` through the cores, in one
    /// instant; returns the local subscriptions it reached. A replayed
    /// event (published at `replayed`) stops where it was taken before.
    fn spread(
        &mut self,
        start: (usize, Hop, Option<Vec<GroupKey>>, bool),
        id: EventId,
        topic: &Topic,
        replayed: Option<Instant>,
    ) -> BTreeMap<(usize, u64), usize> {
        let mut got = BTreeMap::new();
        let mut queue = VecDeque::from([start]);
        let mut hops = 0;
        while let Some((at, from, assigned, only_groups)) = queue.pop_front() {
            hops += 1;
            assert!(hops <= 4 * self.nodes.len(), "event loops");
            let window = &mut self.windows[at];
            let node = self.nodes[at].as_mut().unwrap();
            // The window's rules, as a node's driver applies them.
            let keeping = node.keeps_replays(self.now);
            let kept = (id, topic.clone());
            let only_groups = match replayed {
                Some(published) => {
                    if !window.take_replayed(&kept, keeping, published, self.now) {
                        continue;
                    }
                    false
                }
                None => !window.take_arrival(&kept, keeping, only_groups, self.now) || only_groups,
            };
            let mut route = Route::default();
            let arrival = Arrival {
                only_groups,
                ..Arrival::new(from, assigned.as_deref())
            };
            node.route(id, arrival, topic, &mut route);
            for sub in route.local {
                *got.entry((at, sub.sub)).or_default() += 1;
            }
            let lingering = route
                .lingering
                .into_iter()
                .map(|(edge, groups)| (edge, groups, true));
            let edges = route
                .edges
                .into_iter()
                .map(|(edge, groups)| (edge, groups, route.only_groups));
            for (edge, groups, only_groups) in edges.chain(lingering) {
                let next = self.index[&edge];
                // Lost on a link that is down (the core has not noticed yet).
                if !self.links.contains_key(&Self::key(at, next)) {
                    continue;
                }
                let from = Hop::Edge(self.ids[at]);
                // A replay goes on whole and without groups, as a node's
                // `Replayed` frame does.
                let next_hop = match replayed {
                    Some(_) => (next, from, Some(Vec::new()), false),
                    None => (next, from, Some(groups), only_groups),
                };
                queue.push_back(next_hop);
            }
        }
        self.messages += hops as u64 - 1;
        got
    }

    /// At-least-once events held in custody on the way to their homes,
    /// across all live nodes.
    pub fn custody_held(&self) -> u64 {
        self.delivery
            .iter()
            .flatten()
            .map(|d| d.core.outbox_len().0 as u64)
            .sum()
    }

    /// Attaches durable client `sub` of node `i` to durable `name`
    /// (created there if new); `Seen::Attached` says when it is.
    pub fn subscribe_durable(&mut self, i: usize, name: &str, pattern: &str, sub: u64) {
        let now = self.now;
        let mut seen = Vec::new();
        let delivery = self.delivery_of(i).expect("delivery enabled, node up");
        delivery.subscribe(i as u64, sub, name, pattern, now, &mut seen);
        self.seen.extend(seen.into_iter().map(|s| (i, s)));
        self.after_step(i);
    }

    /// Publishes at least once from node `origin`, on the client
    /// connection `session`: routed to live subscribers like any event,
    /// and taken into custody for durable ones. `Seen::Confirmed` says
    /// when the node confirms it, `Seen::Released` when it has handed it
    /// on.
    pub fn publish_at_least_once(
        &mut self,
        origin: usize,
        topic: &str,
        key: PublishKey,
        session: u64,
    ) -> BTreeMap<(usize, u64), usize> {
        let got = self.publish(origin, topic);
        let event = Published {
            id: EventId {
                publisher: key.0 as u64,
                seq: key.1,
            },
            origin: self.ids[origin],
            topic: Topic::new(topic).expect("checked on load"),
            headers: Vec::new(),
            payload: bytes::Bytes::new(),
            reply: None,
        };
        let now = self.now;
        let generation = self.refusals.get(&(origin, session)).copied();
        let epoch = Epoch::Connection {
            session,
            generation: generation.unwrap_or(0),
        };
        let delivery = self.delivery_of(origin).expect("delivery enabled, node up");
        match delivery.core.admit(event, epoch) {
            Ok(item) => {
                let then = treescale::delivery::Commit::Publisher {
                    publisher: key,
                    session,
                    seqs: vec![key.1],
                };
                delivery.core.take_custody(vec![item], then, now);
            }
            Err(_) => {
                *self.refusals.entry((origin, session)).or_default() += 1;
                self.seen.push((origin, Seen::Confirmed(key, false)))
            }
        }
        self.after_step(origin);
        got
    }

    /// Transmissions of one event from `origin`, for the overhead figure.
    pub fn transmissions(&mut self, origin: usize, topic: &str) -> u64 {
        let before = self.messages;
        self.publish(origin, topic);
        self.messages - before
    }
}

impl Sim {
    /// Follows a directed event from `origin` to the node `target` hop by
    /// hop; returns the hops taken, or `None` if it was dropped.
    pub fn send_directed(&mut self, origin: usize, target: usize) -> Option<usize> {
        use treescale::overlay::{Hop, NextHop};
        use treescale::wire::Destination;
        let to = Destination::Node(self.ids[target]);
        let mut at = origin;
        let mut from = Hop::Local;
        for hops in 0..=2 * self.nodes.len() {
            match self.nodes[at].as_ref()?.next_hop(from, &to) {
                NextHop::Here => return (at == target).then_some(hops),
                NextHop::Edge(next) => {
                    from = Hop::Edge(self.ids[at]);
                    at = self.index[&next];
                }
                NextHop::Unknown => return None,
            }
        }
        panic!("directed event loops");
    }
}
