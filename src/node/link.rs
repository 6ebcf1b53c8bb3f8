//! Node-to-node connections: dialling, the hello exchange, and the tasks
//! that move frames between a connection's streams and the driver.
//!
//! Each connection has one bidirectional control stream, opened by the
//! dialer, and one unidirectional event stream per direction, opened on the
//! first event. The control stream has the higher send priority, so
//! membership and interest never wait behind a burst of events.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::connection::{
    close_for, refuse_second_hello, run_until_closed, write_frame_batches_on_uni, RateLimitedLog,
    HELLO_TIMEOUT,
};
use super::pressure::{Backlog, Source, CONGESTED_SHARE};
use super::{Input, Shared};
use crate::identity::NodeId;
use crate::overlay::DialTarget;
use crate::tls;
use crate::trust::{self, Role, Trust};
use crate::wire::stream::{
    write_each, FrameBatch, FrameReader, FrameWriter, SendStream, StreamError,
};
use crate::wire::{ErrorCode, NodeEventFrame, NodeHello, NodeMessage, PROTOCOL_VERSION};

/// Control stream priority above the event streams' default of 0.
const CONTROL_PRIORITY: i32 = 10;

/// The driver's handle on one live node connection.
pub struct LinkHandle {
    /// Tells this connection apart from an earlier or duplicate one.
    pub conn_id: u64,
    pub connection: quinn::Connection,
    pub hello: NodeHello,
    pub control: mpsc::UnboundedSender<NodeMessage>,
    /// Bounded in bytes through `backlog` (`--max-link-bytes`): past it,
    /// batches are dropped, so a stalled peer costs bounded memory.
    pub events: mpsc::UnboundedSender<FrameBatch>,
    /// Event batches handed over and not yet written to the stream.
    pub backlog: Arc<Backlog>,
    /// Bytes of the last batch encoded for it: room for the next.
    pub last_batch: usize,
    /// Events dropped for this link, and when that was last logged.
    pub dropped: RateLimitedLog,
}

impl LinkHandle {
    pub fn close(&self, code: ErrorCode) {
        self.connection.close(code.varint(), code.reason());
    }
}

/// Why a connection attempt or handshake failed.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("no address could be reached")]
    Unreachable,
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("peer sent no hello within {HELLO_TIMEOUT:?}")]
    HelloTimeout,
    #[error("peer closed the control stream before its hello")]
    NoHello,
    #[error("{1}")]
    Refused(ErrorCode, String),
}

/// Dials `target`, tries all its addresses at once, and on success hands
/// the link to the driver. Failure is reported so the core backs off.
pub async fn dial(shared: Arc<Shared>, target: DialTarget, addrs: Vec<SocketAddr>) {
    let expected = match target {
        DialTarget::Node(id) => Some(id),
        DialTarget::Static(_) => None,
    };
    match dial_and_greet(&shared, expected, &addrs).await {
        Ok((connection, hello, control)) => {
            start(shared, connection, hello, control, Some(target)).await;
        }
        Err(e) => {
            tracing::debug!(?target, "dial failed: {e}");
            let _ = shared.inbox.send(Input::DialFailed { target }).await;
        }
    }
}

type Control = (SendStream, FrameReader);

async fn dial_and_greet(
    shared: &Shared,
    expected: Option<NodeId>,
    addrs: &[SocketAddr],
) -> Result<(quinn::Connection, NodeHello, Control), HandshakeError> {
    let config = tls::node_dial_config(&shared.identity, &shared.trust, expected, shared.liveness);
    let mut attempts = JoinSet::new();
    for addr in addrs {
        match shared
            .endpoint
            .connect_with(config.clone(), *addr, crate::trust::NODE_SERVER_NAME)
        {
            Ok(connecting) => {
                attempts.spawn(connecting);
            }
            Err(e) => tracing::debug!(%addr, "cannot dial: {e}"),
        }
    }
    let mut connection = None;
    while let Some(result) = attempts.join_next().await {
        if let Ok(Ok(conn)) = result {
            connection = Some(conn);
            break;
        }
    }
    let connection = connection.ok_or(HandshakeError::Unreachable)?;
    let (send, recv) = connection.open_bi().await?;
    let mut writer = FrameWriter::new(send);
    writer.send(&NodeMessage::Hello(shared.hello())).await?;
    let mut reader = FrameReader::new(recv, shared.max_frame);
    let hello = receive_hello(shared, &connection, &mut reader).await?;
    Ok((connection, hello, (writer.into_stream(), reader)))
}

