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

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::IteratorRandom;
use rand::SeedableRng;

use crate::ledger::{account, Ledger};
use crate::report::{FaultReport, Progress, Report, Timeline, TreeSummary, Violation};
use crate::scenario::{FaultKind, Qos, Scenario};
use crate::tree;
use delivery::Seen;
use sim::Sim;

/// Virtual time between checks of the tree and publishes.
const SLICE: Duration = Duration::from_millis(10);
/// Candidates discovery gives each node: the smallest ids it sees.
const DISCOVERED: usize = 32;
const BUCKET: Duration = Duration::from_millis(500);

struct Watched {
    report: FaultReport,
    /// Whether a change of the link from a node to a peer notices it.
    across: Box<dyn Fn(usize, usize) -> bool>,
    /// Whether noticing is a link coming up (heals, restarts).
    appears: bool,
    open: bool,
}

pub fn run(scenario: &Scenario, seed: u64) -> anyhow::Result<Report> {
    let names = scenario.nodes();
    let n = names.len();
    let index: BTreeMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, name)| (name.as_str(), i))
        .collect();
    let ix = |name: &String| index[name.as_str()];
    let mut sim = Sim::new(n, scenario.tree.max_children, seed);
    sim.latency = scenario.network.latency;
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(2));
    let mut progress = Progress::start();
    let delivery = scenario.subscribers.iter().any(|s| s.durable.is_some())
        || scenario
            .publishers
            .iter()
            .any(|p| p.qos == Qos::AtLeastOnce);
    if delivery {
        sim.enable_delivery();
    }
    sim.discover(DISCOVERED);

    let mut ledger = Ledger::new(scenario);
    let mut violations = Vec::new();
    for s in 0..scenario.subscribers.len() {
        subscribe(&mut sim, scenario, s, &ix);
        if scenario.subscribers[s].durable.is_none() {
            ledger.ready(s, 0);
        }
    }
    let mut owed = vec![0f64; scenario.publishers.len()];

    let mut faults: Vec<(Duration, &FaultKind)> = Vec::new();
    for fault in &scenario.faults {
        faults.push((fault.at, &fault.kind));
    }
    faults.sort_by_key(|(at, _)| *at);
    // Churn and flaps expand into rounds as they run.
    let mut rounds: Vec<(Duration, Round)> = Vec::new();
    let mut watched: Vec<Watched> = Vec::new();
    let mut alive = vec![true; n];
    let mut formed_ms = None;
    let mut next_fault = 0;
    while sim.elapsed() < scenario.duration {
        let now = sim.elapsed();
        while next_fault < faults.len() && faults[next_fault].0 <= now {
            let (at, kind) = faults[next_fault];
            expand(kind, at, &ix, &mut rounds);
            next_fault += 1;
        }
        rounds.sort_by_key(|(at, _)| *at);
        while rounds.first().is_some_and(|(at, _)| *at <= now) {
            let (at, round) = rounds.remove(0);
            let report = |kind: &str, target: String| FaultReport {
                kind: kind.to_string(),
                target,
                at_ms: at.as_millis() as u64,
                detected_ms: None,
                detected_by: None,
                repaired_ms: None,
                held_peak: 0,
            };
            type Across = Box<dyn Fn(usize, usize) -> bool>;
            let (report, across, appears): (FaultReport, Across, bool) = match round {
                Round::Partition(sides, target) => {
                    let side_of: Vec<u32> = (0..n)
                        .map(|i| sides.get(&i).copied().unwrap_or(0))
                        .collect();
                    sim.partition(|i| side_of[i]);
                    let across = Box::new(move |a: usize, b: usize| side_of[a] != side_of[b]);
                    (report("partition", target), across, false)
                }
                Round::Heal(kind) => {
                    let side_of: Vec<u32> = (0..n).map(|i| sim.side_of(i)).collect();
                    sim.heal();
                    let across = Box::new(move |a: usize, b: usize| side_of[a] != side_of[b]);
                    (report(kind, "all".to_string()), across, true)
                }
                Round::Crash(chosen) => {
                    for &i in &chosen {
                        sim.crash(i);
                        alive[i] = false;
                    }
                    let target = target_of(&chosen, &names);
                    let crashed: BTreeSet<usize> = chosen.into_iter().collect();
                    let across = Box::new(move |_, peer: usize| crashed.contains(&peer));
                    (report("crash", target), across, false)
                }
                Round::Churn {
                    percent,
                    every,
                    left,
                } => {
                    let down: Vec<usize> = (0..n).filter(|&i| !alive[i]).collect();
                    for &i in &down {
                        restart(&mut sim, i, scenario, &ix);
                        alive[i] = true;
                    }
                    let mut chosen = Vec::new();
                    if left > 0 {
                        let up: Vec<usize> =
                            (0..n).filter(|&i| alive[i] && !down.contains(&i)).collect();
                        let count = ((up.len() as f64 * percent / 100.0).round() as usize).max(1);
                        chosen = up.into_iter().choose_multiple(&mut rng, count);
                        chosen.sort();
                        for &i in &chosen {
                            sim.crash(i);
                            alive[i] = false;
                        }
                        rounds.push((
                            at + every,
                            Round::Churn {
                                percent,
                                every,
                                left: left - 1,
                            },
                        ));
                    }
                    let target = format!("{} down, {} up", chosen.len(), down.len());
                    // A round that crashes is noticed when a crash is; the
                    // last one, which only restarts, when a restarted node
                    // links.
                    let appears = chosen.is_empty();
                    let watched: BTreeSet<usize> = if appears {
                        down.into_iter().collect()
                    } else {
                        chosen.into_iter().collect()
                    };
                    let across = Box::new(move |node: usize, peer: usize| {
                        watched.contains(&peer) || (appears && watched.contains(&node))
                    });
                    (report("churn", target), across, appears)
                }
                Round::Restart(i) => {
                    restart(&mut sim, i, scenario, &ix);
                    alive[i] = true;
                    let across = Box::new(move |node: usize, peer: usize| node == i || peer == i);
                    (report("restart", names[i].clone()), across, true)
                }
            };
            watched.push(Watched {
                report,
                across,
                appears,
                open: true,
            });
        }

        sim.run_for(SLICE);
        let now_ms = sim.elapsed().as_millis() as u64;
        record(&mut sim, &mut ledger, &mut violations, &names, now_ms);
        if delivery {
            let held = sim.custody_held();
            for fault in watched.iter_mut().filter(|f| f.open) {
                fault.report.held_peak = fault.report.held_peak.max(held);
            }
        }
        for change in std::mem::take(&mut sim.link_log) {
            for fault in watched
                .iter_mut()
                .filter(|f| f.report.detected_ms.is_none())
            {
                let noticed = change.up == fault.appears
                    && (fault.across)(change.node, change.peer)
                    && change.at.as_millis() as u64 >= fault.report.at_ms;
                if noticed {
                    fault.report.detected_ms =
                        Some(change.at.as_millis() as u64 - fault.report.at_ms);
                    fault.report.detected_by = Some(names[change.node].clone());
                }
            }
        }
        if formed_ms.is_none() {
            let (parents, components) = snapshot(&sim, n);
            if tree::one_tree_per_component(&parents, &components).is_ok() {
                formed_ms = Some(now_ms);
            }
        }
        if watched
            .iter()
            .any(|f| f.open && f.report.detected_ms.is_some())
        {
            let (parents, components) = snapshot(&sim, n);
            if tree::one_tree_per_component(&parents, &components).is_ok() {
                for fault in watched
                    .iter_mut()
                    .filter(|f| f.open && f.report.detected_ms.is_some())
                {
                    fault.report.repaired_ms = Some(now_ms - fault.report.at_ms);
                    fault.open = false;
                }
            }
        }

        for (p, spec) in scenario.publishers.iter().enumerate() {
            if now < spec.from || now >= spec.until.unwrap_or(scenario.duration) {
                continue;
            }
            // Whole events per slice, the fraction carried over: the rate
            // holds for any rate, not just multiples of 100/s.
            owed[p] += SLICE.as_secs_f64() * spec.rate as f64;
            let due = owed[p].floor() as u64;
            owed[p] -= due as f64;
            let origin = ix(&spec.node);
            if !alive[origin] {
                continue;
            }
            for _ in 0..due {
                let seq = ledger.publish(p, now_ms);
                let got = match spec.qos {
                    Qos::AtMostOnce => sim.publish(origin, &spec.topic),
                    Qos::AtLeastOnce => sim.publish_at_least_once(origin, &spec.topic, (p, seq)),
                };
                for ((node, sub), count) in got {
                    let s = sub as usize;
                    if s < scenario.subscribers.len() && ix(&scenario.subscribers[s].node) == node {
                        for _ in 0..count {
                            ledger.receive(s, (p, seq), now_ms);
                        }
                    }
                }
            }
        }
        record(&mut sim, &mut ledger, &mut violations, &names, now_ms);

        progress.at(now, scenario.duration);
    }

    let end_ms = sim.elapsed().as_millis() as u64;
    violations.extend(sim.violations.iter().map(|v| Violation {
        invariant: v.invariant,
        at_ms: v.at.as_millis() as u64,
        node: Some(names[v.node].clone()),
        event: None,
        detail: v.detail.clone(),
    }));
    let (parents, components) = snapshot(&sim, n);
    if let Err(why) = tree::one_tree_per_component(&parents, &components) {
        let why = format!("{why} (node numbers are indices)");
        violations.push(Violation::not_one_tree(end_ms, &why));
    }
    let subscribers = account(scenario, &ledger, &mut violations);
    let lanes = scenario
        .subscribers
        .iter()
        .enumerate()
        .map(|(i, s)| s.lane(i));
    let timeline = Timeline::of(BUCKET, lanes, &ledger.delivered_at, end_ms);
    Ok(Report {
        scenario: scenario.name.clone(),
        mode: "protocol",
        seed,
        duration_ms: end_ms,
        nodes: n,
        formed_ms,
        invariants_ok: violations.is_empty(),
        violations,
        faults: watched.into_iter().map(|w| w.report).collect(),
        subscribers,
        final_tree: TreeSummary {
            components: components.iter().flatten().collect::<BTreeSet<_>>().len(),
            roots: sim.roots().len(),
            max_depth: sim.max_depth(),
        },
        datagrams_dropped: 0,
        timeline,
    })
}

