//! Protocol mode: the scenario on the sans-IO cores alone, on the
//! deterministic event simulator in `sim`, for tens of thousands of nodes.
//! There is no QUIC and no client: publishers' events are routed hop by
//! hop through the overlay cores' routing state, and an event is lost
//! where it meets a link that is down. When the scenario has at-least-once
//! publishers or durable subscribers, every node also runs the delivery
//! core with a store in memory that survives its crashes: custody,
//! acknowledgements and durable queues are the real protocol's.

pub mod delivery;
pub mod sim;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::engine::{self, Backend, Change, LinkChange};
use crate::ledger::Ledger;
use crate::report::{Report, Violation};
use crate::scenario::{Qos, Scenario};
use delivery::Seen;
use sim::Sim;

/// Virtual time between checks of the tree and publishes.
const SLICE: Duration = Duration::from_millis(10);
/// Candidates discovery gives each node: the smallest ids it sees, and as
/// many others at random.
const DISCOVERED: usize = 32;

pub fn run(scenario: &Scenario, seed: u64) -> anyhow::Result<Report> {
    let names = scenario.nodes();
    let index: BTreeMap<String, usize> = names
        .iter()
        .enumerate()
        .map(|(i, name)| (name.clone(), i))
        .collect();
    let mut sim = Sim::new(names.len(), scenario.tree.max_children, seed);
    sim.latency = scenario.network.latency;
    let delivery = scenario.subscribers.iter().any(|s| s.durable.is_some())
        || scenario
            .publishers
            .iter()
            .any(|p| p.qos == Qos::AtLeastOnce);
    if delivery {
        sim.enable_delivery();
    }
    sim.discover(DISCOVERED);
    let subscribed_at = scenario
        .subscribers
        .iter()
        .map(|s| index[&s.node])
        .collect();
    let mut backend = Protocol {
        last_change: sim.last_change,
        sim,
        scenario,
        names,
        index,
        ledger: Ledger::new(scenario),
        violations: Vec::new(),
        owed: vec![0.0; scenario.publishers.len()],
        subscribed_at,
        connections: vec![Connection::default(); scenario.publishers.len()],
        sessions: 0,
        keys: HashMap::new(),
    };
    for s in 0..scenario.subscribers.len() {
        backend.subscribe(s);
        if scenario.subscribers[s].durable.is_none() {
            backend.ledger.ready(s, 0);
        }
    }
    engine::run(scenario, seed, backend)
}

/// The cores on the event simulator, as the engine's backend.
struct Protocol<'a> {
    sim: Sim,
    scenario: &'a Scenario,
    names: Vec<String>,
    index: BTreeMap<String, usize>,
    ledger: Ledger,
    /// Broken invariants the delivery cores showed.
    violations: Vec<Violation>,
    /// Per publisher, the fraction of an event it owes.
    owed: Vec<f64>,
    /// The simulator's last tree change as of the last step.
    last_change: Instant,
    /// The node each subscriber's client is at: its node, or its fallback
    /// while its node is down.
    subscribed_at: Vec<usize>,
    /// Each publisher's client connection.
    connections: Vec<Connection>,
    /// Client sessions opened so far, to number them.
    sessions: u64,
    /// The publisher and sequence number of each event the simulator
    /// numbered, for events replays deliver later.
    keys: HashMap<u64, (usize, u64)>,
}

/// A publisher's client, as the client library keeps it: the node it is
/// connected to, and the at-least-once events that node has not released,
/// to send again through another node if this one dies.
#[derive(Clone, Default)]
struct Connection {
    node: Option<usize>,
    session: u64,
    unreleased: BTreeSet<u64>,
}