/// Greets a node that dialled us, then hands the link to the driver.
pub async fn accept(shared: Arc<Shared>, connection: quinn::Connection) {
    let greeted = async {
        let (send, recv) = tokio::time::timeout(HELLO_TIMEOUT, connection.accept_bi())
            .await
            .map_err(|_| HandshakeError::HelloTimeout)??;
        let mut reader = FrameReader::new(recv, shared.max_frame);
        let hello = receive_hello(&shared, &connection, &mut reader).await?;
        let mut writer = FrameWriter::new(send);
        writer.send(&NodeMessage::Hello(shared.hello())).await?;
        Ok::<_, HandshakeError>((hello, (writer.into_stream(), reader)))
    };
    match greeted.await {
        Ok((hello, control)) => start(shared, connection, hello, control, None).await,
        Err(e) => refuse(&connection, e),
    }
}

/// Reads and checks the peer's hello: it must come first, speak our
/// version, belong to our cluster, and name the id its certificate proves.
async fn receive_hello(
    shared: &Shared,
    connection: &quinn::Connection,
    reader: &mut FrameReader,
) -> Result<NodeHello, HandshakeError> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, reader.next::<NodeMessage>())
        .await
        .map_err(|_| HandshakeError::HelloTimeout)??;
    let hello = match first {
        Some(NodeMessage::Hello(hello)) => hello,
        Some(other) => {
            return Err(HandshakeError::Refused(
                ErrorCode::HelloRequired,
                format!("first message was {other:?}, not a hello"),
            ))
        }
        None => return Err(HandshakeError::NoHello),
    };
    if hello.version != PROTOCOL_VERSION {
        return Err(HandshakeError::Refused(
            ErrorCode::VersionMismatch,
            format!(
                "peer speaks protocol version {}, this node speaks {PROTOCOL_VERSION}",
                hello.version
            ),
        ));
    }
    if hello.cluster != shared.cluster {
        return Err(HandshakeError::Refused(
            ErrorCode::ClusterMismatch,
            format!(
                "peer is in cluster {:?}, this node in {:?}",
                hello.cluster, shared.cluster
            ),
        ));
    }
    let Some(certificate) = tls::peer_certificate(connection) else {
        return Err(HandshakeError::Refused(
            ErrorCode::CertificateRequired,
            "peer presented no certificate".into(),
        ));
    };
    // The handshake accepted any certificate of the cluster; only a node's
    // may speak for a node.
    if let Trust::Cluster(_) = shared.trust {
        if !matches!(trust::describe(&certificate), Some((Role::Node, _))) {
            return Err(HandshakeError::Refused(
                ErrorCode::NotANode,
                "a client certificate was shown on the node ALPN".into(),
            ));
        }
    }
    let Some(proven) = NodeId::from_certificate(&certificate) else {
        return Err(HandshakeError::Refused(
            ErrorCode::CertificateRequired,
            "peer certificate does not parse".into(),
        ));
    };
    if proven != hello.id {
        return Err(HandshakeError::Refused(
            ErrorCode::IdentityMismatch,
            format!(
                "hello names {} but the certificate proves {}",
                hello.id.short(),
                proven.short()
            ),
        ));
    }
    if hello.id == shared.identity.id {
        return Err(HandshakeError::Refused(
            ErrorCode::ProtocolViolation,
            "connected to itself".into(),
        ));
    }
    Ok(hello)
}

/// Closes a connection whose handshake failed, with the matching code.
fn refuse(connection: &quinn::Connection, error: HandshakeError) {
    let code = match &error {
        HandshakeError::Refused(code, _) => *code,
        HandshakeError::Stream(StreamError::Frame(e)) => e.code(),
        HandshakeError::HelloTimeout | HandshakeError::NoHello => ErrorCode::HelloRequired,
        _ => ErrorCode::ProtocolViolation,
    };
    tracing::warn!(remote = %connection.remote_address(), code = ?code, "refused node connection: {error}");
    connection.close(code.varint(), code.reason());
}

