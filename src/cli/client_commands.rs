//! `treescale pub`, `treescale sub` and `treescale status`.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::io::AsyncBufReadExt;
use treescale::wire::{Destination, NodeStatus};
use treescale::NodeId;

use super::ConnectArgs;

#[derive(Args, Debug)]
#[command(
    long_about = "Publish events to TOPIC through a node. With DATA, one event carries it; \
without, every line of stdin becomes one event:\n\n  seq 100 | treescale pub orders.eu\n\n\
Events are delivered at most once: an event published while no subscriber matches is dropped, \
so by default pub first waits briefly (--wait) for a subscriber to appear."
)]
pub struct PubArgs {
    #[command(flatten)]
    connect: ConnectArgs,

    /// Dot-separated topic, e.g. orders.eu (no wildcards).
    topic: String,

    /// Payload of a single event. Without it, stdin is read line by line.
    data: Option<String>,

    /// Header KEY=VALUE carried with every event (repeatable).
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_header)]
    headers: Vec<(String, String)>,

    /// Wait up to this long for a subscriber of TOPIC to exist anywhere in
    /// the overlay before publishing. 0s publishes at once.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "2s")]
    wait: Duration,

    /// Deliver only to the subscribers of this node (its id or --name): the
    /// events follow the tree path to it.
    #[arg(long, value_name = "NODE", value_parser = parse_destination)]
    to: Option<Destination>,
}

fn parse_destination(s: &str) -> Result<Destination, String> {
    if s.is_empty() {
        return Err("a node id or name is needed".into());
    }
    Ok(match s.parse::<NodeId>() {
        Ok(id) => Destination::Node(id),
        Err(_) => Destination::Named(s.to_string()),
    })
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    Ok((key.to_string(), value.to_string()))
}

pub async fn publish(args: PubArgs) -> anyhow::Result<()> {
    treescale::topic::Topic::new(args.topic.as_str())
        .with_context(|| format!("cannot publish to {:?}", args.topic))?;
    let client = args.connect.connect("treescale pub").await?;
    if !args.wait.is_zero() && !client.wait_for_interest(&args.topic, args.wait).await? {
        eprintln!(
            "warning: no subscriber of {:?} appeared within {:?}; publishing anyway (events nobody subscribes to are dropped)",
            args.topic, args.wait
        );
    }
    let mut count = 0u64;
    match args.data {
        Some(data) => {
            client
                .publish_with_headers(&args.topic, args.headers.clone(), data)
                .await?;
            count += 1;
        }
        None => {
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            while let Some(line) = lines.next_line().await.context("reading stdin")? {
                client
                    .publish_with_headers(&args.topic, args.headers.clone(), line)
                    .await?;
                count += 1;
            }
        }
    }
    client.flush().await?;
    eprintln!(
        "published {count} event(s) to {} via node {}",
        args.topic,
        client.node_id().short()
    );
    client.close().await;
    Ok(())
}

#[derive(Args, Debug)]
#[command(
    long_about = "Subscribe to TOPIC and print each event's payload as one line on stdout, \
so the output pipes well. TOPIC may use wildcards: `*` matches one token, `>` the rest:\n\n  \
treescale sub 'orders.*'      # orders.eu, orders.us\n  treescale sub 'orders.>'      # also orders.eu.paris\n\n\
With --group, the subscriber joins a queue group: each event goes to one member of the group only."
)]
pub struct SubArgs {
    #[command(flatten)]
    connect: ConnectArgs,

    /// Topic pattern, e.g. orders.* or orders.>
    topic: String,

    /// Exit after this many events.
    #[arg(long, value_name = "N")]
    count: Option<u64>,

    /// Print topic, event id and origin node before each payload.
    #[arg(long)]
    verbose: bool,

    /// Join this queue group: events are shared out among its members.
    #[arg(long, value_name = "NAME")]
    group: Option<String>,
}

