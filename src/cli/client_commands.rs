//! `treescale pub`, `treescale sub` and `treescale status`.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use treescale::wire::{Destination, NodeStatus, RetentionLimits};
use treescale::{ClientError, Confirmation, DurableOptions, NodeId, Qos};

use super::{parse_size, ConnectArgs};

/// The long help of this command: on its variant in [`super::Command`],
/// where clap reads it.
pub const PUB_ABOUT: &str =
    "Publish events to TOPIC through a node. With DATA, one event carries it; \
without, every line of stdin becomes one event:\n\n  seq 100 | treescale pub orders.eu\n\n\
By default events are delivered at most once: an event published while no subscriber matches \
is dropped, so pub first waits briefly (--wait) for a subscriber to appear.\n\n\
With --qos at-least-once, each event is stored on the node's disk before the node confirms it, \
and durable subscriptions (`treescale sub --durable`) receive it exactly once even across \
crashes and partitions. If its node fails, pub reconnects (to another --node if given) and \
sends the unconfirmed events again; sent through another node, one may then arrive twice. \
pub exits non-zero if any event was refused (for instance when a durable subscription is at \
its retention limit) or left unconfirmed.";

#[derive(Args, Debug)]
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

    /// Deliver only to the subscribers of this node: its name, its id, or
    /// the first 4 or more hex digits of its id (`treescale tree` lists
    /// them). The events follow the tree path to it; an unknown node is an
    /// error.
    #[arg(long, value_name = "NODE", value_parser = parse_destination)]
    to: Option<Destination>,

    /// Delivery mode: at-most-once (in memory, fastest) or at-least-once
    /// (stored at every hop; waits for each event's confirmation).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = Qos::AtMostOnce)]
    qos: Qos,
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

pub fn parse_header(s: &str) -> Result<(String, String), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    Ok((key.to_string(), value.to_string()))
}

pub async fn publish(args: PubArgs) -> anyhow::Result<()> {
    treescale::topic::Topic::new(args.topic.as_str())
        .with_context(|| format!("cannot publish to {:?}", args.topic))?;
    if args.qos == Qos::AtLeastOnce {
        if args.to.is_some() {
            anyhow::bail!("--to sends at most once; leave out --qos at-least-once or --to");
        }
        return publish_at_least_once(args).await;
    }
    let client = args.connect.connect("treescale pub").await?;
    let to = match &args.to {
        Some(to) => Some(resolve_destination(&client, to).await?),
        None => None,
    };
    if !args.wait.is_zero() && !client.wait_for_interest(&args.topic, args.wait).await? {
        eprintln!(
            "warning: no subscriber of {:?} appeared within {:?}; publishing anyway (events nobody subscribes to are dropped)",
            args.topic, args.wait
        );
    }
    let mut sent = 0u64;
    let publish = async |payload: String| -> Result<(), ClientError> {
        let headers = args.headers.clone();
        match &to {
            Some(to) => client
                .publish_to_with_headers(to.clone(), &args.topic, headers, payload)
                .await
                .map(drop),
            None => client
                .publish_with_headers(&args.topic, headers, payload)
                .await
                .map(drop),
        }
    };
    let published = async {
        publish_input(args.data.clone(), &client, &mut sent, publish).await?;
        client.flush().await?;
        anyhow::Ok(())
    }
    .await;
    let node = client.describe_node();
    client.close().await;
    if let Err(e) = published {
        anyhow::bail!("{}\n{sent} event(s) had been handed to node {node}; at most once, so some may not have arrived", super::describe(&e));
    }
    let whom = match &to {
        Some(Destination::Node(id)) => format!(" for the subscribers of node {}", id.short()),
        _ => String::new(),
    };
    eprintln!(
        "published {sent} event(s) to {}{whom} via node {node}",
        args.topic
    );
    Ok(())
}

/// Publishes `data`, or else each line of stdin, with `publish`; counts
/// in `sent` what was handed over.
async fn publish_input(
    data: Option<String>,
    client: &treescale::Client,
    sent: &mut u64,
    mut publish: impl AsyncFnMut(String) -> Result<(), ClientError>,
) -> anyhow::Result<()> {
    match data {
        Some(data) => {
            publish(data).await?;
            *sent += 1;
        }
        None => {
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            while let Some(line) = next_line(&mut lines, client).await? {
                publish(line).await?;
                *sent += 1;
            }
        }
    }
    Ok(())
}

/// The next line of stdin, or the error that ended the connection if that
/// comes first: a publisher fed by a slow pipe (`tail -f`) stops when its
/// node does, not at its next line.
async fn next_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::io::Stdin>>,
    client: &treescale::Client,
) -> anyhow::Result<Option<String>> {
    tokio::select! {
        line = lines.next_line() => line.context("reading stdin"),
        error = client.closed() => Err(error.into()),
    }
}

