//! Keeping a client connected: the task that serves one connection after
//! another. When a connection is lost the client dials again (the same
//! node first, then the others, with backoff and jitter), restores every
//! subscription, sends its unconfirmed at-least-once events again and the
//! at-most-once ones buffered meanwhile, and only then counts as connected.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};

use super::connect::{closed_error, worth_reconnecting, Dialed, Dialer, NodeLink};
use super::deliveries::{read_deliveries, read_publish_replies, read_replies};
use super::pending::Pending;
use super::publish_buffer::{self, Offline, PublishBuffer};
use super::{ClientError, ConnectionEvent};
use crate::wire::stream::{write_from, FrameReader, FrameWriter};
use crate::wire::{
    ClientReply, ClientRequest, ErrorCode, PublishFrame, RequestError, DEFAULT_MAX_FRAME,
};

/// The first wait between reconnect rounds; it doubles up to
/// [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long one reconnect round waits for a node to answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a restored subscription waits for the node's answer.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a durable subscription waits for the node to let go of the
/// client's previous connection, which it may not yet know is gone.
const IN_USE_PATIENCE: Duration = Duration::from_secs(15);

/// How a client reconnects after losing its node.
#[derive(Debug, Clone, Copy)]
pub struct Reconnect {
    /// How long to keep trying to reach a node after the connection is
    /// lost before the client closes for good; `None` tries forever,
    /// `Some(Duration::ZERO)` never reconnects.
    pub give_up: Option<Duration>,
    /// At-most-once events kept while disconnected, in bytes; past it,
    /// publishing fails at once with [`ClientError::BufferFull`].
    pub buffer_bytes: usize,
    /// At-least-once events the node has confirmed but not yet released
    /// (handed to the next node on their way) kept to send again through
    /// another node should this one die, in payload bytes. Past it the
    /// oldest are forgotten: they are safe in the node's store, and arrive
    /// when it comes back.
    pub retain_bytes: usize,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            give_up: None,
            // As NATS's reconnect buffer.
            buffer_bytes: 8 << 20,
            retain_bytes: 8 << 20,
        }
    }
}

/// Why a client closed for good.
#[derive(Debug, Clone)]
pub(super) enum Ended {
    /// Its connection ended in a way no reconnect helps (refused,
    /// disconnected as a slow consumer, closed by the client).
    Lost(quinn::ConnectionError, String),
    /// No node answered for the whole give-up time.
    GaveUp { waited: Duration, last: String },
    /// The client was closed or dropped while reconnecting.
    Stopped,
}

impl Ended {
    pub fn error(&self) -> ClientError {
        match self {
            Ended::Lost(error, node) => closed_error(error, node.clone()),
            Ended::GaveUp { waited, last } => ClientError::GaveUp {
                waited: *waited,
                last: last.clone(),
            },
            Ended::Stopped => ClientError::Closed("the client was closed".into()),
        }
    }
}

/// What the client's handles and the supervising task share.
pub(super) struct Shared {
    pub pending: Arc<Pending>,
    pub publishes: Arc<PublishBuffer>,
    /// Held from numbering an at-least-once event to queueing it, and
    /// while unconfirmed events are sent again after a reconnect.
    pub at_least_once_order: tokio::sync::Mutex<()>,
    pub link: Mutex<Link>,
    /// Whether the current node lets this client publish on every topic:
    /// then a publish checks nothing and takes no lock. Set as it goes live.
    pub publish_anywhere: AtomicBool,
    pub events: broadcast::Sender<ConnectionEvent>,
    pub ended: watch::Sender<Option<Ended>>,
    /// The client was dropped or closed: stop reconnecting.
    pub stop: Notify,
    pub dialer: Dialer,
    pub reconnect: Reconnect,
}

/// The node of the current connection (or of the last one, while
/// reconnecting).
pub(super) struct Link {
    pub node: Arc<NodeLink>,
    /// Why the connection was lost, while reconnecting.
    pub down: Option<String>,
}

impl Shared {
    pub fn node(&self) -> Arc<NodeLink> {
        self.lock_link().node.clone()
    }

    /// Makes `node` the current one.
    pub fn set_node(&self, node: Arc<NodeLink>) {
        let anywhere = node.grant.may_publish_anywhere();
        *self.lock_link() = Link { node, down: None };
        self.publish_anywhere.store(anywhere, Ordering::Relaxed);
    }

