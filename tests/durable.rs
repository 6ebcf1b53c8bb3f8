//! Delivery guarantees: at-least-once events reach durable subscriptions
//! exactly once and in order through kill -9 of nodes on the way and of
//! the subscription's home, wait out a partition, and are refused (never
//! dropped) when a retention limit or the store is full.

mod common;

use std::io::{BufRead, Write};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::processes::*;
use common::*;
use treescale::wire::{PublishRefusal, RetentionLimits};
use treescale::{ClientError, DurableOptions, NodeId};

const EVENTS: u64 = 100_000;

fn lines_of(path: &std::path::Path) -> Vec<String> {
    let file = std::fs::File::open(path).unwrap();
    std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .collect()
}

fn kill_9(child: &mut Child) {
    // Child::kill sends SIGKILL.
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_kill_9_of_an_inner_node_and_of_the_home() {
    let cluster = cluster_for("durable-kill");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    // One child each: the tree is a chain in id order, so the middle id is
    // the inner node between the publisher's node and the home.
    let extra = ["--max-children", "1"];
    let (mut nodes, addrs, logs) = spawn_nodes(&cluster, 3, &extra, &dirs);
    let mut ids: Vec<(NodeId, usize)> = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let c = client(&cluster, addr.parse().unwrap()).await;
        ids.push((c.node_id(), i));
        c.close().await;
    }
    ids.sort();
    let [(_, publisher_node), (_, inner), (_, home)] = ids[..] else {
        unreachable!()
    };
    {
        let clients = [
            client(&cluster, addrs[0].parse().unwrap()).await,
            client(&cluster, addrs[1].parse().unwrap()).await,
            client(&cluster, addrs[2].parse().unwrap()).await,
        ];
        let refs: Vec<_> = clients.iter().collect();
        wait_for_tree(&refs, Duration::from_secs(15)).await;
    }

    let received = tempfile::NamedTempFile::new().unwrap();
    let sub_log = NodeLog::new();
    let subscriber = Processes(vec![treescale(
        &cluster,
        &[
            "sub",
            "--node",
            &addrs[home],
            "--connect-timeout",
            "1s",
            "--durable",
            "kill-test",
            "--ack-wait",
            "2s",
            "load.>",
        ],
    )
    .stdout(Stdio::from(received.reopen().unwrap()))
    .stderr(sub_log.stdio())
    .spawn()
    .unwrap()]);

    // The publisher's node must know the durable subscription before the
    // first event, or that event is not for it.
    let publisher_side = client(&cluster, addrs[publisher_node].parse().unwrap()).await;
    eventually(
        Duration::from_secs(10),
        "the durable subscription to reach the publisher's node",
        || async { !publisher_side.status().await.unwrap().durables.is_empty() },
    )
    .await;
    publisher_side.close().await;

    let pub_log = NodeLog::new();
    let mut publisher = treescale(
        &cluster,
        &[
            "pub",
            "--node",
            &addrs[publisher_node],
            "--qos",
            "at-least-once",
            "load.test",
        ],
    )
    .stdin(Stdio::piped())
    .stderr(pub_log.stdio())
    .spawn()
    .unwrap();
    let mut stdin = publisher.stdin.take().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let feeder = {
        let written = written.clone();
        std::thread::spawn(move || {
            for chunk in 0..EVENTS / 1000 {
                let mut text = String::new();
                for n in chunk * 1000 + 1..=(chunk + 1) * 1000 {
                    text += &format!("e{n}\n");
                }
                stdin.write_all(text.as_bytes()).unwrap();
                written.fetch_add(1000, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(30));
            }
        })
    };
    let wait_written = |n: u64| {
        let written = written.clone();
        async move {
            while written.load(Ordering::Relaxed) < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };

    let mut kill_and_restart = |i: usize| {
        kill_9(&mut nodes.0[i]);
        std::thread::sleep(Duration::from_millis(300));
        let name = format!("node{i}");
        nodes.0[i] = spawn_node(&cluster, &addrs[i], &name, &extra, &dirs[i], &logs[i]);
    };
    wait_written(25_000).await;
    kill_and_restart(inner);
    wait_written(60_000).await;
    kill_and_restart(home);

    feeder.join().unwrap();
    let output = wait_with_timeout(publisher, Duration::from_secs(120));
    assert!(
        output.status.success(),
        "every event is confirmed: the publisher's node never died"
    );

    let expected: Vec<String> = (1..=EVENTS).map(|n| format!("e{n}")).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while (lines_of(received.path()).len() as u64) < EVENTS {
        if tokio::time::Instant::now() > deadline {
            let mut report = String::new();
            for addr in &addrs {
                let status = client(&cluster, addr.parse().unwrap())
                    .await
                    .status()
                    .await
                    .unwrap();
                report += &format!(
                    "{}: parent {:?} outbox {} unreachable {} durables {:?} counters {:?}\n",
                    status.name,
                    status.parent.map(|p| p.short()),
                    status.outbox,
                    status.outbox_unreachable,
                    status.durables,
                    status.counters
                );
            }
            panic!(
                "the subscriber holds {} of {EVENTS} events after 60 s\n{report}",
                lines_of(received.path()).len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = lines_of(received.path());
    let first_wrong = got.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(
        first_wrong, None,
        "events out of order or duplicated from there on"
    );
    assert_eq!(got.len(), expected.len(), "exactly once: no extra events");
    drop(subscriber);
}

/// nftables rules dropping UDP between two ports on loopback, removed on
/// drop. Needs root.
struct Partition {
    table: String,
}

impl Partition {
    fn cut(a: u16, b: u16) -> Result<Partition, String> {
        let table = format!("treescale_test_{:08x}", rand::random::<u32>());
        let script = format!(
            "add table inet {table}\n\
             add chain inet {table} input {{ type filter hook input priority -10; }}\n\
             add rule inet {table} input udp sport {a} udp dport {b} drop\n\
             add rule inet {table} input udp sport {b} udp dport {a} drop\n"
        );
        netfilter::nft(None, &script)?;
        Ok(Partition { table })
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_for_the_far_side_of_a_partition_wait_and_flow_after_the_heal() {
    let cluster = cluster_for("durable-partition");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(&cluster, dir_a.path()).await;
    let b = start_node(&cluster, dir_b.path()).await;
    let (pub_client, sub_client) = (
        client(&cluster, a.addr()).await,
        client(&cluster, b.addr()).await,
    );
    wait_for_tree(&[&pub_client, &sub_client], Duration::from_secs(10)).await;
    let mut durable = sub_client
        .subscribe_durable("far", "orders.>", DurableOptions::default())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(5),
        "A to learn of the durable",
        || async { !pub_client.status().await.unwrap().durables.is_empty() },
    )
    .await;

    let partition = match Partition::cut(a.addr().port(), b.addr().port()) {
        Ok(partition) => partition,
        Err(why) => {
            eprintln!("skipped: cannot partition without root and nftables: {why}");
            return;
        }
    };
    eventually(
        Duration::from_secs(5),
        "A to notice the partition",
        || async { pub_client.status().await.unwrap().peers.is_empty() },
    )
    .await;
    for n in 1..=500 {
        pub_client
            .publish_at_least_once("orders.eu", Vec::new(), format!("o{n}"))
            .await
            .unwrap()
            .confirmed()
            .await
            .unwrap();
    }
    let status = pub_client.status().await.unwrap();
    assert_eq!(status.durables.len(), 1, "the interest remains");
    assert_eq!(status.outbox_unreachable, 500, "the events wait at A");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), durable.next())
            .await
            .is_err(),
        "nothing crosses the partition"
    );

    drop(partition);
    for n in 1..=500 {
        let event = tokio::time::timeout(Duration::from_secs(15), durable.next())
            .await
            .expect("events flow after the heal")
            .unwrap();
        assert_eq!(event.event.payload, format!("o{n}").as_bytes());
        durable.ack(event.position);
    }
    eventually(
        Duration::from_secs(5),
        "A to hand everything on",
        || async { pub_client.status().await.unwrap().outbox == 0 },
    )
    .await;
}

#[tokio::test]
async fn a_full_durable_subscription_refuses_publishers_until_it_is_consumed() {
    let cluster = cluster_for("durable-limit");
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&cluster, dir.path()).await;
    let c = client(&cluster, node.addr()).await;
    let options = DurableOptions {
        limits: RetentionLimits {
            max_events: 10,
            ..Default::default()
        },
        ..Default::default()
    };
    drop(
        c.subscribe_durable("small", "jobs.>", options)
            .await
            .unwrap(),
    );
    let publish = |n: u32| {
        let c = &c;
        async move {
            c.publish_at_least_once("jobs.a", Vec::new(), format!("j{n}"))
                .await
                .unwrap()
                .confirmed()
                .await
        }
    };
    for n in 1..=10 {
        publish(n).await.unwrap();
    }
    match publish(11).await {
        Err(ClientError::PublishRefused { reason, message }) => {
            assert_eq!(reason, PublishRefusal::RetentionLimit);
            assert!(message.contains("small"), "{message}");
        }
        other => panic!("expected a retention-limit refusal, got {other:?}"),
    }
    let status = c.status().await.unwrap();
    assert_eq!(status.durables[0].held, Some(10), "nothing was dropped");
    assert!(status.durables[0].full);

    let mut durable = c
        .subscribe_durable("small", "jobs.>", options)
        .await
        .unwrap();
    for n in 1..=10 {
        let event = durable.next().await.unwrap();
        assert_eq!(event.event.payload, format!("j{n}").as_bytes());
        durable.ack(event.position);
    }
    eventually(Duration::from_secs(5), "the limit to lift", || async {
        !c.status().await.unwrap().durables[0].full
    })
    .await;
    publish(12).await.unwrap();
    assert_eq!(
        durable.next().await.unwrap().event.payload,
        "j12".as_bytes()
    );
}

#[tokio::test]
async fn unacknowledged_events_are_delivered_again_and_acknowledged_ones_never() {
    let cluster = cluster_for("durable-redeliver");
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&cluster, dir.path()).await;
    let publisher = client(&cluster, node.addr()).await;
    let options = DurableOptions {
        ack_wait: Duration::from_millis(200),
        ..Default::default()
    };
    let first = client(&cluster, node.addr()).await;
    let mut durable = first
        .subscribe_durable("redo", "r.>", options)
        .await
        .unwrap();
    for n in 1..=3 {
        publisher
            .publish_with_qos(
                treescale::Qos::AtLeastOnce,
                "r.x",
                Vec::new(),
                format!("r{n}"),
            )
            .await
            .unwrap();
    }
    let one = durable.next().await.unwrap();
    durable.ack(one.position);
    assert_eq!(durable.next().await.unwrap().event.payload, "r2".as_bytes());
    eventually(
        Duration::from_secs(5),
        "a redelivery after the ack wait",
        || async {
            publisher
                .status()
                .await
                .unwrap()
                .counters
                .events_redelivered
                > 0
        },
    )
    .await;
    first.close().await;

    // A new client gets what was not acknowledged, and only that.
    let second = client(&cluster, node.addr()).await;
    let mut again = second
        .subscribe_durable("redo", "r.>", options)
        .await
        .unwrap();
    assert_eq!(again.backlog(), 2);
    assert_eq!(again.next().await.unwrap().event.payload, "r2".as_bytes());
    assert_eq!(again.next().await.unwrap().event.payload, "r3".as_bytes());
}

