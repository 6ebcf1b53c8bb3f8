//! Hostile and broken peers: each gets its connection closed with the
//! documented error code, and the node keeps serving everyone else.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use common::*;
use treescale::identity::Identity;
use treescale::tls::{self, Liveness};
use treescale::trust::{Role, Trust, TrustConfig};
use treescale::wire::{
    ClientRequest, ErrorCode, NodeHello, NodeMessage, OverlayMessage, CLIENT_ALPN,
    DEFAULT_MAX_FRAME, NODE_ALPN, PROTOCOL_VERSION,
};

async fn client_connection(cluster: &TestCluster, node: SocketAddr) -> quinn::Connection {
    connect(node, cluster.raw_client_config(CLIENT_ALPN))
        .await
        .unwrap()
}

/// Sends `bytes` on a fresh bidirectional stream and returns the code the
/// node closed the connection with.
async fn close_code_after(connection: &quinn::Connection, bytes: &[u8]) -> ErrorCode {
    let (mut send, _recv) = connection.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    closed_with(connection).await
}

async fn closed_with(connection: &quinn::Connection) -> ErrorCode {
    let reason = tokio::time::timeout(Duration::from_secs(5), connection.closed())
        .await
        .expect("node closes the connection");
    match reason {
        quinn::ConnectionError::ApplicationClosed(close) => {
            ErrorCode::from_varint(close.error_code).expect("a documented error code")
        }
        other => panic!("closed without an application code: {other}"),
    }
}

fn raw_frame(body: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u32_le(body.len() as u32);
    buf.extend_from_slice(body);
    buf
}

fn hello() -> ClientRequest {
    ClientRequest::Hello {
        version: PROTOCOL_VERSION,
        name: "test".into(),
    }
}

