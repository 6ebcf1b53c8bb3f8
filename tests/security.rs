//! Cluster trust end to end: who gets in, who does not, and what a client
//! may do once in. Each test has its own cluster and its own CA.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use treescale::client::ClientError;
use treescale::identity::Identity;
use treescale::tls::{self, Liveness};
use treescale::trust::{ClusterCa, Role, Trust, TrustConfig, TrustError, PERMISSIONS_FILE};
use treescale::web::certificate::WebCertificate;
use treescale::wire::ErrorCode;
use treescale::wire::{
    frame, ClientReply, ClientRequest, EventId, PublishFrame, PublishRefusal, PublishReply,
    Published, RequestError, RequestFailure, CLIENT_ALPN, PROTOCOL_VERSION,
};
use treescale::{Client, Node, NodeError};

/// The TLS alert a refused handshake ended with. A refused client
/// certificate is only judged after the client's side of the handshake is
/// done, so the connection may open and then close with the alert.
async fn alert(result: Result<quinn::Connection, quinn::ConnectionError>) -> u64 {
    let error = match result {
        Err(error) => error,
        Ok(connection) => tokio::time::timeout(Duration::from_secs(5), connection.closed())
            .await
            .expect("the node closes a connection it refused"),
    };
    let code = match error {
        quinn::ConnectionError::ConnectionClosed(close) => close.error_code,
        quinn::ConnectionError::TransportError(error) => error.code,
        other => panic!("refused without a TLS alert: {other}"),
    };
    let code = u64::from(code);
    assert!((0x100..0x200).contains(&code), "not a TLS alert: {code:#x}");
    code - 0x100
}

// TLS alerts (RFC 8446).
const UNSUPPORTED_CERTIFICATE: u64 = 43;
/// Also sent for a certificate not valid yet ("not currently valid").
const CERTIFICATE_EXPIRED: u64 = 45;
const UNKNOWN_CA: u64 = 48;

/// Says hello on a raw connection (with `token`, if given) and expects the
/// node to close it with TOKEN_REFUSED before any answer; the reason.
async fn refused_hello(
    node: SocketAddr,
    config: quinn::ClientConfig,
    token: Option<&str>,
) -> String {
    let connection = connect(node, config).await.unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    let hello = match token {
        Some(token) => ClientRequest::HelloWithToken {
            version: PROTOCOL_VERSION,
            name: "raw".into(),
            token: token.into(),
        },
        None => ClientRequest::Hello {
            version: PROTOCOL_VERSION,
            name: "raw".into(),
        },
    };
    send.write_all(&framed(&hello)).await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 16))
        .await
        .expect("the node answers or closes");
    assert!(read.is_err(), "the node answered: {read:?}");
    match connection.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(
                ErrorCode::from_varint(close.error_code),
                Some(ErrorCode::TokenRefused)
            );
            String::from_utf8_lossy(&close.reason).into_owned()
        }
        other => panic!("closed otherwise: {other:?}"),
    }
}

/// A certificate from `ca` valid from `from` to `until`, relative to now:
/// rcgen directly, since the CA only issues certificates valid now.
fn certificate_valid(
    ca: &ClusterCa,
    certs: &Path,
    role: Role,
    from: time::Duration,
    until: time::Duration,
) -> Identity {
    let ca_key = std::fs::read_to_string(certs.join("ca.key")).unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(ca.certificate(), ca_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "out of time");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + from;
    params.not_after = now + until;
    params.extended_key_usages = match role {
        Role::Node => vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Role::Client => vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth],
    };
    let cert = params.signed_by(&key, &issuer).unwrap();
    Identity::new(cert.der().clone(), &key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_ca_cannot_join_and_the_cluster_carries_on() {
    let cluster = cluster_for("foreign-ca");
    // The same cluster name on the same LAN, but another CA.
    let impostors = cluster_for("foreign-ca-impostor");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start_node(&cluster, dirs[0].path()).await;
    let b = start_node(&cluster, dirs[1].path()).await;
    let mut foreign_config = config(&cluster, dirs[2].path());
    foreign_config.trust = impostors.trust();
    // mDNS tells it apart by its CA's fingerprint; a static peer makes it
    // dial anyway, so the handshake must refuse it too.
    foreign_config.static_peers = vec![a.addr(), b.addr()];
    let foreign = Node::start(foreign_config).await.unwrap();

    let on_a = client(&cluster, a.addr()).await;
    let on_b = client(&cluster, b.addr()).await;
    wait_for_tree(&[&on_a, &on_b], Duration::from_secs(10)).await;
    // Give the foreign node time for several dial attempts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (client, other) in [(&on_a, b.id()), (&on_b, a.id())] {
        let status = client.status().await.unwrap();
        let peers: Vec<_> = status.peers.iter().map(|p| p.id).collect();
        assert_eq!(peers, vec![other], "only each other");
    }
    let foreign_client = client(&impostors, foreign.addr()).await;
    let alone = foreign_client.status().await.unwrap();
    assert!(alone.peers.is_empty(), "{:?}", alone.peers);
    assert_eq!(alone.root, foreign.id());

    // Events still flow in the real cluster.
    let mut sub = on_b.subscribe("still.ours").await.unwrap();
    assert!(on_a
        .wait_for_interest("still.ours", Duration::from_secs(5))
        .await
        .unwrap());
    on_a.publish("still.ours", "yes").await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.payload, "yes".as_bytes());
    for node in [a, b, foreign] {
        node.shutdown().await;
    }
}