pub async fn subscribe(args: SubArgs) -> anyhow::Result<()> {
    treescale::topic::Pattern::new(args.topic.as_str())
        .with_context(|| format!("cannot subscribe to {:?}", args.topic))?;
    if args.count == Some(0) {
        return Ok(());
    }
    let client = args.connect.connect("treescale sub").await?;
    let mut subscription = match &args.group {
        Some(group) => client.subscribe_group(&args.topic, group).await?,
        None => client.subscribe(&args.topic).await?,
    };
    let mut received = 0u64;
    let mut stdout = std::io::stdout().lock();
    loop {
        let event = tokio::select! {
            event = subscription.next() => event,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Some(event) = event else {
            anyhow::bail!(
                "connection to node {} lost after {received} event(s)",
                client.node_id().short()
            );
        };
        let payload = String::from_utf8_lossy(&event.payload);
        let line = if args.verbose {
            writeln!(
                stdout,
                "{} {} {} {}",
                event.topic,
                event.id,
                event.origin.short(),
                payload
            )
        } else {
            writeln!(stdout, "{payload}")
        };
        if line.and_then(|()| stdout.flush()).is_err() {
            // stdout closed (e.g. `| head`): a normal way to stop.
            break;
        }
        received += 1;
        if args.count.is_some_and(|n| received >= n) {
            break;
        }
    }
    drop(stdout);
    client.close().await;
    Ok(())
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    connect: ConnectArgs,

    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let client = args.connect.connect("treescale status").await?;
    let status = client.status().await?;
    client.close().await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render_status(&status));
    }
    Ok(())
}

pub fn render_status(status: &NodeStatus) -> String {
    let mut out = String::new();
    let short = |id: &treescale::NodeId| id.short();
    out += &format!("node     {} ({})\n", short(&status.id), status.name);
    out += &format!("id       {}\n", status.id);
    out += &format!("address  {}\ncluster  {}\n", status.addr, status.cluster);
    let parent = status
        .parent
        .as_ref()
        .map(short)
        .unwrap_or_else(|| "none (this node is the root)".into());
    out += &format!(
        "tree     root {}, depth {}, parent {}, {} node(s) in its subtree\n",
        short(&status.root),
        status.depth,
        parent,
        status.subtree
    );
    out += &format!("\npeers ({})\n", status.peers.len());
    if !status.peers.is_empty() {
        out += &format!(
            "  {:<10}  {:<16}  {:<22}  {:>9}  {}\n",
            "ID", "NAME", "ADDRESS", "RTT", "ROLE"
        );
        for peer in &status.peers {
            let rtt = format!("{:.2}ms", peer.rtt_us as f64 / 1000.0);
            out += &format!(
                "  {:<10}  {:<16}  {:<22}  {:>9}  {}\n",
                short(&peer.id),
                peer.name,
                peer.addr,
                rtt,
                peer.role
            );
        }
    }
    out += &format!("\nsubscriptions ({})\n", status.subscriptions.len());
    if !status.subscriptions.is_empty() {
        out += &format!(
            "  {:<24}  {:<12}  {:>5}  {}\n",
            "PATTERN", "GROUP", "LOCAL", "VIA EDGES"
        );
        for sub in &status.subscriptions {
            let edges: Vec<String> = sub
                .edges
                .iter()
                .map(|(id, n)| format!("{}×{n}", short(id)))
                .collect();
            out += &format!(
                "  {:<24}  {:<12}  {:>5}  {}\n",
                sub.pattern.as_str(),
                sub.group.as_deref().unwrap_or("-"),
                sub.local,
                edges.join(" ")
            );
        }
    }
    let c = &status.counters;
    out += &format!(
        "\nevents   published {}, received {}, forwarded {}, delivered {}, dropped {}, unroutable {}\n",
        c.events_published,
        c.events_received,
        c.events_forwarded,
        c.events_delivered,
        c.events_dropped,
        c.events_unroutable
    );
    out
}