/// One change of the timeline, as protocol mode applies it.
enum Round {
    /// Side of each named node; the rest are on side 0.
    Partition(BTreeMap<usize, u32>, String),
    Heal(&'static str),
    Crash(Vec<usize>),
    Restart(usize),
    Churn {
        percent: f64,
        every: Duration,
        left: u32,
    },
}

fn expand(
    kind: &FaultKind,
    at: Duration,
    ix: &impl Fn(&String) -> usize,
    rounds: &mut Vec<(Duration, Round)>,
) {
    match kind {
        FaultKind::Partition { sets } => {
            let mut sides = BTreeMap::new();
            for (side, set) in sets.iter().enumerate() {
                for name in set {
                    sides.insert(ix(name), side as u32);
                }
            }
            let target = sets
                .iter()
                .map(|s| s.join(","))
                .collect::<Vec<_>>()
                .join(" | ");
            rounds.push((at, Round::Partition(sides, target)));
        }
        FaultKind::OneWay { from, to } => {
            // The core only knows links that work both ways: a one-way cut
            // breaks the link like a partition. Unnamed nodes stay with
            // `from` (side 0), as they stay with a partition's first set.
            let sides: BTreeMap<usize, u32> = to.iter().map(|n| (ix(n), 1)).collect();
            let target = format!("{} -> {}", from.join(","), to.join(","));
            rounds.push((at, Round::Partition(sides, target)));
        }
        FaultKind::Heal => rounds.push((at, Round::Heal("heal"))),
        FaultKind::Crash { node } => rounds.push((at, Round::Crash(vec![ix(node)]))),
        FaultKind::Restart { node } => rounds.push((at, Round::Restart(ix(node)))),
        FaultKind::Flap {
            between,
            period,
            times,
        } => {
            // Unnamed nodes stay with the first set (side 0).
            let sides: BTreeMap<usize, u32> = between[1].iter().map(|n| (ix(n), 1)).collect();
            let target = format!("{} | {}", between[0].join(","), between[1].join(","));
            for k in 0..*times {
                let down = at + *period * (2 * k);
                rounds.push((down, Round::Partition(sides.clone(), target.clone())));
                rounds.push((down + *period, Round::Heal("flap-up")));
            }
        }
        FaultKind::Churn {
            percent,
            every,
            rounds: count,
        } => rounds.push((
            at,
            Round::Churn {
                percent: *percent,
                every: *every,
                left: *count,
            },
        )),
        // Link quality is below what the core models.
        FaultKind::Loss { .. } | FaultKind::Latency { .. } => {}
    }
}

/// Restarts node `i` with its subscribers subscribed again.
fn restart(sim: &mut Sim, i: usize, scenario: &Scenario, ix: &impl Fn(&String) -> usize) {
    sim.restart(i, DISCOVERED);
    for (s, sub) in scenario.subscribers.iter().enumerate() {
        if ix(&sub.node) == i {
            subscribe(sim, scenario, s, ix);
        }
    }
}

/// Subscribes subscriber `s` at its node: to its durable subscription
/// (homed there), or with interest in its pattern.
fn subscribe(sim: &mut Sim, scenario: &Scenario, s: usize, ix: &impl Fn(&String) -> usize) {
    let spec = &scenario.subscribers[s];
    let node = ix(&spec.node);
    match &spec.durable {
        Some(name) => sim.subscribe_durable(node, name, &spec.pattern, s as u64),
        None => sim.subscribe(node, &spec.pattern, spec.group.as_deref(), s as u64),
    }
}

/// Puts what the delivery cores did since last time into the ledger.
fn record(
    sim: &mut Sim,
    ledger: &mut Ledger,
    violations: &mut Vec<Violation>,
    names: &[String],
    now_ms: u64,
) {
    for (node, seen) in std::mem::take(&mut sim.seen) {
        match seen {
            Seen::Confirmed(key, true) => ledger.ack(key),
            Seen::Confirmed(_, false) => {}
            Seen::Handed { sub, event } => {
                let key = (event.id.publisher as usize, event.id.seq);
                ledger.receive(sub as usize, key, now_ms);
            }
            Seen::Attached { sub } => ledger.ready(sub as usize, now_ms),
            Seen::Refused { sub, message } => violations.push(Violation {
                invariant: "durable-refused",
                at_ms: now_ms,
                node: Some(names[node].clone()),
                event: None,
                detail: format!("subscriber {sub}: {message}"),
            }),
        }
    }
}

fn target_of(nodes: &[usize], names: &[String]) -> String {
    if nodes.len() <= 3 {
        nodes
            .iter()
            .map(|&i| names[i].as_str())
            .collect::<Vec<_>>()
            .join(",")
    } else {
        format!("{} nodes", nodes.len())
    }
}

/// Every node's parent by index, and its component (its side) if alive.
fn snapshot(sim: &Sim, n: usize) -> (Vec<Option<usize>>, Vec<Option<usize>>) {
    let index: BTreeMap<treescale::NodeId, usize> =
        sim.ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let parents = (0..n)
        .map(|i| {
            sim.nodes[i]
                .as_ref()
                .and_then(|node| node.parent())
                .and_then(|p| index.get(&p).copied())
        })
        .collect();
    let components = (0..n)
        .map(|i| sim.nodes[i].as_ref().map(|_| sim.side_of(i) as usize))
        .collect();
    (parents, components)
}
