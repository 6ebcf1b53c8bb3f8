//! Durable throughput, TreeScale beside NATS JetStream, in one run on one
//! machine:
//!
//! ```text
//! cargo bench --bench durable            # 100,000 events of 128 B and of 1 KiB
//! cargo bench --bench durable -- 20000   # another count
//! ```
//!
//! For each size it measures, on each system:
//! - publish-acknowledged: a publisher with up to 16,384 unconfirmed
//!   events, until the last confirmation (TreeScale fsyncs before it
//!   confirms; JetStream with default settings does not);
//! - consume-acknowledged: a durable subscriber (a JetStream pull consumer)
//!   reading the stored events back, acknowledging every 256th
//!   cumulatively, until the last.
//!
//! Each system runs as its own process on 127.0.0.1 with its data (and
//! TreeScale's cluster CA) in a temporary dir. JetStream needs `nats-server` on the PATH (Debian:
//! `apt-get install nats-server`); without it only TreeScale runs.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{free_port, Killed};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use treescale::trust::TrustConfig;
use treescale::{Client, ClientOptions, DurableOptions};

const WINDOW: usize = 16384;
const ACK_EVERY: u64 = 256;

/// Events per second of `n` events done in `elapsed`.
fn rate(n: u64, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

async fn treescale(n: u64, size: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _node = Killed(
        Command::new(env!("CARGO_BIN_EXE_treescale"))
            .args(["node", "--no-mdns", "--listen", &addr, "--data-dir"])
            .arg(dir.path().join("node"))
            .arg("--certs")
            .arg(dir.path().join("certs"))
            .args(["--cluster", &format!("bench-{port}")])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = Client::connect(ClientOptions {
        trust: TrustConfig::Dir(dir.path().join("certs")),
        ..ClientOptions::to_node(addr.parse().unwrap())
    })
    .await
    .unwrap();
    drop(
        client
            .subscribe_durable("bench", "bench.>", DurableOptions::default())
            .await
            .unwrap(),
    );
    let payload = Bytes::from(vec![b'x'; size]);

    let (tx, mut rx) = mpsc::unbounded_channel::<treescale::Confirmation>();
    let confirm = tokio::spawn(async move {
        while let Some(confirmation) = rx.recv().await {
            confirmation.confirmed().await.unwrap();
        }
    });
    let start = Instant::now();
    for _ in 0..n {
        let confirmation = client
            .publish_at_least_once("bench.x", Vec::new(), payload.clone())
            .await
            .unwrap();
        tx.send(confirmation).unwrap();
    }
    drop(tx);
    confirm.await.unwrap();
    let publish = rate(n, start.elapsed());

    let start = Instant::now();
    let mut durable = client
        .subscribe_durable("bench", "bench.>", DurableOptions::default())
        .await
        .unwrap();
    for _ in 0..n {
        let event = durable.next().await.unwrap();
        if event.position % ACK_EVERY == 0 || event.position == n {
            durable.ack(event.position);
        }
    }
    let consume = rate(n, start.elapsed());
    drop(durable);
    client.close().await;
    (publish, consume)
}

async fn jetstream(n: u64, size: usize) -> Option<(f64, f64)> {
    use async_nats::jetstream::{self, consumer, stream};

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let _server = Killed(server);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = async_nats::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let js = jetstream::new(client);
    let stream = js
        .create_stream(stream::Config {
            name: "bench".into(),
            subjects: vec!["bench.>".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
    let payload = Bytes::from(vec![b'x'; size]);

    let (tx, mut rx) = mpsc::channel::<jetstream::context::PublishAckFuture>(WINDOW);
    let confirm = tokio::spawn(async move {
        while let Some(ack) = rx.recv().await {
            ack.await.unwrap();
        }
    });
    let start = Instant::now();
    for _ in 0..n {
        let ack = js.publish("bench.x", payload.clone()).await.unwrap();
        tx.send(ack).await.unwrap();
    }
    drop(tx);
    confirm.await.unwrap();
    let publish = rate(n, start.elapsed());

    let start = Instant::now();
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("bench".into()),
            ack_policy: consumer::AckPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    for i in 1..=n {
        let message = messages.next().await.unwrap().unwrap();
        if i % ACK_EVERY == 0 || i == n {
            message.ack().await.unwrap();
        }
    }
    let consume = rate(n, start.elapsed());
    Some((publish, consume))
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; a bare number is the event count.
    let n: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    println!("durable throughput, {n} events per run, msg/s (higher is better)\n");
    println!(
        "{:<8} {:<22} {:>12} {:>12} {:>8}",
        "size", "measure", "TreeScale", "JetStream", "ratio"
    );
    for size in [128, 1024] {
        let (ts_pub, ts_con) = treescale(n, size).await;
        let js = jetstream(n, size).await;
        for (measure, ts, js) in [
            ("publish-acknowledged", ts_pub, js.map(|j| j.0)),
            ("consume-acknowledged", ts_con, js.map(|j| j.1)),
        ] {
            let (js_text, ratio) = match js {
                Some(js) => (format!("{js:.0}"), format!("{:.2}x", ts / js)),
                None => ("no nats-server".into(), "-".into()),
            };
            println!(
                "{:<8} {:<22} {:>12.0} {:>12} {:>8}",
                format!("{size} B"),
                measure,
                ts,
                js_text,
                ratio
            );
        }
    }
}
