//! Full-stack mode: real TreeScale nodes (QUIC, TLS, LMDB stores in a
//! temporary dir) and clients on turmoil's simulated network, on virtual
//! time. Every node and application is a turmoil host; the scenario's
//! faults are applied between steps, and after each step every node's
//! topology is read to see detection, repair and loops as they happen.

mod discovery;
mod network;
mod socket;
mod workload;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::IteratorRandom;
use rand::SeedableRng;
use tokio::sync::watch;
use treescale::node::{CustomSocket, Topology};
use treescale::store::{StoreConfig, SyncMode};
use treescale::trust::{ClusterCa, TrustConfig};
use treescale::{Node, NodeConfig, NodeId};

use crate::ledger::{account, Ledger};
use crate::report::{FaultReport, Progress, Report, Timeline, TreeSummary, Violation};
use crate::scenario::{FaultKind, Scenario};
use crate::tree;
use discovery::{Lan, SimDiscovery};
use network::Conditions;
use socket::SimSocket;
use workload::{Connector, SharedLedger};

/// One step of virtual time.
const TICK: Duration = Duration::from_millis(1);
/// The UDP port every simulated node listens on.
const PORT: u16 = 7700;
/// Datagrams a simulated socket queues before dropping (turmoil's default
/// of 64 would drop QUIC bursts no real socket would).
const UDP_QUEUE: usize = 1 << 16;
/// Width of a bucket of the delivery timeline.
const BUCKET: Duration = Duration::from_millis(500);
/// How often a node's custody count is sampled.
const HELD_SAMPLE: Duration = Duration::from_millis(50);

/// What one node host shares with the run: filled in when it starts.
/// The node itself stays inside its host, so a crash drops it there (and
/// turmoil releases its port).
struct Running {
    topology: watch::Receiver<Topology>,
    held: Rc<Cell<u64>>,
}

type Registry = Rc<RefCell<BTreeMap<usize, Running>>>;

/// A change the timeline applies, and the fault row it reports to.
#[derive(Debug, Clone)]
enum Change {
    Cut {
        pairs: Vec<(usize, usize)>,
        one_way: bool,
    },
    HealAll,
    /// Ends the cut of these pairs only.
    Repair(Vec<(usize, usize)>),
    Crash(Vec<usize>),
    Restart(Vec<usize>),
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

struct Planned {
    at: Duration,
    change: Change,
    kind: String,
    target: String,
}

/// A fault being watched for detection and repair.
struct Watched {
    report: FaultReport,
    /// Links whose loss (or, for heals and restarts, appearance) means a
    /// node noticed.
    across: Box<dyn Fn(usize, usize) -> bool>,
    appears: bool,
    at: Duration,
    open: bool,
}

pub fn run(scenario: &Scenario, seed: u64) -> anyhow::Result<Report> {
    let names = scenario.nodes();
    let index: BTreeMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let dir = tempfile::tempdir()?;
    let mut sim = turmoil::Builder::new()
        .simulation_duration(scenario.duration + Duration::from_secs(24 * 3600))
        .tick_duration(TICK)
        .min_message_latency(scenario.network.latency)
        .max_message_latency(scenario.network.latency + scenario.network.jitter)
        .udp_capacity(UDP_QUEUE)
        .rng_seed(seed)
        .build();
    let conditions = Arc::new(Conditions::new(seed.wrapping_add(1)));
    let lan = Arc::new(Lan::default());
    let registry: Registry = Rc::default();
    let cluster = format!("netsim-{}", scenario.name);
    // The cluster's CA, as on a real LAN: nodes issue their certificates
    // from it and clients connect as its `admin`.
    let certs = dir.path().join("certs");
    ClusterCa::init(&certs, seeded_key(seed, "cluster ca")?)?;
    let trust = TrustConfig::Dir(certs);

    let mut ids = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let data_dir = dir.path().join(name);
        ids.push(write_seeded_key(&data_dir, seed, i)?);
        let segments: Vec<String> = scenario
            .segments
            .iter()
            .filter(|s| s.members().contains(name))
            .map(|s| s.name.clone())
            .collect();
        let mut config = NodeConfig::new(&data_dir);
        config.listen = SocketAddr::from(([0, 0, 0, 0], PORT));
        config.name = Some(name.clone());
        config.cluster = cluster.clone();
        config.trust = trust.clone();
        config.overlay.max_children = scenario.tree.max_children;
        config.store = StoreConfig {
            map_size: 256 << 20,
            sync: SyncMode::Never,
            inline_writer: true,
        };
        config.seed = Some(
            seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(i as u64),
        );
        let quic_seed = derive(seed, &format!("quic {name}"));
        let (lan, conditions, registry, host) = (
            lan.clone(),
            conditions.clone(),
            registry.clone(),
            name.clone(),
        );
        sim.host(name.as_str(), move || {
            let (config, lan, conditions, registry, segments, name) = (
                config.clone(),
                lan.clone(),
                conditions.clone(),
                registry.clone(),
                segments.clone(),
                host.clone(),
            );
            async move {
                let ip = turmoil::lookup(name.as_str());
                let socket = SimSocket::bind(config.listen, &name, conditions).await?;
                let discovery = SimDiscovery::new(lan, segments, SocketAddr::new(ip, PORT));
                let custom = CustomSocket {
                    socket,
                    runtime: Arc::new(quinn::TokioRuntime),
                    endpoint: seeded_endpoint(quic_seed),
                };
                let node = Node::start_on(config, Some(Box::new(discovery)), Some(custom)).await?;
                let held = Rc::new(Cell::new(0));
                let running = Running {
                    topology: node.topology(),
                    held: held.clone(),
                };
                registry.borrow_mut().insert(i, running);
                // Runs until the host crashes.
                loop {
                    held.set(node.custody_held());
                    tokio::time::sleep(HELD_SAMPLE).await;
                }
            }
        });
    }

