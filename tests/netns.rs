//! A real network: `treescale node` processes, each in its own network
//! namespace, finding each other with real mDNS.
//!
//! - Three nodes on one bridge: the root is cut off with nftables and let
//!   back; the test prints how long detection, repair and recovery took,
//!   then sends events across the bridge while it drops 10% of datagrams
//!   (nftables `numgen`).
//! - Three segments joined by a router that is a node too: mDNS shows each
//!   node only the router, yet the four must become one tree.
//! - A durable subscriber attached at another node than the subscription's
//!   home: its node is cut off mid-stream and let back; every event
//!   arrives once, in order.
//!
//! Every namespace a test made is deleted, pass or fail. Skipped with a
//! reason when not root or without `ip netns`.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::cluster_for;
use common::netfilter::{nft, Lab};
use common::processes::*;
use serde_json::Value;

const NODES: usize = 3;

/// nftables rules that cut a namespace off: everything but loopback is
/// dropped, both ways. `delete table inet cut` lets it back.
const CUT_OFF: &str = "add table inet cut\n\
    add chain inet cut input { type filter hook input priority -10; policy drop; }\n\
    add chain inet cut output { type filter hook output priority -10; policy drop; }\n\
    add rule inet cut input iifname lo accept\n\
    add rule inet cut output oifname lo accept\n";

struct Net {
    lab: Lab,
    cluster: common::TestCluster,
}

impl Net {
    /// The lab with a cluster of its own; `None`, saying why, when the lab
    /// cannot be made here (not root, no `ip netns`).
    fn new(lab: Result<Lab, String>, test: &str) -> Option<Net> {
        match lab {
            Ok(lab) => Some(Net {
                lab,
                cluster: cluster_for(test),
            }),
            Err(why) => {
                eprintln!("skipped: {why}");
                None
            }
        }
    }

    fn node_addr(&self, i: usize) -> String {
        format!("{}:7700", self.lab.addr(i))
    }

    fn treescale(&self, i: usize, args: &[&str]) -> std::process::Command {
        let mut command = self.lab.command(i, BIN);
        command
            .args(args)
            .env("TREESCALE_CLUSTER", &self.cluster.name)
            .env("TREESCALE_CERTS", self.cluster.certs())
            .env_remove("RUST_LOG");
        command
    }

    fn status(&self, i: usize) -> Option<Value> {
        let addr = self.node_addr(i);
        let args = [
            "status",
            "--node",
            &addr,
            "--json",
            "--connect-timeout",
            "1s",
        ];
        let output = self.treescale(i, &args).output().ok()?;
        serde_json::from_slice(&output.stdout).ok()
    }

    /// Starts node `i` on `interfaces`, keeping its state in `dir`; with
    /// several interfaces it listens on all of them, and announces on each
    /// the address it has there.
    fn spawn_node(
        &self,
        i: usize,
        interfaces: &[String],
        dir: &tempfile::TempDir,
        log: &NodeLog,
    ) -> std::process::Child {
        let addr = match interfaces.len() {
            1 => self.node_addr(i),
            _ => "0.0.0.0:7700".to_string(),
        };
        let name = format!("n{i}");
        let mut args = vec!["node", "--listen", &addr, "--name", &name, "-v"];
        for interface in interfaces {
            args.extend(["--interface", interface.as_str()]);
        }
        self.treescale(i, &args)
            .arg("--data-dir")
            .arg(dir.path())
            .stderr(log.stdio())
            .spawn()
            .unwrap()
    }

    /// Starts one node in each namespace of a one-bridge lab.
    fn start_on_the_bridge(&self, dirs: &[tempfile::TempDir], logs: &[NodeLog]) -> Processes {
        let eth0 = ["eth0".to_string()];
        let nodes = (0..NODES).map(|i| self.spawn_node(i, &eth0, &dirs[i], &logs[i]));
        Processes(nodes.collect())
    }

    /// Whether `members` form one tree: one root among them, known to all.
    fn one_tree(&self, members: &[usize]) -> bool {
        let statuses: Option<Vec<Value>> = members.iter().map(|&i| self.status(i)).collect();
        let Some(statuses) = statuses else {
            return false;
        };
        let ids: Vec<&Value> = statuses.iter().map(|s| &s["id"]).collect();
        let roots = statuses.iter().filter(|s| s["parent"].is_null()).count();
        let root = &statuses[0]["root"];
        roots == 1 && ids.contains(&root) && statuses.iter().all(|s| &s["root"] == root)
    }
}

/// Polls `done` every 100 ms; returns how long it took to hold.
fn time_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

