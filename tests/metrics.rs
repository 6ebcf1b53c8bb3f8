//! `--metrics ADDR`: Prometheus text with the figures `status` shows, and
//! an endpoint that shrugs off bad requests.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn http(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .expect("the endpoint answers")
        .unwrap();
    response
}

/// The value of an unlabelled sample `name` in `text`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_what_status_shows() {
    let cluster = cluster_for("metrics");
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut first = config(&cluster, dirs[0].path());
    first.metrics = Some("127.0.0.1:0".parse().unwrap());
    let a = treescale::Node::start(first).await.unwrap();
    let b = start_node(&cluster, dirs[1].path()).await;
    let metrics = a.metrics_addr().expect("metrics are served");
    let on_a = client(&cluster, a.addr()).await;
    let on_b = client(&cluster, b.addr()).await;
    wait_for_tree(&[&on_a, &on_b], Duration::from_secs(10)).await;
    let mut sub = on_b.subscribe("m.x").await.unwrap();
    assert!(on_a
        .wait_for_interest("m.x", Duration::from_secs(5))
        .await
        .unwrap());
    for i in 0..3 {
        on_a.publish("m.x", format!("{i}")).await.unwrap();
    }
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap();
    }
    // Let an RTT sample be taken (every 500 ms).
    tokio::time::sleep(Duration::from_millis(700)).await;

    let response = http(metrics, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(
        response.contains("application/openmetrics-text"),
        "{response}"
    );
    let status = on_a.status().await.unwrap();
    assert_eq!(status.counters.events_published, 3);
    assert_eq!(
        sample(&response, "treescale_events_published_total"),
        Some(3.0),
        "{response}"
    );
    assert_eq!(
        sample(&response, "treescale_events_forwarded_total"),
        Some(status.counters.events_forwarded as f64),
        "{response}"
    );
    assert_eq!(
        sample(&response, "treescale_links"),
        Some(1.0),
        "{response}"
    );
    assert_eq!(
        sample(&response, "treescale_tree_depth"),
        Some(f64::from(status.depth))
    );
    assert_eq!(
        sample(&response, "treescale_clients"),
        Some(1.0),
        "{response}"
    );
    assert_eq!(
        sample(&response, "treescale_congested_destinations"),
        Some(0.0),
        "{response}"
    );
    let peer = &status.peers[0];
    let dropped = format!(
        "treescale_link_events_dropped_total{{peer=\"{}\",name=\"{}\"}}",
        peer.id.short(),
        peer.name
    );
    assert_eq!(sample(&response, &dropped), Some(0.0), "{response}");
    let rtt_samples = sample(&response, "treescale_link_rtt_seconds_count").unwrap();
    assert!(rtt_samples >= 1.0, "{response}");

    // Bad requests get an HTTP error; the node serves on.
    assert!(http(metrics, b"GET /other HTTP/1.1\r\n\r\n")
        .await
        .starts_with("HTTP/1.1 404"));
    assert!(http(metrics, b"DELETE /metrics HTTP/1.1\r\n\r\n")
        .await
        .starts_with("HTTP/1.1 405"));
    assert!(http(metrics, &[0xff; 9000])
        .await
        .starts_with("HTTP/1.1 400"));
    assert!(http(metrics, b"GET /metrics HTTP/1.1\r\n\r\n")
        .await
        .starts_with("HTTP/1.1 200"));
    on_a.status().await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}