#[tokio::test]
async fn a_full_store_refuses_with_a_clear_error_and_keeps_what_it_has() {
    let cluster = cluster_for("durable-store-full");
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&cluster, dir.path());
    config.store.map_size = 1 << 20;
    let node = treescale::Node::start(config).await.unwrap();
    let c = client(&cluster, node.addr()).await;
    drop(
        c.subscribe_durable("big", "big.>", DurableOptions::default())
            .await
            .unwrap(),
    );
    let payload = vec![7u8; 100_000];
    let mut confirmed = 0;
    let error = loop {
        match c
            .publish_at_least_once("big.x", Vec::new(), payload.clone())
            .await
            .unwrap()
            .confirmed()
            .await
        {
            Ok(_) => confirmed += 1,
            Err(e) => break e,
        }
        assert!(confirmed < 50, "a 1 MiB store cannot take 5 MB");
    };
    match &error {
        ClientError::PublishRefused { reason, message } => {
            assert_eq!(*reason, PublishRefusal::StoreFull);
            assert!(message.contains("--store-size"), "{message}");
        }
        other => panic!("expected a store-full refusal, got {other:?}"),
    }
    let status = c.status().await.unwrap();
    assert_eq!(
        status.durables[0].held,
        Some(confirmed),
        "all confirmed kept"
    );
}

