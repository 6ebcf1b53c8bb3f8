//! Client connections: the hello, then tasks that carry requests, publish
//! streams and deliveries between the client and the driver.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::client_connection::ClientConnection;
use super::connection::{
    close_for, refuse_second_hello, run_until_closed, write_frame_batches_on_uni, PeerConnection,
    RateLimitedLog, HELLO_TIMEOUT,
};
use super::pressure::{Backlog, Source, CONGESTED_SHARE};
use super::{Input, Shared};
use crate::topic::Pattern;
use crate::trust::{self, Grant, Operation, TokenScope, Trust};
use crate::wire::stream::{write_each, FrameBatch, FrameReader};
use crate::wire::{
    ClientReply, ClientRequest, ErrorCode, PublishFrame, PublishRefusal, PublishReply,
    RequestError, RequestFailure, PROTOCOL_VERSION,
};

/// The driver's handle on one client connection.
pub struct SessionHandle {
    pub replies: mpsc::UnboundedSender<ClientReply>,
    /// Bounded in bytes through `backlog`: a slow consumer costs bounded
    /// memory.
    pub deliveries: mpsc::UnboundedSender<FrameBatch>,
    /// Deliveries handed over and not yet written to the stream.
    pub backlog: Arc<Backlog>,
    /// What `backlog` had written when the driver last looked, and since
    /// when it has been congested without writing more: a stalled client.
    pub stalled: Option<(u64, Instant)>,
    /// Bytes of the last batch encoded for it: room for the next.
    pub last_batch: usize,
    pub connection: ClientConnection,
    /// Plain and group subscriptions held, against the node's limit.
    pub subscriptions: usize,
    /// Its questions to other nodes awaiting answers ([`ClientRequest::Ask`]).
    pub questions: usize,
    /// Disconnected for not reading its deliveries; nothing more is queued.
    pub slow: bool,
    /// Where answers to this client's requests are addressed: random, so
    /// that no other client can guess it and answer in a responder's place.
    pub inbox: u64,
    /// Refusals of its at-least-once events so far: each ends the
    /// publisher's epoch on this connection, since an epoch promises that
    /// none of its events after the first is missing (see
    /// [`crate::store::writer::Epoch`]).
    pub refusals: u64,
    /// Where releases of its at-least-once events go: its publish stream,
    /// once it has one.
    pub publish_replies: Option<mpsc::UnboundedSender<PublishReply>>,
}

