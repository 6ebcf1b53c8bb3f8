//! What the applications of a scenario published, got confirmed and
//! received, in either mode, and the subscriber rows and violations made
//! from it.

use std::collections::BTreeMap;

use crate::report::{SubscriberReport, Violation};
use crate::scenario::{Qos, Scenario};

/// Violations of one kind listed one by one before they are summed up.
const LISTED: usize = 50;

/// An event as the applications name it: publisher index and number.
pub type EventKey = (usize, u64);

#[derive(Clone)]
pub struct Ledger {
    /// Per publisher, the virtual time (ms) each event was published, by
    /// number minus one.
    pub published: Vec<Vec<u64>>,
    /// Per publisher, the numbers its node confirmed.
    pub acked: Vec<Vec<bool>>,
    /// Per subscriber: when it first subscribed.
    pub ready_at: Vec<Option<u64>>,
    /// Per subscriber: each event handed over, how often and when first.
    pub received: Vec<BTreeMap<EventKey, Received>>,
    /// Per subscriber: when each delivery happened (ms), for the timeline.
    pub delivered_at: Vec<Vec<u64>>,
}

impl Ledger {
    /// An empty ledger for `scenario`'s publishers and subscribers.
    pub fn new(scenario: &Scenario) -> Ledger {
        let (publishers, subscribers) = (scenario.publishers.len(), scenario.subscribers.len());
        Ledger {
            published: vec![Vec::new(); publishers],
            acked: vec![Vec::new(); publishers],
            ready_at: vec![None; subscribers],
            received: vec![BTreeMap::new(); subscribers],
            delivered_at: vec![Vec::new(); subscribers],
        }
    }

    /// Publisher `p` publishes its next event at `at` (ms); returns its
    /// number.
    pub fn publish(&mut self, p: usize, at: u64) -> u64 {
        self.published[p].push(at);
        self.acked[p].push(false);
        self.published[p].len() as u64
    }

    /// The node confirmed event `seq` of publisher `p`.
    pub fn ack(&mut self, (p, seq): EventKey) {
        self.acked[p][seq as usize - 1] = true;
    }

    /// Subscriber `s` is subscribed from `at` (ms) on.
    pub fn ready(&mut self, s: usize, at: u64) {
        self.ready_at[s].get_or_insert(at);
    }

    /// Subscriber `s` was handed event `key` at `at` (ms).
    pub fn receive(&mut self, s: usize, key: EventKey, at: u64) {
        let received = self.received[s].entry(key).or_insert(Received {
            count: 0,
            first_at: at,
        });
        received.count += 1;
        self.delivered_at[s].push(at);
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Received {
    pub count: u32,
    /// Virtual time (ms) of the first hand-over.
    pub first_at: u64,
}

/// The subscriber rows, and the violations the ledger shows.
pub fn account(
    scenario: &Scenario,
    ledger: &Ledger,
    violations: &mut Vec<Violation>,
) -> Vec<SubscriberReport> {
    let mut reports = Vec::new();
    for (name, members) in scenario.subscriber_rows() {
        let first = &scenario.subscribers[members[0]];
        let pattern = treescale::topic::Pattern::new(&first.pattern).expect("checked on load");
        let durable = first.durable.is_some();
        let ready = members.iter().filter_map(|&m| ledger.ready_at[m]).min();
        let mut received: BTreeMap<(usize, u64), Received> = BTreeMap::new();
        for &m in &members {
            for (key, got) in &ledger.received[m] {
                received
                    .entry(*key)
                    .and_modify(|merged| {
                        merged.count += got.count;
                        merged.first_at = merged.first_at.min(got.first_at);
                    })
                    .or_insert(*got);
            }
        }
        // Confirmed events waiting for this subscriber: +1 when published,
        // -1 when first delivered.
        let mut waiting: Vec<(u64, i64)> = Vec::new();
        let (mut published, mut acked, mut lost, mut delivered) = (0, 0, 0, 0);
        // Confirmed events lost: each one a violation, listed up to LISTED.
        let mut acked_lost = 0;
        for (p, spec) in scenario.publishers.iter().enumerate() {
            let topic = treescale::topic::Topic::new(&spec.topic).expect("checked on load");
            if !pattern.matches(&topic) || (durable && spec.qos != Qos::AtLeastOnce) {
                continue;
            }
            for (k, &at) in ledger.published[p].iter().enumerate() {
                let seq = k as u64 + 1;
                if ready.is_none_or(|ready| at < ready) {
                    continue;
                }
                published += 1;
                let was_acked = ledger.acked[p][k];
                acked += u64::from(was_acked);
                let got = received.get(&(p, seq));
                if was_acked {
                    waiting.push((at, 1));
                    if let Some(got) = got {
                        waiting.push((got.first_at.max(at), -1));
                    }
                }
                if got.is_some() {
                    delivered += 1;
                    continue;
                }
                lost += 1;
                if durable && was_acked {
                    acked_lost += 1;
                    if acked_lost <= LISTED {
                        violations.push(Violation {
                            invariant: "acknowledged-event-lost",
                            at_ms: at,
                            node: Some(spec.node.clone()),
                            event: Some(format!("publisher-{p}/{seq}")),
                            detail: format!(
                                "confirmed to its publisher, never delivered to {name}"
                            ),
                        });
                    } else if acked_lost == LISTED + 1 {
                        violations.push(Violation {
                            invariant: "acknowledged-event-lost",
                            at_ms: at,
                            node: None,
                            event: None,
                            detail: format!(
                                "more lost acknowledged events for {name}; see the subscriber row"
                            ),
                        });
                    }
                }
            }
        }
        let (mut duplicated, mut listed) = (0, 0);
        for (&(p, seq), got) in &received {
            let count = got.count;
            if count > 1 {
                duplicated += u64::from(count - 1);
                listed += 1;
                if listed == LISTED + 1 {
                    violations.push(Violation {
                        invariant: "duplicate-delivered",
                        at_ms: 0,
                        node: None,
                        event: None,
                        detail: format!("more duplicates for {name}; see the subscriber row"),
                    });
                }
                if listed <= LISTED {
                    violations.push(Violation {
                        invariant: "duplicate-delivered",
                        at_ms: ledger.published[p]
                            .get(seq as usize - 1)
                            .copied()
                            .unwrap_or(0),
                        node: Some(first.node.clone()),
                        event: Some(format!("publisher-{p}/{seq}")),
                        detail: format!("handed to {name} {count} times"),
                    });
                }
            }
        }
        reports.push(SubscriberReport {
            name,
            node: scenario.nodes_of(&members),
            kind: first.kind(),
            pattern: first.pattern.clone(),
            published,
            acked,
            delivered,
            lost,
            duplicated,
            held_peak: peak(waiting),
        });
    }
    reports
}

/// The highest running sum of `changes` in time order, deliveries before
/// publishes at the same instant.
fn peak(mut changes: Vec<(u64, i64)>) -> u64 {
    changes.sort();
    let (mut now, mut most) = (0i64, 0i64);
    for (_, change) in changes {
        now += change;
        most = most.max(now);
    }
    most as u64
}