impl Protocol<'_> {
    fn node_of(&self, name: &str) -> usize {
        self.index[name]
    }

    /// Subscribes subscriber `s` where its client is: to its durable
    /// subscription (homed at its node), or with interest in its pattern.
    fn subscribe(&mut self, s: usize) {
        let spec = &self.scenario.subscribers[s];
        let node = self.subscribed_at[s];
        match &spec.durable {
            Some(name) => self
                .sim
                .subscribe_durable(node, name, &spec.pattern, s as u64),
            None => self
                .sim
                .subscribe(node, &spec.pattern, spec.group.as_deref(), s as u64),
        }
    }

    fn is_up(&self, i: usize) -> bool {
        self.sim.nodes[i].is_some()
    }

    /// Node `i` crashed: subscribers whose client was there move to their
    /// other node, if it is up.
    fn crash(&mut self, i: usize) {
        self.sim.crash(i);
        for s in 0..self.scenario.subscribers.len() {
            if self.subscribed_at[s] != i {
                continue;
            }
            let spec = &self.scenario.subscribers[s];
            let other = [Some(&spec.node), spec.fallback.as_ref()]
                .into_iter()
                .flatten()
                .map(|name| self.node_of(name))
                .find(|&n| n != i && self.is_up(n));
            if let Some(other) = other {
                self.subscribed_at[s] = other;
                self.subscribe(s);
            }
        }
    }

    /// Restarts node `i`: the subscribers whose client waited for it (it
    /// was theirs, and nothing else was up) subscribe again there.
    fn restart(&mut self, i: usize) {
        self.sim.restart(i, DISCOVERED);
        for s in 0..self.scenario.subscribers.len() {
            let spec = &self.scenario.subscribers[s];
            let holds = self.node_of(&spec.node) == i
                || spec.fallback.as_ref().is_some_and(|f| self.node_of(f) == i);
            if self.subscribed_at[s] == i || (holds && !self.is_up(self.subscribed_at[s])) {
                self.subscribed_at[s] = i;
                self.subscribe(s);
            }
        }
    }

    /// The node publisher `p`'s client publishes through now: the one it
    /// is connected to while it is up, else its node or its fallback. On a
    /// new connection it first sends again what the old one had not
    /// released, in order.
    fn publisher_node(&mut self, p: usize) -> Option<usize> {
        let spec = &self.scenario.publishers[p];
        if let Some(node) = self.connections[p].node.filter(|&n| self.is_up(n)) {
            return Some(node);
        }
        let node = [Some(&spec.node), spec.fallback.as_ref()]
            .into_iter()
            .flatten()
            .map(|name| self.node_of(name))
            .find(|&n| self.is_up(n))?;
        self.sessions += 1;
        let connection = &mut self.connections[p];
        connection.node = Some(node);
        connection.session = self.sessions;
        let again: Vec<u64> = connection.unreleased.iter().copied().collect();
        let session = connection.session;
        for seq in again {
            self.sim
                .publish_at_least_once(node, &spec.topic, (p, seq), session);
        }
        Some(node)
    }

    /// Publishes what each publisher owes for the slice that started at
    /// `from`.
    fn publish(&mut self, from: Duration, now_ms: u64) {
        let scenario = self.scenario;
        for (p, spec) in scenario.publishers.iter().enumerate() {
            if from < spec.from || from >= spec.until.unwrap_or(scenario.duration) {
                continue;
            }
            // Whole events per slice, the fraction carried over: the rate
            // holds for any rate, not just multiples of 100/s.
            self.owed[p] += SLICE.as_secs_f64() * spec.rate as f64;
            let due = self.owed[p].floor() as u64;
            self.owed[p] -= due as f64;
            let Some(origin) = self.publisher_node(p) else {
                continue;
            };
            for _ in 0..due {
                let seq = self.ledger.publish(p, now_ms);
                let got = match spec.qos {
                    Qos::AtMostOnce => self.sim.publish(origin, &spec.topic),
                    Qos::AtLeastOnce => {
                        let connection = &mut self.connections[p];
                        connection.unreleased.insert(seq);
                        let session = connection.session;
                        self.sim
                            .publish_at_least_once(origin, &spec.topic, (p, seq), session)
                    }
                };
                self.keys.insert(self.sim.published, (p, seq));
                for ((node, sub), count) in got {
                    for _ in 0..count {
                        self.receive(node, sub, (p, seq), now_ms);
                    }
                }
            }
        }
    }

    /// Subscription `sub` of node `node` got the event `key`: counted if
    /// it is the subscriber's client at its own node.
    fn receive(&mut self, node: usize, sub: u64, key: (usize, u64), now_ms: u64) {
        let s = sub as usize;
        let subscriber = self.scenario.subscribers.get(s);
        if subscriber.is_some_and(|sub| self.node_of(&sub.node) == node) {
            self.ledger.receive(s, key, now_ms);
        }
    }

    /// Puts what the delivery cores and replays did since last time into
    /// the ledger.
    fn record(&mut self, now_ms: u64) {
        for (node, sub, number) in std::mem::take(&mut self.sim.replayed) {
            if let Some(key) = self.keys.get(&number).copied() {
                self.receive(node, sub, key, now_ms);
            }
        }
        for (node, seen) in std::mem::take(&mut self.sim.seen) {
            match seen {
                Seen::Confirmed(key, true) => self.ledger.ack(key),
                // Refused: the client drops it.
                Seen::Confirmed((p, seq), false) => {
                    self.connections[p].unreleased.remove(&seq);
                }
                Seen::Released { session, up_to } => {
                    if let Some(connection) =
                        self.connections.iter_mut().find(|c| c.session == session)
                    {
                        connection.unreleased.retain(|&seq| seq > up_to);
                    }
                }
                Seen::Handed { sub, event } => {
                    let key = (event.id.publisher as usize, event.id.seq);
                    self.ledger.receive(sub as usize, key, now_ms);
                }
                Seen::Attached { sub } => self.ledger.ready(sub as usize, now_ms),
                Seen::Refused { sub, message } => self.violations.push(Violation {
                    invariant: "durable-refused",
                    at_ms: now_ms,
                    node: Some(self.names[node].clone()),
                    event: None,
                    detail: format!("subscriber {sub}: {message}"),
                }),
            }
        }
    }
}