    let ledger: SharedLedger = Rc::new(RefCell::new(Ledger::new(scenario)));
    let node_addr = |sim: &turmoil::Sim, node: &str| SocketAddr::new(sim.lookup(node), PORT);
    for (i, spec) in scenario.publishers.iter().enumerate() {
        let addr = node_addr(&sim, &spec.node);
        let until = spec.until.unwrap_or(scenario.duration);
        let connector = Connector {
            node: addr,
            conditions: conditions.clone(),
            seed: derive(seed, &format!("publisher {i}")),
            trust: trust.clone(),
        };
        let task = workload::publish(i, spec.clone(), until, connector, ledger.clone());
        sim.client(format!("publisher-{i}").as_str(), async move {
            task.await;
            Ok(())
        });
    }
    for (i, spec) in scenario.subscribers.iter().enumerate() {
        let addr = node_addr(&sim, &spec.node);
        let connector = Connector {
            node: addr,
            conditions: conditions.clone(),
            seed: derive(seed, &format!("subscriber {i}")),
            trust: trust.clone(),
        };
        let task = workload::subscribe(i, spec.clone(), connector, ledger.clone());
        sim.client(format!("subscriber-{i}").as_str(), async move {
            task.await;
            Ok(())
        });
    }

    let ips: Vec<IpAddr> = names.iter().map(|n| sim.lookup(n.as_str())).collect();
    let plan = plan(scenario, &index, names.len(), seed);
    let by_id: BTreeMap<NodeId, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();

