//! Browsers' way in: a WebTransport session on the node's QUIC port, with
//! the certificate hash the web side publishes and a token, speaks the
//! client protocol as any client does.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{client, cluster_for, start_node_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use treescale::topic::Topic;
use treescale::trust::PERMISSIONS_FILE;
use treescale::wire::stream::{FrameReader, FrameWriter};
use treescale::wire::{
    ClientReply, ClientRequest, Delivery, EventId, PublishFrame, Published, RequestError,
    DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};

/// GETs `path` from the web side; the response's status line and body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
        addr.port()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// A WebTransport session as a browser opens one: the URL and certificate
/// hash from `/webtransport.json`.
async fn open_session(web: std::net::SocketAddr) -> web_transport_quinn::Session {
    let (status, body) = get(web, "/webtransport.json").await;
    assert!(status.contains("200"), "{status}");
    let found: serde_json::Value = serde_json::from_str(&body).unwrap();
    let hash = found["certHash"].as_str().expect("a hash to accept");
    let hash: Vec<u8> = (0..hash.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hash[i..i + 2], 16).unwrap())
        .collect();
    let url: url::Url = found["url"].as_str().unwrap().parse().unwrap();
    assert_eq!(url.host_str(), Some("127.0.0.1"), "the host the page asked");
    let browser = web_transport_quinn::ClientBuilder::new()
        .with_server_certificate_hashes(vec![hash])
        .unwrap();
    browser.connect(url).await.expect("the session opens")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_session_with_a_token_publishes_and_subscribes() {
    let cluster = cluster_for("web");
    std::fs::write(
        cluster.certs().join(PERMISSIONS_FILE),
        "[users.alice]\npublish = [\"orders.>\"]\nsubscribe = [\"orders.*\"]\n\
         [users.admin]\npublish = [\">\"]\nsubscribe = [\">\"]\n",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = start_node_with(&cluster, dir.path(), |config| {
        config.web = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let web = node.web_addr().expect("--web serves");
    let (status, _) = get(web, "/nothing-here").await;
    assert!(status.contains("404"), "{status}");

    let session = open_session(web).await;
    let (send, recv) = session.open_bi().await.unwrap();
    let mut control = FrameWriter::new(send);
    let mut replies = FrameReader::new(recv, DEFAULT_MAX_FRAME);
    let token = cluster
        .ca()
        .issue_token("alice", Duration::from_secs(3600))
        .unwrap();
    control
        .send(&ClientRequest::HelloWithToken {
            version: PROTOCOL_VERSION,
            name: "page".into(),
            token,
        })
        .await
        .unwrap();
    match replies.next::<ClientReply>().await.unwrap() {
        Some(ClientReply::Welcome { user, node: id, .. }) => {
            assert_eq!(user.as_deref(), Some("alice"));
            assert_eq!(id, node.id());
        }
        other => panic!("expected a welcome, got {other:?}"),
    }
    // The token's user's permissions hold.
    for (sub, pattern) in [(1, "secret.>"), (2, "orders.eu")] {
        let subscribe = ClientRequest::Subscribe {
            sub,
            pattern: pattern.into(),
            group: None,
        };
        control.send(&subscribe).await.unwrap();
    }
    let denied = replies.next::<ClientReply>().await.unwrap();
    assert!(
        matches!(
            denied,
            Some(ClientReply::Error {
                request: 1,
                error: RequestError::PermissionDenied,
                ..
            })
        ),
        "{denied:?}"
    );
    let subscribed = replies.next::<ClientReply>().await.unwrap();
    assert_eq!(subscribed, Some(ClientReply::Subscribed { sub: 2 }));

    // An event from a client over bare QUIC reaches the page...
    let other = client(&cluster, node.addr()).await;
    let mut from_page = other.subscribe("orders.>").await.unwrap();
    other.publish("orders.eu", "to the page").await.unwrap();
    let deliveries = session.accept_uni().await.unwrap();
    let mut deliveries = FrameReader::new(deliveries, DEFAULT_MAX_FRAME);
    let delivered = tokio::time::timeout(Duration::from_secs(5), deliveries.next::<Delivery>())
        .await
        .expect("a delivery in time")
        .unwrap();
    match delivered {
        Some(Delivery::Event { sub: 2, event }) => {
            assert_eq!(&event.payload[..], b"to the page")
        }
        other => panic!("expected the event, got {other:?}"),
    }
    // ...and one from the page reaches it.
    let (send, _recv) = session.open_bi().await.unwrap();
    let mut publish = FrameWriter::new(send);
    let event = Published {
        id: EventId {
            publisher: 7,
            seq: 1,
        },
        topic: Topic::new("orders.us").unwrap(),
        headers: vec![],
        payload: Bytes::from_static(b"from the page"),
    };
    publish.send(&PublishFrame::Event(event)).await.unwrap();
    let received = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let event = from_page.next().await.expect("subscribed");
            if event.topic.as_str() == "orders.us" {
                return event;
            }
        }
    })
    .await
    .expect("the page's event in time");
    assert_eq!(&received.payload[..], b"from the page");
    other.close().await;
    session.close(0, b"done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_session_without_a_valid_token_is_closed_with_token_refused() {
    let cluster = cluster_for("web-refused");
    let dir = tempfile::tempdir().unwrap();
    let node = start_node_with(&cluster, dir.path(), |config| {
        config.web = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let session = open_session(node.web_addr().unwrap()).await;
    let (send, _recv) = session.open_bi().await.unwrap();
    let mut control = FrameWriter::new(send);
    control
        .send(&ClientRequest::HelloWithToken {
            version: PROTOCOL_VERSION,
            name: "page".into(),
            token: "not.a.token".into(),
        })
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), session.closed())
        .await
        .expect("closed in time");
    let why = closed.to_string();
    assert!(why.contains("token refused"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_given_certificate_is_shown_to_browsers_and_on_https() {
    let cluster = cluster_for("web-given");
    let certs = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let given = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_file, key_file) = (certs.path().join("web.crt"), certs.path().join("web.key"));
    std::fs::write(&cert_file, given.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = start_node_with(&cluster, dir.path(), |config| {
        config.web = Some("127.0.0.1:0".parse().unwrap());
        config.web_certificate = Some((cert_file.clone(), key_file.clone()));
    })
    .await;

    // HTTPS with the given certificate; no hash is needed.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(given.der().clone()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(treescale::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let web = node.web_addr().unwrap();
    let tcp = tokio::net::TcpStream::connect(web).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = connector.connect(name, tcp).await.expect("HTTPS with it");
    let request = "GET /webtransport.json HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1;
    let found: serde_json::Value = serde_json::from_str(body).unwrap();
    assert!(found["certHash"].is_null(), "{found}");
    assert_eq!(
        found["url"],
        format!("https://localhost:{}/", node.addr().port())
    );

    // WebTransport shows it too.
    let browser = web_transport_quinn::ClientBuilder::new()
        .with_server_certificates(vec![given.der().clone()])
        .unwrap();
    let url: url::Url = format!("https://127.0.0.1:{}/", node.addr().port())
        .parse()
        .unwrap();
    let session = browser.connect(url).await.expect("the session opens");
    session.close(0, b"done");

    // Files that do not fit together stop the node with a clear error.
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    std::fs::write(&key_file, other.serialize_pem()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(&cluster, dir.path());
    config.web_certificate = Some((cert_file, key_file));
    let error = treescale::Node::start(config).await.err().expect("refused");
    assert!(error.to_string().contains("does not match"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_client_and_the_dashboard_are_served_as_in_the_repo() {
    let cluster = cluster_for("web-scripts");
    let dir = tempfile::tempdir().unwrap();
    let node = start_node_with(&cluster, dir.path(), |config| {
        config.web = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let web = node.web_addr().unwrap();
    // Every module, so one that /treescale.js imports is never missing.
    let sources = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js/src");
    let mut served = 0;
    for file in std::fs::read_dir(&sources).unwrap() {
        let path = file.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let (status, body) = get(web, &format!("/{name}")).await;
        assert!(status.contains("200"), "/{name}: {status}");
        assert_eq!(body, std::fs::read_to_string(&path).unwrap(), "/{name}");
        served += 1;
    }
    assert!(
        served >= 5,
        "treescale.js, the modules it imports, the dashboard"
    );
    let (status, body) = get(web, "/").await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(
        body,
        std::fs::read_to_string(sources.join("dashboard.html")).unwrap()
    );
}
