//! Load: nothing is lost between one publisher and a healthy subscriber,
//! however fast the publisher; a subscriber that stops reading is a slow
//! consumer, told so, and costs the others nothing.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::processes::*;
use common::*;
use treescale::ClientError;

/// `treescale bench` through the nodes at `addrs` (publishers on the first,
/// subscribers on the last): its JSON report.
fn bench(cluster: &TestCluster, addrs: &[String], msgs: &str) -> serde_json::Value {
    let mut args = vec!["bench", "--json", "--msgs", msgs, "--size", "128"];
    for addr in addrs {
        args.extend(["--node", addr.as_str()]);
    }
    let bench = treescale(cluster, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let output = wait_with_timeout(bench, Duration::from_secs(180));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn a_million_events_from_one_publisher_reach_one_subscriber_through_one_node_and_two() {
    let cluster = cluster_for("load-million");
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (_nodes, addrs, logs) = spawn_nodes(&cluster, 2, &[], &dirs);
    for through in [&addrs[..1], &addrs[..]] {
        let report = bench(&cluster, through, "1000000");
        let n = |key: &str| report[key].as_u64().unwrap();
        eprintln!(
            "{} node(s): {} msg/s, {} lost",
            through.len(),
            report["msgs_per_sec"],
            n("lost")
        );
        assert_eq!(n("sent"), 1_000_000, "{report}");
        assert_eq!((n("lost"), n("duplicated")), (0, 0), "{report}");
        assert_eq!(n("delivered"), 1_000_000, "{report}");
    }
    for log in &logs {
        assert!(
            !log.contents().contains("events dropped"),
            "{}",
            log.contents()
        );
    }
}

/// The node's resident memory, and the most it has had, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"));
        kib * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_is_a_slow_consumer_and_costs_the_others_nothing() {
    const BOUND: u64 = 16 << 20;
    const EVENTS: u64 = 60_000;
    let cluster = cluster_for("load-slow-consumer");
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let log = NodeLog::new();
    let node = spawn_node(
        &cluster,
        &addr,
        "node",
        &["--max-consumer-bytes", "16MiB"],
        &dir,
        &log,
    );
    let pid = node.id();
    let _node = Processes(vec![node]);
    let node_addr: SocketAddr = addr.parse().unwrap();
    let connect = || {
        let options = cluster.client_options(node_addr);
        async move {
            for _ in 0..50 {
                if let Ok(client) = treescale::Client::connect(options.clone()).await {
                    return client;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("the node did not start");
        }
    };
    let publisher = connect().await;
    let healthy = connect().await;
    let stalled = connect().await;
    let mut reading = healthy.subscribe("flood").await.unwrap();
    // Subscribed, and never read: the library's buffer fills, then QUIC's.
    let _ignored = stalled.subscribe("flood").await.unwrap();
    assert!(publisher
        .wait_for_interest("flood", Duration::from_secs(10))
        .await
        .unwrap());
    let (before, _) = memory(pid);
    let reader = tokio::spawn(async move {
        let mut got = 0u64;
        while got < EVENTS {
            match tokio::time::timeout(Duration::from_secs(30), reading.next_batch()).await {
                Ok(Some(batch)) => got += batch.len() as u64,
                _ => break,
            }
        }
        got
    });
    // 60 MiB of 1 KiB events: far past what may wait for the stalled one.
    let payload = bytes::Bytes::from(vec![b'x'; 1024]);
    for _ in 0..EVENTS {
        publisher.publish("flood", payload.clone()).await.unwrap();
    }
    publisher.flush().await.unwrap();

    match tokio::time::timeout(Duration::from_secs(30), stalled.closed()).await {
        Ok(ClientError::SlowConsumer { reason }) => {
            assert!(reason.contains("--max-consumer-bytes"), "{reason}")
        }
        other => panic!("expected a slow consumer error, got {other:?}"),
    }
    assert_eq!(
        reader.await.unwrap(),
        EVENTS,
        "the healthy subscriber lost events"
    );
    let (_, peak) = memory(pid);
    let grown = peak.saturating_sub(before);
    eprintln!("node memory grew by {} MiB at most", grown >> 20);
    assert!(
        grown < BOUND + (8 << 20),
        "the node grew by {} MiB",
        grown >> 20
    );
    eventually(
        Duration::from_secs(10),
        "its lost events counted",
        || async { publisher.status().await.unwrap().counters.events_dropped > 0 },
    )
    .await;
    let status = publisher.status().await.unwrap();
    assert_eq!(
        status.congested, 0,
        "nothing holds publishers back any more"
    );
    let warnings = log
        .contents()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .count();
    assert!(warnings <= 3, "{warnings} warnings:\n{}", log.contents());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_that_keeps_reading_holds_the_publisher_back_and_loses_nothing() {
    const EVENTS: u64 = 40_000;
    let cluster = cluster_for("load-slow-reader");
    let dir = tempfile::tempdir().unwrap();
    let node = start_node_with(&cluster, dir.path(), |config| {
        config.limits.consumer_bytes = 16 << 20;
    })
    .await;
    let publisher = client(&cluster, node.addr()).await;
    let subscriber = client(&cluster, node.addr()).await;
    let mut events = subscriber.subscribe("paced").await.unwrap();
    assert!(publisher
        .wait_for_interest("paced", Duration::from_secs(10))
        .await
        .unwrap());
    // About 5 MiB/s: far slower than the publisher, never stalled.
    let reader = tokio::spawn(async move {
        let mut got = 0u64;
        while got < EVENTS {
            match tokio::time::timeout(Duration::from_secs(30), events.next_batch()).await {
                Ok(Some(batch)) => got += batch.len() as u64,
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        got
    });
    // 40 MiB, more than twice what may wait for the subscriber: without
    // backpressure it would be disconnected as a slow consumer.
    let payload = bytes::Bytes::from(vec![b'y'; 1024]);
    for _ in 0..EVENTS {
        publisher.publish("paced", payload.clone()).await.unwrap();
    }
    publisher.flush().await.unwrap();
    assert_eq!(reader.await.unwrap(), EVENTS, "events were lost");
    let status = publisher.status().await.unwrap();
    assert_eq!(status.counters.events_dropped, 0, "{:?}", status.counters);
    assert!(
        subscriber.close_reason().is_none(),
        "the reader was disconnected"
    );
    node.shutdown().await;
}