/// The node still serves: a fresh client publishes to a subscriber.
async fn assert_node_serves(cluster: &TestCluster, node: SocketAddr) {
    let client = client(cluster, node).await;
    let mut sub = client.subscribe("still.alive").await.unwrap();
    client.publish("still.alive", "yes").await.unwrap();
    client.flush().await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.payload, "yes".as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_client_frames_close_with_their_codes() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = cluster_for("badclient");
    let node = start_node(&cluster, dir.path()).await;
    let addr = node.addr();

    let cases: Vec<(&str, BytesMut, ErrorCode)> = vec![
        (
            "malformed frame",
            raw_frame(&[0x00]),
            ErrorCode::MalformedFrame,
        ),
        (
            "trailing garbage",
            {
                let mut body = postcard::to_allocvec(&hello()).unwrap();
                body.extend_from_slice(&[1, 2, 3]);
                raw_frame(&body)
            },
            ErrorCode::MalformedFrame,
        ),
        (
            "oversized frame",
            {
                let mut buf = BytesMut::new();
                buf.put_u32_le(DEFAULT_MAX_FRAME as u32 + 1);
                buf
            },
            ErrorCode::FrameTooLarge,
        ),
        (
            "unknown message kind",
            raw_frame(&[0x7f]),
            ErrorCode::UnknownMessage,
        ),
        (
            "protocol version mismatch",
            framed(&ClientRequest::Hello {
                version: 99,
                name: "x".into(),
            }),
            ErrorCode::VersionMismatch,
        ),
        (
            "request before hello",
            framed(&ClientRequest::Status { request: 1 }),
            ErrorCode::HelloRequired,
        ),
        (
            "second hello",
            {
                let mut buf = framed(&hello());
                buf.extend_from_slice(&framed(&hello()));
                buf
            },
            ErrorCode::ProtocolViolation,
        ),
    ];
    for (what, bytes, expected) in cases {
        let connection = client_connection(&cluster, addr).await;
        assert_eq!(
            close_code_after(&connection, &bytes).await,
            expected,
            "{what}"
        );
    }

    // A bad frame on the publish stream, after a good hello.
    let connection = client_connection(&cluster, addr).await;
    let (mut control, _replies) = connection.open_bi().await.unwrap();
    control.write_all(&framed(&hello())).await.unwrap();
    assert_eq!(
        close_code_after(&connection, &raw_frame(&[0x00, 0xff])).await,
        ErrorCode::MalformedFrame
    );

    assert_node_serves(&cluster, addr).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_alpn_fails_the_tls_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = cluster_for("alpn");
    let node = start_node(&cluster, dir.path()).await;
    let config = cluster.raw_client_config(b"imap");
    match connect(node.addr(), config).await {
        Err(quinn::ConnectionError::ConnectionClosed(close)) => {
            // TLS alert 120, no_application_protocol, as a QUIC crypto error.
            assert_eq!(close.error_code, quinn::TransportErrorCode::crypto(120));
        }
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("a connection with an unknown ALPN was accepted"),
    }
    assert_node_serves(&cluster, node.addr()).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialer_refuses_a_node_that_is_not_the_one_announced() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = cluster_for("pinned");
    let node = start_node(&cluster, dir.path()).await;
    let impostor_id = Identity::ephemeral().unwrap().id;
    let me = cluster.issue(Role::Client, "pinner");
    let trust = cluster.trust_anchor();
    let pinned_wrong =
        tls::client_dial_config(Some(&me), &trust, Some(impostor_id), Liveness::default());
    match connect(node.addr(), pinned_wrong).await {
        Err(quinn::ConnectionError::TransportError(error)) => {
            // TLS alert 49, access_denied, raised by our own verifier.
            assert_eq!(error.code, quinn::TransportErrorCode::crypto(49));
        }
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("accepted a certificate that does not match the pinned id"),
    }
    let pinned_right =
        tls::client_dial_config(Some(&me), &trust, Some(node.id()), Liveness::default());
    assert!(connect(node.addr(), pinned_right).await.is_ok());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_node_hellos_are_refused() {
    let cluster = cluster_for("badnode");
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&cluster, dir.path()).await;
    // A node of this cluster, and a client of it posing as a node.
    let stranger = cluster.issue(Role::Node, "stranger");
    let client_identity = cluster.issue(Role::Client, "poser");
    let trust = cluster.trust_anchor();
    let hello = |id, cluster: &str| {
        NodeMessage::Hello(NodeHello {
            version: PROTOCOL_VERSION,
            id,
            name: "stranger".into(),
            cluster: cluster.into(),
        })
    };
    let node_config = || tls::node_dial_config(&stranger, &trust, None, Liveness::default());
    let cases = vec![
        (
            "other cluster",
            node_config(),
            hello(stranger.id, "elsewhere"),
            ErrorCode::ClusterMismatch,
        ),
        (
            "id not matching certificate",
            node_config(),
            hello(node.id(), &cluster.name),
            ErrorCode::IdentityMismatch,
        ),
        (
            "a client's certificate",
            tls::dial_config(
                Some(&client_identity),
                &trust,
                None,
                Liveness::default(),
                NODE_ALPN,
            ),
            hello(client_identity.id, &cluster.name),
            ErrorCode::NotANode,
        ),
        (
            "interest before hello",
            node_config(),
            NodeMessage::Overlay(OverlayMessage::Join),
            ErrorCode::HelloRequired,
        ),
        (
            "version mismatch",
            node_config(),
            NodeMessage::Hello(NodeHello {
                version: PROTOCOL_VERSION + 1,
                id: stranger.id,
                name: "future".into(),
                cluster: cluster.name.clone(),
            }),
            ErrorCode::VersionMismatch,
        ),
    ];
    for (what, config, message, expected) in cases {
        let connection = connect(node.addr(), config).await.unwrap();
        assert_eq!(
            close_code_after(&connection, &framed(&message)).await,
            expected,
            "{what}"
        );
    }
    assert_node_serves(&cluster, node.addr()).await;
    node.shutdown().await;
}

