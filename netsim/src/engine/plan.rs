//! The timeline of a scenario as changes at points in virtual time: each
//! fault of the TOML becomes one change or more (a flap, churn), every
//! random choice made here from the seed, so both modes apply the same.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::IteratorRandom;
use rand::SeedableRng;

use crate::scenario::{FaultKind, Scenario};

/// A change the timeline applies; nodes are numbered as `Scenario::nodes`
/// lists them.
#[derive(Debug, Clone)]
pub enum Change {
    /// Links between nodes of different sides break; with `one_way`, only
    /// from the first side to the second. Nodes on no side are not cut.
    Cut {
        sides: Vec<Vec<usize>>,
        one_way: bool,
    },
    /// Every cut ends.
    HealAll,
    /// The cut between these sides ends.
    Repair(Vec<Vec<usize>>),
    Crash(Vec<usize>),
    Restart(Vec<usize>),
    /// One round of churn: `up` (the last round's) start again, then `down`
    /// crash.
    Churn {
        down: Vec<usize>,
        up: Vec<usize>,
    },
    Loss {
        pairs: Vec<(usize, usize)>,
        probability: f64,
    },
    Latency {
        pairs: Vec<(usize, usize)>,
        latency: Duration,
        jitter: Duration,
    },
}

/// A change, when, and the fault row it reports to.
pub struct Planned {
    pub at: Duration,
    pub change: Change,
    pub kind: String,
    pub target: String,
}

/// Every change of `scenario`'s timeline, in time order.
pub fn plan(scenario: &Scenario, seed: u64) -> Vec<Planned> {
    let names = scenario.nodes();
    let n = names.len();
    let index: BTreeMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, name)| (name.as_str(), i))
        .collect();
    let ix = |name: &String| index[name.as_str()];
    let set = |names: &[String]| names.iter().map(ix).collect::<Vec<_>>();
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(2));
    let mut plan = Vec::new();
    for fault in &scenario.faults {
        let at = fault.at;
        let mut push = |at, change, kind: &str, target: String| {
            plan.push(Planned {
                at,
                change,
                kind: kind.to_string(),
                target,
            })
        };
        match &fault.kind {
            FaultKind::Partition { sets } => {
                // Nodes named in no set stay with the first.
                let mut sides: Vec<Vec<usize>> = sets.iter().map(|s| set(s)).collect();
                let named: BTreeSet<usize> = sides.iter().flatten().copied().collect();
                sides[0].extend((0..n).filter(|i| !named.contains(i)));
                let target = sets
                    .iter()
                    .map(|s| s.join(","))
                    .collect::<Vec<_>>()
                    .join(" | ");
                let cut = Change::Cut {
                    sides,
                    one_way: false,
                };
                push(at, cut, "partition", target);
            }
            FaultKind::OneWay { from, to } => {
                let target = format!("{} -> {}", from.join(","), to.join(","));
                let cut = Change::Cut {
                    sides: vec![set(from), set(to)],
                    one_way: true,
                };
                push(at, cut, "one-way", target);
            }
            FaultKind::Heal => push(at, Change::HealAll, "heal", "all".to_string()),
            FaultKind::Crash { node } => {
                push(at, Change::Crash(vec![ix(node)]), "crash", node.clone())
            }
            FaultKind::MassCrash { percent } => {
                let spared: BTreeSet<usize> = scenario.client_nodes().into_iter().map(ix).collect();
                let others = (0..n).filter(|i| !spared.contains(i));
                let count = ((n - spared.len()) as f64 * percent / 100.0).round() as usize;
                let mut down = others.choose_multiple(&mut rng, count);
                down.sort();
                let target = format!("{} of {n} nodes", down.len());
                push(at, Change::Crash(down), "mass-crash", target);
            }
            FaultKind::Restart { node } => {
                push(at, Change::Restart(vec![ix(node)]), "restart", node.clone())
            }
            FaultKind::Loss { between, percent } => push(
                at,
                Change::Loss {
                    pairs: link_pairs(between, &index, n),
                    probability: percent / 100.0,
                },
                "loss",
                format!("{}-{} {percent}%", between[0], between[1]),
            ),
            FaultKind::Latency {
                between,
                latency,
                jitter,
            } => push(
                at,
                Change::Latency {
                    pairs: link_pairs(between, &index, n),
                    latency: *latency,
                    jitter: *jitter,
                },
                "latency",
                format!("{}-{} {latency:?}±{jitter:?}", between[0], between[1]),
            ),
            FaultKind::Flap {
                between,
                period,
                times,
            } => {
                let sides = vec![set(&between[0]), set(&between[1])];
                let target = format!("{} | {}", between[0].join(","), between[1].join(","));
                for k in 0..*times {
                    let down = at + *period * (2 * k);
                    let cut = Change::Cut {
                        sides: sides.clone(),
                        one_way: false,
                    };
                    push(down, cut, "flap-down", target.clone());
                    let repair = Change::Repair(sides.clone());
                    push(down + *period, repair, "flap-up", target.clone());
                }
            }
            FaultKind::Churn {
                percent,
                every,
                rounds,
            } => {
                let mut up: Vec<usize> = Vec::new();
                for k in 0..=*rounds {
                    let when = at + *every * k;
                    let mut down = Vec::new();
                    if k < *rounds {
                        let running: Vec<usize> = (0..n).filter(|i| !up.contains(i)).collect();
                        let count =
                            ((running.len() as f64 * percent / 100.0).round() as usize).max(1);
                        down = running.into_iter().choose_multiple(&mut rng, count);
                        down.sort();
                    }
                    let target = format!("{} down, {} up", down.len(), up.len());
                    let restarted = std::mem::replace(&mut up, down.clone());
                    let change = Change::Churn {
                        down,
                        up: restarted,
                    };
                    push(when, change, "churn", target);
                }
            }
        }
    }
    plan.sort_by_key(|p| p.at);
    plan
}