impl Backend for Protocol<'_> {
    const MODE: &'static str = "protocol";

    fn elapsed(&self) -> Duration {
        self.sim.elapsed()
    }

    fn apply(&mut self, change: &Change) {
        match change {
            // The core only knows links that work both ways: a one-way cut
            // breaks the link like a partition. Nodes on no side stay with
            // the first.
            Change::Cut { sides, .. } => {
                let mut side_of = vec![0; self.names.len()];
                for (side, members) in sides.iter().enumerate() {
                    for &i in members {
                        side_of[i] = side as u32;
                    }
                }
                self.sim.partition(|i| side_of[i]);
            }
            Change::HealAll | Change::Repair(_) => self.sim.heal(),
            Change::Crash(nodes) => nodes.iter().for_each(|&i| self.crash(i)),
            Change::Restart(nodes) => nodes.iter().for_each(|&i| self.restart(i)),
            Change::Churn { down, up } => {
                up.iter().for_each(|&i| self.restart(i));
                down.iter().for_each(|&i| self.crash(i));
            }
            // Link quality is below what the core models.
            Change::Loss { .. } | Change::Latency { .. } => {}
        }
    }

    fn step(&mut self) -> anyhow::Result<bool> {
        let from = self.sim.elapsed();
        self.sim.run_for(SLICE);
        let now_ms = self.sim.elapsed().as_millis() as u64;
        self.record(now_ms);
        self.publish(from, now_ms);
        self.record(now_ms);
        let changed = self.sim.last_change != self.last_change;
        self.last_change = self.sim.last_change;
        Ok(changed)
    }

    fn link_changes(&mut self) -> Vec<LinkChange> {
        std::mem::take(&mut self.sim.link_log)
    }

    fn parents(&self) -> Vec<Option<usize>> {
        self.sim.parents()
    }

    fn components(&self) -> Vec<Option<usize>> {
        (0..self.names.len())
            .map(|i| {
                self.sim.nodes[i]
                    .as_ref()
                    .map(|_| self.sim.side_of(i) as usize)
            })
            .collect()
    }

    fn held(&self) -> u64 {
        self.sim.custody_held()
    }

    fn datagrams_dropped(&self) -> u64 {
        0
    }

    fn peak_links(&self) -> Option<Vec<usize>> {
        Some(self.sim.peak_links.clone())
    }

    fn direct_moves(&self) -> Option<u64> {
        Some(self.sim.direct_moves)
    }

    fn events_replayed(&self) -> Option<u64> {
        Some(self.sim.replays_sent)
    }

    fn violations(&mut self) -> Vec<Violation> {
        let names = &self.names;
        let found = self.sim.violations.iter().map(|v| Violation {
            invariant: v.invariant,
            at_ms: v.at.as_millis() as u64,
            node: Some(names[v.node].clone()),
            event: None,
            detail: v.detail.clone(),
        });
        let mut all: Vec<Violation> = found.collect();
        all.append(&mut self.violations);
        all
    }

    fn finish(self) -> Ledger {
        self.ledger
    }
}