/// Without a CA (`--insecure`) the handshake lets a peer in without a
/// certificate; on the node ALPN the hello is then refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insecure_node_still_wants_a_certificate_from_nodes() {
    let cluster = cluster_for("insecure-nocert");
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&cluster, dir.path());
    config.trust = TrustConfig::Insecure;
    let node = treescale::Node::start(config).await.unwrap();
    let no_certificate =
        tls::dial_config(None, &Trust::Insecure, None, Liveness::default(), NODE_ALPN);
    let connection = connect(node.addr(), no_certificate).await.unwrap();
    let hello = NodeMessage::Hello(NodeHello {
        version: PROTOCOL_VERSION,
        id: Identity::ephemeral().unwrap().id,
        name: "anonymous".into(),
        cluster: cluster.name.clone(),
    });
    assert_eq!(
        close_code_after(&connection, &framed(&hello)).await,
        ErrorCode::CertificateRequired
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_never_take_a_node_down() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = cluster_for("random");
    let node = start_node(&cluster, dir.path()).await;
    let stranger = cluster.issue(Role::Node, "stranger");
    let trust = cluster.trust_anchor();
    for round in 0..60u32 {
        let len = (rand::random::<u32>() % 300) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| rand::random()).collect();
        // Half the time, a plausible length prefix so the body is decoded.
        if round % 2 == 0 && len >= 4 {
            bytes[..4].copy_from_slice(&((len - 4) as u32).to_le_bytes());
        }
        let config = if round % 3 == 0 {
            tls::node_dial_config(&stranger, &trust, None, Liveness::default())
        } else {
            cluster.raw_client_config(CLIENT_ALPN)
        };
        let connection = connect(node.addr(), config).await.unwrap();
        let (mut send, _recv) = connection.open_bi().await.unwrap();
        let _ = send.write_all(&bytes).await;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_millis(500), connection.closed()).await;
        connection.close(0u32.into(), b"done");
    }
    assert_node_serves(&cluster, node.addr()).await;
    node.shutdown().await;
}

#[tokio::test]
async fn a_client_holds_no_more_subscriptions_than_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = cluster_for("sub-limit");
    let mut config = config(&cluster, dir.path());
    config.limits.subscriptions_per_client = 3;
    let node = treescale::Node::start(config).await.unwrap();
    let client = client(&cluster, node.addr()).await;
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(client.subscribe(&format!("t.{i}")).await.unwrap());
    }
    match client.subscribe("t.3").await {
        Err(treescale::ClientError::Refused { error, message }) => {
            assert_eq!(error, treescale::wire::RequestError::TooManySubscriptions);
            assert!(
                message.contains("--max-subscriptions-per-client"),
                "{message}"
            );
        }
        other => panic!(
            "a fourth subscription was not refused: {:?}",
            other.map(|_| ())
        ),
    }
    // Giving one up makes room again (requests reach the node in order).
    held.pop().unwrap().unsubscribe();
    held.push(client.subscribe("t.4").await.unwrap());
    // Another client has its own allowance.
    let other = common::client(&cluster, node.addr()).await;
    other.subscribe("t.0").await.unwrap();
    node.shutdown().await;
}

