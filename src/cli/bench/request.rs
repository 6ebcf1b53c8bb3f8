//! `treescale bench --request`: round trips through responders in a queue
//! group, with many requests in flight per requester.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use tokio::task::JoinSet;
use treescale::topic::Topic;
use treescale::ClientError;

use super::tally::Latencies;
use super::{progress_bar, BenchArgs};

/// The queue group the responders form: each request is answered once.
const RESPONDERS: &str = "bench-responders";

/// What a request run measured; `--json` prints it as is.
#[derive(Debug, Serialize)]
struct RequestReport {
    mode: &'static str,
    requesters: u32,
    responders: u32,
    in_flight: u32,
    size: usize,
    nodes: usize,
    requests: u64,
    replies: u64,
    timeouts: u64,
    /// Requests that failed otherwise (no responders, a lost connection).
    errors: u64,
    requests_per_sec: f64,
    elapsed_s: f64,
    rtt_p50_us: u64,
    rtt_p90_us: u64,
    rtt_p99_us: u64,
    rtt_p999_us: u64,
    rtt_max_us: u64,
}

/// What one requester's workers measured.
#[derive(Default)]
struct Outcome {
    replies: u64,
    timeouts: u64,
    errors: u64,
    first_error: Option<String>,
}

pub(super) async fn run(args: &BenchArgs, topic: &Topic) -> anyhow::Result<()> {
    if args.subs == 0 {
        anyhow::bail!("--request needs at least one responder (--subs)");
    }
    let size = args.size;
    // Responders echo each request's payload.
    let mut responders = JoinSet::new();
    for i in 0..args.subs {
        let client = args
            .reach
            .connect_once(args.sub_node(i), &format!("bench responder {i}"))
            .await?;
        let mut requests = client.subscribe_group(topic.as_str(), RESPONDERS).await?;
        responders.spawn(async move {
            while let Some(batch) = requests.next_batch().await {
                for request in batch {
                    if client
                        .respond(&request, request.payload.clone())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
    }
    let mut requesters = Vec::new();
    for i in 0..args.pubs {
        let client = args
            .reach
            .connect_once(args.nodes.first().copied(), &format!("bench requester {i}"))
            .await?;
        requesters.push(Arc::new(client));
    }
    if !requesters[0]
        .wait_for_interest(topic.as_str(), Duration::from_secs(10))
        .await?
    {
        anyhow::bail!(
            "the responders' subscriptions did not reach the requesters' node within 10 s"
        );
    }
    if args.spread && args.nodes.len() > 1 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let per_requester = args.msgs.div_ceil(u64::from(args.pubs));
    let requests = per_requester * u64::from(args.pubs);
    // With --rate, request i of a requester starts at i / (rate / pubs) s.
    let period = args
        .rate
        .map(|rate| Duration::from_secs_f64(f64::from(args.pubs) / rate as f64));
    let progress = progress_bar(requests);
    let start = Instant::now();
    let mut workers = JoinSet::new();
    for client in &requesters {
        let next = Arc::new(AtomicU64::new(0));
        for _ in 0..args.in_flight {
            let (client, next, topic, progress) = (
                client.clone(),
                next.clone(),
                topic.clone(),
                progress.clone(),
            );
            workers.spawn(async move {
                let payload = Bytes::from(vec![b'r'; size]);
                let (mut outcome, mut rtts) = (Outcome::default(), Latencies::new());
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= per_requester {
                        break;
                    }
                    if let Some(period) = period {
                        tokio::time::sleep_until((start + period.mul_f64(i as f64)).into()).await;
                    }
                    let sent = Instant::now();
                    match client
                        .request(topic.clone(), payload.clone(), REQUEST_TIMEOUT)
                        .await
                    {
                        Ok(_) => {
                            rtts.record(sent.elapsed());
                            outcome.replies += 1;
                        }
                        Err(ClientError::Timeout { .. }) => outcome.timeouts += 1,
                        Err(e) => {
                            outcome.errors += 1;
                            outcome.first_error.get_or_insert(e.to_string());
                        }
                    }
                    progress.inc(1);
                }
                (outcome, rtts)
            });
        }
    }
    let (mut total, mut rtts) = (Outcome::default(), Latencies::new());
    while let Some(done) = workers.join_next().await {
        let (outcome, latencies) = done?;
        total.replies += outcome.replies;
        total.timeouts += outcome.timeouts;
        total.errors += outcome.errors;
        if total.first_error.is_none() {
            total.first_error = outcome.first_error;
        }
        rtts.merge(&latencies);
    }
    let elapsed = start.elapsed();
    progress.finish_and_clear();
    responders.abort_all();
    let report = RequestReport {
        mode: if args.rate.is_some() {
            "latency"
        } else {
            "throughput"
        },
        requesters: args.pubs,
        responders: args.subs,
        in_flight: args.in_flight,
        size,
        nodes: args.nodes.len().max(1),
        requests,
        replies: total.replies,
        timeouts: total.timeouts,
        errors: total.errors,
        requests_per_sec: total.replies as f64 / elapsed.as_secs_f64(),
        elapsed_s: elapsed.as_secs_f64(),
        rtt_p50_us: rtts.percentile(50.0),
        rtt_p90_us: rtts.percentile(90.0),
        rtt_p99_us: rtts.percentile(99.0),
        rtt_p999_us: rtts.percentile(99.9),
        rtt_max_us: rtts.max(),
    };
    if let Some(error) = &total.first_error {
        eprintln!(
            "warning: {} request(s) failed, the first with: {error}",
            total.errors
        );
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "request/reply: {} requester(s) × {} in flight, {} responder(s), {} B, {} node(s)",
            report.requesters, report.in_flight, report.responders, report.size, report.nodes
        );
        println!("  requests    {:>12}", report.requests);
        println!("  replies     {:>12}", report.replies);
        println!("  timeouts    {:>12}", report.timeouts);
        println!("  errors      {:>12}", report.errors);
        println!("  requests/s  {:>12.0}", report.requests_per_sec);
        println!("  elapsed     {:>11.3}s", report.elapsed_s);
        println!(
            "  rtt µs      p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            report.rtt_p50_us,
            report.rtt_p90_us,
            report.rtt_p99_us,
            report.rtt_p999_us,
            report.rtt_max_us
        );
    }
    Ok(())
}

/// A request not answered within this counts as a timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
