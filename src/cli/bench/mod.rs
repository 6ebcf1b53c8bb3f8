//! `treescale bench`: throughput and latency of a running cluster, as its
//! clients see it, with every lost or duplicated event counted.

mod request;
mod tally;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::task::JoinSet;
use treescale::topic::Topic;
use treescale::{Client, Qos};

use super::{parse_addr, parse_size, ReachArgs};
use tally::{Latencies, Tally, HEADER};

pub const BENCH_ABOUT: &str = "Measure a cluster as its clients see it, in the manner of \
`nats bench`. Publishers connect to the first --node and subscribers to the last (or, with --spread, to \
each --node in turn), each with its own connection; every event carries its publisher, sequence number and send time, so \
lost and duplicated events are counted and shown.\n\n\
Throughput (default): publishers send --msgs events as fast as they can; msg/s is what the \
subscribers received per second, from the first publish to the last delivery.\n\
Latency (--rate N): publishers send N events per second in all, and the one-way latency of \
each delivery goes into an HDR histogram (p50, p90, p99, p99.9).\n\n\
Fan-out (default): every subscriber gets every event. With --group NAME the subscribers \
form a queue group: each event goes to one of them.\n\n\
Request/reply (--request): the subscribers become responders in one queue group, echoing \
each request; each publisher becomes a requester with --in-flight requests outstanding, and \
the round trip of each answer goes into the histogram (requests/s, p50 … p99.9). With --rate, \
requests start at that rate in all.\n\n\
  treescale bench --node 127.0.0.1:7700 --msgs 1000000\n\
  treescale bench --node A:7700 --node B:7700 --rate 10000 --msgs 100000 --json\n\
  treescale bench --node A:7700 --node B:7700 --request --in-flight 100 --msgs 100000";

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A node to use (repeatable): publishers connect to the first,
    /// subscribers to the last. Without it, the first node of the cluster
    /// found over mDNS serves both.
    #[arg(long = "node", value_name = "ADDR", value_parser = parse_addr)]
    nodes: Vec<SocketAddr>,

    /// Publishing connections.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pubs: u32,

    /// Subscribing connections (0 measures publishing alone).
    #[arg(long, value_name = "N", default_value_t = 1)]
    subs: u32,

    /// Events to publish in all, shared among the publishers.
    #[arg(long, value_name = "N", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    msgs: u64,

    /// Payload size, e.g. 128 or 1KiB; at least 20 bytes (the stamp each
    /// event carries).
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "128")]
    size: usize,

    /// Delivery mode of the published events.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = Qos::AtMostOnce)]
    qos: Qos,

    /// Subscribers form this queue group: each event goes to one of them.
    #[arg(long, value_name = "NAME")]
    group: Option<String>,

    /// Latency mode: publish this many events per second in all, and
    /// report latency percentiles.
    #[arg(long, value_name = "PER_SEC", value_parser = clap::value_parser!(u64).range(1..))]
    rate: Option<u64>,

    /// Spread the subscribers over every --node in turn, the first on the
    /// first node (fan-out across a cluster); by default they all use the
    /// last.
    #[arg(long)]
    spread: bool,

    /// Topic to use. Default: one no other run uses.
    #[arg(long, value_name = "TOPIC")]
    topic: Option<String>,

    /// How long subscribers wait for more once publishing is done and
    /// events stop coming; what has not come by then counts as lost.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "2s")]
    drain: Duration,

    /// Measure request/reply round trips instead of events: subscribers
    /// answer, publishers request.
    #[arg(long, conflicts_with_all = ["group", "qos"])]
    request: bool,

    /// Requests each requester keeps outstanding (--request).
    #[arg(long, value_name = "N", default_value_t = 100, requires = "request", value_parser = clap::value_parser!(u32).range(1..))]
    in_flight: u32,

    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    reach: ReachArgs,
}

