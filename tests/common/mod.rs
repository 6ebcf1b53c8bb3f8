//! Helpers shared by the integration tests. Every node listens on 127.0.0.1
//! and runs mDNS on `lo` only, in a cluster named for its test, so tests
//! running in parallel never join each other.

#![allow(dead_code)]

pub mod netfilter;
pub mod processes;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use treescale::{Client, ClientOptions, Node, NodeConfig};

/// A cluster name no other test (or run) uses.
pub fn cluster_for(test: &str) -> String {
    format!("test-{test}-{:08x}", rand::random::<u32>())
}

pub fn config(cluster: &str, data_dir: &Path) -> NodeConfig {
    let mut config = NodeConfig::new(data_dir);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.cluster = cluster.to_string();
    config.interfaces = vec!["lo".to_string()];
    config
}

pub async fn start_node(cluster: &str, data_dir: &Path) -> Node {
    Node::start(config(cluster, data_dir))
        .await
        .expect("node starts")
}

pub async fn client(addr: SocketAddr) -> Client {
    Client::connect(ClientOptions::to_node(addr))
        .await
        .expect("client connects")
}

/// Polls `check` until it returns true, failing the test after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the nodes behind `clients` form one tree: the same root
/// everywhere, and a parent for every node but the root.
pub async fn wait_for_tree(clients: &[&Client], limit: Duration) {
    eventually(limit, "nodes to form one tree", || async {
        let mut roots = Vec::new();
        let mut with_parent = 0;
        for client in clients {
            let status = client.status().await.expect("status");
            with_parent += usize::from(status.parent.is_some());
            roots.push(status.root);
        }
        roots.windows(2).all(|w| w[0] == w[1]) && with_parent == clients.len() - 1
    })
    .await;
}