/// The node `to` names, by id, id prefix or name, as the root's directory
/// knows it: an unknown node is an error, not a silent broadcast.
async fn resolve_destination(
    client: &treescale::Client,
    to: &Destination,
) -> anyhow::Result<Destination> {
    let given = match to {
        Destination::Node(id) => id.to_string(),
        Destination::Named(name) => name.clone(),
    };
    let tree = match super::tree::fetch(client).await {
        Ok(tree) => tree,
        Err(e) => {
            // The node may still know it (its subtree), and route to it.
            let below = super::tree::from_entries(client.tree().await?);
            if let [id] = matching(&below, &given).as_slice() {
                return Ok(Destination::Node(*id));
            }
            eprintln!(
                "warning: cannot read the tree from its root ({}); sending to {given:?} unchecked",
                super::describe(&e)
            );
            return Ok(to.clone());
        }
    };
    match matching(&tree, &given).as_slice() {
        [id] => Ok(Destination::Node(*id)),
        [] => anyhow::bail!(
            "no node named {given:?}, and none whose id starts so, among the {} node(s) of the tree; `treescale tree` lists them",
            tree.nodes.len()
        ),
        several => anyhow::bail!(
            "{} nodes match {given:?} ({}); give more of the id",
            several.len(),
            several.iter().map(|id| id.short()).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The nodes of `tree` named `given`, or else those whose id starts with it
/// (4 hex digits at least).
fn matching(tree: &super::tree::Tree, given: &str) -> Vec<NodeId> {
    let by_name: Vec<NodeId> = tree
        .nodes
        .iter()
        .filter(|n| n.name == given)
        .map(|n| n.id)
        .collect();
    if !by_name.is_empty() {
        return by_name;
    }
    let prefix = given.to_ascii_lowercase();
    tree.nodes
        .iter()
        .filter(|n| prefix.len() >= 4 && n.id.to_string().starts_with(&prefix))
        .map(|n| n.id)
        .collect()
}

/// `pub --qos at-least-once`: publishes every event, then waits for each
/// confirmation. Confirmations are awaited by a second task so that
/// publishing never waits for one unless the window of unconfirmed events
/// is full.
async fn publish_at_least_once(args: PubArgs) -> anyhow::Result<()> {
    let client = args.connect.connect("treescale pub").await?;
    let (confirmations_tx, mut confirmations) = mpsc::unbounded_channel::<Confirmation>();
    let tally = tokio::spawn(async move {
        let (mut confirmed, mut refused) = (0u64, 0u64);
        while let Some(confirmation) = confirmations.recv().await {
            match confirmation.confirmed().await {
                Ok(_) => confirmed += 1,
                // The connection's end is reported once, below.
                Err(ClientError::Unconfirmed(_)) => {}
                Err(e) => {
                    if refused == 0 {
                        eprintln!("error: {e}");
                    }
                    refused += 1;
                }
            }
        }
        (confirmed, refused)
    });
    let mut sent = 0u64;
    let publish = async |payload: String| -> Result<(), ClientError> {
        let confirmation = client
            .publish_at_least_once(&args.topic, args.headers.clone(), payload)
            .await?;
        let _ = confirmations_tx.send(confirmation);
        Ok(())
    };
    let published = publish_input(args.data.clone(), &client, &mut sent, publish).await;
    drop(confirmations_tx);
    let (confirmed, refused) = tally.await?;
    let node = client.describe_node();
    let lost = client.close_reason();
    client.close().await;
    let unconfirmed = sent - confirmed - refused;
    let mut counts = format!(
        "{sent} event(s) sent to node {node}: {confirmed} confirmed, {refused} refused, {unconfirmed} unconfirmed"
    );
    if unconfirmed + refused > 0 {
        counts += "; only confirmed events are guaranteed, so publish the others again";
    }
    match (published, lost) {
        (Err(e), _) => anyhow::bail!("{}\n{counts}", super::describe(&e)),
        (Ok(()), Some(lost)) if unconfirmed > 0 => anyhow::bail!("{lost}\n{counts}"),
        (Ok(()), _) if unconfirmed + refused > 0 => anyhow::bail!("{counts}"),
        (Ok(()), _) => {
            eprintln!(
                "published {confirmed} event(s) to {}, each confirmed by node {node}",
                args.topic
            );
            Ok(())
        }
    }
}

/// The long help of this command: on its variant in [`super::Command`],
/// where clap reads it.
pub const SUB_ABOUT: &str = "Subscribe to TOPIC and print each event's payload as one line on stdout, \
so the output pipes well. TOPIC may use wildcards: `*` matches one token, `>` the rest:\n\n  \
treescale sub 'orders.*'      # orders.eu, orders.us\n  treescale sub 'orders.>'      # also orders.eu.paris\n\n\
With --group, the subscriber joins a queue group: each event goes to one member of the group only.\n\n\
With --durable NAME, the subscription is durable: it lives on the node where it was first \
created (its home), which keeps every at-least-once event for it while no subscriber is \
attached, within the retention limits. Attach again from any node, with the same NAME and \
TOPIC, to receive what was kept, in order: from another node the events come across the tree \
(while the home is unreachable, sub waits for it). sub itself reconnects if the connection \
drops (see --reconnect-for). Each event is \
acknowledged after it is printed. Durable subscriptions receive at-least-once events only \
(`treescale pub --qos at-least-once`).";

#[derive(Args, Debug)]
pub struct SubArgs {
    #[command(flatten)]
    connect: ConnectArgs,

    /// Topic pattern, e.g. 'orders.*' or 'orders.>' (quoted for the shell)
    topic: String,

    /// Exit after this many events.
    #[arg(long, value_name = "N")]
    count: Option<u64>,

    /// Print topic, event id and origin node before each payload.
    #[arg(long)]
    verbose: bool,

    /// Join this queue group: events are shared out among its members.
    #[arg(long, value_name = "NAME", conflicts_with = "durable")]
    group: Option<String>,

    /// Make the subscription durable under this name (letters, digits,
    /// '-', '_', '.').
    #[arg(long, value_name = "NAME")]
    durable: Option<String>,

    /// Durable: most events kept for the subscriber; when reached, the
    /// node refuses at-least-once publishes to TOPIC with an error.
    #[arg(long, value_name = "N", requires = "durable", default_value_t = RetentionLimits::default().max_events)]
    max_events: u64,

    /// Durable: most payload bytes kept, e.g. 256MiB.
    #[arg(long, value_name = "BYTES", requires = "durable", value_parser = parse_size, default_value = "1GiB")]
    max_bytes: usize,

    /// Durable: refuse publishes once the oldest kept event is this old,
    /// e.g. 1h. Default: no age limit.
    #[arg(long, value_name = "DURATION", requires = "durable", value_parser = humantime::parse_duration)]
    max_age: Option<Duration>,

    /// Durable: how long a printed event may stay unacknowledged before
    /// the node sends it again.
    #[arg(long, value_name = "DURATION", requires = "durable", value_parser = humantime::parse_duration, default_value = "30s")]
    ack_wait: Duration,
}

pub async fn subscribe(args: SubArgs) -> anyhow::Result<()> {
    treescale::topic::Pattern::new(args.topic.as_str())
        .with_context(|| format!("cannot subscribe to {:?}", args.topic))?;
    if args.count == Some(0) {
        return Ok(());
    }
    if let Some(name) = &args.durable {
        return subscribe_durable(&args, name).await;
    }
    let stop = super::stop_requested();
    tokio::pin!(stop);
    let client = args.connect.connect_long_lived("treescale sub").await?;
    let mut subscription = match &args.group {
        Some(group) => client.subscribe_group(&args.topic, group).await?,
        None => client.subscribe(&args.topic).await?,
    };
    let mut received = 0u64;
    let mut stdout = std::io::stdout().lock();
    loop {
        let event = tokio::select! {
            event = subscription.next() => event,
            _ = &mut stop => break,
        };
        let Some(event) = event else {
            anyhow::bail!(
                "connection lost after {received} event(s){}",
                lost_because(&client)
            );
        };
        if print_event(&mut stdout, &event, args.verbose).is_err() {
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

/// Writes one event as a line: its payload, or with `verbose` its topic,
/// id and origin first.
fn print_event(
    out: &mut impl Write,
    event: &treescale::Event,
    verbose: bool,
) -> std::io::Result<()> {
    let payload = String::from_utf8_lossy(&event.payload);
    if verbose {
        writeln!(
            out,
            "{} {} {} {}",
            event.topic,
            event.id,
            event.origin.short(),
            payload
        )?;
    } else {
        writeln!(out, "{payload}")?;
    }
    out.flush()
}

/// How often a durable subscriber acknowledges, at least: after this many
/// printed events, and whenever it has caught up.
const ACK_EVERY: u64 = 256;

/// `sub --durable`: prints and acknowledges events. The client library
/// reconnects and attaches again whenever the connection drops; the node
/// keeps the events meanwhile.
async fn subscribe_durable(args: &SubArgs, name: &str) -> anyhow::Result<()> {
    let limits = RetentionLimits {
        max_events: args.max_events,
        max_bytes: args.max_bytes as u64,
        max_age_ms: args.max_age.map_or(0, |d| d.as_millis() as u64),
    };
    let options = DurableOptions {
        limits,
        ack_wait: args.ack_wait,
        handled: 0,
    };
    // Stopped with Ctrl-C or SIGTERM, it detaches at once: the node frees
    // the subscription for the next subscriber without waiting out a
    // timeout.
    let stop = super::stop_requested();
    tokio::pin!(stop);
    let client = tokio::select! {
        connected = args.connect.connect_long_lived("treescale sub") => connected?,
        _ = &mut stop => return Ok(()),
    };
    // At a node other than its home, attaching waits for the home.
    let mut subscription = {
        let attach = client.subscribe_durable(name, &args.topic, options);
        tokio::pin!(attach);
        tokio::select! {
            attached = &mut attach => attached?,
            _ = &mut stop => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(2)) => {
                eprintln!("waiting for the home node of durable subscription {name} to answer (it may be unreachable now); `treescale status` shows it as waiting_for_home");
                tokio::select! {
                    attached = &mut attach => attached?,
                    _ = &mut stop => return Ok(()),
                }
            }
        }
    };
    eprintln!(
        "durable subscription {name} attached at node {} ({} event(s) waiting)",
        client.node_id().short(),
        subscription.backlog()
    );
    let mut stdout = std::io::stdout().lock();
    let (mut received, mut unacked, mut handled) = (0u64, 0u64, 0u64);
    loop {
        let event = tokio::select! {
            event = subscription.next() => event,
            _ = &mut stop => break,
        };
        let Some(event) = event else {
            anyhow::bail!(
                "durable subscription {name} ended after {received} event(s){}",
                lost_because(&client)
            );
        };
        if print_event(&mut stdout, &event.event, args.verbose).is_err() {
            // stdout closed: stop, and let the next subscriber attach.
            break;
        }
        handled = event.position;
        received += 1;
        unacked += 1;
        let done = args.count.is_some_and(|n| received >= n);
        if done || unacked >= ACK_EVERY || subscription.is_caught_up() {
            subscription.ack(event.position);
            unacked = 0;
        }
        if done {
            break;
        }
    }
    subscription.ack(handled);
    drop(subscription);
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
            "  {:<10}  {:<16}  {:<22}  {:>9}  {:<6}  {:>9}  {}\n",
            "ID", "NAME", "ADDRESS", "RTT", "ROLE", "QUEUED", "DROPPED"
        );
        for peer in &status.peers {
            let rtt = format!("{:.2}ms", peer.rtt_us as f64 / 1000.0);
            let queued = format!("{:.1}MiB", peer.queued_bytes as f64 / (1 << 20) as f64);
            out += &format!(
                "  {:<10}  {:<16}  {:<22}  {:>9}  {:<6}  {:>9}  {}\n",
                short(&peer.id),
                peer.name,
                peer.addr,
                rtt,
                peer.role,
                queued,
                peer.events_dropped
            );
        }
    }
    if status.congested > 0 {
        out += &format!(
            "\ncongested: {} client(s) or link(s) are behind; publishers are held back until they catch up\n",
            status.congested
        );
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
    if !status.durables.is_empty() {
        out += &format!("\ndurable subscriptions ({})\n", status.durables.len());
        out += &format!(
            "  {:<16}  {:<20}  {:<10}  {:>9}  {}\n",
            "NAME", "PATTERN", "HOME", "HELD", "STATE"
        );
        for durable in &status.durables {
            let held = durable
                .held
                .map_or_else(|| "-".to_string(), |n| n.to_string());
            let state = match (durable.full, durable.attached) {
                (true, _) => "full: publishers refused",
                _ if durable.waiting_for_home => "client here waiting for its home",
                (false, true) => "client attached",
                (false, false) if durable.held.is_some() => "keeping events",
                (false, false) => "",
            };
            out += &format!(
                "  {:<16}  {:<20}  {:<10}  {:>9}  {}\n",
                durable.name,
                durable.pattern.as_str(),
                short(&durable.home),
                held,
                state
            );
        }
    }
    if status.outbox > 0 {
        out += &format!(
            "\ncustody  {} event(s) held for durable subscriptions elsewhere, {} waiting for an unreachable home\n",
            status.outbox, status.outbox_unreachable
        );
    }
    let c = &status.counters;
    out += &format!(
        "\nevents   published {}, received {}, forwarded {}, delivered {}, dropped {}, unroutable {}\n         stored {}, refused {}, redelivered {}, replayed {}, gaps filled {}\nrequests without responders {}, replies undeliverable {}\n",
        c.events_published,
        c.events_received,
        c.events_forwarded,
        c.events_delivered,
        c.events_dropped,
        c.events_unroutable,
        c.events_stored,
        c.events_refused,
        c.events_redelivered,
        c.events_replayed,
        c.replays_filled,
        c.requests_without_responders,
        c.replies_undeliverable
    );
    out
}

/// ": <why>" when the connection's close reason is known.
fn lost_because(client: &treescale::Client) -> String {
    client
        .close_reason()
        .map(|why| format!(": {why}"))
        .unwrap_or_default()
}