/// Serves one client connection until it closes.
pub async fn serve(shared: Arc<Shared>, connection: ClientConnection) {
    let remote = connection.remote_address();
    let control = async {
        let (send, recv) = tokio::time::timeout(HELLO_TIMEOUT, connection.accept_bi())
            .await
            .map_err(|_| ErrorCode::HelloRequired)?
            .ok_or(ErrorCode::Closed)?;
        let mut reader = FrameReader::new(recv, shared.max_frame);
        let first = tokio::time::timeout(HELLO_TIMEOUT, reader.next::<ClientRequest>())
            .await
            .map_err(|_| ErrorCode::HelloRequired)?;
        match first {
            Ok(Some(ClientRequest::Hello { version, name })) if version == PROTOCOL_VERSION => {
                Ok((send, reader, name, None))
            }
            Ok(Some(ClientRequest::HelloWithToken {
                version,
                name,
                token,
            })) if version == PROTOCOL_VERSION => Ok((send, reader, name, Some(token))),
            Ok(Some(
                ClientRequest::Hello { version, .. }
                | ClientRequest::HelloWithToken { version, .. },
            )) => {
                tracing::warn!(%remote, "client speaks protocol version {version}, this node {PROTOCOL_VERSION}");
                Err(ErrorCode::VersionMismatch)
            }
            Ok(Some(other)) => {
                tracing::warn!(%remote, "client sent {other:?} before its hello");
                Err(ErrorCode::HelloRequired)
            }
            Ok(None) => Err(ErrorCode::HelloRequired),
            Err(e) => {
                close_for(&connection, e);
                Err(ErrorCode::Closed)
            }
        }
    };
    let (send, reader, name, token) = match control.await {
        Ok(parts) => parts,
        Err(ErrorCode::Closed) => return,
        Err(code) => {
            tracing::warn!(%remote, ?code, "refused client");
            connection.close_with(code, code.reason());
            return;
        }
    };
    let user = match user_of(&shared.trust, &connection, token.as_deref()) {
        Ok(user) => user,
        Err(why) => {
            let now = std::time::Instant::now();
            match lock(&shared.clients_refused).count(1, now) {
                Some(count) => {
                    tracing::warn!(%remote, name = %name, count, "refused client(s): {why}")
                }
                None => tracing::debug!(%remote, name = %name, "refused client: {why}"),
            }
            let reason = format!("token refused: {why}");
            connection.close_with(ErrorCode::TokenRefused, reason.as_bytes());
            return;
        }
    };
    let (user, scope) = user;
    let grant = match scope {
        TokenScope::Granted => shared.permissions.grant_for(user.as_deref()),
        TokenScope::ReadOnly => Grant::default(),
    };
    let grant = Arc::new(grant);
    let user = user.unwrap_or_else(|| "anonymous".to_string());
    let session = shared.next_id();
    let span = tracing::info_span!("client", session, %remote, name = %name, %user);
    let (replies_tx, replies_rx) = mpsc::unbounded_channel();
    let (deliveries_tx, deliveries_rx) = mpsc::unbounded_channel();
    let backlog = Arc::new(Backlog::new(
        shared.limits.consumer_bytes / CONGESTED_SHARE,
        None,
        shared.pressure.clone(),
    ));
    let _ = replies_tx.send(ClientReply::Welcome {
        version: PROTOCOL_VERSION,
        node: shared.identity.id,
        name: shared.name.clone(),
        cluster: shared.cluster.clone(),
        user: matches!(shared.trust, Trust::Cluster(_)).then(|| user.clone()),
        grant: (*grant).clone(),
    });
    let handle_replies = replies_tx.clone();
    let handle = SessionHandle {
        replies: replies_tx,
        deliveries: deliveries_tx,
        backlog: backlog.clone(),
        stalled: None,
        last_batch: 0,
        connection: connection.clone(),
        subscriptions: 0,
        questions: 0,
        slow: false,
        inbox: rand::random(),
        refusals: 0,
        publish_replies: None,
    };
    if shared
        .inbox
        .send(Input::SessionOpen { session, handle })
        .await
        .is_err()
    {
        return;
    }
    span.in_scope(|| tracing::debug!("client connected"));
    let mut tasks = JoinSet::new();
    tasks.spawn(write_each(send, replies_rx).instrument(span.clone()));
    let deliveries = write_frame_batches_on_uni(connection.clone(), deliveries_rx, backlog);
    tasks.spawn(deliveries.instrument(span.clone()));
    let guard = Guard {
        user: user.clone(),
        grant: grant.clone(),
        log: Mutex::new(RateLimitedLog::default()),
        replies: handle_replies.clone(),
        shared: shared.clone(),
    };
    let guard = Arc::new(guard);
    tasks.spawn(
        read_requests(
            shared.clone(),
            connection.clone(),
            session,
            reader,
            guard.clone(),
        )
        .instrument(span.clone()),
    );
    tasks.spawn(
        accept_publish_streams(shared.clone(), connection.clone(), session, guard)
            .instrument(span.clone()),
    );
    let reason = run_until_closed(connection.closed(), tasks).await;
    span.in_scope(|| tracing::debug!("client gone: {reason}"));
    let _ = shared.inbox.send(Input::SessionClosed { session }).await;
}

