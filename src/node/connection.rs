//! What node links and client sessions share: the hello deadline, the
//! refusal of a second hello, closing for a bad frame, running a
//! connection's tasks until it closes, writing the driver's batches, and
//! logging that a flood cannot
//! turn into a flood of lines.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::client_connection::ClientConnection;
use super::pressure::Backlog;
use super::{link, now, session, Shared};
use crate::tls;
use crate::web::WEB_ALPN;
use crate::wire::stream::{FrameBatch, SendStream, StreamError, WRITE_BATCH};
use crate::wire::{ErrorCode, NODE_ALPN};

/// How long a peer (node or client) may take to open its control stream
/// and say hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Something that may happen without pause is logged at most once per
/// interval, with the count since the last line.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Counts occurrences of something logged at most once per
/// [`LOG_INTERVAL`].
#[derive(Debug, Default)]
pub struct RateLimitedLog {
    pub total: u64,
    since_logged: u64,
    logged_at: Option<Instant>,
}

impl RateLimitedLog {
    /// Counts `n` more; whether to log now, with the count since the last
    /// line.
    pub fn count(&mut self, n: u64, now: Instant) -> Option<u64> {
        self.total += n;
        self.since_logged += n;
        let due = self
            .logged_at
            .is_none_or(|at| now.duration_since(at) >= LOG_INTERVAL);
        if !due {
            return None;
        }
        self.logged_at = Some(now);
        Some(std::mem::take(&mut self.since_logged))
    }
}

/// What the helpers here need of a connection: a node's link (bare QUIC)
/// or a client's (QUIC or WebTransport).
pub trait PeerConnection {
    fn remote_address(&self) -> SocketAddr;
    fn close_with(&self, code: ErrorCode, reason: &[u8]);
    /// Opens a stream to the peer; `None` once the connection is gone.
    fn open_uni(&self) -> impl Future<Output = Option<SendStream>> + Send;
    /// Waits until the connection has closed; says why.
    fn closed(&self) -> impl Future<Output = String> + Send;
}

impl PeerConnection for quinn::Connection {
    fn remote_address(&self) -> SocketAddr {
        quinn::Connection::remote_address(self)
    }

    fn close_with(&self, code: ErrorCode, reason: &[u8]) {
        self.close(code.varint(), reason)
    }

    async fn open_uni(&self) -> Option<SendStream> {
        quinn::Connection::open_uni(self).await.ok().map(Into::into)
    }

    async fn closed(&self) -> String {
        quinn::Connection::closed(self).await.to_string()
    }
}

impl PeerConnection for ClientConnection {
    fn remote_address(&self) -> SocketAddr {
        self.quic().remote_address()
    }

    /// A WebTransport page sees `code` as the session's `closeCode`.
    fn close_with(&self, code: ErrorCode, reason: &[u8]) {
        match self {
            ClientConnection::Quic(connection) => connection.close(code.varint(), reason),
            ClientConnection::Web(session) => {
                session.close(code as u32, reason);
                // The session holds the HTTP/3 control streams: dropped
                // before the browser has read the close, they make it see
                // only "Connection lost", without the code.
                let session = session.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(HELLO_TIMEOUT, session.closed()).await;
                });
            }
        }
    }

    async fn open_uni(&self) -> Option<SendStream> {
        match self {
            ClientConnection::Quic(connection) => connection.open_uni().await.ok().map(Into::into),
            ClientConnection::Web(session) => session.open_uni().await.ok().map(Into::into),
        }
    }

    async fn closed(&self) -> String {
        match self {
            ClientConnection::Quic(connection) => connection.closed().await.to_string(),
            ClientConnection::Web(session) => session.closed().await.to_string(),
        }
    }
}

/// Closes a connection whose peer said hello a second time.
pub fn refuse_second_hello(connection: &impl PeerConnection) {
    tracing::warn!(remote = %connection.remote_address(), "second hello; closing the connection");
    let code = ErrorCode::ProtocolViolation;
    connection.close_with(code, code.reason());
}

/// Closes the connection after a bad frame; stream errors mean it is
/// already going away.
pub fn close_for(connection: &impl PeerConnection, error: StreamError) {
    let code = match &error {
        StreamError::Frame(e) => e.code(),
        StreamError::Truncated => ErrorCode::MalformedFrame,
        StreamError::Read(_) | StreamError::Write(_) => return,
    };
    tracing::warn!(remote = %connection.remote_address(), "closing connection: {error}");
    connection.close_with(code, code.reason());
}

