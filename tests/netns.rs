//! A real network: three `treescale node` processes, each in its own
//! network namespace, joined by a bridge and finding each other with real
//! mDNS on it. The root is cut off with nftables and let back; the test
//! prints how long detection, repair and recovery took, then sends events
//! across the bridge while it drops 10% of datagrams (nftables `numgen`).
//! Every namespace it made is deleted, pass or fail. Skipped with a reason
//! when not root or without `ip netns`.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::cluster_for;
use common::netfilter::{nft, Lab};
use common::processes::*;
use serde_json::Value;

const NODES: usize = 3;

struct Net {
    lab: Lab,
    cluster: common::TestCluster,
}

impl Net {
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
    let lab = match Lab::new(NODES) {
        Ok(lab) => lab,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let net = Net {
        lab,
        cluster: cluster_for("netns"),
    };
    let dirs: Vec<_> = (0..NODES).map(|_| tempfile::tempdir().unwrap()).collect();
    let logs: Vec<NodeLog> = (0..NODES).map(|_| NodeLog::new()).collect();
    // Declared after the lab: the processes stop before it is deleted.
    let mut processes = Processes(Vec::new());
    for i in 0..NODES {
        let (addr, name) = (net.node_addr(i), format!("n{i}"));
        let args = [
            "node",
            "--listen",
            &addr,
            "--interface",
            "eth0",
            "--name",
            &name,
            "-v",
        ];
        let child = net
            .treescale(i, &args)
            .arg("--data-dir")
            .arg(dirs[i].path())
            .stderr(logs[i].stdio())
            .spawn()
            .unwrap();
        processes.0.push(child);
    }
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
    let cut = "add table inet cut\n\
               add chain inet cut input { type filter hook input priority -10; policy drop; }\n\
               add chain inet cut output { type filter hook output priority -10; policy drop; }\n\
               add rule inet cut input iifname lo accept\n\
               add rule inet cut output oifname lo accept\n";
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
    nft(Some(net.lab.node(root)), cut).unwrap();
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