/// Node processes of two CAs under one cluster name, the foreign one told
/// to dial the other: each side logs the other once, however often it
/// tries, and never links.
#[test]
fn a_foreign_node_costs_one_log_line() {
    use common::processes::*;
    let cluster = cluster_for("foreign-log");
    let mut foreign = cluster_for("foreign-log-other");
    foreign.name = cluster.name.clone();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (_ours, addrs, logs) = spawn_nodes(&cluster, 1, &[], &dirs[..1]);
    let their_log = NodeLog::new();
    let their_addr = format!("127.0.0.1:{}", free_port());
    let peer = ["--peer", addrs[0].as_str()];
    let _theirs = Processes(vec![spawn_node(
        &foreign,
        &their_addr,
        "foreign",
        &peer,
        &dirs[1],
        &their_log,
    )]);
    // The foreign node retries its static peer about every second.
    std::thread::sleep(Duration::from_secs(5));
    let ours = logs[0].contents();
    let theirs = their_log.contents();
    let warnings = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains(" WARN "))
            .map(String::from)
            .collect()
    };
    // Ours saw it on mDNS and never dialled it; its dials at us fail on
    // its side, before it shows its certificate.
    let ours_warned = warnings(&ours);
    assert_eq!(ours_warned.len(), 1, "our node's log:\n{ours}");
    assert!(ours_warned[0].contains("with another CA"), "{ours}");
    // It refuses our certificate once per key, not once per attempt.
    let theirs_warned = warnings(&theirs);
    let refusals: Vec<_> = theirs_warned
        .iter()
        .filter(|l| l.contains("refused a peer"))
        .collect();
    assert_eq!(refusals.len(), 1, "the foreign node's log:\n{theirs}");
    assert!(refusals[0].contains("another cluster"), "{theirs}");
    assert!(
        theirs.matches("dial failed").count() >= 2,
        "the foreign node tried only once:\n{theirs}"
    );
    assert!(!ours.contains("linked") && !theirs.contains("linked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_certificate_of_the_cluster_get_nothing() {
    let cluster = cluster_for("unauthenticated");
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&cluster, dir.path()).await;
    let trust = cluster.trust_anchor();

    // No certificate at all: the handshake lets it show a token instead;
    // a hello without one closes the connection, unanswered.
    let anonymous = tls::client_dial_config(None, &trust, None, Liveness::default());
    let refusal = refused_hello(node.addr(), anonymous, None).await;
    assert!(
        refusal.contains("showed no certificate and no token"),
        "{refusal}"
    );
    // A self-signed certificate, or one from another CA: unknown CA.
    let self_signed = Identity::ephemeral().unwrap();
    let config = tls::client_dial_config(Some(&self_signed), &trust, None, Liveness::default());
    assert_eq!(alert(connect(node.addr(), config).await).await, UNKNOWN_CA);
    let elsewhere = cluster_for("unauthenticated-elsewhere");
    let error = Client::connect(elsewhere.client_options(node.addr()))
        .await
        .err()
        .expect("a client of another CA is refused");
    let message = error.to_string();
    assert!(
        message.contains("does not trust the node's certificate")
            || message.contains("refused this client's certificate"),
        "{message}"
    );

    // A client of the cluster is served as before.
    let member = client(&cluster, node.addr()).await;
    assert_eq!(member.user().as_deref(), Some("admin"));
    member.status().await.unwrap();
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_not_yet_valid_certificates_are_refused() {
    let cluster = cluster_for("validity");
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&cluster, dir.path()).await;
    let (ca, trust) = (cluster.ca(), cluster.trust_anchor());
    let day = time::Duration::days(1);
    let expired = |role| certificate_valid(&ca, cluster.certs(), role, -2 * day, -day);
    let early = |role| certificate_valid(&ca, cluster.certs(), role, day, 2 * day);

    let client_config = |identity: &Identity| {
        tls::client_dial_config(Some(identity), &trust, None, Liveness::default())
    };
    let node_config =
        |identity: &Identity| tls::node_dial_config(identity, &trust, None, Liveness::default());
    assert_eq!(
        alert(connect(node.addr(), client_config(&expired(Role::Client))).await).await,
        CERTIFICATE_EXPIRED
    );
    assert_eq!(
        alert(connect(node.addr(), node_config(&expired(Role::Node))).await).await,
        CERTIFICATE_EXPIRED
    );
    assert_eq!(
        alert(connect(node.addr(), client_config(&early(Role::Client))).await).await,
        CERTIFICATE_EXPIRED
    );
    assert_eq!(
        alert(connect(node.addr(), node_config(&early(Role::Node))).await).await,
        CERTIFICATE_EXPIRED
    );
    // The same CA's certificates valid now get in and are greeted.
    let current = cluster.issue(Role::Client, "current");
    let (_, _, _, welcome) = raw_session(node.addr(), &current, &trust).await;
    assert!(
        matches!(welcome, ClientReply::Welcome { .. }),
        "{welcome:?}"
    );

    // A node whose own certificate expired says so at start.
    let offline = tempfile::tempdir().unwrap();
    let stale = certificate_valid(&ca, cluster.certs(), Role::Node, -2 * day, -day);
    let node_dir = tempfile::tempdir().unwrap();
    write_offline_node(node_dir.path(), &stale, offline.path(), &ca);
    let mut config = config(&cluster, node_dir.path());
    config.trust = TrustConfig::Dir(offline.path().to_path_buf());
    match Node::start(config).await {
        Err(NodeError::Trust(TrustError::InvalidCertificate { reason, .. })) => {
            assert!(reason.contains("expired"), "{reason}")
        }
        other => panic!(
            "a node with an expired certificate started: {:?}",
            other.err()
        ),
    }
    node.shutdown().await;
}