async fn read_requests(
    shared: Arc<Shared>,
    connection: ClientConnection,
    session: u64,
    mut reader: FrameReader,
    guard: Arc<Guard>,
) {
    let mut batch = Vec::new();
    loop {
        match reader.next_batch::<ClientRequest>(&mut batch).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => return close_for(&connection, e),
        }
        for request in batch.drain(..) {
            if request.is_hello() {
                return refuse_second_hello(&connection);
            }
            if !guard.allows_request(&request) {
                continue;
            }
            if shared
                .inbox
                .send(Input::Request { session, request })
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

async fn accept_publish_streams(
    shared: Arc<Shared>,
    connection: ClientConnection,
    session: u64,
    guard: Arc<Guard>,
) {
    // One allowance per client, shared by its publish streams.
    let allowance = shared.limits.pending_publishes.min(Semaphore::MAX_PERMITS);
    let pending = Arc::new(Semaphore::new(allowance));
    let mut streams = JoinSet::new();
    while let Some((send, recv)) = connection.accept_bi().await {
        let (shared, connection, guard, pending) = (
            shared.clone(),
            connection.clone(),
            guard.clone(),
            pending.clone(),
        );
        streams.spawn(async move {
            let (reply_tx, reply_rx) = mpsc::unbounded_channel::<PublishReply>();
            let replies = tokio::spawn(write_each(send, reply_rx));
            let mut reader = FrameReader::new(recv, shared.max_frame);
            let publisher = Publisher {
                shared: &shared,
                session,
                reply: &reply_tx,
                pending: &pending,
            };
            // Each batch gets as much room as the last one needed: growing
            // moves every frame, and a quiet stream needs little.
            let mut room = 0;
            loop {
                let mut frames: Vec<PublishFrame> = Vec::with_capacity(room);
                match reader.next_batch(&mut frames).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        close_for(&connection, e);
                        break;
                    }
                }
                room = frames.len();
                if !guard.grant.may_publish_anywhere() {
                    frames.retain(|frame| guard.allows_publish(frame, &reply_tx));
                }
                if publisher.forward(frames).await.is_err() {
                    break;
                }
            }
            drop(reply_tx);
            let _ = replies.await;
        });
    }
}

/// One publish stream's way to the driver. Each at-least-once event takes
/// a permit of the client's allowance (a batch's are taken at once when
/// there is room for all), which travels with it to the store and comes
/// back once its commit is answered.
struct Publisher<'a> {
    shared: &'a Shared,
    session: u64,
    reply: &'a mpsc::UnboundedSender<PublishReply>,
    pending: &'a Arc<Semaphore>,
}