    let n = names.len();
    let mut alive = vec![true; n];
    let mut cut: BTreeSet<(usize, usize)> = BTreeSet::new();
    let mut topology: Vec<Option<Topology>> = vec![None; n];
    let mut watched: Vec<Watched> = Vec::new();
    let mut violations = Vec::new();
    let mut loop_seen = false;
    let mut formed_ms = None;
    let mut next = 0;
    let mut progress = Progress::start();
    while sim.elapsed() < scenario.duration {
        let now = sim.elapsed();
        while next < plan.len() && plan[next].at <= now {
            let planned = &plan[next];
            // A fault nobody noticed before the next one never will be: it
            // stops counting what is held, and needs no more tree checks.
            let at = planned.at;
            for fault in watched.iter_mut() {
                if fault.report.detected_ms.is_none() && fault.at < at {
                    fault.open = false;
                }
            }
            // Watched first: a heal must see what was cut.
            watched.push(watch_fault(planned, &cut));
            apply(
                &mut sim,
                &planned.change,
                &names,
                &ips,
                &mut alive,
                &mut cut,
                &conditions,
                &registry,
            );
            next += 1;
        }
        sim.step()
            .map_err(|e| anyhow::anyhow!("the simulation stopped: {e}"))?;
        let now_ms = sim.elapsed().as_millis() as u64;

        let mut changed = false;
        for (i, slot) in topology.iter_mut().enumerate() {
            let registry = registry.borrow();
            let fresh = match registry.get(&i) {
                Some(running) if alive[i] => Some(running.topology.borrow().clone()),
                _ => None,
            };
            if fresh == *slot {
                continue;
            }
            changed = true;
            let before: BTreeSet<usize> = slot
                .iter()
                .flat_map(|t| t.links.iter().filter_map(|id| by_id.get(id).copied()))
                .collect();
            let after: BTreeSet<usize> = fresh
                .iter()
                .flat_map(|t| t.links.iter().filter_map(|id| by_id.get(id).copied()))
                .collect();
            for fault in watched
                .iter_mut()
                .filter(|f| f.report.detected_ms.is_none())
            {
                let seen = if fault.appears {
                    after.difference(&before).find(|&&j| (fault.across)(i, j))
                } else {
                    before.difference(&after).find(|&&j| (fault.across)(i, j))
                };
                if seen.is_some() && alive[i] {
                    fault.report.detected_ms = Some(now_ms - fault.at.as_millis() as u64);
                    fault.report.detected_by = Some(names[i].clone());
                }
            }
            *slot = fresh;
        }
        // Custody held anywhere counts for every fault still open.
        let held: u64 = registry
            .borrow()
            .iter()
            .filter(|(i, _)| alive[**i])
            .map(|(_, r)| r.held.get())
            .sum();
        for fault in watched.iter_mut().filter(|f| f.open) {
            fault.report.held_peak = fault.report.held_peak.max(held);
        }
        if changed || watched.iter().any(|f| f.open) {
            let parents = parents(&topology, &by_id);
            if let Some(cycle) = tree::find_loop(&parents, &alive) {
                if !loop_seen {
                    violations.push(Violation {
                        invariant: "loop",
                        at_ms: now_ms,
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
                    });
                }
                loop_seen = true;
            }
            let components = tree::components(&alive, |a, b| connected(&cut, a, b));
            let whole = tree::one_tree_per_component(&parents, &components).is_ok();
            if whole && formed_ms.is_none() {
                formed_ms = Some(now_ms);
            }
            for fault in watched.iter_mut().filter(|f| f.open) {
                if whole && fault.report.detected_ms.is_some() {
                    fault.report.repaired_ms = Some(now_ms - fault.at.as_millis() as u64);
                    fault.open = false;
                }
            }
        }
        progress.at(now, scenario.duration);
    }

    let end_ms = sim.elapsed().as_millis() as u64;
    let parents = parents(&topology, &by_id);
    let components = tree::components(&alive, |a, b| connected(&cut, a, b));
    if let Err(why) = tree::one_tree_per_component(&parents, &components) {
        violations.push(Violation::not_one_tree(end_ms, &name_nodes(&why, &names)));
    }
    let final_tree = summary(&parents, &alive, &components);
    let ledger = ledger.borrow();
    let subscribers = account(scenario, &ledger, &mut violations);
    let lanes = scenario
        .subscribers
        .iter()
        .enumerate()
        .map(|(i, s)| s.lane(i));
    let timeline = Timeline::of(BUCKET, lanes, &ledger.delivered_at, end_ms);
    drop(sim);
    Ok(Report {
        scenario: scenario.name.clone(),
        mode: "full",
        seed,
        duration_ms: end_ms,
        nodes: n,
        formed_ms,
        invariants_ok: violations.is_empty(),
        violations,
        faults: watched.into_iter().map(|w| w.report).collect(),
        subscribers,
        final_tree,
        datagrams_dropped: conditions.dropped(),
        timeline,
    })
}

/// 32 bytes from the run's seed and a label, for one seeded generator.
fn derive(seed: u64, label: &str) -> [u8; 32] {
    let material = format!("netsim {seed} {label}");
    let digest = ring::digest::digest(&ring::digest::SHA256, material.as_bytes());
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// QUIC endpoint settings whose random choices (packet numbers skipped,
/// connection ids) come from `seed`.
fn seeded_endpoint(seed: [u8; 32]) -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    config.rng_seed(Some(seed));
    config
}

/// Gives node `i` a key derived from the seed, so ids (and with them the
/// tree) are the same on every run with this seed.
fn write_seeded_key(data_dir: &Path, seed: u64, i: usize) -> anyhow::Result<NodeId> {
    let key = seeded_key(seed, &format!("node key {i}"))?;
    std::fs::create_dir_all(data_dir)?;
    std::fs::write(data_dir.join("node.key"), key.serialize_pem())?;
    Ok(NodeId::from_public_key(
        &rcgen::PublicKeyData::subject_public_key_info(&key),
    ))
}

