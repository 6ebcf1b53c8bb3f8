//! A fault being watched: which link changes mean a node noticed it, and
//! its row of the report as it fills in.

use std::collections::BTreeSet;
use std::time::Duration;

use super::plan::{separated, side_map, Change, Cuts, Planned};
use super::LinkChange;
use crate::report::FaultReport;

pub struct Watched {
    pub report: FaultReport,
    /// Links whose loss (or, for heals and restarts, appearance) means a
    /// node noticed.
    across: Box<dyn Fn(usize, usize) -> bool>,
    appears: bool,
    at: Duration,
    /// Still counted: neither repaired nor given up on.
    pub open: bool,
}

impl Watched {
    /// Starts watching `planned`, about to be applied over `cuts` (what a
    /// heal restores). `n` is the number of nodes.
    pub fn new(planned: &Planned, cuts: &Cuts, n: usize) -> Watched {
        let report = FaultReport {
            kind: planned.kind.clone(),
            target: planned.target.clone(),
            at_ms: planned.at.as_millis() as u64,
            detected_ms: None,
            detected_by: None,
            repaired_ms: None,
            held_peak: 0,
        };
        type Across = Box<dyn Fn(usize, usize) -> bool>;
        let (across, appears): (Across, bool) = match &planned.change {
            Change::Cut { sides, .. } => {
                let cut = side_map(sides, n);
                (Box::new(move |a, b| separated(&cut, a, b)), false)
            }
            Change::HealAll => {
                let healed = cuts.snapshot();
                (
                    Box::new(move |a, b| healed.iter().any(|cut| separated(cut, a, b))),
                    true,
                )
            }
            Change::Repair(sides) => {
                let cut = side_map(sides, n);
                (Box::new(move |a, b| separated(&cut, a, b)), true)
            }
            Change::Crash(nodes) => {
                let nodes: BTreeSet<usize> = nodes.iter().copied().collect();
                (Box::new(move |_, b| nodes.contains(&b)), false)
            }
            Change::Restart(nodes) => {
                let nodes: BTreeSet<usize> = nodes.iter().copied().collect();
                (
                    Box::new(move |a, b| nodes.contains(&a) || nodes.contains(&b)),
                    true,
                )
            }
            // A round that crashes is noticed when a crash is; the last
            // one, which only restarts, when a restarted node links.
            Change::Churn { down, up } if down.is_empty() => {
                let nodes: BTreeSet<usize> = up.iter().copied().collect();
                (
                    Box::new(move |a, b| nodes.contains(&a) || nodes.contains(&b)),
                    true,
                )
            }
            Change::Churn { down, .. } => {
                let nodes: BTreeSet<usize> = down.iter().copied().collect();
                (Box::new(move |_, b| nodes.contains(&b)), false)
            }
            Change::Loss { pairs, .. } | Change::Latency { pairs, .. } => {
                let pairs: BTreeSet<(usize, usize)> =
                    pairs.iter().flat_map(|&(a, b)| [(a, b), (b, a)]).collect();
                (Box::new(move |a, b| pairs.contains(&(a, b))), false)
            }
        };
        Watched {
            report,
            across,
            appears,
            at: planned.at,
            open: true,
        }
    }

    /// A node saw `change`: the fault is noticed if it is the first such
    /// change since the fault.
    pub fn see(&mut self, change: &LinkChange, names: &[String]) {
        let noticed = self.report.detected_ms.is_none()
            && change.up == self.appears
            && change.at >= self.at
            && (self.across)(change.node, change.peer);
        if noticed {
            self.report.detected_ms = Some((change.at - self.at).as_millis() as u64);
            self.report.detected_by = Some(names[change.node].clone());
        }
    }

    /// A fault nobody noticed before the next one (`next_at`) never will
    /// be: it stops counting what is held, and needs no more tree checks.
    pub fn next_fault_at(&mut self, next_at: Duration) {
        if self.report.detected_ms.is_none() && self.at < next_at {
            self.open = false;
        }
    }

    /// Open and noticed: waiting for the tree to be whole.
    pub fn awaits_repair(&self) -> bool {
        self.open && self.report.detected_ms.is_some()
    }

    /// Every component is one tree at `now`.
    pub fn whole_at(&mut self, now: Duration) {
        if self.awaits_repair() {
            self.report.repaired_ms = Some((now - self.at).as_millis() as u64);
            self.open = false;
        }
    }

    /// `held` events wait in custody across the cluster now.
    pub fn held(&mut self, held: u64) {
        if self.open {
            self.report.held_peak = self.report.held_peak.max(held);
        }
    }
}