#[tokio::test]
async fn connections_beyond_the_per_address_limit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = cluster_for("conn-limit");
    let mut config = config(&cluster, dir.path());
    config.limits.connections_per_address = 2;
    let node = treescale::Node::start(config).await.unwrap();
    let first = client(&cluster, node.addr()).await;
    let _second = client(&cluster, node.addr()).await;
    match treescale::Client::connect(cluster.client_options(node.addr())).await {
        Err(treescale::ClientError::Connect { reason, .. }) => {
            assert!(reason.contains("--max-connections-per-address"), "{reason}");
        }
        other => panic!(
            "a third connection was not refused: {:?}",
            other.map(|_| ())
        ),
    }
    // The node still serves the connections it has.
    first.status().await.unwrap();
    // A slot frees when a connection closes.
    first.close().await;
    eventually(Duration::from_secs(5), "a free connection slot", || async {
        treescale::Client::connect(cluster.client_options(node.addr()))
            .await
            .is_ok()
    })
    .await;
    node.shutdown().await;
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_before_it_costs_memory() {
    use common::processes::*;
    use std::process::Stdio;
    let cluster = cluster_for("slow-consumer");
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let log = NodeLog::new();
    let node = spawn_node(
        &cluster,
        &addr,
        "node",
        &["--max-consumer-bytes", "8MiB"],
        &dir,
        &log,
    );
    let pid = node.id();
    let _node = Processes(vec![node]);
    let node_addr: SocketAddr = addr.parse().unwrap();
    let publisher = {
        let mut tries = 0;
        loop {
            match treescale::Client::connect(cluster.client_options(node_addr)).await {
                Ok(client) => break client,
                Err(_) if tries < 50 => tries += 1,
                Err(e) => panic!("node did not start: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    // A subscriber whose output nobody reads: once the pipe is full it
    // stops reading its deliveries.
    let mut slow = treescale(&cluster, &["sub", "--node", &addr, "flood"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(publisher
        .wait_for_interest("flood", Duration::from_secs(10))
        .await
        .unwrap());
    let before = rss(pid);
    let payload = bytes::Bytes::from(vec![b'x'; 256 * 1024]);
    let mut peak = before;
    // 300 events of 256 KiB: 75 MiB for a client that reads none of it.
    for _ in 0..300 {
        publisher.publish("flood", payload.clone()).await.unwrap();
        peak = peak.max(rss(pid));
    }
    publisher.flush().await.unwrap();
    for _ in 0..20 {
        peak = peak.max(rss(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 8 MiB of queued deliveries, QUIC's buffers and the publisher's
    // stream: far below the 75 MiB sent.
    let grown = peak.saturating_sub(before);
    eprintln!("node RSS grew by {} MiB", grown >> 20);
    assert!(grown < 32 << 20, "the node grew by {} MiB", grown >> 20);
    // The node said why it let the subscriber go: its queue passed the
    // bound, or, as publishers wait while it is congested, it read nothing
    // for 2 s. Either way what it never got is counted.
    eventually(
        Duration::from_secs(10),
        "the slow consumer let go",
        || async {
            log.contents()
                .contains("does not read its deliveries; disconnecting it")
        },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "its lost events counted",
        || async { publisher.status().await.unwrap().counters.events_dropped > 0 },
    )
    .await;
    // Reading its output again, the subscriber finds itself disconnected.
    let mut out = slow.stdout.take().unwrap();
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let done = wait_with_timeout(slow, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(!done.status.success());
    assert!(stderr.contains("lost after"), "{stderr}");
    assert!(
        stderr.contains("the node disconnected this client as a slow consumer"),
        "{stderr}"
    );
}

/// A client asking questions of a node that cannot answer (killed, not yet
/// noticed) holds memory on its own node for each: past a bound, the node
/// refuses more until the unanswered ones are forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn questions_without_answers_are_bounded_per_client() {
    use processes::{spawn_nodes, Processes};
    use treescale::wire::RequestError;
    use treescale::ClientError;

    let cluster = cluster_for("questions");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (mut nodes, addrs, _logs) = spawn_nodes(&cluster, 3, &[], &dirs);
    let addrs: Vec<SocketAddr> = addrs.iter().map(|a| a.parse().unwrap()).collect();
    let mut clients = Vec::new();
    for &addr in &addrs {
        clients.push(client(&cluster, addr).await);
    }
    wait_for_tree(&clients.iter().collect::<Vec<_>>(), Duration::from_secs(15)).await;
    let (gone, other) = (clients[1].node_id(), clients[2].node_id());
    let asker = &clients[0];
    // SIGKILL: node 0 notices only after its idle timeout (1 s).
    let mut killed = Processes(vec![nodes.0.remove(1)]);
    killed.0[0].kill().unwrap();
    let asked = futures_util::future::join_all((0..300).map(|_| asker.status_of(gone))).await;
    let refused = |error: RequestError| {
        asked
            .iter()
            .filter(|answer| {
                matches!(answer, Err(ClientError::Refused { error: e, .. }) if *e == error)
            })
            .count()
    };
    let unanswered = asked
        .iter()
        .filter(|answer| matches!(answer, Err(ClientError::NoAnswer { .. })))
        .count();
    assert!(asked.iter().all(Result::is_err), "a dead node answered");
    assert!(unanswered <= 256, "{unanswered} questions held");
    assert!(refused(RequestError::TooManyQuestions) > 0, "no bound");
    assert_eq!(
        unanswered + refused(RequestError::TooManyQuestions) + refused(RequestError::UnknownNode),
        300
    );
    // Forgotten 10 s after they were asked, they no longer count.
    eventually(Duration::from_secs(15), "questions forgotten", || async {
        asker.status_of(other).await.is_ok()
    })
    .await;
}