/// A node that has at most `unacked` events of a durable subscription out
/// beyond its client's last ack.
async fn node_with_unacked_limit(
    cluster: &TestCluster,
    dir: &std::path::Path,
    unacked: usize,
) -> treescale::Node {
    let mut config = config(cluster, dir);
    config.limits.unacked = unacked;
    treescale::Node::start(config).await.unwrap()
}

#[tokio::test]
async fn no_more_than_the_unacknowledged_limit_is_in_flight() {
    let cluster = cluster_for("durable-unacked");
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_unacked_limit(&cluster, dir.path(), 5).await;
    let publisher = client(&cluster, node.addr()).await;
    let subscriber = client(&cluster, node.addr()).await;
    let mut durable = subscriber
        .subscribe_durable("window", "w.>", DurableOptions::default())
        .await
        .unwrap();
    for n in 1..=12 {
        publisher
            .publish_with_qos(
                treescale::Qos::AtLeastOnce,
                "w.x",
                Vec::new(),
                format!("w{n}"),
            )
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(durable.next().await.unwrap());
    }
    // Five out, none acknowledged: the sixth waits.
    let sixth = tokio::time::timeout(Duration::from_millis(500), durable.next()).await;
    assert!(sixth.is_err(), "a sixth event came before any ack");
    durable.ack(got[4].position);
    for n in 6..=10 {
        let event = tokio::time::timeout(Duration::from_secs(5), durable.next())
            .await
            .expect("events flow again after the ack")
            .unwrap();
        assert_eq!(event.event.payload, format!("w{n}").as_bytes());
    }
}