#[test]
fn nodes_on_a_bridge_notice_a_cut_repair_and_recover() {
    let Some(net) = Net::new(Lab::new(NODES), "netns") else {
        return;
    };
    let dirs: Vec<_> = (0..NODES).map(|_| tempfile::tempdir().unwrap()).collect();
    let logs: Vec<NodeLog> = (0..NODES).map(|_| NodeLog::new()).collect();
    // Declared after the lab: the processes stop before it is deleted.
    let processes = net.start_on_the_bridge(&dirs, &logs);
    let all: Vec<usize> = (0..NODES).collect();
    let formed = time_until(Duration::from_secs(30), "one tree over mDNS", || {
        net.one_tree(&all)
    });

    // Cut the root off: everything on its eth0 dropped, both ways.
    let status = net.status(0).unwrap();
    let root_id = status["root"].clone();
    let root = (0..NODES)
        .find(|&i| net.status(i).is_some_and(|s| s["id"] == root_id))
        .expect("the root is one of the nodes");
    let survivors: Vec<usize> = all.iter().copied().filter(|&i| i != root).collect();
    let linked_to_root = |i: usize| {
        net.status(i).is_some_and(|s| {
            s["peers"]
                .as_array()
                .is_some_and(|peers| peers.iter().any(|p| p["id"] == root_id))
        })
    };
    // Noticing means losing a link the root had.
    let neighbours: Vec<usize> = survivors
        .iter()
        .copied()
        .filter(|&i| linked_to_root(i))
        .collect();
    assert!(!neighbours.is_empty(), "nobody is linked to the root");
    nft(Some(net.lab.node(root)), CUT_OFF).unwrap();
    let cut_at = Instant::now();
    time_until(Duration::from_secs(10), "the cut to be noticed", || {
        neighbours.iter().any(|&i| !linked_to_root(i))
    });
    let detected = cut_at.elapsed();
    time_until(
        Duration::from_secs(20),
        "the survivors to form a tree",
        || net.one_tree(&survivors),
    );
    let repaired = cut_at.elapsed();

    nft(Some(net.lab.node(root)), "delete table inet cut\n").unwrap();
    let recovered = time_until(
        Duration::from_secs(30),
        "one tree again after the heal",
        || net.one_tree(&all),
    );
    eprintln!(
        "netns: formed in {formed:?}; root n{root} cut: noticed after {detected:?}, \
         survivors one tree after {repaired:?}; after the heal one tree again in {recovered:?}"
    );

    // 10% of the datagrams crossing the bridge dropped: QUIC resends, so
    // every event still arrives, in order.
    let lossy = "add table bridge lossy\n\
                 add chain bridge lossy forward { type filter hook forward priority 0; }\n\
                 add rule bridge lossy forward meta l4proto udp numgen random mod 100 < 10 drop\n";
    nft(Some(net.lab.bridge()), lossy).unwrap();
    let (from, to) = (survivors[0], root);
    let to_addr = net.node_addr(to);
    let sub = net
        .treescale(
            to,
            &["sub", "--node", &to_addr, "--count", "300", "lossy.events"],
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let from_addr = net.node_addr(from);
    let args = ["pub", "--node", &from_addr, "--wait", "10s", "lossy.events"];
    let lines: String = (1..=300).map(|i| format!("{i}\n")).collect();
    publish_and_expect(
        net.treescale(from, &args),
        sub,
        &lines,
        Duration::from_secs(30),
    );
    drop(processes);
}

/// Waits for `child` (kept in a `Processes`, so it dies with the test)
/// to exit; its success.
fn exits_within(child: &mut std::process::Child, limit: Duration, what: &str) -> bool {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        assert!(
            start.elapsed() < limit,
            "{what} did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_durable_subscriber_at_another_node_loses_nothing_when_cut_off_from_its_home() {
    let Some(net) = Net::new(Lab::new(NODES), "netns-remote-durable") else {
        return;
    };
    let dirs: Vec<_> = (0..NODES).map(|_| tempfile::tempdir().unwrap()).collect();
    let logs: Vec<NodeLog> = (0..NODES).map(|_| NodeLog::new()).collect();
    let mut processes = net.start_on_the_bridge(&dirs, &logs);
    let all: Vec<usize> = (0..NODES).collect();
    time_until(Duration::from_secs(30), "one tree over mDNS", || {
        net.one_tree(&all)
    });
    let (home, far) = (0, 2);
    let (home_addr, far_addr) = (net.node_addr(home), net.node_addr(far));
    let durable = |i: usize| net.status(i).map(|s| s["durables"][0].clone());

    // Made at n0, which becomes its home; its first subscriber leaves.
    let made = ["sub", "--node", &home_addr, "--durable", "far", "far.>"];
    let mut maker = net
        .treescale(home, &made)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    time_until(Duration::from_secs(15), "the durable to reach n2", || {
        durable(far).is_some_and(|d| d["name"] == "far")
    });
    maker.kill().unwrap();
    maker.wait().unwrap();
    time_until(
        Duration::from_secs(15),
        "its first subscriber to leave",
        || durable(home).is_some_and(|d| d["attached"] == false),
    );

    const EVENTS: usize = 10_000;
    let received = tempfile::NamedTempFile::new().unwrap();
    let count = EVENTS.to_string();
    // A long ack wait: only attaching again, not the home's redelivery
    // after the ack wait, can bring back in time what the cut lost.
    let args = [
        "sub",
        "--node",
        &far_addr,
        "--durable",
        "far",
        "--count",
        &count,
        "--ack-wait",
        "5m",
        "far.>",
    ];
    let sub = net.treescale(far, &args);
    processes.0.push(
        { sub }
            .stdout(Stdio::from(received.reopen().unwrap()))
            .spawn()
            .unwrap(),
    );
    time_until(
        Duration::from_secs(15),
        "the attachment at its home",
        || durable(home).is_some_and(|d| d["attached"] == true),
    );
    let args = [
        "pub",
        "--node",
        &home_addr,
        "--qos",
        "at-least-once",
        "far.events",
    ];
    let mut publisher = net
        .treescale(home, &args)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = publisher.stdin.take().unwrap();
    processes.0.push(publisher);
    let lines: Vec<String> = (1..=EVENTS).map(|n| format!("f{n}")).collect();
    let text: Vec<String> = lines.chunks(500).map(|c| c.join("\n") + "\n").collect();
    let feeder = std::thread::spawn(move || {
        use std::io::Write;
        for chunk in text {
            stdin.write_all(chunk.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(150));
        }
    });

    // Mid-stream, n2 is cut off from everything for 3 s, then let back.
    std::thread::sleep(Duration::from_millis(800));
    nft(Some(net.lab.node(far)), CUT_OFF).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    time_until(Duration::from_secs(5), "n2 to lose its links", || {
        net.status(far)
            .is_some_and(|s| s["peers"].as_array().is_some_and(|p| p.is_empty()))
    });
    nft(Some(net.lab.node(far)), "delete table inet cut\n").unwrap();
    feeder.join().unwrap();
    let published = exits_within(&mut processes.0[NODES + 1], Duration::from_secs(30), "pub");
    assert!(published, "pub failed: {}", logs[home].contents());
    let subscribed = exits_within(&mut processes.0[NODES], Duration::from_secs(60), "sub");
    let got: Vec<String> = std::fs::read_to_string(received.path())
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert!(subscribed, "sub failed after {} events", got.len());
    if let Some(at) = (0..got.len()).find(|&i| lines.get(i) != Some(&got[i])) {
        panic!(
            "not each event once, in order: from line {} on sub printed {:?}",
            at + 1,
            &got[at..got.len().min(at + 5)]
        );
    }
    assert_eq!(got.len(), EVENTS);
    drop(processes);
}

#[test]
fn segments_joined_by_a_router_become_one_tree() {
    const SEGMENTS: usize = 3;
    let Some(net) = Net::new(Lab::segments(SEGMENTS), "netns-segments") else {
        return;
    };
    let nodes = SEGMENTS + 1;
    let hub = SEGMENTS;
    let dirs: Vec<_> = (0..nodes).map(|_| tempfile::tempdir().unwrap()).collect();
    // Keys chosen so that the hub has the largest id: no node may join it,
    // so each segment's node stays a tree of its own unless the trees find
    // each other's roots through the hub.
    let mut keys: Vec<(treescale::NodeId, rcgen::KeyPair)> = (0..nodes)
        .map(|_| {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
            let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
            (treescale::NodeId::from_public_key(&spki), key)
        })
        .collect();
    keys.sort_by_key(|(id, _)| *id);
    for (dir, (_, key)) in dirs.iter().zip(&keys) {
        std::fs::write(dir.path().join("node.key"), key.serialize_pem()).unwrap();
    }
    let logs: Vec<NodeLog> = (0..nodes).map(|_| NodeLog::new()).collect();
    let mut processes = Processes(Vec::new());
    for i in 0..nodes {
        let interfaces: Vec<String> = if i == hub {
            (0..SEGMENTS).map(|s| format!("eth{s}")).collect()
        } else {
            vec!["eth0".to_string()]
        };
        processes
            .0
            .push(net.spawn_node(i, &interfaces, &dirs[i], &logs[i]));
    }
    let all: Vec<usize> = (0..nodes).collect();
    let formed = time_until(
        Duration::from_secs(20),
        "one tree across the segments",
        || net.one_tree(&all),
    );
    eprintln!("netns segments: one tree of {nodes} nodes {formed:?} after the last node started");
    // Polled every 100 ms, each poll asking four nodes in turn.
    assert!(
        formed <= Duration::from_secs(3),
        "one tree only after {formed:?}"
    );

    // From one segment to another, through the router.
    let to_addr = net.node_addr(1);
    let sub = net
        .treescale(
            1,
            &[
                "sub",
                "--node",
                &to_addr,
                "--count",
                "300",
                "segments.events",
            ],
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let from_addr = net.node_addr(0);
    let args = [
        "pub",
        "--node",
        &from_addr,
        "--wait",
        "10s",
        "segments.events",
    ];
    let lines: String = (1..=300).map(|i| format!("{i}\n")).collect();
    publish_and_expect(
        net.treescale(0, &args),
        sub,
        &lines,
        Duration::from_secs(30),
    );
    drop(processes);
}
