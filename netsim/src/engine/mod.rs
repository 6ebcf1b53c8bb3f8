//! The scenario engine both modes share. It applies the timeline's changes
//! (`plan`), watches each fault until a node notices it and the tree is
//! whole again (`watch`), checks the tree after every step that changed
//! it, and makes the report from what the nodes did and the ledger. A
//! mode is a [`Backend`]: how to apply a change and take a step, and what
//! the nodes look like.

mod plan;
mod watch;

use std::collections::BTreeSet;
use std::time::Duration;

use plan::Cuts;
pub use plan::{plan, Change, Planned};
use watch::Watched;

use crate::ledger::{account, Ledger};
use crate::report::{Progress, Report, Timeline, TreeSummary, Violation};
use crate::scenario::Scenario;
use crate::tree;

/// Width of a bucket of the delivery timeline.
const BUCKET: Duration = Duration::from_millis(500);

/// A node saw its link to `peer` go down (`up` false) or come up.
#[derive(Debug, Clone, Copy)]
pub struct LinkChange {
    pub at: Duration,
    pub node: usize,
    pub peer: usize,
    pub up: bool,
}

/// What a mode offers the engine. Nodes are numbered as
/// `Scenario::nodes` lists them.
pub trait Backend {
    /// The mode's name in the report.
    const MODE: &'static str;
    /// Virtual time since the start.
    fn elapsed(&self) -> Duration;
    /// Applies one change of the timeline.
    fn apply(&mut self, change: &Change);
    /// Runs the nodes and the workload for one step. Returns whether any
    /// node's place in the tree may have changed.
    fn step(&mut self) -> anyhow::Result<bool>;
    /// Links that nodes saw go or come since the last call.
    fn link_changes(&mut self) -> Vec<LinkChange>;
    /// Each node's parent, `None` for roots (and nodes that are down).
    fn parents(&self) -> Vec<Option<usize>>;
    /// Each live node's connected component; `None` for nodes that are down.
    fn components(&self) -> Vec<Option<usize>>;
    /// At-least-once events held in custody across live nodes.
    fn held(&self) -> u64;
    /// Datagrams the simulated network dropped.
    fn datagrams_dropped(&self) -> u64;
    /// Broken invariants only the mode sees.
    fn violations(&mut self) -> Vec<Violation>;
    /// The most connections each node held at once, where the mode counts
    /// them.
    fn peak_links(&self) -> Option<Vec<usize>> {
        None
    }
    /// Changes from one parent straight to another, where the mode counts
    /// them.
    fn direct_moves(&self) -> Option<u64> {
        None
    }
    /// Events sent again from replay windows after repairs, where the
    /// mode counts them.
    fn events_replayed(&self) -> Option<u64> {
        None
    }
    /// Ends the run; what the applications did.
    fn finish(self) -> Ledger;
}

/// Runs `scenario` on `backend` to the end and reports.
pub fn run<B: Backend>(scenario: &Scenario, seed: u64, mut backend: B) -> anyhow::Result<Report> {
    let names = scenario.nodes();
    let n = names.len();
    let plan = plan(scenario, seed);
    let mut cuts = Cuts::default();
    let mut watched: Vec<Watched> = Vec::new();
    let mut violations = Vec::new();
    let mut loop_seen = false;
    let mut formed_ms = None;
    let mut next = 0;
    let mut progress = Progress::start();
    while backend.elapsed() < scenario.duration {
        let now = backend.elapsed();
        while next < plan.len() && plan[next].at <= now {
            let planned = &plan[next];
            for fault in watched.iter_mut() {
                fault.next_fault_at(planned.at);
            }
            // Watched first: a heal must see what was cut.
            watched.push(Watched::new(planned, &cuts, n));
            cuts.apply(&planned.change, n);
            backend.apply(&planned.change);
            next += 1;
        }
        let changed = backend.step()?;
        let now = backend.elapsed();
        let changes = backend.link_changes();
        for change in &changes {
            for fault in watched.iter_mut() {
                fault.see(change, &names);
            }
        }
        let held = backend.held();
        for fault in watched.iter_mut() {
            fault.held(held);
        }
        let awaited = watched.iter().any(Watched::awaits_repair);
        if changed || !changes.is_empty() || awaited || formed_ms.is_none() {
            let parents = backend.parents();
            let components = backend.components();
            let alive: Vec<bool> = components.iter().map(Option::is_some).collect();
            if let Some(cycle) = tree::find_loop(&parents, &alive) {
                if !loop_seen {
                    violations.push(Violation::a_loop(now, &cycle, &names));
                }
                loop_seen = true;
            }
            if tree::one_tree_per_component(&parents, &components).is_ok() {
                formed_ms.get_or_insert(now.as_millis() as u64);
                for fault in watched.iter_mut() {
                    fault.whole_at(now);
                }
            }
        }
        progress.at(now, scenario.duration);
    }

    let end = backend.elapsed();
    let end_ms = end.as_millis() as u64;
    let parents = backend.parents();
    let components = backend.components();
    if let Err(error) = tree::one_tree_per_component(&parents, &components) {
        violations.push(Violation::not_one_tree(end_ms, &error.describe(&names)));
    }
    let mut final_tree = summary(&parents, &components);
    if let Some(peaks) = backend.peak_links() {
        final_tree.root_peak_links = (0..n)
            .filter(|&i| components[i].is_some() && parents[i].is_none())
            .map(|i| peaks[i])
            .max();
    }
    final_tree.direct_moves = backend.direct_moves();
    final_tree.events_replayed = backend.events_replayed();
    violations.extend(backend.violations());
    let datagrams_dropped = backend.datagrams_dropped();
    let ledger = backend.finish();
    let subscribers = account(scenario, &ledger, &mut violations);
    let lanes = scenario
        .subscribers
        .iter()
        .enumerate()
        .map(|(i, s)| s.lane(i));
    let timeline = Timeline::of(BUCKET, lanes, &ledger.delivered_at, end_ms);
    Ok(Report {
        scenario: scenario.name.clone(),
        mode: B::MODE,
        seed,
        duration_ms: end_ms,
        nodes: n,
        formed_ms,
        invariants_ok: violations.is_empty(),
        violations,
        faults: watched.into_iter().map(|w| w.report).collect(),
        subscribers,
        final_tree,
        datagrams_dropped,
        timeline,
    })
}

/// Components, roots and depth of the tree of live nodes.
fn summary(parents: &[Option<usize>], components: &[Option<usize>]) -> TreeSummary {
    let alive = |i: usize| components[i].is_some();
    let depth = |mut i: usize| {
        let mut d = 0;
        while let Some(p) = parents[i] {
            d += 1;
            i = p;
            if d > parents.len() as u32 {
                break;
            }
        }
        d
    };
    let mut depth_histogram: Vec<u32> = Vec::new();
    for i in (0..parents.len()).filter(|&i| alive(i)) {
        let d = depth(i) as usize;
        if depth_histogram.len() <= d {
            depth_histogram.resize(d + 1, 0);
        }
        depth_histogram[d] += 1;
    }
    TreeSummary {
        components: components.iter().flatten().collect::<BTreeSet<_>>().len(),
        roots: (0..parents.len())
            .filter(|&i| alive(i) && parents[i].is_none())
            .count(),
        max_depth: depth_histogram.len().saturating_sub(1) as u32,
        depth_histogram,
        root_peak_links: None,
        direct_moves: None,
        events_replayed: None,
    }
}