/// An Ed25519 key derived from the seed and `label`. Its signatures are
/// deterministic and of fixed size, so certificates it signs keep runs
/// replayable.
fn seeded_key(seed: u64, label: &str) -> anyhow::Result<rcgen::KeyPair> {
    // PKCS#8 v1 of an Ed25519 key: a fixed prefix, then the 32-byte seed.
    const PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let mut der = PREFIX.to_vec();
    der.extend_from_slice(&derive(seed, label));
    Ok(rcgen::KeyPair::try_from(der.as_slice())?)
}

/// The scenario's faults as changes in time order, flaps and churn rounds
/// spelled out.
fn plan(scenario: &Scenario, index: &BTreeMap<&str, usize>, n: usize, seed: u64) -> Vec<Planned> {
    let ix = |name: &String| index[name.as_str()];
    let set = |names: &[String]| names.iter().map(ix).collect::<Vec<_>>();
    let pairs_between = |a: &[usize], b: &[usize]| {
        a.iter()
            .flat_map(|&x| b.iter().map(move |&y| (x, y)))
            .collect::<Vec<_>>()
    };
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
                let mut sides: Vec<Vec<usize>> = sets.iter().map(|s| set(s)).collect();
                let named: BTreeSet<usize> = sides.iter().flatten().copied().collect();
                sides[0].extend((0..n).filter(|i| !named.contains(i)));
                let mut pairs = Vec::new();
                for (x, a) in sides.iter().enumerate() {
                    for b in &sides[x + 1..] {
                        pairs.extend(pairs_between(a, b));
                    }
                }
                let target = sets
                    .iter()
                    .map(|s| s.join(","))
                    .collect::<Vec<_>>()
                    .join(" | ");
                push(
                    at,
                    Change::Cut {
                        pairs,
                        one_way: false,
                    },
                    "partition",
                    target,
                );
            }
            FaultKind::OneWay { from, to } => {
                let pairs = pairs_between(&set(from), &set(to));
                let target = format!("{} -> {}", from.join(","), to.join(","));
                push(
                    at,
                    Change::Cut {
                        pairs,
                        one_way: true,
                    },
                    "one-way",
                    target,
                );
            }
            FaultKind::Heal => push(at, Change::HealAll, "heal", "all".to_string()),
            FaultKind::Crash { node } => {
                push(at, Change::Crash(vec![ix(node)]), "crash", node.clone())
            }
            FaultKind::Restart { node } => {
                push(at, Change::Restart(vec![ix(node)]), "restart", node.clone())
            }
            FaultKind::Loss { between, percent } => push(
                at,
                Change::Loss {
                    pairs: link_pairs(between, index, n),
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
                    pairs: link_pairs(between, index, n),
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
                let pairs = pairs_between(&set(&between[0]), &set(&between[1]));
                let target = format!("{} | {}", between[0].join(","), between[1].join(","));
                for k in 0..*times {
                    let down = at + *period * (2 * k);
                    let cut = Change::Cut {
                        pairs: pairs.clone(),
                        one_way: false,
                    };
                    push(down, cut, "flap-down", target.clone());
                    let repair = Change::Repair(pairs.clone());
                    push(down + *period, repair, "flap-up", target.clone());
                }
            }
            FaultKind::Churn {
                percent,
                every,
                rounds,
            } => {
                let mut down: Vec<usize> = Vec::new();
                for k in 0..=*rounds {
                    let when = at + *every * k;
                    if !down.is_empty() {
                        let names = down.len().to_string();
                        push(when, Change::Restart(down.clone()), "churn-up", names);
                    }
                    if k == *rounds {
                        break;
                    }
                    let up: Vec<usize> = (0..n).filter(|i| !down.contains(i)).collect();
                    let count = ((up.len() as f64 * percent / 100.0).round() as usize).max(1);
                    down = up.into_iter().choose_multiple(&mut rng, count);
                    down.sort();
                    push(
                        when,
                        Change::Crash(down.clone()),
                        "churn-down",
                        count.to_string(),
                    );
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

#[allow(clippy::too_many_arguments)]
fn apply(
    sim: &mut turmoil::Sim,
    change: &Change,
    names: &[String],
    ips: &[IpAddr],
    alive: &mut [bool],
    cut: &mut BTreeSet<(usize, usize)>,
    conditions: &Conditions,
    registry: &Registry,
) {
    let host = |i: usize| names[i].as_str();
    match change {
        Change::Cut { pairs, one_way } => {
            for &(a, b) in pairs {
                if *one_way {
                    sim.partition_oneway(host(a), host(b));
                } else {
                    sim.partition(host(a), host(b));
                    cut.insert((b, a));
                }
                cut.insert((a, b));
            }
        }
        Change::HealAll => {
            for &(a, b) in cut.iter() {
                sim.repair(host(a), host(b));
            }
            cut.clear();
        }
        Change::Repair(pairs) => {
            for &(a, b) in pairs {
                sim.repair(host(a), host(b));
                cut.remove(&(a, b));
                cut.remove(&(b, a));
            }
        }
        Change::Crash(nodes) => {
            for &i in nodes {
                sim.crash(host(i));
                registry.borrow_mut().remove(&i);
                alive[i] = false;
            }
        }
        Change::Restart(nodes) => {
            for &i in nodes {
                sim.bounce(host(i));
                alive[i] = true;
            }
        }
        Change::Loss { pairs, probability } => {
            for &(a, b) in pairs {
                conditions.set_loss(ips[a], ips[b], *probability);
            }
        }
        Change::Latency {
            pairs,
            latency,
            jitter,
        } => {
            for &(a, b) in pairs {
                sim.set_link_latency(host(a), host(b), *latency);
                sim.set_link_max_message_latency(host(a), host(b), *latency + *jitter);
            }
        }
    }
}

/// Starts watching a fault that was just applied: which links count as
/// noticing it.
fn watch_fault(planned: &Planned, cut: &BTreeSet<(usize, usize)>) -> Watched {
    let report = FaultReport {
        kind: planned.kind.clone(),
        target: planned.target.clone(),
        at_ms: planned.at.as_millis() as u64,
        detected_ms: None,
        detected_by: None,
        repaired_ms: None,
        held_peak: 0,
    };
    let (across, appears): (Box<dyn Fn(usize, usize) -> bool>, bool) = match &planned.change {
        Change::Cut { pairs, .. } => {
            let pairs: BTreeSet<(usize, usize)> =
                pairs.iter().flat_map(|&(a, b)| [(a, b), (b, a)]).collect();
            (Box::new(move |a, b| pairs.contains(&(a, b))), false)
        }
        Change::HealAll | Change::Repair(_) => {
            let repaired: Vec<(usize, usize)> = match &planned.change {
                Change::Repair(pairs) => pairs.clone(),
                _ => cut.iter().copied().collect(),
            };
            let healed: BTreeSet<(usize, usize)> = repaired
                .iter()
                .flat_map(|&(a, b)| [(a, b), (b, a)])
                .collect();
            (Box::new(move |a, b| healed.contains(&(a, b))), true)
        }
        Change::Crash(nodes) => {
            let nodes = nodes.clone();
            (Box::new(move |_, b| nodes.contains(&b)), false)
        }
        Change::Restart(nodes) => {
            let nodes = nodes.clone();
            (
                Box::new(move |a, b| nodes.contains(&a) || nodes.contains(&b)),
                true,
            )
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

fn connected(cut: &BTreeSet<(usize, usize)>, a: usize, b: usize) -> bool {
    !cut.contains(&(a, b)) && !cut.contains(&(b, a))
}

fn parents(topology: &[Option<Topology>], by_id: &BTreeMap<NodeId, usize>) -> Vec<Option<usize>> {
    topology
        .iter()
        .map(|t| {
            t.as_ref()
                .and_then(|t| t.parent)
                .and_then(|p| by_id.get(&p).copied())
        })
        .collect()
}

fn summary(parents: &[Option<usize>], alive: &[bool], components: &[Option<usize>]) -> TreeSummary {
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
    TreeSummary {
        components: components.iter().flatten().collect::<BTreeSet<_>>().len(),
        roots: (0..parents.len())
            .filter(|&i| alive[i] && parents[i].is_none())
            .count(),
        max_depth: (0..parents.len())
            .filter(|&i| alive[i])
            .map(depth)
            .max()
            .unwrap_or(0),
    }
}

/// Replaces node numbers in a tree-check message with names.
fn name_nodes(why: &str, names: &[String]) -> String {
    why.split(' ')
        .map(|word| match word.trim_end_matches(',').parse::<usize>() {
            Ok(i) if i < names.len() => word.replacen(&i.to_string(), &names[i], 1),
            _ => word.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}