impl Publisher<'_> {
    /// Hands `frames` to the driver. When the allowance runs out, what
    /// came before goes first, then this waits for commits: the stream is
    /// not read meanwhile, and QUIC flow control slows the client down.
    async fn forward(&self, frames: Vec<PublishFrame>) -> Result<(), ()> {
        let confirmed = frames
            .iter()
            .filter(|frame| matches!(frame, PublishFrame::AtLeastOnce(_)))
            .count();
        let whole = match confirmed {
            0 => Some(Vec::new()),
            n => u32::try_from(n)
                .ok()
                .and_then(|n| self.pending.clone().try_acquire_many_owned(n).ok())
                .map(|permit| vec![permit]),
        };
        if let Some(permits) = whole {
            return self.send(frames, permits).await;
        }
        let mut ready = Vec::with_capacity(frames.len());
        let mut permits = Vec::new();
        for frame in frames {
            if matches!(frame, PublishFrame::AtLeastOnce(_)) {
                let permit = match self.pending.clone().try_acquire_owned() {
                    Ok(permit) => permit,
                    Err(_) => {
                        self.shared
                            .publishes_throttled
                            .fetch_add(1, Ordering::Relaxed);
                        let (before, held) =
                            (std::mem::take(&mut ready), std::mem::take(&mut permits));
                        self.send(before, held).await?;
                        self.pending.clone().acquire_owned().await.map_err(|_| ())?
                    }
                };
                permits.push(permit);
            }
            ready.push(frame);
        }
        self.send(ready, permits).await
    }

    async fn send(
        &self,
        frames: Vec<PublishFrame>,
        permits: Vec<OwnedSemaphorePermit>,
    ) -> Result<(), ()> {
        if frames.is_empty() {
            return Ok(());
        }
        // A congested destination anywhere holds publishers back: the
        // stream is not read meanwhile, and QUIC slows the client down.
        self.shared.pressure.wait(Source::Client).await;
        let input = Input::Publish {
            session: self.session,
            frames,
            reply: self.reply.clone(),
            permits,
        };
        self.shared.inbox.send(input).await.map_err(|_| ())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The user a client is, whom permissions are looked up by: in a cluster,
/// the name in the certificate it showed in the handshake, or else in the
/// token of its hello; `None` in insecure mode. Without either, or with a
/// token this cluster did not sign or that expired, the client is refused.
fn user_of(
    trust: &Trust,
    connection: &ClientConnection,
    token: Option<&str>,
) -> Result<(Option<String>, TokenScope), String> {
    let Trust::Cluster(anchor) = trust else {
        return Ok((None, TokenScope::Granted));
    };
    if let Some(certificate) = connection.peer_certificate() {
        let user = trust::describe(&certificate).map(|(_, name)| name);
        return Ok((user, TokenScope::Granted));
    }
    match token {
        Some(token) => anchor
            .verify_token(token)
            .map(|holder| (Some(holder.user), holder.scope))
            .map_err(|e| e.to_string()),
        None => Err(
            "the client showed no certificate and no token (an --insecure client, or one without the cluster's certs dir?)"
                .into(),
        ),
    }
}

/// Enforces one client's permissions before anything reaches the driver.
struct Guard {
    user: String,
    grant: Arc<Grant>,
    log: Mutex<RateLimitedLog>,
    /// Where denials are counted.
    shared: Arc<Shared>,
    /// Where a denied request's error goes.
    replies: mpsc::UnboundedSender<ClientReply>,
}

impl Guard {
    /// Whether `request` may go on; a denied subscription is answered with
    /// `PermissionDenied` here. Invalid patterns go on, to get the driver's
    /// error.
    fn allows_request(&self, request: &ClientRequest) -> bool {
        let (ClientRequest::Subscribe { sub, pattern, .. }
        | ClientRequest::SubscribeDurable { sub, pattern, .. }) = request
        else {
            return true;
        };
        match Pattern::new(pattern.as_str()) {
            Ok(pattern) if !self.grant.may_subscribe(&pattern) => {
                let message = self.deny(Operation::Subscribe, pattern.as_str());
                let _ = self.replies.send(ClientReply::Error {
                    request: *sub,
                    error: RequestError::PermissionDenied,
                    message,
                });
                false
            }
            _ => true,
        }
    }

    /// Whether a publish frame may go on. A denied at-least-once event or
    /// request is refused on `replies`; a denied at-most-once one is
    /// dropped, as that mode has no answer (the client library checks
    /// before sending). Answering a request needs no permission: only who
    /// received the request knows where its answer goes.
    fn allows_publish(
        &self,
        frame: &PublishFrame,
        replies: &mpsc::UnboundedSender<PublishReply>,
    ) -> bool {
        let event = match frame {
            PublishFrame::Event(event)
            | PublishFrame::Directed { event, .. }
            | PublishFrame::AtLeastOnce(event)
            | PublishFrame::Request { event, .. } => event,
            PublishFrame::Flush(_) | PublishFrame::Reply { .. } => return true,
        };
        if self.grant.may_publish(&event.topic) {
            return true;
        }
        let message = self.deny(Operation::Publish, event.topic.as_str());
        let refusal = match frame {
            PublishFrame::AtLeastOnce(event) => PublishReply::Refused {
                seq: event.id.seq,
                reason: PublishRefusal::PermissionDenied,
                message,
            },
            PublishFrame::Request { request, .. } => PublishReply::RequestFailed {
                request: *request,
                reason: RequestFailure::PermissionDenied,
                message,
            },
            _ => return false,
        };
        let _ = replies.send(refusal);
        false
    }

    /// The denial's message, logged at most once per interval.
    fn deny(&self, operation: Operation, what: &str) -> String {
        let message = self.grant.denial(&self.user, operation, what);
        self.shared
            .operations_denied
            .fetch_add(1, Ordering::Relaxed);
        if let Some(denied) = lock(&self.log).count(1, Instant::now()) {
            tracing::warn!(denied, "{message}");
        }
        message
    }
}
