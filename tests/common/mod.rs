//! Helpers shared by the integration tests. Every node listens on 127.0.0.1
//! and runs mDNS on `lo` only, in a cluster named for its test and with its
//! own CA, so tests running in parallel never join each other.

#![allow(dead_code)]

pub mod netfilter;
pub mod processes;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use std::sync::Arc;

use treescale::identity::Identity;
use treescale::tls::{self, Liveness};
use treescale::trust::{ClusterAnchor, ClusterCa, Role, Trust, TrustConfig, DEFAULT_VALIDITY};
use treescale::{Client, ClientOptions, Node, NodeConfig};

/// A test's own cluster: a name no other test (or run) uses, and its own
/// CA in a temporary certs dir, removed when the test ends.
pub struct TestCluster {
    pub name: String,
    certs: tempfile::TempDir,
}

impl TestCluster {
    /// The certs dir: the CA's certificate and key.
    pub fn certs(&self) -> &Path {
        self.certs.path()
    }

    pub fn trust(&self) -> TrustConfig {
        TrustConfig::Dir(self.certs.path().to_path_buf())
    }

    pub fn ca(&self) -> ClusterCa {
        ClusterCa::load(self.certs()).unwrap().expect("the test CA")
    }

    /// How handshakes of this cluster check peers.
    pub fn trust_anchor(&self) -> Trust {
        Trust::Cluster(Arc::new(ClusterAnchor::new(&self.ca()).unwrap()))
    }

    /// A fresh identity issued by this cluster's CA.
    pub fn issue(&self, role: Role, name: &str) -> Identity {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        self.ca().issue(&key, role, name, DEFAULT_VALIDITY).unwrap()
    }

    /// A QUIC config for a raw connection to a node of this cluster, as a
    /// client of it with `alpn`.
    pub fn raw_client_config(&self, alpn: &[u8]) -> quinn::ClientConfig {
        let identity = self.issue(Role::Client, "raw");
        tls::dial_config(
            Some(&identity),
            &self.trust_anchor(),
            None,
            Liveness::default(),
            alpn,
        )
    }

    /// Options for a client of this cluster connecting to `addr`.
    pub fn client_options(&self, addr: SocketAddr) -> ClientOptions {
        ClientOptions {
            trust: self.trust(),
            ..ClientOptions::to_node(addr)
        }
    }

    /// Options for a client of this cluster holding any of `nodes`.
    pub fn client_options_for(&self, nodes: Vec<SocketAddr>) -> ClientOptions {
        ClientOptions {
            trust: self.trust(),
            ..ClientOptions::to_nodes(nodes)
        }
    }
}

impl Drop for TestCluster {
    /// Every process started for this cluster must have ended with the
    /// test: one still running is killed, and fails a test that passed.
    fn drop(&mut self) {
        let leaked = processes::running_in_cluster(&self.name);
        for (pid, _) in &leaked {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
        if !leaked.is_empty() && !std::thread::panicking() {
            let list: Vec<String> = leaked
                .iter()
                .map(|(pid, command)| format!("{pid}: {command}"))
                .collect();
            panic!(
                "the test left {} process(es) of cluster {} running (now killed):\n{}",
                leaked.len(),
                self.name,
                list.join("\n")
            );
        }
    }
}

impl fmt::Display for TestCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

pub fn cluster_for(test: &str) -> TestCluster {
    let certs = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    ClusterCa::init(certs.path(), key).unwrap();
    TestCluster {
        name: format!("test-{test}-{:08x}", rand::random::<u32>()),
        certs,
    }
}

pub fn config(cluster: &TestCluster, data_dir: &Path) -> NodeConfig {
    let mut config = NodeConfig::new(data_dir);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.cluster = cluster.name.clone();
    config.interfaces = vec!["lo".to_string()];
    config.trust = cluster.trust();
    config
}

pub async fn start_node(cluster: &TestCluster, data_dir: &Path) -> Node {
    start_node_with(cluster, data_dir, |_| {}).await
}

/// A node of `cluster` whose config `change` adjusts first.
pub async fn start_node_with(
    cluster: &TestCluster,
    data_dir: &Path,
    change: impl FnOnce(&mut NodeConfig),
) -> Node {
    let mut config = config(cluster, data_dir);
    change(&mut config);
    Node::start(config).await.expect("node starts")
}

pub async fn client(cluster: &TestCluster, addr: SocketAddr) -> Client {
    Client::connect(cluster.client_options(addr))
        .await
        .expect("client connects")
}

/// A raw QUIC connection to `node` with `config`, from a fresh endpoint.
pub async fn connect(
    node: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint
        .connect_with(config, node, "treescale")
        .unwrap()
        .await
}

/// `message` as one frame, as a node or client sends it.
pub fn framed<T: serde::Serialize>(message: &T) -> bytes::BytesMut {
    let mut buf = bytes::BytesMut::new();
    treescale::wire::frame::encode(message, &mut buf);
    buf
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

/// Nodes of one cluster, started in this process, a client on each, once
/// they form one tree.
pub async fn tree_of_nodes(
    test: &str,
    n: usize,
) -> (TestCluster, Vec<Node>, Vec<Client>, Vec<tempfile::TempDir>) {
    let cluster = cluster_for(test);
    let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = Vec::new();
    for dir in &dirs {
        nodes.push(start_node(&cluster, dir.path()).await);
    }
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(client(&cluster, node.addr()).await);
    }
    wait_for_tree(&clients.iter().collect::<Vec<_>>(), Duration::from_secs(15)).await;
    (cluster, nodes, clients, dirs)
}
