//! Clients that outlive their node: a client holding several nodes moves
//! to another when its node is killed, restores its subscriptions before
//! anything else, keeps what it publishes meanwhile up to a bound, and
//! sends unconfirmed at-least-once events again.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::processes::*;
use common::*;
use tokio::sync::broadcast;
use treescale::{Client, ClientError, ClientOptions, ConnectionEvent, Reconnect};

fn kill_9(child: &mut Child) {
    // Child::kill sends SIGKILL.
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Options for a client holding `nodes`, with the default liveness.
fn holding(cluster: &TestCluster, nodes: &[&str]) -> ClientOptions {
    cluster.client_options_for(nodes.iter().map(|a| a.parse().unwrap()).collect())
}

/// The next connection event, failing the test after `limit`.
async fn next_event(
    events: &mut broadcast::Receiver<ConnectionEvent>,
    limit: Duration,
) -> ConnectionEvent {
    tokio::time::timeout(limit, events.recv())
        .await
        .unwrap_or_else(|_| panic!("no connection event within {limit:?}"))
        .expect("the client's events end only with it")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_holding_two_nodes_moves_to_the_other_when_its_node_is_killed() {
    let cluster = cluster_for("reconnect-move");
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (mut nodes, addrs, _logs) = spawn_nodes(&cluster, 2, &[], &dirs);
    let (a, b) = (addrs[0].as_str(), addrs[1].as_str());
    let publisher = client(&cluster, b.parse().unwrap()).await;
    {
        // Both up and linked, so the subscriber takes the first, A.
        let at_a = client(&cluster, a.parse().unwrap()).await;
        wait_for_tree(&[&at_a, &publisher], Duration::from_secs(15)).await;
        at_a.close().await;
    }

    let subscriber = Client::connect(holding(&cluster, &[a, b])).await.unwrap();
    assert_eq!(subscriber.node_addr(), a.parse::<SocketAddr>().unwrap());
    let mut events = subscriber.connection_events();
    let mut orders = subscriber.subscribe("orders.>").await.unwrap();
    let mut workers = subscriber.subscribe_group("jobs", "workers").await.unwrap();
    publisher
        .wait_for_interest("orders.eu", Duration::from_secs(15))
        .await
        .unwrap();

    kill_9(&mut nodes.0[0]);
    let killed = tokio::time::Instant::now();
    let ConnectionEvent::Disconnected { reason } =
        next_event(&mut events, Duration::from_secs(5)).await
    else {
        panic!("the first event after the kill is not Disconnected");
    };
    assert!(
        reason.contains(a),
        "the reason names the lost node: {reason}"
    );
    match next_event(&mut events, Duration::from_secs(5)).await {
        ConnectionEvent::Reconnected { addr, .. } => {
            assert_eq!(addr, b.parse::<SocketAddr>().unwrap())
        }
        other => panic!("expected Reconnected, got {other:?}"),
    }
    let took = killed.elapsed();
    eprintln!("reconnected {took:?} after the kill");
    assert!(
        took < Duration::from_secs(3),
        "reconnected {took:?} after the kill"
    );
    assert!(subscriber.is_connected());
    assert_eq!(subscriber.node_addr(), b.parse::<SocketAddr>().unwrap());

    // Both subscriptions were restored at B before the client counted as
    // reconnected, so what is published from now on reaches them.
    publisher.publish("orders.eu", "after").await.unwrap();
    publisher.publish("jobs", "work").await.unwrap();
    publisher.flush().await.unwrap();
    let within = Duration::from_secs(5);
    let order = tokio::time::timeout(within, orders.next()).await.unwrap();
    assert_eq!(order.unwrap().payload.as_ref(), b"after");
    let job = tokio::time::timeout(within, workers.next()).await.unwrap();
    assert_eq!(job.unwrap().payload.as_ref(), b"work");
    subscriber.close().await;
    publisher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_published_during_an_outage_arrives_after_the_reconnect_up_to_the_bound() {
    let cluster = cluster_for("reconnect-buffer");
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let log = NodeLog::new();
    let mut node = Processes(vec![spawn_node(&cluster, &addr, "only", &[], &dir, &log)]);

    const BOUND: usize = 64 * 1024;
    let client = Client::connect(ClientOptions {
        reconnect: Reconnect {
            buffer_bytes: BOUND,
            ..Reconnect::default()
        },
        ..holding(&cluster, &[&addr])
    })
    .await
    .unwrap();
    let mut events = client.connection_events();
    // The client subscribes to what it publishes: its subscription is
    // restored before the buffered events go out, so it receives them.
    let mut echoes = client.subscribe("outage.>").await.unwrap();

    kill_9(&mut node.0[0]);
    let down = tokio::time::Instant::now();
    let reason = next_event(&mut events, Duration::from_secs(5)).await;
    assert!(
        matches!(reason, ConnectionEvent::Disconnected { .. }),
        "{reason:?}"
    );
    assert!(!client.is_connected());
    match client.status().await {
        Err(ClientError::Disconnected { .. }) => {}
        other => panic!("a request while disconnected: {other:?}"),
    }

    let payload = vec![b'x'; 1024];
    let mut kept = 0u32;
    let refusal = loop {
        match client
            .publish(format!("outage.{kept}").as_str(), payload.clone())
            .await
        {
            Ok(_) => kept += 1,
            Err(error) => break error,
        }
        assert!(kept < 1000, "the buffer takes more than its bound");
    };
    assert!(
        matches!(refusal, ClientError::BufferFull { bound: BOUND }),
        "{refusal}"
    );
    assert!(refusal.to_string().contains("65536 bytes"), "{refusal}");
    // 1 KiB payloads: the bound holds most of 64, and framing takes some.
    assert!((50..64).contains(&kept), "{kept} events kept");

    // An outage of about 2 s.
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(down.elapsed())).await;
    node.0[0] = spawn_node(&cluster, &addr, "only", &[], &dir, &log);
    match next_event(&mut events, Duration::from_secs(10)).await {
        ConnectionEvent::Reconnected { name, .. } => assert_eq!(name, "only"),
        other => panic!("expected Reconnected, got {other:?}"),
    }
    for n in 0..kept {
        let event = tokio::time::timeout(Duration::from_secs(5), echoes.next())
            .await
            .unwrap_or_else(|_| panic!("event {n} of {kept} did not arrive"))
            .unwrap();
        assert_eq!(event.topic.as_str(), format!("outage.{n}"));
    }
    // Connected again, publishing goes straight through.
    client.publish("outage.after", "now").await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), echoes.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.topic.as_str(), "outage.after");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_may_not_reconnect_closes_and_says_why() {
    let cluster = cluster_for("reconnect-give-up");
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let log = NodeLog::new();
    let mut node = Processes(vec![spawn_node(&cluster, &addr, "only", &[], &dir, &log)]);
    let client = Client::connect(ClientOptions {
        reconnect: Reconnect {
            give_up: Some(Duration::from_secs(1)),
            ..Reconnect::default()
        },
        ..holding(&cluster, &[&addr])
    })
    .await
    .unwrap();
    let mut subscription = client.subscribe("anything").await.unwrap();
    let mut events = client.connection_events();
    kill_9(&mut node.0[0]);
    let disconnected = next_event(&mut events, Duration::from_secs(5)).await;
    assert!(matches!(disconnected, ConnectionEvent::Disconnected { .. }));
    let ConnectionEvent::Closed { reason } = next_event(&mut events, Duration::from_secs(10)).await
    else {
        panic!("expected Closed");
    };
    assert!(reason.contains("gave up reconnecting"), "{reason}");
    let error = client.closed().await;
    assert!(matches!(error, ClientError::GaveUp { .. }), "{error}");
    // The subscription ends instead of waiting forever.
    let end = tokio::time::timeout(Duration::from_secs(5), subscription.next()).await;
    assert!(end.unwrap().is_none());
    assert!(client.publish("anything", "late").await.is_err());
}

/// `treescale pub --qos at-least-once` holding two nodes of three: its
/// node is killed with SIGKILL mid-stream and stays dead. The publisher
/// carries on through the other and exits 0; what the dead node had
/// confirmed but not yet handed on, the publisher had kept and sent again,
/// so the durable subscriber on the third node gets every event exactly
/// once, in order, without the dead node coming back.
#[test]
fn at_least_once_publishing_survives_its_node_exactly_once_in_order() {
    let cluster = cluster_for("reconnect-pub");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (mut nodes, addrs, _logs) = spawn_nodes(&cluster, 3, &[], &dirs);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    const EVENTS: u32 = 100_000;
    let received = tempfile::NamedTempFile::new().unwrap();
    let count = EVENTS.to_string();
    let subscriber = Processes(vec![treescale(
        &cluster,
        &[
            "sub",
            "--node",
            &addrs[2],
            "--durable",
            "carry",
            "--count",
            &count,
            "carry.>",
        ],
    )
    .stdout(Stdio::from(received.reopen().unwrap()))
    .spawn()
    .unwrap()]);
    runtime.block_on(async {
        let a = client(&cluster, addrs[0].parse().unwrap()).await;
        eventually(
            Duration::from_secs(15),
            "the durable subscription to reach the publisher's node",
            || async { !a.status().await.unwrap().durables.is_empty() },
        )
        .await;
        a.close().await;
    });

    let pub_log = NodeLog::new();
    let mut publisher = treescale(
        &cluster,
        &[
            "pub",
            "--node",
            &addrs[0],
            "--node",
            &addrs[1],
            "--qos",
            "at-least-once",
            "carry.on",
        ],
    )
    .stdin(Stdio::piped())
    .stderr(pub_log.stdio())
    .spawn()
    .unwrap();
    let mut stdin = publisher.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        use std::io::Write;
        let text: String = (1..=EVENTS).map(|n| format!("e{n}\n")).collect();
        stdin.write_all(text.as_bytes()).unwrap();
    });
    // Killed mid-stream, while it holds events it has confirmed and not
    // yet handed on: those only the publisher can still send.
    let held = runtime.block_on(async {
        let a = client(&cluster, addrs[0].parse().unwrap()).await;
        loop {
            let status = a.status().await.unwrap();
            if status.counters.events_published >= 30_000 && status.outbox > 0 {
                return status.outbox;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    kill_9(&mut nodes.0[0]);
    eprintln!("node0 was killed holding {held} events");
    feeder.join().unwrap();
    let published = wait_with_timeout(publisher, Duration::from_secs(60));
    let stderr = pub_log.contents();
    assert!(published.status.success(), "pub failed: {stderr}");
    assert!(stderr.contains("reconnected to node node1"), "{stderr}");

    let read = || -> Vec<String> {
        let text = std::fs::read_to_string(received.path()).unwrap();
        text.lines().map(str::to_string).collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while read().len() < EVENTS as usize && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    // A moment for a duplicate past the last event to show.
    std::thread::sleep(Duration::from_millis(300));
    drop(subscriber);
    let lines = read();
    let expected: Vec<String> = (1..=EVENTS).map(|n| format!("e{n}")).collect();
    if let Some(at) = (0..lines.len()).find(|&i| expected.get(i) != Some(&lines[i])) {
        panic!(
            "not each event once, in order: from line {} on it printed {:?}",
            at + 1,
            &lines[at..lines.len().min(at + 5)]
        );
    }
    assert_eq!(lines.len(), expected.len(), "events missing at the end");
}