/// A subscriber that has handled more than the node knows (the node lost
/// acks in a crash, or the subscriber says so with `handled`) acknowledges
/// the redeliveries it skips. A window of them left unacknowledged would
/// stall the subscription for good: they are never handed out again.
#[tokio::test]
async fn redeliveries_of_handled_events_are_acknowledged_and_never_stall() {
    let cluster = cluster_for("durable-handled");
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_unacked_limit(&cluster, dir.path(), 5).await;
    let c = client(&cluster, node.addr()).await;
    drop(
        c.subscribe_durable("handled", "h.>", DurableOptions::default())
            .await
            .unwrap(),
    );
    for n in 1..=14 {
        c.publish_at_least_once("h.x", Vec::new(), format!("h{n}"))
            .await
            .unwrap()
            .confirmed()
            .await
            .unwrap();
    }
    // Twelve handled: more than two windows of five skipped. The default
    // ack wait (30 s) is past the timeout, so only acks move it on.
    let options = DurableOptions {
        handled: 12,
        ..Default::default()
    };
    let mut durable = c
        .subscribe_durable("handled", "h.>", options)
        .await
        .unwrap();
    for n in 13..=14 {
        let event = tokio::time::timeout(Duration::from_secs(5), durable.next())
            .await
            .expect("the events after the handled ones arrive")
            .unwrap();
        assert_eq!(event.event.payload, format!("h{n}").as_bytes());
    }
    durable.ack(14);
    eventually(Duration::from_secs(5), "the queue emptied", || async {
        c.status().await.unwrap().durables[0].held == Some(0)
    })
    .await;
}

/// A client that publishes faster than the store commits waits, instead of
/// piling events up in the node: with room for one pending event, each
/// waits for the commit of the one before, and all arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_past_its_pending_limit_waits_and_loses_nothing() {
    let cluster = cluster_for("pending-limit");
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&cluster, dir.path());
    config.limits.pending_publishes = 1;
    let node = treescale::Node::start(config).await.unwrap();
    let publisher = client(&cluster, node.addr()).await;
    let subscriber = client(&cluster, node.addr()).await;
    let mut durable = subscriber
        .subscribe_durable("paced", "p.>", DurableOptions::default())
        .await
        .unwrap();
    let mut confirmations = Vec::new();
    for n in 0..300 {
        confirmations.push(
            publisher
                .publish_at_least_once("p.x", Vec::new(), format!("{n}"))
                .await
                .unwrap(),
        );
    }
    for confirmation in confirmations {
        confirmation.confirmed().await.unwrap();
    }
    for n in 0..300 {
        let event = tokio::time::timeout(Duration::from_secs(5), durable.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(event.event.payload, format!("{n}").as_bytes());
        durable.ack(event.position);
    }
    let throttled = publisher
        .status()
        .await
        .unwrap()
        .counters
        .publishes_throttled;
    assert!(throttled > 0, "the limit never held a publisher back");
    node.shutdown().await;
}