impl BenchArgs {
    /// The node subscriber (or responder) `i` uses: the last --node, or
    /// with --spread each in turn; `None` finds one over mDNS.
    fn sub_node(&self, i: u32) -> Option<SocketAddr> {
        match self.spread {
            true if !self.nodes.is_empty() => Some(self.nodes[i as usize % self.nodes.len()]),
            _ => self.nodes.last().copied(),
        }
    }
}

/// What a run measured; `--json` prints it as is.
#[derive(Debug, Serialize)]
struct Report {
    mode: &'static str,
    qos: &'static str,
    delivery: &'static str,
    pubs: u32,
    subs: u32,
    size: usize,
    nodes: usize,
    /// Events published (at-least-once: confirmed by the node).
    sent: u64,
    /// Deliveries to subscribers, duplicates included.
    delivered: u64,
    /// Events a subscriber should have had and never got.
    lost: u64,
    duplicated: u64,
    /// Delivered per second, first publish to last delivery (published per
    /// second when there are no subscribers).
    msgs_per_sec: f64,
    /// Published per second, first publish to the last one sent (or
    /// confirmed).
    pub_msgs_per_sec: f64,
    elapsed_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    p50_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p90_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p99_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p999_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_us: Option<u64>,
}

/// What subscribers hand back when they are done.
struct Received {
    tally: Tally,
    latencies: Latencies,
    last_at: Option<Duration>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.size < HEADER {
        anyhow::bail!("--size must be at least {HEADER} bytes: each event carries its publisher, sequence number and send time");
    }
    if args.pubs == 0 {
        anyhow::bail!("--pubs must be at least 1");
    }
    let per_publisher = args.msgs.div_ceil(u64::from(args.pubs));
    let topic = args
        .topic
        .clone()
        .unwrap_or_else(|| format!("bench.{:08x}", rand::random::<u32>()));
    // Parsed once: publishing a `Topic` skips the check per event.
    let parsed =
        Topic::new(topic.as_str()).map_err(|e| anyhow::anyhow!("--topic {topic:?}: {e}"))?;
    if args.request {
        return request::run(&args, &parsed).await;
    }
    let pub_node = args.nodes.first().copied();
    let sub_node = |i: u32| args.sub_node(i);

