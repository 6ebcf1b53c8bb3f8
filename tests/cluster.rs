//! Real nodes on 127.0.0.1 finding each other and carrying events.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_discover_each_other_over_mdns_and_carry_events_in_order() {
    let cluster = cluster_for("mdns3");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let started = Instant::now();
    let mut nodes = Vec::new();
    for dir in &dirs {
        nodes.push(start_node(&cluster, dir.path()).await);
    }
    let clients = [
        client(nodes[0].addr()).await,
        client(nodes[1].addr()).await,
        client(nodes[2].addr()).await,
    ];
    wait_for_tree(
        &clients.iter().collect::<Vec<_>>(),
        2,
        Duration::from_secs(5),
    )
    .await;
    let converged = started.elapsed();
    assert!(
        converged < Duration::from_secs(3),
        "discovery took {converged:?}"
    );

    let mut sub = clients[2].subscribe("orders.*").await.unwrap();
    assert!(clients[0]
        .wait_for_interest("orders.eu", Duration::from_secs(5))
        .await
        .unwrap());
    for i in 0..1000 {
        clients[0]
            .publish("orders.eu", format!("order {i}"))
            .await
            .unwrap();
    }
    clients[0].flush().await.unwrap();
    for i in 0..1000 {
        let event = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("event arrives")
            .expect("subscription open");
        assert_eq!(event.payload, format!("order {i}").as_bytes());
        assert_eq!(event.id.seq, i + 1);
        assert_eq!(event.origin, nodes[0].id());
        assert_eq!(event.topic.as_str(), "orders.eu");
    }
    // Exactly once: nothing more arrives.
    assert!(tokio::time::timeout(Duration::from_millis(300), sub.next())
        .await
        .is_err());
    for node in nodes {
        node.shutdown().await;
    }
}