/// Waits for a connection to close (`closed`), then stops its tasks;
/// returns why it closed.
pub async fn run_until_closed<R>(closed: impl Future<Output = R>, mut tasks: JoinSet<()>) -> R {
    let reason = closed.await;
    tasks.abort_all();
    reason
}

/// Writes batches encoded by the driver to a unidirectional stream opened
/// on the first batch, and takes what has gone out off `backlog` as it
/// goes. Ends when the channel closes or the connection fails.
pub async fn write_frame_batches_on_uni(
    connection: impl PeerConnection,
    mut batches: mpsc::UnboundedReceiver<FrameBatch>,
    backlog: Arc<Backlog>,
) {
    let mut stream = None;
    let mut pending = Vec::new();
    let mut chunks = Vec::new();
    while batches.recv_many(&mut pending, WRITE_BATCH).await > 0 {
        let stream = match &mut stream {
            Some(stream) => stream,
            None => match connection.open_uni().await {
                Some(opened) => stream.insert(opened),
                None => return,
            },
        };
        let mut events = 0;
        for batch in pending.drain(..) {
            events += batch.frames() as u64;
            batch.into_chunks(&mut chunks);
        }
        // Written a part at a time, each part counted as it goes: progress
        // is how the driver tells a slow destination from a stalled one.
        let mut rest = &mut chunks[..];
        while !rest.is_empty() {
            match stream.write_chunks(rest).await {
                Ok(written) => {
                    backlog.remove(written.bytes);
                    rest = &mut rest[written.chunks..];
                }
                Err(_) => return,
            }
        }
        backlog.remove_events(events);
        chunks.clear();
    }
}

/// A connection counted against its address's limit until dropped.
struct ConnectionSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl ConnectionSlot {
    /// Takes a slot for `ip`, or `None` when it has as many as allowed.
    fn take(shared: &Arc<Shared>, ip: IpAddr) -> Option<ConnectionSlot> {
        let mut open = shared.connections.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(ip).or_default();
        if *count >= shared.limits.connections_per_address {
            return None;
        }
        *count += 1;
        Some(ConnectionSlot {
            shared: shared.clone(),
            ip,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self
            .shared
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Takes every incoming connection to its task: a node's link or a
/// client's session, by the ALPN it chose.
pub(super) async fn accept_connections(shared: Arc<Shared>) {
    // A flood of refusals cannot fill the disk with log lines.
    let mut refusals = RateLimitedLog::default();
    while let Some(incoming) = shared.endpoint.accept().await {
        let remote = incoming.remote_address();
        // Refused before the handshake, so a flood costs no crypto.
        let Some(slot) = ConnectionSlot::take(&shared, remote.ip()) else {
            incoming.refuse();
            if let Some(refused) = refusals.count(1, now()) {
                tracing::warn!(%remote, refused,
                    limit = shared.limits.connections_per_address,
                    "connections refused: too many from one address (--max-connections-per-address)");
            }
            continue;
        };
        let shared = shared.clone();
        let task = async move {
            let _slot = slot;
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(e) => {
                    tracing::debug!(%remote, "handshake failed: {e}");
                    return;
                }
            };
            match tls::negotiated_alpn(&connection).as_deref() {
                Some(NODE_ALPN) => link::accept(shared, connection).await,
                Some(WEB_ALPN) => serve_web(shared, connection).await,
                _ => session::serve(shared, ClientConnection::Quic(connection)).await,
            }
        };
        tokio::spawn(task.in_current_span());
    }
}

/// Serves a browser: the HTTP/3 handshake of a WebTransport session, then
/// the client protocol inside it, as for any client.
async fn serve_web(shared: Arc<Shared>, connection: quinn::Connection) {
    let remote = connection.remote_address();
    let accepted = async {
        let request = web_transport_quinn::Request::accept(connection).await?;
        request.ok().await
    };
    match tokio::time::timeout(HELLO_TIMEOUT, accepted).await {
        Ok(Ok(session)) => session::serve(shared, ClientConnection::Web(Box::new(session))).await,
        Ok(Err(e)) => tracing::debug!(%remote, "WebTransport handshake failed: {e}"),
        Err(_) => tracing::debug!(%remote, "WebTransport handshake took too long"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occurrences_are_counted_always_and_logged_once_per_interval() {
        let start = Instant::now();
        let mut log = RateLimitedLog::default();
        assert_eq!(log.count(5, start), Some(5), "the first one is logged");
        assert_eq!(log.count(7, start + Duration::from_secs(1)), None);
        assert_eq!(log.count(3, start + Duration::from_secs(9)), None);
        // The next line says how many since the last.
        assert_eq!(log.count(1, start + LOG_INTERVAL), Some(11));
        assert_eq!(log.total, 16);
    }
}
