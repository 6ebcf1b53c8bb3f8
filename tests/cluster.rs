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
        client(&cluster, nodes[0].addr()).await,
        client(&cluster, nodes[1].addr()).await,
        client(&cluster, nodes[2].addr()).await,
    ];
    wait_for_tree(&clients.iter().collect::<Vec<_>>(), Duration::from_secs(5)).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_peers_form_a_cluster_without_mdns() {
    let cluster = cluster_for("static");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = Vec::new();
    // A chain: each node knows only the one started before it.
    for dir in &dirs {
        let mut config = config(&cluster, dir.path());
        config.mdns = false;
        config.static_peers = nodes
            .last()
            .map(|n: &treescale::Node| n.addr())
            .into_iter()
            .collect();
        nodes.push(treescale::Node::start(config).await.unwrap());
    }
    let all = [
        client(&cluster, nodes[0].addr()).await,
        client(&cluster, nodes[1].addr()).await,
        client(&cluster, nodes[2].addr()).await,
    ];
    wait_for_tree(&all.iter().collect::<Vec<_>>(), Duration::from_secs(5)).await;
    let clients = [&all[0], &all[2]];

    let mut sub = clients[0].subscribe("metrics.>").await.unwrap();
    assert!(clients[1]
        .wait_for_interest("metrics.cpu", Duration::from_secs(5))
        .await
        .unwrap());
    for i in 0..100 {
        clients[1]
            .publish("metrics.cpu", format!("{i}"))
            .await
            .unwrap();
    }
    clients[1].flush().await.unwrap();
    for i in 0..100 {
        let event = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(event.payload, format!("{i}").as_bytes());
    }
    for node in nodes {
        node.shutdown().await;
    }
}