/// Registers the link with the driver and runs its stream tasks until the
/// connection ends.
async fn start(
    shared: Arc<Shared>,
    connection: quinn::Connection,
    hello: NodeHello,
    (control_send, control_recv): Control,
    dialed: Option<DialTarget>,
) {
    let conn_id = shared.next_id();
    let peer = hello.id;
    let span = tracing::info_span!("link", peer = %peer.short(), name = %hello.name);
    control_send.set_priority(CONTROL_PRIORITY);
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let backlog = Arc::new(Backlog::new(
        shared.limits.link_bytes / CONGESTED_SHARE,
        Some(peer),
        shared.pressure.clone(),
    ));
    let handle = LinkHandle {
        conn_id,
        connection: connection.clone(),
        hello,
        control: control_tx,
        events: events_tx,
        backlog: backlog.clone(),
        last_batch: 0,
        dropped: RateLimitedLog::default(),
    };
    // LinkUp goes first, so the driver knows the link before any message.
    if shared
        .inbox
        .send(Input::LinkUp { handle, dialed })
        .await
        .is_err()
    {
        return;
    }
    let mut tasks = JoinSet::new();
    tasks.spawn(write_each(control_send, control_rx).instrument(span.clone()));
    let events = write_frame_batches_on_uni(connection.clone(), events_rx, backlog);
    tasks.spawn(events.instrument(span.clone()));
    tasks.spawn(
        read_control(
            shared.clone(),
            connection.clone(),
            peer,
            conn_id,
            control_recv,
        )
        .instrument(span.clone()),
    );
    tasks.spawn(
        accept_event_streams(shared.clone(), connection.clone(), peer, conn_id)
            .instrument(span.clone()),
    );
    let reason = run_until_closed(connection.closed(), tasks).await;
    span.in_scope(|| tracing::info!("link closed: {reason}"));
    let parted = matches!(&reason, quinn::ConnectionError::ApplicationClosed(close)
        if close.error_code == ErrorCode::Closed.varint());
    let down = Input::LinkDown {
        peer,
        conn_id,
        parted,
    };
    let _ = shared.inbox.send(down).await;
}

async fn read_control(
    shared: Arc<Shared>,
    connection: quinn::Connection,
    peer: NodeId,
    conn_id: u64,
    stream: FrameReader,
) {
    let mut reader = stream;
    let mut batch = Vec::new();
    loop {
        match reader.next_batch::<NodeMessage>(&mut batch).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => return close_for(&connection, e),
        }
        for message in batch.drain(..) {
            let input = match message {
                NodeMessage::Hello(_) => return refuse_second_hello(&connection),
                NodeMessage::Overlay(message) => Input::Overlay {
                    peer,
                    conn_id,
                    message,
                },
                NodeMessage::Delivery(message) => Input::Delivery {
                    peer,
                    conn_id,
                    message,
                },
            };
            if shared.inbox.send(input).await.is_err() {
                return;
            }
        }
    }
}

async fn accept_event_streams(
    shared: Arc<Shared>,
    connection: quinn::Connection,
    peer: NodeId,
    conn_id: u64,
) {
    let mut readers = JoinSet::new();
    while let Ok(stream) = connection.accept_uni().await {
        let (shared, connection) = (shared.clone(), connection.clone());
        readers.spawn(async move {
            let mut reader = FrameReader::new(stream, shared.max_frame);
            // Each batch gets as much room as the last one needed: growing
            // moves every frame (~2.5% of a node), and a quiet stream needs
            // little.
            let mut room = 0;
            loop {
                let mut frames = Vec::with_capacity(room);
                match reader.next_batch::<NodeEventFrame>(&mut frames).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => return close_for(&connection, e),
                }
                room = frames.len();
                // Held back while a destination other than this link is
                // congested; the peer's writer then waits on QUIC.
                shared.pressure.wait(Source::Link(peer)).await;
                let input = Input::NodeEvents {
                    peer,
                    conn_id,
                    frames,
                };
                if shared.inbox.send(input).await.is_err() {
                    return;
                }
            }
        });
    }
}
