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

use tokio::sync::watch;
use treescale::node::{CustomSocket, Topology};
use treescale::store::{StoreConfig, SyncMode};
use treescale::trust::{ClusterCa, TrustConfig};
use treescale::{Node, NodeConfig, NodeId};

use crate::engine::{self, Backend, Change, LinkChange};
use crate::ledger::Ledger;
use crate::report::{Report, Violation};
use crate::scenario::Scenario;
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

pub fn run(scenario: &Scenario, seed: u64) -> anyhow::Result<Report> {
    let names = scenario.nodes();
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
            inline_io: true,
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
    let by_id: BTreeMap<NodeId, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let n = names.len();
    let backend = Full {
        sim,
        _dir: dir,
        names,
        ips,
        by_id,
        alive: vec![true; n],
        cut: BTreeSet::new(),
        topology: vec![None; n],
        changes: Vec::new(),
        conditions,
        registry,
        ledger,
    };
    engine::run(scenario, seed, backend)
}

/// Real nodes on turmoil, as the engine's backend.
struct Full {
    sim: turmoil::Sim<'static>,
    /// The nodes' data dirs and the cluster CA; removed at the end.
    _dir: tempfile::TempDir,
    names: Vec<String>,
    ips: Vec<IpAddr>,
    by_id: BTreeMap<NodeId, usize>,
    alive: Vec<bool>,
    /// Directed pairs whose datagrams are cut.
    cut: BTreeSet<(usize, usize)>,
    /// Each node's topology as last read.
    topology: Vec<Option<Topology>>,
    /// Link changes seen since the engine last asked.
    changes: Vec<LinkChange>,
    conditions: Arc<Conditions>,
    registry: Registry,
    ledger: SharedLedger,
}

impl Full {
    fn host(&self, i: usize) -> &str {
        self.names[i].as_str()
    }

    /// Directed pairs between the sides of a cut.
    fn pairs(sides: &[Vec<usize>], one_way: bool) -> Vec<(usize, usize)> {
        let mut pairs = Vec::new();
        for (x, a) in sides.iter().enumerate() {
            for b in &sides[x + 1..] {
                for &p in a {
                    for &q in b {
                        pairs.push((p, q));
                        if !one_way {
                            pairs.push((q, p));
                        }
                    }
                }
            }
        }
        pairs
    }

    fn cut_pairs(&mut self, sides: &[Vec<usize>], one_way: bool) {
        for (a, b) in Self::pairs(sides, one_way) {
            self.sim
                .partition_oneway(self.names[a].as_str(), self.names[b].as_str());
            self.cut.insert((a, b));
        }
    }

    fn repair_pairs(&mut self, pairs: Vec<(usize, usize)>) {
        for (a, b) in pairs {
            self.sim
                .repair_oneway(self.names[a].as_str(), self.names[b].as_str());
            self.cut.remove(&(a, b));
        }
    }

    fn crash(&mut self, nodes: &[usize]) {
        for &i in nodes {
            self.sim.crash(self.names[i].as_str());
            self.registry.borrow_mut().remove(&i);
            self.alive[i] = false;
        }
    }

    fn restart(&mut self, nodes: &[usize]) {
        for &i in nodes {
            self.sim.bounce(self.names[i].as_str());
            self.alive[i] = true;
        }
    }
}

impl Backend for Full {
    const MODE: &'static str = "full";

    fn elapsed(&self) -> Duration {
        self.sim.elapsed()
    }

    fn apply(&mut self, change: &Change) {
        match change {
            Change::Cut { sides, one_way } => self.cut_pairs(sides, *one_way),
            Change::HealAll => {
                let all = std::mem::take(&mut self.cut).into_iter().collect();
                self.repair_pairs(all);
            }
            Change::Repair(sides) => self.repair_pairs(Self::pairs(sides, false)),
            Change::Crash(nodes) => self.crash(nodes),
            Change::Restart(nodes) => self.restart(nodes),
            Change::Churn { down, up } => {
                self.restart(up);
                self.crash(down);
            }
            Change::Loss { pairs, probability } => {
                for &(a, b) in pairs {
                    self.conditions
                        .set_loss(self.ips[a], self.ips[b], *probability);
                }
            }
            Change::Latency {
                pairs,
                latency,
                jitter,
            } => {
                for &(a, b) in pairs {
                    let (a, b) = (self.host(a).to_string(), self.host(b).to_string());
                    self.sim.set_link_latency(a.as_str(), b.as_str(), *latency);
                    self.sim.set_link_max_message_latency(
                        a.as_str(),
                        b.as_str(),
                        *latency + *jitter,
                    );
                }
            }
        }
    }

    fn step(&mut self) -> anyhow::Result<bool> {
        self.sim
            .step()
            .map_err(|e| anyhow::anyhow!("the simulation stopped: {e}"))?;
        let at = self.sim.elapsed();
        let mut changed = false;
        let registry = self.registry.borrow();
        for (i, slot) in self.topology.iter_mut().enumerate() {
            let fresh = match registry.get(&i) {
                Some(running) if self.alive[i] => Some(running.topology.borrow().clone()),
                _ => None,
            };
            if fresh == *slot {
                continue;
            }
            changed = true;
            let links = |t: &Option<Topology>| -> BTreeSet<usize> {
                t.iter()
                    .flat_map(|t| t.links.iter().filter_map(|id| self.by_id.get(id).copied()))
                    .collect()
            };
            let (before, after) = (links(slot), links(&fresh));
            if self.alive[i] {
                for (peers, up) in [
                    (after.difference(&before), true),
                    (before.difference(&after), false),
                ] {
                    for &peer in peers {
                        self.changes.push(LinkChange {
                            at,
                            node: i,
                            peer,
                            up,
                        });
                    }
                }
            }
            *slot = fresh;
        }
        Ok(changed)
    }

    fn link_changes(&mut self) -> Vec<LinkChange> {
        std::mem::take(&mut self.changes)
    }

    fn parents(&self) -> Vec<Option<usize>> {
        self.topology
            .iter()
            .map(|t| {
                t.as_ref()
                    .and_then(|t| t.parent)
                    .and_then(|p| self.by_id.get(&p).copied())
            })
            .collect()
    }

    fn components(&self) -> Vec<Option<usize>> {
        let cut = &self.cut;
        tree::components(&self.alive, |a, b| {
            !cut.contains(&(a, b)) && !cut.contains(&(b, a))
        })
    }

    fn held(&self) -> u64 {
        self.registry
            .borrow()
            .iter()
            .filter(|(i, _)| self.alive[**i])
            .map(|(_, r)| r.held.get())
            .sum()
    }

    fn datagrams_dropped(&self) -> u64 {
        self.conditions.dropped()
    }

    fn violations(&mut self) -> Vec<Violation> {
        Vec::new()
    }

    fn finish(self) -> Ledger {
        // The applications' tasks, which share the ledger, end with the
        // simulation.
        drop(self.sim);
        Rc::unwrap_or_clone(self.ledger).into_inner()
    }
}

/// 32 bytes from the run's seed and a label, for one seeded generator.
fn derive(seed: u64, label: &str) -> [u8; 32] {
    let material = format!("netsim {seed} {label}");
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, material.as_bytes());
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
