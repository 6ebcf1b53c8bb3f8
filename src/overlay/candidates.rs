//! Nodes this node knows of and may dial, with the backoff state of each.
//!
//! Discovery can report every node of a large LAN. Joins only ever go to
//! nodes with a smaller id. The smallest are the most useful after a loss
//! or a partition (the root and its neighbourhood), but if every node of a
//! mass start joined them, the root would hold a connection per joiner. So
//! the `cap` smallest discovered ids are kept, and a sample of `cap` of the
//! others smaller than this node: those whose ids hash lowest under this
//! node's own salt, a uniform sample that differs from node to node, over
//! which first joins spread. Static peers are always kept.
//!
//! A node that cannot be reached is not forgotten, only retried more
//! slowly: after a partition heals, a root finds the other tree by retrying
//! the smaller nodes it remembers. Discovery removes nodes that leave.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore};

use super::DialTarget;
use crate::identity::NodeId;

#[derive(Debug)]
struct Candidate {
    addrs: Vec<SocketAddr>,
    /// Earliest time of the next dial or join attempt.
    next_try: Instant,
    dialing: bool,
    failures: u32,
    /// Static peers are dialled whatever their id and never forgotten.
    is_static: bool,
}

/// Retry policy: exponential backoff with jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

#[derive(Debug)]
pub struct Candidates {
    /// This node: only smaller ones are sampled.
    me: NodeId,
    entries: BTreeMap<DialTarget, Candidate>,
    /// How many of the smallest discovered (non-static) nodes to keep,
    /// and how many sampled ones besides.
    cap: usize,
    backoff: Backoff,
    rng: StdRng,
    /// Orders ids for the sample, differently on every node.
    salt: u64,
    /// Discovery showed more nodes than are kept: a large cluster.
    crowded: bool,
}

impl Candidates {
    pub fn new(me: NodeId, cap: usize, backoff: Backoff, mut rng: StdRng) -> Self {
        Candidates {
            me,
            entries: BTreeMap::new(),
            cap,
            backoff,
            salt: rng.next_u64(),
            rng,
            crowded: false,
        }
    }

    /// Records `id` at `addrs`, keeping only the smallest ids and the
    /// sample.
    pub fn learn(&mut self, id: NodeId, addrs: Vec<SocketAddr>, now: Instant) {
        self.remember(id, addrs, now);
        self.trim();
    }

    /// Records `id` at `addrs` whatever the cap: for a node we are told to
    /// join now. The cap applies again at the next `learn`.
    pub fn remember(&mut self, id: NodeId, addrs: Vec<SocketAddr>, now: Instant) {
        if addrs.is_empty() {
            return;
        }
        let target = DialTarget::Node(id);
        if let Some(candidate) = self.entries.get_mut(&target) {
            candidate.addrs = addrs;
            return;
        }
        self.entries.insert(
            target,
            Candidate {
                addrs,
                next_try: now,
                dialing: false,
                failures: 0,
                is_static: false,
            },
        );
    }

    /// Keeps only the `cap` smallest discovered ids and the `cap` sampled
    /// ones (and any being dialled).
    fn trim(&mut self) {
        let discovered = self.discovered();
        if discovered.len() <= 2 * self.cap {
            return;
        }
        let keep: BTreeSet<NodeId> = discovered
            .iter()
            .take(self.cap)
            .chain(self.sample(&discovered))
            .copied()
            .collect();
        self.entries.retain(|target, c| match target {
            DialTarget::Node(id) => c.is_static || c.dialing || keep.contains(id),
            DialTarget::Static(_) => true,
        });
        self.crowded = true;
    }

    /// Discovered (non-static) node ids, smallest first.
    fn discovered(&self) -> Vec<NodeId> {
        self.entries
            .iter()
            .filter_map(|(target, c)| match target {
                DialTarget::Node(id) if !c.is_static => Some(*id),
                _ => None,
            })
            .collect()
    }

    fn sample_key(&self, id: NodeId) -> u64 {
        let mut hasher = DefaultHasher::new();
        (self.salt, id).hash(&mut hasher);
        hasher.finish()
    }