async fn linked(watcher: &treescale::Client, peer: treescale::NodeId) -> bool {
    let status = watcher.status().await.unwrap();
    status.peers.iter().any(|p| p.id == peer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_keeps_its_id_and_its_peers_reconnect() {
    let cluster = cluster_for("restart");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(&cluster, dir_a.path()).await;
    let b = start_node(&cluster, dir_b.path()).await;
    let b_id = b.id();
    let watcher = client(&cluster, a.addr()).await;
    eventually(Duration::from_secs(5), "a links to b", || {
        linked(&watcher, b_id)
    })
    .await;

    b.shutdown().await;
    eventually(Duration::from_secs(5), "a notices b left", || async {
        !linked(&watcher, b_id).await
    })
    .await;

    let b = start_node(&cluster, dir_b.path()).await;
    assert_eq!(b.id(), b_id, "same data dir, same node id");
    eventually(
        Duration::from_secs(5),
        "a reconnects to the restarted b",
        || linked(&watcher, b_id),
    )
    .await;

    // Interest is announced again over the new link.
    let on_b = client(&cluster, b.addr()).await;
    let mut sub = on_b.subscribe("after.restart").await.unwrap();
    assert!(watcher
        .wait_for_interest("after.restart", Duration::from_secs(5))
        .await
        .unwrap());
    watcher
        .publish("after.restart", "hello again")
        .await
        .unwrap();
    watcher.flush().await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.payload, "hello again".as_bytes());
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_on_the_same_data_dir_is_refused() {
    let cluster = cluster_for("lock");
    let dir = tempfile::tempdir().unwrap();
    let first = start_node(&cluster, dir.path()).await;
    let second = treescale::Node::start(config(&cluster, dir.path())).await;
    match second {
        Err(treescale::NodeError::DataDirInUse(path)) => assert_eq!(path, dir.path()),
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("second node started on a data dir in use"),
    }
    first.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_dialling_each_other_at_once_keep_exactly_one_connection() {
    let cluster = cluster_for("race");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let port = |_| {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (addr_a, addr_b) = (port(0), port(1));
    let node_config = |dir: &std::path::Path, listen, peer| {
        let mut config = config(&cluster, dir);
        config.listen = listen;
        config.mdns = false;
        config.static_peers = vec![peer];
        config
    };
    // Both know the other as a static peer, so both dial at once.
    let (a, b) = tokio::join!(
        treescale::Node::start(node_config(dir_a.path(), addr_a, addr_b)),
        treescale::Node::start(node_config(dir_b.path(), addr_b, addr_a)),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let clients = [
        client(&cluster, a.addr()).await,
        client(&cluster, b.addr()).await,
    ];
    wait_for_tree(&clients.iter().collect::<Vec<_>>(), Duration::from_secs(5)).await;
    // Let any losing connection finish closing.
    eventually(
        Duration::from_secs(5),
        "one node connection plus one client each",
        || async { a.connection_count() == 2 && b.connection_count() == 2 },
    )
    .await;

    let mut subs = [
        clients[0].subscribe("ping").await.unwrap(),
        clients[1].subscribe("ping").await.unwrap(),
    ];
    // Each node holds a subscriber itself, so wait for the other's
    // interest to arrive over the tree edge.
    for client in &clients {
        eventually(Duration::from_secs(5), "interest over the edge", || async {
            let status = client.status().await.unwrap();
            status
                .subscriptions
                .iter()
                .any(|s| s.local == 1 && !s.edges.is_empty())
        })
        .await;
    }
    clients[0]
        .publish_with_headers("ping", vec![("k".into(), "v".into())], "from a")
        .await
        .unwrap();
    clients[1].publish("ping", "from b").await.unwrap();
    clients[0].flush().await.unwrap();
    clients[1].flush().await.unwrap();
    for sub in &mut subs {
        let mut got = Vec::new();
        while let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_millis(500), sub.next()).await
        {
            got.push(event);
        }
        let mut payloads: Vec<_> = got.iter().map(|e| e.payload.clone()).collect();
        payloads.sort();
        assert_eq!(
            payloads,
            vec!["from a".as_bytes(), "from b".as_bytes()],
            "each event exactly once"
        );
        let from_a = got
            .iter()
            .find(|e| e.payload == "from a".as_bytes())
            .unwrap();
        assert_eq!(from_a.headers, vec![("k".to_string(), "v".to_string())]);
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_payload_is_refused_by_the_client_and_the_connection_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = cluster_for("payload");
    let node = start_node(&cluster, dir.path()).await;
    let client = client(&cluster, node.addr()).await;
    let huge = vec![0u8; treescale::client::MAX_PAYLOAD + 1];
    match client.publish("big", huge).await {
        Err(treescale::ClientError::PayloadTooLarge(n)) => {
            assert_eq!(n, treescale::client::MAX_PAYLOAD + 1)
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    let mut sub = client.subscribe("big").await.unwrap();
    client
        .publish("big", vec![1u8; treescale::client::MAX_PAYLOAD])
        .await
        .unwrap();
    client.flush().await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.payload.len(), treescale::client::MAX_PAYLOAD);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_read_in_batches_and_one_by_one_come_in_order() {
    let cluster = cluster_for("batches");
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&cluster, dir.path()).await;
    let publisher = client(&cluster, node.addr()).await;
    let subscriber = client(&cluster, node.addr()).await;
    let mut sub = subscriber.subscribe("batch.*").await.unwrap();
    assert!(publisher
        .wait_for_interest("batch.x", Duration::from_secs(5))
        .await
        .unwrap());
    const EVENTS: usize = 2000;
    for i in 0..EVENTS {
        publisher.publish("batch.x", format!("{i}")).await.unwrap();
    }
    publisher.flush().await.unwrap();
    let read_all = async {
        let (mut payloads, mut largest) = (Vec::new(), 0);
        while payloads.len() < EVENTS {
            // One event, then what is left of its batch, and so on.
            payloads.push(sub.next().await.unwrap().payload);
            if payloads.len() == EVENTS {
                break;
            }
            if let Some(batch) = sub.next_batch().await {
                assert!(!batch.is_empty());
                largest = largest.max(batch.len());
                payloads.extend(batch.into_iter().map(|event| event.payload));
            }
        }
        (payloads, largest)
    };
    let (payloads, largest) = tokio::time::timeout(Duration::from_secs(20), read_all)
        .await
        .expect("every event arrives");
    let expected: Vec<String> = (0..EVENTS).map(|i| i.to_string()).collect();
    assert_eq!(payloads, expected);
    assert!(
        largest > 1,
        "events that arrived together come as one batch"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_subscription_can_be_read_while_anothers_events_wait() {
    let cluster = cluster_for("interleaved");
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&cluster, dir.path()).await;
    let publisher = client(&cluster, node.addr()).await;
    let subscriber = client(&cluster, node.addr()).await;
    let mut first = subscriber.subscribe("mix.a").await.unwrap();
    let mut second = subscriber.subscribe("mix.b").await.unwrap();
    assert!(publisher
        .wait_for_interest("mix.b", Duration::from_secs(5))
        .await
        .unwrap());
    // Alternating topics: each delivery batch holds runs of one event, and
    // the unread subscription must still buffer thousands, not a few dozen.
    const EACH: usize = 3000;
    for i in 0..EACH {
        publisher.publish("mix.a", format!("{i}")).await.unwrap();
        publisher.publish("mix.b", format!("{i}")).await.unwrap();
        if i % 500 == 0 {
            publisher.flush().await.unwrap();
        }
    }
    publisher.flush().await.unwrap();
    let read_all = async {
        for i in 0..EACH {
            let event = first.next().await.unwrap();
            assert_eq!(event.payload, format!("{i}").as_bytes());
        }
        for i in 0..EACH {
            let event = second.next().await.unwrap();
            assert_eq!(event.payload, format!("{i}").as_bytes());
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read_all)
        .await
        .expect("reading one subscription stalled behind the other");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_full_subscription_does_not_stall_the_others() {
    let cluster = cluster_for("dropfull");
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&cluster, dir.path()).await;
    let publisher = client(&cluster, node.addr()).await;
    let subscriber = client(&cluster, node.addr()).await;
    let unread = subscriber.subscribe("full.a").await.unwrap();
    let mut read = subscriber.subscribe("full.b").await.unwrap();
    assert!(publisher
        .wait_for_interest("full.b", Duration::from_secs(5))
        .await
        .unwrap());
    // More than the unread subscription buffers (8 MiB): the client's
    // delivery reader waits for room there.
    let payload = bytes::Bytes::from(vec![b'x'; 1024]);
    for _ in 0..12_000 {
        publisher.publish("full.a", payload.clone()).await.unwrap();
    }
    publisher.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(unread);
    publisher.publish("full.b", "after").await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), read.next())
        .await
        .expect("the delivery reader stayed stuck on the dropped subscription")
        .unwrap();
    assert_eq!(event.payload, "after".as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_asks_any_node_of_the_tree_through_its_own() {
    let (_cluster, nodes, clients, _dirs) = tree_of_nodes("ask", 3).await;
    let root = clients[0].status().await.unwrap().root;
    // Every node answers every client, however many hops lie between.
    for asker in &clients {
        for node in &nodes {
            let status = asker.status_of(node.id()).await.unwrap();
            assert_eq!(status.id, node.id());
            assert_eq!(status.root, root);
        }
        let tree = asker.tree_of(root).await.unwrap();
        assert_eq!(tree.len(), 3, "the root knows the whole tree: {tree:?}");
        assert_eq!(tree[0].id, root);
    }
    // Asked at the root or below it, the tree holds no such node.
    let nowhere = treescale::NodeId::from_bytes([0xee; 32]);
    for asker in &clients {
        match asker.status_of(nowhere).await {
            Err(treescale::ClientError::Refused { error, message }) => {
                assert_eq!(error, treescale::wire::RequestError::UnknownNode);
                assert!(message.contains("eeeeeeeeee"), "{message}");
            }
            other => panic!("expected UnknownNode, got {other:?}"),
        }
    }
    // Questions are not events.
    for client in &clients {
        let counters = client.status().await.unwrap().counters;
        assert_eq!(counters.events_received, 0, "{counters:?}");
        assert_eq!(counters.events_forwarded, 0, "{counters:?}");
    }
    for node in nodes {
        node.shutdown().await;
    }
}
