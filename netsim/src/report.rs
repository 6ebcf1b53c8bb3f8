//! What a run found: faults with their detection and repair times,
//! subscribers with what they were sent and got, and every invariant
//! violation with the event, node and time. Printed as a table, written as
//! JSON, drawn as SVG (`svg.rs`). Nothing in it depends on wall time, so
//! the same seed gives the same report.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub mode: &'static str,
    pub seed: u64,
    pub duration_ms: u64,
    pub nodes: usize,
    /// From the start until every connected component was first one tree;
    /// `None` when that never happened.
    pub formed_ms: Option<u64>,
    pub invariants_ok: bool,
    pub violations: Vec<Violation>,
    pub faults: Vec<FaultReport>,
    pub subscribers: Vec<SubscriberReport>,
    pub final_tree: TreeSummary,
    /// Datagrams the scenario's `loss` faults dropped (full mode).
    pub datagrams_dropped: u64,
    pub timeline: Timeline,
}

#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    /// `acknowledged-event-lost`, `duplicate-delivered`, `loop`,
    /// `not-one-tree-per-component`; in protocol mode also `heap-order`
    /// and `degree`.
    pub invariant: &'static str,
    pub at_ms: u64,
    pub node: Option<String>,
    pub event: Option<String>,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct FaultReport {
    pub kind: String,
    /// What it hit, in words: `a,b,c | d,e,f`, a node, a link.
    pub target: String,
    pub at_ms: u64,
    /// From the fault until the first node noticed it (lost or, after a
    /// heal or restart, gained a link across it); `None` when no node did.
    pub detected_ms: Option<u64>,
    pub detected_by: Option<String>,
    /// From the fault until every connected component was one tree again
    /// (after a heal: the convergence time); `None` when it never was.
    pub repaired_ms: Option<u64>,
    /// Most at-least-once events held in custody across all nodes between
    /// the fault and its repair: what waited at the boundaries.
    pub held_peak: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SubscriberReport {
    pub name: String,
    pub node: String,
    pub kind: &'static str,
    pub pattern: String,
    /// Events published on matching topics since it subscribed.
    pub published: u64,
    /// Of those, at-least-once events the publisher's node confirmed.
    pub acked: u64,
    /// Distinct events handed to the application.
    pub delivered: u64,
    /// Published and never delivered. For a durable subscriber only
    /// at-least-once events count, and an acknowledged one lost is a
    /// violation; plain subscribers are at-most-once and may lose events
    /// while the tree repairs.
    pub lost: u64,
    /// Events handed to the application more than once.
    pub duplicated: u64,
    /// Most confirmed events waiting for this subscriber at one moment
    /// (confirmed, not yet delivered): what was held for it at the
    /// boundaries and in its queue. 0 for at-most-once subscribers.
    pub held_peak: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TreeSummary {
    pub components: usize,
    pub roots: usize,
    pub max_depth: u32,
    /// Live nodes at each depth, the roots' first.
    pub depth_histogram: Vec<u32>,
    /// The most connections a root at the end held at once during the run
    /// (protocol mode).
    pub root_peak_links: Option<usize>,
    /// Changes from one parent straight to another during the run: planned
    /// moves, make-before-break (protocol mode).
    pub direct_moves: Option<u64>,
    /// Events nodes sent again from their replay windows, to interest
    /// that came back after a repair (protocol mode).
    pub events_replayed: Option<u64>,
}

/// Events delivered to each subscriber in each bucket, for the SVG.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timeline {
    pub bucket_ms: u64,
    /// By lane: the subscriber's row, kind and node (members of one queue
    /// group on one node share a lane).
    pub delivered: BTreeMap<String, Vec<u64>>,
}

impl Violation {
    /// Parent pointers go round through `cycle` (node numbers).
    pub fn a_loop(at: Duration, cycle: &[usize], names: &[String]) -> Violation {
        Violation {
            invariant: "loop",
            at_ms: at.as_millis() as u64,
            node: Some(names[cycle[0]].clone()),
            event: None,
            detail: format!(
                "parent pointers go round: {}",
                cycle
                    .iter()
                    .map(|&i| names[i].as_str())
                    .collect::<Vec<_>>()
                    .join(" → ")
            ),
        }
    }

    /// The tree check failed at the end of the run.
    pub fn not_one_tree(at_ms: u64, why: &str) -> Violation {
        Violation {
            invariant: "not-one-tree-per-component",
            at_ms,
            node: None,
            event: None,
            detail: format!("at the end of the run: {why}"),
        }
    }
}

impl Timeline {
    /// Buckets each subscriber's delivery times (ms) under its lane.
    pub fn of(
        bucket: Duration,
        lanes: impl Iterator<Item = String>,
        delivered_at: &[Vec<u64>],
        end_ms: u64,
    ) -> Timeline {
        let bucket_ms = bucket.as_millis().max(1) as u64;
        let buckets = (end_ms / bucket_ms + 1) as usize;
        let mut delivered: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (lane, times) in lanes.zip(delivered_at) {
            let row = delivered.entry(lane).or_insert_with(|| vec![0; buckets]);
            for &at in times {
                row[((at / bucket_ms) as usize).min(buckets - 1)] += 1;
            }
        }
        Timeline {
            bucket_ms,
            delivered,
        }
    }
}

/// A line on stderr each tenth of the virtual duration.
pub struct Progress {
    wall: Instant,
    tenths: u128,
}

impl Progress {
    pub fn start() -> Progress {
        Progress {
            wall: Instant::now(),
            tenths: 0,
        }
    }

    pub fn at(&mut self, now: Duration, duration: Duration) {
        let tenths = now.as_millis() * 10 / duration.as_millis().max(1);
        if tenths > self.tenths {
            self.tenths = tenths;
            eprintln!(
                "netsim: {:.0} of {:.0} s virtual, {:.1} s wall",
                now.as_secs_f64(),
                duration.as_secs_f64(),
                self.wall.elapsed().as_secs_f64()
            );
        }
    }
}

impl Report {
    /// The human table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "scenario {} ({} mode, seed {}), {} nodes, {:.1} s virtual",
            self.scenario,
            self.mode,
            self.seed,
            self.nodes,
            self.duration_ms as f64 / 1000.0
        );
        let _ = writeln!(
            out,
            "one tree per component {}",
            match self.formed_ms {
                Some(_) => format!("after {}", ms(self.formed_ms)),
                None => "never".to_string(),
            }
        );
        let _ = writeln!(out);
        if !self.faults.is_empty() {
            let _ = writeln!(
                out,
                "{:<10} {:<28} {:>9} {:>11} {:>10} {:>6}  detected by",
                "fault", "target", "at", "detected", "repaired", "held"
            );
            for f in &self.faults {
                let _ = writeln!(
                    out,
                    "{:<10} {:<28} {:>9} {:>11} {:>10} {:>6}  {}",
                    f.kind,
                    clip(&f.target, 28),
                    ms(Some(f.at_ms)),
                    plus_ms(f.detected_ms, "not noticed"),
                    plus_ms(
                        f.repaired_ms,
                        if f.detected_ms.is_some() {
                            "never"
                        } else {
                            "-"
                        }
                    ),
                    f.held_peak,
                    f.detected_by.as_deref().unwrap_or("-")
                );
            }
            let _ = writeln!(out);
        }
        if !self.subscribers.is_empty() {
            let _ = writeln!(
                out,
                "{:<24} {:<8} {:<8} {:>9} {:>9} {:>9} {:>7} {:>10} {:>6}",
                "subscriber",
                "node",
                "kind",
                "published",
                "acked",
                "delivered",
                "lost",
                "duplicated",
                "held"
            );
            for s in &self.subscribers {
                let _ = writeln!(
                    out,
                    "{:<24} {:<8} {:<8} {:>9} {:>9} {:>9} {:>7} {:>10} {:>6}",
                    clip(&s.name, 24),
                    clip(&s.node, 8),
                    s.kind,
                    s.published,
                    s.acked,
                    s.delivered,
                    s.lost,
                    s.duplicated,
                    s.held_peak
                );
            }
            let _ = writeln!(out);
        }
        if self.datagrams_dropped > 0 {
            let _ = writeln!(
                out,
                "lossy links dropped {} datagrams",
                self.datagrams_dropped
            );
        }
        let t = &self.final_tree;
        let _ = writeln!(
            out,
            "at the end: {} component(s), {} root(s), max depth {}, nodes by depth {:?}",
            t.components, t.roots, t.max_depth, t.depth_histogram
        );
        if let Some(peak) = t.root_peak_links {
            let _ = writeln!(out, "the root held at most {peak} connections at once");
        }
        if let Some(moves) = t.direct_moves {
            let _ = writeln!(out, "{moves} planned moves changed parents without a gap");
        }
        if let Some(replayed) = t.events_replayed {
            let _ = writeln!(
                out,
                "{replayed} events sent again from replay windows after repairs"
            );
        }
        if self.invariants_ok {
            let _ = writeln!(out, "invariants: all held");
        } else {
            let _ = writeln!(out, "invariants: {} VIOLATION(S)", self.violations.len());
            for v in self.violations.iter().take(20) {
                let _ = writeln!(
                    out,
                    "  {} at {}{}{}: {}",
                    v.invariant,
                    ms(Some(v.at_ms)),
                    v.node
                        .as_ref()
                        .map(|n| format!(" on {n}"))
                        .unwrap_or_default(),
                    v.event
                        .as_ref()
                        .map(|e| format!(", event {e}"))
                        .unwrap_or_default(),
                    v.detail
                );
            }
            if self.violations.len() > 20 {
                let _ = writeln!(out, "  … {} more in the JSON", self.violations.len() - 20);
            }
        }
        out
    }
}

fn ms(value: Option<u64>) -> String {
    match value {
        Some(v) if v >= 10_000 => format!("{:.2}s", v as f64 / 1000.0),
        Some(v) => format!("{v}ms"),
        None => "-".to_string(),
    }
}

fn plus_ms(value: Option<u64>, otherwise: &str) -> String {
    match value {
        Some(_) => format!("+{}", ms(value)),
        None => otherwise.to_string(),
    }
}

/// `text`, cut to `width` characters with an ellipsis.
pub(crate) fn clip(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        let kept: String = text.chars().take(width - 1).collect();
        format!("{kept}…")
    }
}