    /// The sample: of the discovered ids (smallest first) smaller than
    /// this node, but for the `cap` smallest, the `cap` that hash lowest.
    fn sample<'a>(&self, discovered: &'a [NodeId]) -> impl Iterator<Item = &'a NodeId> + 'a {
        let others = discovered.get(self.cap..).unwrap_or_default();
        let mut by_key: Vec<(u64, &NodeId)> = others
            .iter()
            .filter(|id| **id < self.me)
            .map(|id| (self.sample_key(*id), id))
            .collect();
        by_key.sort_unstable();
        by_key.truncate(self.cap);
        by_key.into_iter().map(|(_, id)| id)
    }

    /// Known nodes smaller than `bound` to try for a first join, best
    /// first: the sampled ones, then the smallest, each in the order of
    /// their hash. Only a node among the smallest itself (no sampled node
    /// is smaller) may choose the root, as one choice among a few. `None` in
    /// a cluster of at most `cap` other nodes: there a first join goes to
    /// the smallest, as any other join, which places it at once.
    pub fn spread_smaller_than(&self, bound: NodeId) -> Option<Vec<NodeId>> {
        let discovered = self.discovered();
        if !self.crowded && discovered.len() <= self.cap {
            return None;
        }
        let sampled: BTreeSet<NodeId> = self.sample(&discovered).copied().collect();
        let mut choices: Vec<NodeId> = self.smaller_than(bound).collect();
        choices.sort_by_key(|id| (!sampled.contains(id), self.sample_key(*id)));
        Some(choices)
    }

    pub fn forget(&mut self, id: NodeId) {
        let target = DialTarget::Node(id);
        if self
            .entries
            .get(&target)
            .is_some_and(|c| !c.dialing && !c.is_static)
        {
            self.entries.remove(&target);
        }
    }

    pub fn add_static(&mut self, addr: SocketAddr, now: Instant) {
        self.entries
            .entry(DialTarget::Static(addr))
            .or_insert(Candidate {
                addrs: vec![addr],
                next_try: now,
                dialing: false,
                failures: 0,
                is_static: true,
            });
    }

    pub fn addrs(&self, id: NodeId) -> Option<&[SocketAddr]> {
        self.entries
            .get(&DialTarget::Node(id))
            .map(|c| c.addrs.as_slice())
    }

    pub fn is_static(&self, id: NodeId) -> bool {
        self.entries
            .get(&DialTarget::Node(id))
            .is_some_and(|c| c.is_static)
    }

    /// Whether a dial or join may be tried now.
    pub fn ready(&self, target: DialTarget, now: Instant) -> bool {
        self.entries
            .get(&target)
            .is_some_and(|c| !c.dialing && c.next_try <= now)
    }

    pub fn is_dialing(&self, target: DialTarget) -> bool {
        self.entries.get(&target).is_some_and(|c| c.dialing)
    }

    /// Marks a dial as started; returns the addresses to try.
    pub fn start_dial(&mut self, target: DialTarget) -> Option<Vec<SocketAddr>> {
        let candidate = self.entries.get_mut(&target)?;
        candidate.dialing = true;
        Some(candidate.addrs.clone())
    }

    /// A dial failed, or a join through the node did: back off.
    pub fn failed(&mut self, target: DialTarget, now: Instant) {
        let delay = self.delay_after_failure(target);
        if let Some(candidate) = self.entries.get_mut(&target) {
            candidate.dialing = false;
            candidate.next_try = now + delay;
        }
    }

    fn delay_after_failure(&mut self, target: DialTarget) -> Duration {
        let failures = self.entries.get_mut(&target).map_or(1, |c| {
            c.failures += 1;
            c.failures
        });
        let factor = 1u32 << failures.saturating_sub(1).min(16);
        let delay = (self.backoff.initial * factor).min(self.backoff.max);
        // ±20% jitter, so nodes that failed together do not retry together.
        delay.mul_f64(self.rng.random_range(0.8..1.2))
    }

    /// A link to `peer` came up; `dialed` is our dial that made it, if any.
    pub fn connected(&mut self, peer: NodeId, dialed: Option<DialTarget>, now: Instant) {
        if let Some(DialTarget::Static(addr)) = dialed {
            // From now on the static address is known as this node: never
            // expired, redialled after every loss.
            if let Some(candidate) = self.entries.remove(&DialTarget::Static(addr)) {
                self.entries
                    .entry(DialTarget::Node(peer))
                    .and_modify(|c| c.is_static = true)
                    .or_insert(Candidate {
                        next_try: now,
                        ..candidate
                    });
            }
        }
        if let Some(candidate) = self.entries.get_mut(&DialTarget::Node(peer)) {
            candidate.dialing = false;
            candidate.failures = 0;
        }
    }

    /// The link to `peer` broke: it may be retried only after a backoff.
    pub fn link_lost(&mut self, peer: NodeId, now: Instant) {
        self.failed(DialTarget::Node(peer), now);
    }

    /// Known node ids smaller than `bound`, smallest first.
    pub fn smaller_than(&self, bound: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        self.entries.keys().filter_map(move |target| match target {
            DialTarget::Node(id) if *id < bound => Some(*id),
            _ => None,
        })
    }

    /// Failed attempts to reach `id` since it was last reached.
    pub fn failures(&self, id: NodeId) -> u32 {
        self.entries
            .get(&DialTarget::Node(id))
            .map_or(0, |c| c.failures)
    }

    /// Static peers to dial now, given which nodes are linked.
    pub fn static_due(&self, now: Instant, linked: impl Fn(NodeId) -> bool) -> Vec<DialTarget> {
        self.entries
            .iter()
            .filter(|(target, c)| {
                c.is_static
                    && !c.dialing
                    && c.next_try <= now
                    && match target {
                        DialTarget::Node(id) => !linked(*id),
                        DialTarget::Static(_) => true,
                    }
            })
            .map(|(target, _)| *target)
            .collect()
    }

    /// When a dial or join via `target` may next be tried; `None` while a
    /// dial is under way or for an unknown node.
    pub fn retry_at(&self, target: DialTarget) -> Option<Instant> {
        self.entries
            .get(&target)
            .filter(|c| !c.dialing)
            .map(|c| c.next_try)
    }

    /// When the next static peer that is not linked may be redialled.
    pub fn next_static_dial(&self, linked: impl Fn(NodeId) -> bool) -> Option<Instant> {
        self.entries
            .iter()
            .filter(|(target, c)| {
                c.is_static
                    && !c.dialing
                    && match target {
                        DialTarget::Node(id) => !linked(*id),
                        DialTarget::Static(_) => true,
                    }
            })
            .map(|(_, c)| c.next_try)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn id(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 17000 + n as u16))
    }

    fn candidates(cap: usize) -> Candidates {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        Candidates::new(id(255), cap, backoff, StdRng::seed_from_u64(7))
    }

    #[test]
    fn the_smallest_ids_and_a_sample_of_the_others_are_kept() {
        let now = Instant::now();
        let mut c = candidates(3);
        for n in (1..=60).rev() {
            c.learn(id(n), vec![addr(n)], now);
        }
        let kept: Vec<NodeId> = c.smaller_than(id(255)).collect();
        assert_eq!(kept.len(), 6, "{kept:?}");
        assert_eq!(kept[..3], [id(1), id(2), id(3)]);
        let all: Vec<NodeId> = (1..=60).map(id).collect();
        let sample: BTreeSet<NodeId> = c.sample(&all).copied().collect();
        assert_eq!(sample.len(), 3);
        assert!(kept[3..].iter().all(|k| sample.contains(k)), "{kept:?}");
        c.forget(id(2));
        assert_eq!(c.smaller_than(id(3)).collect::<Vec<_>>(), vec![id(1)]);
    }

    #[test]
    fn first_joins_spread_over_the_sample_and_a_small_cluster_joins_the_smallest() {
        let now = Instant::now();
        let mut small = candidates(8);
        for n in 1..=8 {
            small.learn(id(n), vec![addr(n)], now);
        }
        assert_eq!(small.spread_smaller_than(id(9)), None);
        // Nodes with other salts choose differently; the root is rarely first.
        let mut firsts = BTreeSet::new();
        let mut root_first = 0;
        for seed in 0..50 {
            let backoff = Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(2),
            };
            let mut c = Candidates::new(id(201), 4, backoff, StdRng::seed_from_u64(seed));
            for n in 1..=200 {
                c.learn(id(n), vec![addr(n)], now);
            }
            let choices = c.spread_smaller_than(id(201)).unwrap();
            assert_eq!(choices.len(), 8, "the 4 smallest and 4 sampled");
            assert!(choices[..4].iter().all(|c| *c > id(4)), "{choices:?}");
            firsts.insert(choices[0]);
            root_first += usize::from(choices[0] == id(1));
        }
        assert!(firsts.len() > 20, "{firsts:?}");
        assert_eq!(root_first, 0, "a sampled node goes first");
    }

    #[test]
    fn failures_back_off_exponentially_up_to_the_cap_and_never_forget() {
        let start = Instant::now();
        let mut c = candidates(8);
        c.learn(id(1), vec![addr(1)], start);
        let target = DialTarget::Node(id(1));
        let mut now = start;
        let mut delays = Vec::new();
        for _ in 0..8 {
            assert!(c.ready(target, now));
            c.start_dial(target);
            c.failed(target, now);
            let next = c.entries[&target].next_try;
            delays.push(next - now);
            now = next;
        }
        assert!(delays[1] > delays[0] && delays[2] > delays[1], "{delays:?}");
        assert!(
            delays.iter().all(|d| *d <= Duration::from_millis(2400)),
            "{delays:?}"
        );
        assert!(
            c.addrs(id(1)).is_some(),
            "an unreachable node is remembered"
        );
        c.connected(id(1), Some(target), now);
        assert!(c.ready(target, now));
    }

    #[test]
    fn a_static_address_becomes_its_node_once_reached() {
        let now = Instant::now();
        let mut c = candidates(8);
        c.add_static(addr(5), now);
        assert_eq!(
            c.static_due(now, |_| false),
            vec![DialTarget::Static(addr(5))]
        );
        c.start_dial(DialTarget::Static(addr(5)));
        c.connected(id(5), Some(DialTarget::Static(addr(5))), now);
        assert!(c.is_static(id(5)));
        assert!(
            c.static_due(now, |_| true).is_empty(),
            "not redialled while linked"
        );
        assert_eq!(c.static_due(now, |_| false), vec![DialTarget::Node(id(5))]);
    }
}