#[test]
fn a_subscriber_stopped_with_sigterm_frees_its_durable_subscription_at_once() {
    let cluster = cluster_for("durable-sigterm");
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let log = NodeLog::new();
    let _node = Processes(vec![spawn_node(&cluster, &addr, "home", &[], &dir, &log)]);
    let durable = ["sub", "--node", &addr, "--durable", "billing", "orders.>"];
    let (mut first, attached) = start_and_read_a_line(&cluster, &durable);
    assert!(
        attached.starts_with("durable subscription billing"),
        "{attached}"
    );
    let sigterm = std::process::Command::new("kill")
        .args(["-TERM", &first.0[0].id().to_string()])
        .status()
        .unwrap();
    assert!(sigterm.success());
    let stopped = wait_with_timeout(first.0.remove(0), Duration::from_secs(5));
    assert!(
        stopped.status.success(),
        "a stop by SIGTERM is a clean exit"
    );
    // At once, well within the node's idle timeout (1 s): a clean close.
    let stopped_at = std::time::Instant::now();
    let (_second, line) = start_and_read_a_line(&cluster, &durable);
    assert!(line.starts_with("durable subscription billing"), "{line}");
    let reattached = stopped_at.elapsed();
    assert!(
        reattached < Duration::from_millis(900),
        "attached again only after {reattached:?}"
    );
}

/// Starts the binary with `args`; returns it and the first line it writes
/// to stderr.
fn start_and_read_a_line(cluster: &TestCluster, args: &[&str]) -> (Processes, String) {
    let child = treescale(cluster, args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut process = Processes(vec![child]);
    let mut line = String::new();
    std::io::BufReader::new(process.0[0].stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (process, line)
}

/// A durable subscription attached at a node that is not its home: the
/// home's events come across the tree, acknowledgements go back, and the
/// home's queue empties.
#[tokio::test]
async fn a_durable_subscription_attached_at_another_node_receives_from_its_home() {
    let cluster = cluster_for("durable-remote");
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let home = start_node(&cluster, dirs[0].path()).await;
    let other = start_node(&cluster, dirs[1].path()).await;
    let at_home = client(&cluster, home.addr()).await;
    let at_other = client(&cluster, other.addr()).await;
    wait_for_tree(&[&at_home, &at_other], Duration::from_secs(15)).await;
    drop(
        at_home
            .subscribe_durable("audit", "logs.>", DurableOptions::default())
            .await
            .unwrap(),
    );
    eventually(
        Duration::from_secs(10),
        "the durable subscription's record to reach the other node",
        || async { !at_other.status().await.unwrap().durables.is_empty() },
    )
    .await;
    const EVENTS: u32 = 10_000;
    let mut last = None;
    for n in 1..=EVENTS {
        let confirmation = at_home
            .publish_at_least_once("logs.x", Vec::new(), format!("l{n}"))
            .await
            .unwrap();
        last = Some(confirmation);
    }
    // Confirmations come in order: the last one means all are stored.
    last.unwrap().confirmed().await.unwrap();
    let mut durable = at_other
        .subscribe_durable("audit", "logs.>", DurableOptions::default())
        .await
        .unwrap();
    assert_eq!(durable.backlog(), EVENTS as u64);
    let status = at_other.status().await.unwrap();
    assert!(status.durables[0].attached, "{:?}", status.durables);
    assert_eq!(status.durables[0].held, None, "held at its home only");
    for n in 1..=EVENTS {
        let event = tokio::time::timeout(Duration::from_secs(10), durable.next())
            .await
            .unwrap_or_else(|_| panic!("event {n} did not come"))
            .unwrap();
        assert_eq!(event.event.payload, format!("l{n}").as_bytes());
        durable.ack(event.position);
    }
    eventually(
        Duration::from_secs(10),
        "the home's queue to empty as acknowledgements come back",
        || async { at_home.status().await.unwrap().durables[0].held == Some(0) },
    )
    .await;
}