    pub fn lock_link(&self) -> std::sync::MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What a call fails with while nothing can answer it.
    pub fn gone(&self) -> ClientError {
        if let Some(ended) = &*self.ended.borrow() {
            return ended.error();
        }
        let link = self.lock_link();
        match &link.down {
            Some(reason) => ClientError::Disconnected {
                reason: reason.clone(),
            },
            None => ClientError::ConnectionLost {
                node: link.node.describe(),
                reason: "its streams ended".into(),
            },
        }
    }

    fn finish(&self, ended: Ended) {
        self.pending.close();
        self.publishes.close();
        let reason = ended.error().to_string();
        self.ended.send_replace(Some(ended));
        let _ = self.events.send(ConnectionEvent::Closed { reason });
    }
}

/// Starts serving `first`; resolves once calls may go through it.
pub(super) fn start(
    shared: Arc<Shared>,
    requests: mpsc::UnboundedReceiver<ClientRequest>,
    first: Dialed,
) -> impl std::future::Future<Output = ()> {
    let (live, is_live) = oneshot::channel();
    tokio::spawn(supervise(shared, requests, first, live));
    async {
        let _ = is_live.await;
    }
}

/// Serves `first` and every connection after it, until the client is
/// closed, dropped, or gives up.
async fn supervise(
    shared: Arc<Shared>,
    mut requests: mpsc::UnboundedReceiver<ClientRequest>,
    first: Dialed,
    live: oneshot::Sender<()>,
) {
    let mut dialed = first;
    let mut live = Some(live);
    let mut reconnected = false;
    loop {
        let node = dialed.node.clone();
        let mut control = dialed.control;
        tokio::spawn(read_replies(dialed.replies, shared.pending.clone()));
        tokio::spawn(read_publish_replies(
            FrameReader::new(dialed.publish_recv, DEFAULT_MAX_FRAME),
            shared.pending.clone(),
        ));
        tokio::spawn(read_deliveries(
            node.connection.clone(),
            shared.pending.clone(),
        ));
        let restored = if reconnected {
            restore(&shared, &mut control).await
        } else {
            Ok(())
        };
        let (lost, reason) = match restored {
            Ok(()) => {
                go_live(&shared, &node, dialed.publish_send).await;
                if let Some(live) = live.take() {
                    let _ = live.send(());
                }
                if reconnected {
                    let _ = shared.events.send(ConnectionEvent::Reconnected {
                        node: node.id,
                        name: node.name.clone(),
                        addr: node.connection.remote_address(),
                    });
                }
                let lost = tokio::select! {
                    _ = shared.stop.notified() => {
                        // Dropped or closed: what is queued is still
                        // written, and subscriptions end with this
                        // connection.
                        shared.publishes.close();
                        let lost = node.connection.closed().await;
                        return shared.finish(Ended::Lost(lost, node.describe()));
                    }
                    _ = write_from(&mut control, &mut requests) => node.connection.closed().await,
                    lost = node.connection.closed() => lost,
                };
                let reason = closed_error(&lost, node.describe()).to_string();
                (lost, reason)
            }
            // A node that cannot take the client's subscriptions back is
            // left for another try (at it or at another node).
            Err(reason) => {
                node.connection
                    .close(ErrorCode::Closed.varint(), reason.as_bytes());
                let reason = format!(
                    "cannot restore the subscriptions at {}: {reason}",
                    node.describe()
                );
                (quinn::ConnectionError::TimedOut, reason)
            }
        };
        disconnected(&shared, &mut requests, &reason);
        if !worth_reconnecting(&lost) || shared.reconnect.give_up == Some(Duration::ZERO) {
            return shared.finish(Ended::Lost(lost, node.describe()));
        }
        tracing::info!("{reason}; reconnecting");
        let _ = shared.events.send(ConnectionEvent::Disconnected { reason });
        let prefer = node.connection.remote_address();
        drop(node);
        match redial(&shared, prefer).await {
            Some(Ok(next)) => dialed = next,
            Some(Err(ended)) => return shared.finish(ended),
            None => return shared.finish(Ended::Stopped),
        }
        reconnected = true;
    }
}

