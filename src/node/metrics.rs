//! `--metrics ADDR`: the node's figures for Prometheus, over plain HTTP.
//!
//! A scrape asks the driver for the same status `treescale status --json`
//! shows and encodes it with prometheus-client, so the two always agree.
//! Link RTTs are also observed into a histogram every half second.

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use super::Input;
use crate::wire::NodeStatus;

/// The largest request head read; anything longer is refused.
const MAX_REQUEST: usize = 8192;
/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Metrics kept over time; everything else is read at each scrape.
#[derive(Clone)]
pub struct Metrics {
    /// Round-trip time of every link, sampled every half second.
    pub link_rtt: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            // 50 µs to about 1.6 s.
            link_rtt: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
        }
    }
}

/// Serves `GET /metrics` on `listener` until the node stops.
pub async fn serve(listener: TcpListener, inbox: mpsc::Sender<Input>, metrics: Metrics) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (inbox, metrics) = (inbox.clone(), metrics.clone());
        tokio::spawn(async move {
            let _ = answer(stream, &inbox, &metrics).await;
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    inbox: &mpsc::Sender<Input>,
    metrics: &Metrics,
) -> std::io::Result<()> {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => head,
        _ => {
            return respond(
                &mut stream,
                "400 Bad Request",
                "text/plain",
                "bad request\n",
            )
            .await
        }
    };
    let mut parts = head.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics")) => {}
        (Some("GET"), Some(_)) => {
            return respond(&mut stream, "404 Not Found", "text/plain", "try /metrics\n").await
        }
        _ => {
            return respond(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                "GET only\n",
            )
            .await
        }
    }
    let (reply, status) = oneshot::channel();
    let status = match inbox.send(Input::Scrape { reply }).await {
        Ok(()) => status.await.ok(),
        Err(_) => None,
    };
    let Some(status) = status else {
        let unavailable = "503 Service Unavailable";
        return respond(&mut stream, unavailable, "text/plain", "stopping\n").await;
    };
    let body = exposition(&status, metrics);
    respond(
        &mut stream,
        "200 OK",
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        &body,
    )
    .await
}

/// The request head, up to the blank line; `None` if it is too long or
/// the connection ends first.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_REQUEST {
            return Ok(None);
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(Some(String::from_utf8_lossy(&head).into_owned()))
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The status and the kept metrics in the OpenMetrics text format.
pub fn exposition(status: &NodeStatus, metrics: &Metrics) -> String {
    let mut registry = Registry::with_prefix("treescale");
    let c = &status.counters;
    for (name, help, value) in [
        (
            "events_published",
            "Events published by this node's clients",
            c.events_published,
        ),
        (
            "events_received",
            "Events received from other nodes",
            c.events_received,
        ),
        (
            "events_forwarded",
            "Events sent on to other nodes",
            c.events_forwarded,
        ),
        (
            "events_delivered",
            "Events handed to this node's clients' connections",
            c.events_delivered,
        ),
        (
            "events_dropped",
            "Events dropped: a link's or client's queue was full, or a client left with events queued",
            c.events_dropped,
        ),
        (
            "events_unroutable",
            "Directed events for a node this tree does not hold",
            c.events_unroutable,
        ),
        (
            "events_stored",
            "Events added to durable subscriptions' queues here",
            c.events_stored,
        ),
        (
            "events_refused",
            "At-least-once events refused to publishers",
            c.events_refused,
        ),
        (
            "events_redelivered",
            "Durable deliveries sent again for want of an ack",
            c.events_redelivered,
        ),
        (
            "operations_denied",
            "Publishes and subscriptions refused by permissions",
            c.operations_denied,
        ),
        (
            "publishes_throttled",
            "Times a client waited on --max-pending-publishes",
            c.publishes_throttled,
        ),
        (
            "requests_without_responders",
            "Requests answered at once with no responders",
            c.requests_without_responders,
        ),
        (
            "replies_undeliverable",
            "Answers whose requester had gone (or never was)",
            c.replies_undeliverable,
        ),
        (
            "events_replayed",
            "Events sent again from the replay window after a repair",
            c.events_replayed,
        ),
        (
            "replays_filled",
            "Replayed events that were new here: gaps a repair had left",
            c.replays_filled,
        ),
    ] {
        let counter: Counter = Counter::default();
        counter.inc_by(value);
        registry.register(name, help, counter);
    }
    let children = status.peers.iter().filter(|p| p.role == "child").count();
    for (name, help, value) in [
        (
            "tree_depth",
            "Depth of this node in the tree; 0 at the root",
            u64::from(status.depth),
        ),
        (
            "subtree_nodes",
            "Nodes in this node's subtree, itself included",
            u64::from(status.subtree),
        ),
        (
            "children",
            "Children of this node in the tree",
            children as u64,
        ),
        (
            "links",
            "Nodes this node has a connection to",
            status.peers.len() as u64,
        ),
        (
            "connections",
            "Open QUIC connections, nodes and clients",
            status.connections,
        ),
        ("clients", "Connected clients", status.clients),
        (
            "subscriptions",
            "Patterns and queue groups this node routes",
            status.subscriptions.len() as u64,
        ),
        (
            "outbox_events",
            "At-least-once events held for durable subscriptions elsewhere",
            status.outbox,
        ),
        (
            "congested_destinations",
            "Clients and links a quarter of whose bound waits for them; while any is, publishers are held back",
            status.congested,
        ),
    ] {
        let gauge: Gauge = Gauge::default();
        gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        registry.register(name, help, gauge);
    }
    // Per linked node: what waits for it and what was dropped for it.
    let dropped = Family::<Vec<(String, String)>, Counter>::default();
    let queued = Family::<Vec<(String, String)>, Gauge>::default();
    for peer in &status.peers {
        let labels = vec![
            ("peer".to_string(), peer.id.short()),
            ("name".to_string(), peer.name.clone()),
        ];
        dropped.get_or_create(&labels).inc_by(peer.events_dropped);
        queued
            .get_or_create(&labels)
            .set(i64::try_from(peer.queued_bytes).unwrap_or(i64::MAX));
    }
    registry.register(
        "link_events_dropped",
        "Events dropped for a linked node that fell --max-link-bytes behind",
        dropped,
    );
    registry.register(
        "link_queued_bytes",
        "Bytes of events waiting to be written to a linked node",
        queued,
    );
    registry.register(
        "link_rtt_seconds",
        "Round-trip time of each link, sampled every 500 ms",
        metrics.link_rtt.clone(),
    );
    let mut text = String::new();
    encode(&mut text, &registry).expect("writing to a String cannot fail");
    text
}