/// Sets up a node the way `certs issue node` does for a machine without the
/// CA key: its key and certificate in `data_dir`, only ca.crt in `certs`.
fn write_offline_node(data_dir: &Path, identity: &Identity, certs: &Path, ca: &ClusterCa) {
    use rustls::pki_types::PrivateKeyDer;
    let PrivateKeyDer::Pkcs8(key) = identity.private_key() else {
        unreachable!("identities hold PKCS#8 keys")
    };
    let key = rcgen::KeyPair::try_from(key.secret_pkcs8_der()).unwrap();
    std::fs::write(data_dir.join("node.key"), key.serialize_pem()).unwrap();
    let cert = treescale::trust::pem_of("CERTIFICATE", &identity.certificate);
    std::fs::write(data_dir.join("node.crt"), cert).unwrap();
    std::fs::write(certs.join("ca.crt"), ca.certificate_pem()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_without_the_ca_key_runs_a_node_issued_offline() {
    let cluster = cluster_for("offline");
    let dir = tempfile::tempdir().unwrap();
    let with_key = start_node(&cluster, dir.path()).await;
    let ca = cluster.ca();

    // Nothing issued yet: a clear error naming the command to run.
    let certs = tempfile::tempdir().unwrap();
    std::fs::write(certs.path().join("ca.crt"), ca.certificate_pem()).unwrap();
    let bare = tempfile::tempdir().unwrap();
    let mut config = config(&cluster, bare.path());
    config.trust = TrustConfig::Dir(certs.path().to_path_buf());
    let error = Node::start(config.clone())
        .await
        .err()
        .expect("no certificate");
    assert!(
        error.to_string().contains("treescale certs issue node"),
        "{error}"
    );

    // Issued on the CA's machine, then moved here: it joins.
    let issued = cluster.issue(Role::Node, "offline");
    write_offline_node(bare.path(), &issued, certs.path(), &ca);
    config.static_peers = vec![with_key.addr()];
    let without_key = Node::start(config).await.unwrap();
    assert_eq!(without_key.id(), issued.id);
    let clients = [
        client(&cluster, with_key.addr()).await,
        client(&cluster, without_key.addr()).await,
    ];
    wait_for_tree(&[&clients[0], &clients[1]], Duration::from_secs(10)).await;
    with_key.shutdown().await;
    without_key.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_nodes_on_a_machine_make_one_ca_and_clients_just_work() {
    let name = cluster_for("zero-config").name.clone();
    let certs = tempfile::tempdir().unwrap();
    let certs_dir = certs.path().join("treescale/certs");
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let zero_config = |data_dir: &Path| {
        let mut config = treescale::NodeConfig::new(data_dir);
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.cluster = name.clone();
        config.interfaces = vec!["lo".to_string()];
        config.trust = TrustConfig::Dir(certs_dir.clone());
        config
    };
    // Both start at once on a machine with no CA: one CA comes out.
    let (a, b) = tokio::join!(
        Node::start(zero_config(dirs[0].path())),
        Node::start(zero_config(dirs[1].path())),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let ca = ClusterCa::load(&certs_dir).unwrap().expect("a CA was made");
    assert!(ca.can_issue());
    let options = |addr| treescale::ClientOptions {
        trust: TrustConfig::Dir(certs_dir.clone()),
        ..treescale::ClientOptions::to_node(addr)
    };
    let on_a = Client::connect(options(a.addr())).await.unwrap();
    let on_b = Client::connect(options(b.addr())).await.unwrap();
    wait_for_tree(&[&on_a, &on_b], Duration::from_secs(10)).await;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(certs_dir.join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "ca.key is readable by others: {mode:o}");
    }

    // A data dir whose node belongs to a CA, with that CA gone from the
    // certs dir: no new CA (it would split the cluster), a clear error.
    a.shutdown().await;
    b.shutdown().await;
    std::fs::remove_dir_all(&certs_dir).unwrap();
    match Node::start(zero_config(dirs[0].path())).await {
        Err(NodeError::Trust(TrustError::WouldSplit { .. })) => {}
        other => panic!("expected WouldSplit, got {:?}", other.err()),
    }
    assert!(!certs_dir.join("ca.key").exists());
}

/// A raw client connection with `identity`, greeted: the control stream,
/// the publish stream, and the welcome.
async fn raw_session(
    node: SocketAddr,
    identity: &Identity,
    trust: &Trust,
) -> (
    quinn::Connection,
    (quinn::SendStream, quinn::RecvStream),
    (quinn::SendStream, quinn::RecvStream),
    ClientReply,
) {
    let config = tls::dial_config(
        Some(identity),
        trust,
        None,
        Liveness::default(),
        CLIENT_ALPN,
    );
    let connection = connect(node, config).await.unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&framed(&ClientRequest::Hello {
        version: PROTOCOL_VERSION,
        name: "raw".into(),
    }))
    .await
    .unwrap();
    let welcome = read_one::<ClientReply>(&mut recv).await;
    let publish = connection.open_bi().await.unwrap();
    (connection, (send, recv), publish, welcome)
}

async fn read_one<T: frame::Message>(recv: &mut quinn::RecvStream) -> T {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    recv.read_exact(&mut body).await.unwrap();
    frame::decode(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_may_do_only_what_its_permissions_grant() {
    let cluster = cluster_for("permissions");
    std::fs::write(
        cluster.certs().join(PERMISSIONS_FILE),
        r#"
            [users.admin]
            publish = [">"]
            subscribe = [">"]

            [users.alice]
            publish = ["orders.>"]
            subscribe = ["orders.*"]

            [users.bob]
            subscribe = ["svc.*"]
        "#,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&cluster, dir.path()).await;
    let admin = client(&cluster, node.addr()).await;
    let mut everything = admin.subscribe(">").await.unwrap();

    // The library refuses a denied at-most-once event at once, from the
    // grant in the node's welcome; the node answers the rest.
    let alice_dir = tempfile::tempdir().unwrap();
    let alice_identity = cluster.issue(Role::Client, "alice");
    write_client_certs(alice_dir.path(), &alice_identity, &cluster.ca());
    let alice = Client::connect(treescale::ClientOptions {
        trust: TrustConfig::Dir(alice_dir.path().to_path_buf()),
        ..treescale::ClientOptions::to_node(node.addr())
    })
    .await
    .unwrap();
    assert_eq!(alice.user().as_deref(), Some("alice"));
    match alice.publish("billing.eu", "no").await {
        Err(ClientError::PermissionDenied(message)) => {
            assert!(
                message.contains("\"alice\" may not publish to billing.eu"),
                "{message}"
            );
            assert!(message.contains("allowed: orders.>"), "{message}");
        }
        other => panic!("denied publish went out: {other:?}"),
    }
    match alice.subscribe("orders.>").await {
        Err(ClientError::Refused { error, message }) => {
            assert_eq!(error, RequestError::PermissionDenied);
            assert!(message.contains("allowed: orders.*"), "{message}");
        }
        other => panic!("denied subscribe: {:?}", other.map(|_| ())),
    }
    match alice
        .publish_at_least_once("billing.eu", Vec::new(), "no")
        .await
        .unwrap()
        .confirmed()
        .await
    {
        Err(ClientError::PublishRefused { reason, .. }) => {
            assert_eq!(reason, PublishRefusal::PermissionDenied)
        }
        other => panic!("denied at-least-once event: {other:?}"),
    }
    match alice
        .request("billing.eu", "no", Duration::from_secs(5))
        .await
    {
        Err(ClientError::PermissionDenied(message)) => {
            assert!(
                message.contains("\"alice\" may not publish to billing.eu"),
                "{message}"
            );
        }
        other => panic!("denied request went out: {other:?}"),
    }
    alice.subscribe("orders.eu").await.unwrap();
    // Answering a request needs no permission to publish: bob may only
    // subscribe.
    let bob_dir = tempfile::tempdir().unwrap();
    write_client_certs(
        bob_dir.path(),
        &cluster.issue(Role::Client, "bob"),
        &cluster.ca(),
    );
    let bob = Client::connect(treescale::ClientOptions {
        trust: TrustConfig::Dir(bob_dir.path().to_path_buf()),
        ..treescale::ClientOptions::to_node(node.addr())
    })
    .await
    .unwrap();
    let mut time_requests = bob.subscribe("svc.time").await.unwrap();
    let answering = async {
        let request = time_requests.next().await.unwrap();
        bob.respond(&request, "noon").await.unwrap();
    };
    let (answer, ()) = tokio::join!(
        admin.request("svc.time", "?", Duration::from_secs(5)),
        answering
    );
    assert_eq!(answer.unwrap().payload, "noon".as_bytes());
    // The subscriber of everything saw the request too (answers go only
    // to the requester).
    let seen = everything.next().await.unwrap();
    assert!(seen.payload == "?".as_bytes() && seen.reply.is_some());
    // A user nobody listed, with no [default]: nothing at all.
    let mallory_dir = tempfile::tempdir().unwrap();
    write_client_certs(
        mallory_dir.path(),
        &cluster.issue(Role::Client, "mallory"),
        &cluster.ca(),
    );
    let mallory = Client::connect(treescale::ClientOptions {
        trust: TrustConfig::Dir(mallory_dir.path().to_path_buf()),
        ..treescale::ClientOptions::to_node(node.addr())
    })
    .await
    .unwrap();
    assert!(mallory.grant().publish.is_empty() && mallory.grant().subscribe.is_empty());
    assert!(matches!(
        mallory.publish("orders.eu", "no").await,
        Err(ClientError::PermissionDenied(_))
    ));
    assert!(matches!(
        mallory.subscribe("orders.eu").await,
        Err(ClientError::Refused {
            error: RequestError::PermissionDenied,
            ..
        })
    ));

    // The node enforces it for a client that skips the library's check,
    // at-most-once events included.
    let trust = cluster.trust_anchor();
    let (_connection, (mut control, mut replies), (mut publish, mut publish_replies), welcome) =
        raw_session(node.addr(), &alice_identity, &trust).await;
    assert!(matches!(welcome, ClientReply::Welcome { user: Some(ref u), .. } if u == "alice"));
    control
        .write_all(&framed(&ClientRequest::Subscribe {
            sub: 7,
            pattern: "billing.>".into(),
            group: None,
        }))
        .await
        .unwrap();
    match read_one::<ClientReply>(&mut replies).await {
        ClientReply::Error {
            request,
            error,
            message,
        } => {
            assert_eq!((request, error), (7, RequestError::PermissionDenied));
            assert!(message.contains("billing.>"), "{message}");
        }
        other => panic!("denied subscribe answered {other:?}"),
    }
    let event = |seq, topic: &str, payload: &'static str| Published {
        id: EventId { publisher: 42, seq },
        topic: topic.parse().unwrap(),
        headers: Vec::new(),
        payload: payload.into(),
    };
    let mut frames = Vec::new();
    for frame in [
        PublishFrame::Event(event(1, "billing.eu", "dropped")),
        PublishFrame::AtLeastOnce(event(2, "billing.eu", "refused")),
        PublishFrame::Request {
            event: event(4, "billing.eu", "denied"),
            request: 11,
        },
        PublishFrame::Event(event(3, "orders.eu", "allowed")),
        PublishFrame::Flush(9),
    ] {
        frames.extend(framed(&frame));
    }
    publish.write_all(&frames).await.unwrap();
    match read_one::<PublishReply>(&mut publish_replies).await {
        PublishReply::Refused { seq, reason, .. } => {
            assert_eq!((seq, reason), (2, PublishRefusal::PermissionDenied))
        }
        other => panic!("denied at-least-once event answered {other:?}"),
    }
    match read_one::<PublishReply>(&mut publish_replies).await {
        PublishReply::RequestFailed {
            request, reason, ..
        } => assert_eq!((request, reason), (11, RequestFailure::PermissionDenied)),
        other => panic!("denied request answered {other:?}"),
    }
    assert_eq!(
        read_one::<PublishReply>(&mut publish_replies).await,
        PublishReply::Flushed(9)
    );
    // Only the allowed event reached the subscriber of everything.
    let first = tokio::time::timeout(Duration::from_secs(5), everything.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.payload, "allowed".as_bytes());
    admin.flush().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), everything.next())
            .await
            .is_err(),
        "a denied event was delivered"
    );
    // Only what reached the node counts: alice's subscribe and
    // at-least-once event, mallory's subscribe, and the raw session's
    // four (the library kept the at-most-once ones and the request back).
    let denied = admin.status().await.unwrap().counters.operations_denied;
    assert_eq!(denied, 7);
    node.shutdown().await;
}

/// A client's certs dir as `certs issue client` writes it.
fn write_client_certs(dir: &Path, identity: &Identity, ca: &ClusterCa) {
    let key = identity.private_key();
    let pem = |label, der: &[u8]| treescale::trust::pem_of(label, der);
    std::fs::write(dir.join("ca.crt"), ca.certificate_pem()).unwrap();
    std::fs::write(
        dir.join("client.crt"),
        pem("CERTIFICATE", &identity.certificate),
    )
    .unwrap();
    std::fs::write(dir.join("client.key"), pem("PRIVATE KEY", key.secret_der())).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_serve_as_a_node() {
    // A client certificate cannot even be a node's server side: a node
    // dialling it refuses the handshake. (On the node ALPN as a dialler it
    // gets NOT_A_NODE: tests/bad_input.rs.)
    let cluster = cluster_for("client-as-server");
    let client_identity = cluster.issue(Role::Client, "poser");
    let trust = cluster.trust_anchor();
    let web = WebCertificate::made(tls::provider(), std::time::SystemTime::now()).unwrap();
    let server = tls::server_config(&client_identity, &trust, Liveness::default(), web.into());
    let endpoint = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let _ = incoming.await;
        }
    });
    let node_identity = cluster.issue(Role::Node, "dialler");
    let dial = tls::node_dial_config(&node_identity, &trust, None, Liveness::default());
    assert_eq!(
        alert(connect(addr, dial).await).await,
        UNSUPPORTED_CERTIFICATE
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_stands_in_for_a_certificate_and_bad_ones_are_refused() {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    let cluster = cluster_for("tokens");
    std::fs::write(
        cluster.certs().join(PERMISSIONS_FILE),
        "[users.alice]\npublish = [\"orders.>\"]\nsubscribe = [\"orders.*\"]\n",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&cluster, dir.path()).await;
    // The token holder has the CA's certificate only.
    let holder = tempfile::tempdir().unwrap();
    std::fs::write(holder.path().join("ca.crt"), cluster.ca().certificate_pem()).unwrap();
    let with_token = |token: &str| treescale::ClientOptions {
        trust: TrustConfig::Dir(holder.path().to_path_buf()),
        token: Some(token.to_string()),
        ..treescale::ClientOptions::to_node(node.addr())
    };
    let hour = Duration::from_secs(3600);
    let token = cluster.ca().issue_token("alice", hour).unwrap();
    let alice = Client::connect(with_token(&token)).await.unwrap();
    assert_eq!(alice.user().as_deref(), Some("alice"));
    match alice.subscribe("secret.>").await {
        Err(ClientError::Refused { error, .. }) => {
            assert_eq!(error, RequestError::PermissionDenied)
        }
        other => panic!("a denied subscribe: {:?}", other.map(|_| ())),
    }
    let mut orders = alice.subscribe("orders.eu").await.unwrap();
    alice.publish("orders.eu", "by token").await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), orders.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&event.payload[..], b"by token");
    alice.close().await;

    let refused = |options| async move {
        let error = Client::connect(options)
            .await
            .err()
            .expect("the node refuses the token");
        let message = error.to_string();
        assert!(
            message.contains("refused this client: token refused: "),
            "{message}"
        );
        message
    };
    let expired = cluster
        .ca()
        .issue_token("alice", Duration::from_secs(1))
        .unwrap();
    // Valid for a second at most: whole seconds are compared.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let message = refused(with_token(&expired)).await;
    assert!(message.contains("the token expired"), "{message}");

    let elsewhere = cluster_for("tokens-elsewhere");
    let theirs = elsewhere.ca().issue_token("alice", hour).unwrap();
    let message = refused(with_token(&theirs)).await;
    assert!(message.contains("another cluster's CA"), "{message}");

    let parts: Vec<&str> = token.split('.').collect();
    let claims = String::from_utf8(URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    let as_admin = URL_SAFE_NO_PAD.encode(claims.replace("\"alice\"", "\"admin\""));
    let tampered = format!("{}.{as_admin}.{}", parts[0], parts[2]);
    let message = refused(with_token(&tampered)).await;
    assert!(message.contains("altered, or forged"), "{message}");

    let message = refused(with_token("not-a-token")).await;
    assert!(message.contains("malformed token"), "{message}");

    // The refusal is TOKEN_REFUSED on the wire, for clients in any language.
    let anonymous =
        tls::client_dial_config(None, &cluster.trust_anchor(), None, Liveness::default());
    let reason = refused_hello(node.addr(), anonymous, Some(&expired)).await;
    assert!(
        reason.starts_with("token refused: the token expired"),
        "{reason}"
    );

    // A read-only token: alice, who may subscribe to orders.* with her
    // full token, may only look with this one.
    let look = cluster
        .ca()
        .issue_scoped_token("alice", treescale::trust::TokenScope::ReadOnly, hour)
        .unwrap();
    let viewer = Client::connect(with_token(&look)).await.unwrap();
    assert_eq!(viewer.user().as_deref(), Some("alice"));
    assert_eq!(viewer.status().await.unwrap().id, node.id());
    match viewer.subscribe("orders.eu").await {
        Err(ClientError::Refused { error, .. }) => {
            assert_eq!(error, RequestError::PermissionDenied)
        }
        other => panic!("a read-only subscribe: {:?}", other.map(|_| ())),
    }
    assert!(matches!(
        viewer.publish("orders.eu", "no").await,
        Err(ClientError::PermissionDenied(_))
    ));
    viewer.close().await;
    node.shutdown().await;
}
