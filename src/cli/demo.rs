//! `treescale demo`: a cluster of real node processes on loopback, shown
//! working and repairing itself, then stopped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use treescale::trust::{ClusterCa, TrustConfig};
use treescale::wire::NodeStatus;
use treescale::{Client, ClientOptions, NodeId};

use super::tree;

/// The long help of this command: on its variant in [`super::Command`],
/// where clap reads it.
pub const DEMO_ABOUT: &str = "Start a cluster of `treescale node` processes on this machine, on \
127.0.0.1 with mDNS restricted to the loopback interface, and show it at work: nodes \
discovering each other with no configuration, the tree they form, events crossing it, a queue \
group sharing work, and the tree repairing itself after one node is killed with SIGKILL. The \
cluster has a random name, its data dirs are temporary, and everything stops by itself.";

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// How many nodes to start.
    #[arg(long, value_name = "N", default_value_t = 7, value_parser = clap::value_parser!(u16).range(3..=32))]
    nodes: u16,

    /// Children per node: small, so that even a few nodes form a deep tree.
    #[arg(long, value_name = "K", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    max_children: u16,

    /// How many events to publish across the cluster.
    #[arg(long, value_name = "N", default_value_t = 5)]
    events: u32,
}

/// The node processes; killed when the demo ends, however it ends.
struct Nodes(Vec<Option<Child>>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for child in self.0.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let cluster = format!("demo-{:08x}", rand::random::<u32>());
    let scratch = tempfile::tempdir().context("cannot create a temporary dir for the demo")?;
    let exe = std::env::current_exe().context("cannot find the treescale binary")?;
    // The demo's own CA: its nodes join no other cluster, and no other
    // cluster's nodes join them.
    let certs = scratch.path().join("certs");
    let ca = ClusterCa::init(&certs, rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?)?;
    println!(
        "TreeScale demo: {} node processes on 127.0.0.1, up to {} children each, finding each \
         other over mDNS on lo (cluster {cluster}, with a fresh cluster CA {}: every connection \
         is mutual TLS with certificates it issued)\n",
        args.nodes,
        args.max_children,
        ca.fingerprint()
    );

    let started = Instant::now();
    let mut nodes = Nodes(Vec::new());
    let mut addrs = Vec::new();
    for i in 0..args.nodes {
        let addr = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
        let log = std::fs::File::create(scratch.path().join(format!("node{i}.log")))?;
        let child = Command::new(&exe)
            .args(["node", "--interface", "lo", "--cluster", &cluster])
            .args(["--listen", &addr.to_string(), "--name", &format!("node{i}")])
            .args(["--max-children", &args.max_children.to_string()])
            .arg("--data-dir")
            .arg(scratch.path().join(format!("node{i}")))
            .arg("--certs")
            .arg(&certs)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start a node process")?;
        nodes.0.push(Some(child));
        addrs.push(addr);
    }
    let mut clients = Vec::new();
    for addr in &addrs {
        let options = ClientOptions {
            trust: TrustConfig::Dir(certs.clone()),
            ..ClientOptions::to_node(*addr)
        };
        clients.push(Some(Client::connect(options).await?));
    }
    println!(
        "Started {} nodes; discovering peers (no --peer given)...",
        args.nodes
    );
    wait_for_one_tree(&clients, None, Duration::from_secs(15)).await?;
    println!(
        "  one tree {:.2}s after the first node started:\n",
        started.elapsed().as_secs_f64()
    );
    print!("{}", indent(&draw(&clients).await?));

    let first = clients[0].as_ref().expect("connected");
    let last = clients[clients.len() - 1].as_ref().expect("connected");
    println!(
        "\nSubscribing on {} to 'orders.>', publishing {} events on {} to 'orders.eu'...",
        last.node_name(),
        args.events,
        first.node_name()
    );
    let mut orders = last.subscribe("orders.>").await?;
    if !first
        .wait_for_interest("orders.eu", Duration::from_secs(5))
        .await?
    {
        anyhow::bail!("the subscription never reached {}", first.node_name());
    }
    let sent_at = Instant::now();
    for i in 1..=args.events {
        first.publish("orders.eu", format!("order #{i}")).await?;
    }
    first.flush().await?;
    for _ in 0..args.events {
        let event = tokio::time::timeout(Duration::from_secs(5), orders.next())
            .await
            .context("an event did not arrive within 5s")?
            .context("connection lost")?;
        println!(
            "  {} received {:?} (event {}, from node {})",
            last.node_name(),
            String::from_utf8_lossy(&event.payload),
            event.id,
            event.origin.short()
        );
    }
    println!(
        "  {} events crossed the tree in {:.1}ms",
        args.events,
        sent_at.elapsed().as_secs_f64() * 1000.0
    );
    drop(orders);

    let jobs = 100;
    let members: Vec<&Client> = clients[1..].iter().flatten().take(3).collect();
    println!(
        "\nQueue group 'workers' on 'jobs' with members on {}; {jobs} jobs published:",
        members
            .iter()
            .map(|c| c.node_name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut workers = Vec::new();
    for member in &members {
        workers.push((
            member.node_name().to_string(),
            member.subscribe_group("jobs", "workers").await?,
        ));
    }
    wait_for_group(first, workers.len() as u32).await?;
    for i in 0..jobs {
        first.publish("jobs", format!("job {i}")).await?;
    }
    first.flush().await?;
    let mut total = 0;
    for (name, worker) in &mut workers {
        let mut got = 0;
        while let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_millis(300), worker.next()).await
        {
            got += 1;
        }
        total += got;
        println!("  worker on {name} took {got} jobs");
    }
    println!("  {total} of {jobs} jobs handled, each by exactly one worker");
    drop(workers);

    let statuses = statuses(&clients).await?;
    let victim = statuses
        .iter()
        .position(|s| {
            s.as_ref()
                .is_some_and(|s| s.parent.is_some() && s.peers.iter().any(|p| p.role == "child"))
        })
        .or_else(|| {
            statuses
                .iter()
                .position(|s| s.as_ref().is_some_and(|s| s.parent.is_none()))
        })
        .expect("a tree has a root");
    println!(
        "\nKilling node{victim} with SIGKILL: no goodbye, its links just go silent. Its \
         neighbours notice after the 1s idle timeout and re-attach..."
    );
    let victim_id = clients[victim].as_ref().expect("connected").node_id();
    let killed_at = Instant::now();
    if let Some(mut child) = nodes.0[victim].take() {
        child.kill()?;
        child.wait()?;
    }
    clients[victim] = None;
    wait_for_one_tree(&clients, Some(victim_id), Duration::from_secs(15)).await?;
    println!(
        "  tree repaired {:.2}s after the kill:\n",
        killed_at.elapsed().as_secs_f64()
    );
    print!("{}", indent(&draw(&clients).await?));

    println!("\nStopping the cluster...");
    for client in clients.into_iter().flatten() {
        client.close().await;
    }
    drop(nodes);
    println!("done.");
    Ok(())
}

async fn statuses(clients: &[Option<Client>]) -> anyhow::Result<Vec<Option<NodeStatus>>> {
    let mut statuses = Vec::new();
    for client in clients {
        statuses.push(match client {
            Some(client) => Some(client.status().await?),
            None => None,
        });
    }
    Ok(statuses)
}

/// Polls the live nodes until they report one root, and none of them
/// still links to the node that is `gone`.
async fn wait_for_one_tree(
    clients: &[Option<Client>],
    gone: Option<NodeId>,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let statuses: Vec<NodeStatus> = statuses(clients).await?.into_iter().flatten().collect();
        let root = statuses[0].root;
        let roots = statuses.iter().filter(|s| s.parent.is_none()).count();
        let forgotten = gone.is_none_or(|gone| {
            statuses
                .iter()
                .all(|s| s.root != gone && s.peers.iter().all(|p| p.id != gone))
        });
        if roots == 1 && forgotten && statuses.iter().all(|s| s.root == root) {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "nodes did not form one tree within {limit:?}; is multicast allowed on lo?"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The picture of the tree, asked of the root once its directory holds
/// every live node (it learns of changes a few round trips late).
async fn draw(clients: &[Option<Client>]) -> anyhow::Result<String> {
    let live = clients.iter().flatten().count();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for client in clients.iter().flatten() {
            if client.status().await?.parent.is_none() {
                let tree = tree::from_entries(client.tree().await?);
                if tree.nodes.len() == live || Instant::now() > deadline {
                    return Ok(tree::render(&tree));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

/// Waits until the first node sees every group member.
async fn wait_for_group(client: &Client, members: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if client.status().await?.group_members("workers") >= members {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("the queue group did not propagate within 5s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
