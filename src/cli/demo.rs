//! `treescale demo`: a small cluster on loopback, shown working, then stopped.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use treescale::wire::NodeStatus;
use treescale::{Client, ClientOptions, Node, NodeConfig, NodeId};

#[derive(Args, Debug)]
#[command(
    long_about = "Start a small cluster on this machine, on 127.0.0.1 with mDNS restricted \
to the loopback interface, and show it at work: nodes discovering each other with no \
configuration, the tree they form, events crossing it, and a queue group sharing work. The \
cluster has a random name, its data dirs are temporary, and everything stops by itself."
)]
pub struct DemoArgs {
    /// How many nodes to start.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=16))]
    nodes: u16,

    /// How many events to publish across the cluster.
    #[arg(long, value_name = "N", default_value_t = 5)]
    events: u32,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let cluster = format!("demo-{:08x}", rand::random::<u32>());
    let scratch = tempfile::tempdir().context("cannot create a temporary dir for the demo")?;
    println!(
        "TreeScale demo: {} nodes on 127.0.0.1, finding each other over mDNS on lo (cluster {cluster})\n",
        args.nodes
    );

    let started = Instant::now();
    let mut nodes = Vec::new();
    for i in 0..args.nodes {
        let mut config = NodeConfig::new(scratch.path().join(format!("node{i}")));
        config.listen = "127.0.0.1:0".parse().expect("valid address");
        config.cluster = cluster.clone();
        config.interfaces = vec!["lo".to_string()];
        config.name = Some(format!("node{i}"));
        let node = Node::start(config).await?;
        println!(
            "  started node{i}  id {}  on {}",
            node.id().short(),
            node.addr()
        );
        nodes.push(node);
    }
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(Client::connect(ClientOptions::to_node(node.addr())).await?);
    }

    println!("\nDiscovering peers (no --peer given)...");
    let statuses = wait_for_one_tree(&clients, Duration::from_secs(10)).await?;
    println!(
        "  all {} nodes in one tree {:.2}s after the first started:\n",
        nodes.len(),
        started.elapsed().as_secs_f64()
    );
    print!("{}", render_tree(&statuses));

    let (first, last) = (&clients[0], &clients[clients.len() - 1]);
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
        "  {} events crossed the cluster in {:.1}ms",
        args.events,
        sent_at.elapsed().as_secs_f64() * 1000.0
    );
    drop(orders);

    let jobs = 100;
    println!("\nQueue group 'workers' on 'jobs' with a member on every node but the first; {jobs} jobs published:");
    let mut workers = Vec::new();
    for client in &clients[1..] {
        workers.push((
            client.node_name().to_string(),
            client.subscribe_group("jobs", "workers").await?,
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
            tokio::time::timeout(Duration::from_millis(500), worker.next()).await
        {
            got += 1;
        }
        total += got;
        println!("  worker on {name} took {got} jobs");
    }
    println!("  {total} of {jobs} jobs handled, each by exactly one worker");

    println!("\nStopping the cluster...");
    for client in clients {
        client.close().await;
    }
    for node in nodes {
        node.shutdown().await;
    }
    println!("done.");
    Ok(())
}

/// Polls every node until all report the same root and a full set of links.
async fn wait_for_one_tree(clients: &[Client], limit: Duration) -> anyhow::Result<Vec<NodeStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        let mut statuses = Vec::new();
        for client in clients {
            statuses.push(client.status().await?);
        }
        let root = statuses[0].root;
        let linked = statuses.iter().all(|s| s.root == root)
            && statuses.iter().filter(|s| s.parent.is_none()).count() == 1;
        if linked {
            return Ok(statuses);
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "nodes did not form one tree within {limit:?}; is multicast allowed on lo?"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the first node sees every group member.
async fn wait_for_group(client: &Client, members: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = client.status().await?;
        let seen: u32 = status
            .subscriptions
            .iter()
            .filter(|s| s.group.as_deref() == Some("workers"))
            .map(|s| s.local + s.edges.iter().map(|(_, n)| n).sum::<u32>())
            .sum();
        if seen >= members {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("the queue group did not propagate within 5s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An indented picture of the tree, root first.
fn render_tree(statuses: &[NodeStatus]) -> String {
    let mut children: BTreeMap<Option<NodeId>, Vec<&NodeStatus>> = BTreeMap::new();
    for status in statuses {
        children.entry(status.parent).or_default().push(status);
    }
    let mut out = String::new();
    let mut stack: Vec<(&NodeStatus, usize)> = children
        .get(&None)
        .into_iter()
        .flatten()
        .map(|s| (*s, 0))
        .collect();
    while let Some((status, depth)) = stack.pop() {
        let role = if depth == 0 { "root" } else { "" };
        out += &format!(
            "    {}{} {} {role}\n",
            "  ".repeat(depth),
            status.name,
            status.id.short()
        );
        for child in children.get(&Some(status.id)).into_iter().flatten().rev() {
            stack.push((child, depth + 1));
        }
    }
    out
}