/// The links `between` names: one pair, or with `"*"` as the second name,
/// the first node and every other.
fn link_pairs(
    between: &[String; 2],
    index: &BTreeMap<&str, usize>,
    n: usize,
) -> Vec<(usize, usize)> {
    let a = index[between[0].as_str()];
    match between[1].as_str() {
        "*" => (0..n).filter(|&b| b != a).map(|b| (a, b)).collect(),
        b => vec![(a, index[b])],
    }
}

/// Which side of each cut in effect each node is on.
#[derive(Default)]
pub struct Cuts {
    /// Per cut: each node's side, `None` for nodes on no side.
    active: Vec<Vec<Option<usize>>>,
}

impl Cuts {
    /// Follows `change`.
    pub fn apply(&mut self, change: &Change, n: usize) {
        match change {
            Change::Cut { sides, .. } => self.active.push(side_map(sides, n)),
            Change::HealAll => self.active.clear(),
            Change::Repair(sides) => {
                let map = side_map(sides, n);
                self.active.retain(|cut| *cut != map);
            }
            _ => {}
        }
    }

    /// The cuts in effect now, to tell later which links a heal restores.
    pub fn snapshot(&self) -> Vec<Vec<Option<usize>>> {
        self.active.clone()
    }
}

/// Each node's side in `sides`.
pub fn side_map(sides: &[Vec<usize>], n: usize) -> Vec<Option<usize>> {
    let mut map = vec![None; n];
    for (side, members) in sides.iter().enumerate() {
        for &i in members {
            map[i] = Some(side);
        }
    }
    map
}

/// Whether `a` and `b` are on different sides of one cut.
pub fn separated(cut: &[Option<usize>], a: usize, b: usize) -> bool {
    matches!((cut[a], cut[b]), (Some(x), Some(y)) if x != y)
}