/// Subscribes again to everything the client had subscribed to, so no
/// delivery is handed out before the client is whole again.
async fn restore(shared: &Shared, control: &mut FrameWriter) -> Result<(), String> {
    let (subscriptions, acks) = shared.pending.restore_requests();
    for (sub, request) in subscriptions {
        restore_one(shared, control, sub, request).await?;
    }
    control.send_all(&acks).await.map_err(|e| e.to_string())
}

async fn restore_one(
    shared: &Shared,
    control: &mut FrameWriter,
    sub: u64,
    request: ClientRequest,
) -> Result<(), String> {
    let patience = tokio::time::Instant::now() + IN_USE_PATIENCE;
    loop {
        let reply = shared.pending.restore_reply_to(sub);
        control.send(&request).await.map_err(|e| e.to_string())?;
        let reply = match tokio::time::timeout(RESTORE_TIMEOUT, reply).await {
            Ok(reply) => {
                reply.map_err(|_| "the connection was lost while subscribing again".to_string())?
            }
            // A node attaching at a durable subscription's home elsewhere
            // waits for that home, and keeps asking it: the client need
            // not wait with it. Events come once the home answers.
            Err(_) if matches!(request, ClientRequest::SubscribeDurable { .. }) => {
                tracing::warn!(sub, "the durable subscription's home does not answer yet; its events come once it does");
                return Ok(());
            }
            Err(_) => return Err("the node did not answer a subscription in time".to_string()),
        };
        match reply {
            ClientReply::Subscribed { .. } | ClientReply::DurableAttached { .. } => return Ok(()),
            // The node has not yet noticed that the client's previous
            // connection is gone.
            ClientReply::Error {
                error: RequestError::DurableInUse,
                ..
            } if tokio::time::Instant::now() < patience => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            other => {
                tracing::warn!(
                    sub,
                    "a subscription could not be restored and ends: {other:?}"
                );
                shared.pending.end_subscription(sub);
                return Ok(());
            }
        }
    }
}

/// Starts the connection's publish writer, sends the unconfirmed
/// at-least-once events again, and lets calls through.
async fn go_live(shared: &Shared, node: &Arc<NodeLink>, publish: quinn::SendStream) {
    // No at-least-once event is numbered and queued in between, so the
    // node sees them in order.
    let _in_order = shared.at_least_once_order.lock().await;
    let generation = shared.publishes.connected();
    tokio::spawn(publish_buffer::write(
        shared.publishes.clone(),
        generation,
        publish,
    ));
    for event in shared.pending.unreleased() {
        let frame = PublishFrame::AtLeastOnce(event);
        if shared.publishes.send(&frame, Offline::Skip).await != Ok(true) {
            break;
        }
    }
    shared.set_node(node.clone());
    shared.pending.connected();
}

/// The connection is lost: calls waiting for it fail, what was queued for
/// it is dropped.
fn disconnected(
    shared: &Shared,
    requests: &mut mpsc::UnboundedReceiver<ClientRequest>,
    reason: &str,
) {
    shared.lock_link().down = Some(reason.to_string());
    shared.pending.disconnected();
    shared.publishes.disconnected(shared.reconnect.buffer_bytes);
    while requests.try_recv().is_ok() {}
}

/// Dials until a node answers, backing off between rounds; `None` when
/// the client is stopped meanwhile.
async fn redial(shared: &Shared, prefer: SocketAddr) -> Option<Result<Dialed, Ended>> {
    let started = tokio::time::Instant::now();
    let mut backoff = MIN_BACKOFF;
    loop {
        let attempt = tokio::select! {
            _ = shared.stop.notified() => return None,
            attempt = shared.dialer.any(Some(prefer), ATTEMPT_TIMEOUT) => attempt,
        };
        let error = match attempt {
            Ok(dialed) => return Some(Ok(dialed)),
            Err(error) => error,
        };
        tracing::debug!("reconnect attempt failed: {error}");
        if let Some(limit) = shared.reconnect.give_up {
            if started.elapsed() >= limit {
                return Some(Err(Ended::GaveUp {
                    waited: limit,
                    last: error.to_string(),
                }));
            }
        }
        // ±50%, so clients of one failed node do not come back together.
        let wait = backoff.mul_f64(rand::random_range(0.5..1.5));
        tokio::select! {
            _ = shared.stop.notified() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