    // Subscribers first, so no event is published before they listen.
    let mut subscriptions = Vec::new();
    for i in 0..args.subs {
        let client = args
            .reach
            .connect_once(sub_node(i), &format!("bench sub {i}"))
            .await?;
        let subscription = match &args.group {
            Some(group) => client.subscribe_group(&topic, group).await?,
            None => client.subscribe(&topic).await?,
        };
        subscriptions.push((client, subscription));
    }
    let mut publishers = Vec::new();
    for i in 0..args.pubs {
        publishers.push(
            args.reach
                .connect_once(pub_node, &format!("bench pub {i}"))
                .await?,
        );
    }
    if args.subs > 0
        && !publishers[0]
            .wait_for_interest(&topic, Duration::from_secs(10))
            .await?
    {
        anyhow::bail!("the subscriptions did not reach the publishers' node within 10 s");
    }
    if args.spread && args.nodes.len() > 1 {
        // The first interest to arrive says nothing of the others: give
        // every node's the moment it takes to cross the tree.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // Each subscriber of a fan-out, or the group as a whole, should get
    // every event.
    let expected_per_sub = args.msgs;
    let progress = progress_bar(match (&args.group, args.subs) {
        (None, 1..) => args.msgs * u64::from(args.subs),
        _ => args.msgs,
    });
    let counted = Arc::new(AtomicU64::new(0));
    let publishing_done = Arc::new(AtomicBool::new(false));
    let start = Instant::now();

    let mut receivers = JoinSet::new();
    for (client, mut subscription) in subscriptions {
        let (counted, done) = (counted.clone(), publishing_done.clone());
        let (pubs, drain) = (args.pubs, args.drain);
        // A group member cannot know its share; it stops on silence.
        let complete = if args.group.is_some() {
            u64::MAX
        } else {
            expected_per_sub
        };
        receivers.spawn(async move {
            let mut received = Received {
                tally: Tally::new(pubs, per_publisher),
                latencies: Latencies::new(),
                last_at: None,
            };
            // One timer for the whole run, not one per event: it fires
            // every `drain`, and the loop ends once publishing is done and
            // nothing came for that long.
            let mut last_event = tokio::time::Instant::now();
            let idle = tokio::time::sleep(drain);
            tokio::pin!(idle);
            loop {
                tokio::select! {
                    batch = subscription.next_batch() => {
                        let Some(batch) = batch else { break };
                        // Events that arrived together share one clock
                        // read: on a VM it is not free.
                        let at = Instant::now();
                        let now = at - start;
                        for event in &batch {
                            if let Some((publisher, seq, sent)) = tally::read_stamp(&event.payload) {
                                received.tally.record(publisher, seq);
                                received.latencies.record(now.saturating_sub(sent));
                            }
                        }
                        received.last_at = Some(now);
                        last_event = at.into();
                        counted.fetch_add(batch.len() as u64, Ordering::Relaxed);
                        if received.tally.unique >= complete {
                            break;
                        }
                    }
                    () = &mut idle => {
                        if done.load(Ordering::Relaxed) && last_event.elapsed() >= drain {
                            break;
                        }
                        let now = tokio::time::Instant::now();
                        let quiet_until = last_event + drain;
                        idle.as_mut().reset(if quiet_until > now { quiet_until } else { now + drain });
                    }
                }
            }
            drop(client);
            received
        });
    }

    let mut senders = JoinSet::new();
    for (index, client) in publishers.into_iter().enumerate() {
        let count = per_publisher.min(args.msgs.saturating_sub(per_publisher * index as u64));
        let rate = args.rate.map(|total| total as f64 / f64::from(args.pubs));
        let (size, qos, topic) = (args.size, args.qos, parsed.clone());
        let counted = (args.subs == 0).then(|| counted.clone());
        senders.spawn(async move {
            publish(
                client,
                index as u32,
                count,
                size,
                qos,
                &topic,
                rate,
                start,
                counted,
            )
            .await
        });
    }
    let ticker = tokio::spawn({
        let (progress, counted) = (progress.clone(), counted.clone());
        async move {
            loop {
                progress.set_position(counted.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    let mut sent = 0;
    let mut published_by = Duration::ZERO;
    while let Some(result) = senders.join_next().await {
        let (count, finished) = result??;
        sent += count;
        published_by = published_by.max(finished);
    }
    publishing_done.store(true, Ordering::Relaxed);
    let mut all = Tally::new(args.pubs, per_publisher);
    let mut per_sub = Vec::new();
    let mut latencies = Latencies::new();
    let mut last_at = published_by;
    while let Some(received) = receivers.join_next().await {
        let received = received?;
        latencies.merge(&received.latencies);
        last_at = last_at.max(received.last_at.unwrap_or_default());
        per_sub.push(received.tally);
    }
    ticker.abort();
    progress.finish_and_clear();

    let (delivered, lost, duplicated) = match args.group {
        Some(_) => {
            for tally in &per_sub {
                all.merge(tally);
            }
            (all.delivered, all.lost(expected_per_sub), all.duplicated)
        }
        None => per_sub.iter().fold((0, 0, 0), |(d, l, u), t| {
            (
                d + t.delivered,
                l + t.lost(expected_per_sub),
                u + t.duplicated,
            )
        }),
    };
    let elapsed = if args.subs == 0 {
        published_by
    } else {
        last_at
    };
    let per_sec = |n: u64, over: Duration| n as f64 / over.as_secs_f64().max(1e-9);
    let latency = args.rate.is_some() && latencies.len() > 0;
    let report = Report {
        mode: if args.rate.is_some() {
            "latency"
        } else {
            "throughput"
        },
        qos: match args.qos {
            Qos::AtMostOnce => "at-most-once",
            Qos::AtLeastOnce => "at-least-once",
        },
        delivery: if args.group.is_some() {
            "queue-group"
        } else {
            "fan-out"
        },
        pubs: args.pubs,
        subs: args.subs,
        size: args.size,
        nodes: args.nodes.len().max(1),
        sent,
        delivered,
        lost,
        duplicated,
        msgs_per_sec: per_sec(if args.subs == 0 { sent } else { delivered }, elapsed),
        pub_msgs_per_sec: per_sec(sent, published_by),
        elapsed_s: elapsed.as_secs_f64(),
        p50_us: latency.then(|| latencies.percentile(50.0)),
        p90_us: latency.then(|| latencies.percentile(90.0)),
        p99_us: latency.then(|| latencies.percentile(99.0)),
        p999_us: latency.then(|| latencies.percentile(99.9)),
        max_us: latency.then(|| latencies.max()),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Publishes `count` events; returns how many were sent (at-least-once:
/// confirmed) and when the last was.
#[allow(clippy::too_many_arguments)]
async fn publish(
    client: Client,
    index: u32,
    count: u64,
    size: usize,
    qos: Qos,
    topic: &Topic,
    rate: Option<f64>,
    start: Instant,
    counted: Option<Arc<AtomicU64>>,
) -> anyhow::Result<(u64, Duration)> {
    let mut payload = vec![0u8; size];
    let mut confirmations = JoinSet::new();
    let begun = start.elapsed();
    let mut ticks = tokio::time::interval(Duration::from_millis(1));
    let mut seq = 0;
    while seq < count {
        // At a fixed rate, send what is due by now, every millisecond.
        let due = match rate {
            Some(rate) => {
                ticks.tick().await;
                let due = ((start.elapsed() - begun).as_secs_f64() * rate) as u64 + 1;
                due.min(count)
            }
            None => count,
        };
        while seq < due {
            tally::stamp(&mut payload, index, seq, start.elapsed());
            let bytes = Bytes::copy_from_slice(&payload);
            match qos {
                Qos::AtMostOnce => {
                    client.publish(topic, bytes).await?;
                }
                Qos::AtLeastOnce => {
                    let confirmation = client
                        .publish_at_least_once(topic, Vec::new(), bytes)
                        .await?;
                    confirmations.spawn(confirmation.confirmed());
                }
            }
            if let Some(counted) = &counted {
                counted.fetch_add(1, Ordering::Relaxed);
            }
            seq += 1;
        }
    }
    let mut sent = count;
    if qos == Qos::AtLeastOnce {
        sent = 0;
        while let Some(confirmed) = confirmations.join_next().await {
            if matches!(confirmed, Ok(Ok(_))) {
                sent += 1;
            }
        }
    }
    client.flush().await?;
    let finished = start.elapsed();
    client.close().await;
    Ok((sent, finished))
}

fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} events {per_sec} eta {eta}")
            .expect("a valid template"),
    );
    bar
}

fn print_table(report: &Report) {
    println!(
        "treescale bench: {} {}, {} publisher(s) -> {} subscriber(s) ({}), {} B events, {} node(s)",
        report.mode,
        report.qos,
        report.pubs,
        report.subs,
        report.delivery,
        report.size,
        report.nodes
    );
    println!("  sent        {:>12}", report.sent);
    println!("  delivered   {:>12}", report.delivered);
    println!("  lost        {:>12}", report.lost);
    println!("  duplicated  {:>12}", report.duplicated);
    println!(
        "  msg/s       {:>12.0}   (delivered, first publish to last delivery)",
        report.msgs_per_sec
    );
    println!("  publish/s   {:>12.0}", report.pub_msgs_per_sec);
    println!("  elapsed     {:>11.3}s", report.elapsed_s);
    if let (Some(p50), Some(p90), Some(p99), Some(p999), Some(max)) = (
        report.p50_us,
        report.p90_us,
        report.p99_us,
        report.p999_us,
        report.max_us,
    ) {
        println!("  latency µs  p50 {p50}  p90 {p90}  p99 {p99}  p99.9 {p999}  max {max}");
    }
}
