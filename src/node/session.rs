//! Client connections: the hello, then tasks that carry requests, publish
//! streams and deliveries between the client and the driver.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::link::close_for;
use super::stream::{write_batches_on_uni, write_each, FrameReader};
use super::{Input, Shared};
use crate::wire::{
    ClientReply, ClientRequest, Delivery, ErrorCode, PublishFrame, PublishReply, PROTOCOL_VERSION,
};

/// How long a client may take to open its control stream and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Delivery batches queued for one client before events are dropped for it.
const DELIVERY_QUEUE_BATCHES: usize = 1024;

/// The driver's handle on one client connection.
pub struct SessionHandle {
    pub replies: mpsc::UnboundedSender<ClientReply>,
    /// Bounded in batches and, through `queued`, in bytes: a slow
    /// consumer costs bounded memory.
    pub deliveries: mpsc::Sender<Vec<Delivery>>,
    /// Bytes of deliveries handed over and not yet written to the stream
    /// (as [`delivery_bytes`] counts them).
    pub queued: Arc<AtomicUsize>,
    pub connection: quinn::Connection,
    /// Plain and group subscriptions held, against the node's limit.
    pub subscriptions: usize,
    /// Disconnected for not reading its deliveries; nothing more is queued.
    pub slow: bool,
}

/// Serves one client connection until it closes.
pub async fn serve(shared: Arc<Shared>, connection: quinn::Connection) {
    let remote = connection.remote_address();
    let control = async {
        let (send, recv) = tokio::time::timeout(HELLO_TIMEOUT, connection.accept_bi())
            .await
            .map_err(|_| ErrorCode::HelloRequired)?
            .map_err(|_| ErrorCode::Closed)?;
        let mut reader = FrameReader::new(recv, shared.max_frame);
        let first = tokio::time::timeout(HELLO_TIMEOUT, reader.next::<ClientRequest>())
            .await
            .map_err(|_| ErrorCode::HelloRequired)?;
        match first {
            Ok(Some(ClientRequest::Hello { version, name })) if version == PROTOCOL_VERSION => {
                Ok((send, reader, name))
            }
            Ok(Some(ClientRequest::Hello { version, .. })) => {
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
    let (send, reader, name) = match control.await {
        Ok(parts) => parts,
        Err(ErrorCode::Closed) => return,
        Err(code) => {
            tracing::warn!(%remote, ?code, "refused client");
            connection.close(code.varint(), code.reason());
            return;
        }
    };
    let session = shared.next_id();
    let span = tracing::info_span!("client", session, %remote, name = %name);
    let (replies_tx, replies_rx) = mpsc::unbounded_channel();
    let (deliveries_tx, deliveries_rx) = mpsc::channel(DELIVERY_QUEUE_BATCHES);
    let queued = Arc::new(AtomicUsize::new(0));
    let _ = replies_tx.send(ClientReply::Welcome {
        version: PROTOCOL_VERSION,
        node: shared.identity.id,
        name: shared.name.clone(),
        cluster: shared.cluster.clone(),
    });
    let handle = SessionHandle {
        replies: replies_tx,
        deliveries: deliveries_tx,
        queued: queued.clone(),
        connection: connection.clone(),
        subscriptions: 0,
        slow: false,
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
    let written = move |batches: &[Vec<Delivery>]| {
        let bytes: usize = batches.iter().flatten().map(delivery_bytes).sum();
        queued.fetch_sub(bytes, Ordering::Relaxed);
    };
    let deliveries = write_batches_on_uni(connection.clone(), deliveries_rx, written);
    tasks.spawn(deliveries.instrument(span.clone()));
    tasks.spawn(
        read_requests(shared.clone(), connection.clone(), session, reader).instrument(span.clone()),
    );
    tasks
        .spawn(accept_publish_streams(shared.clone(), connection.clone()).instrument(span.clone()));
    let reason = connection.closed().await;
    tasks.abort_all();
    span.in_scope(|| tracing::debug!("client gone: {reason}"));
    let _ = shared.inbox.send(Input::SessionClosed { session }).await;
}

async fn read_requests(
    shared: Arc<Shared>,
    connection: quinn::Connection,
    session: u64,
    mut reader: FrameReader,
) {
    let mut batch = Vec::new();
    loop {
        match reader.next_batch::<ClientRequest>(&mut batch).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => return close_for(&connection, e),
        }
        for request in batch.drain(..) {
            if matches!(request, ClientRequest::Hello { .. }) {
                tracing::warn!("second hello from client");
                connection.close(
                    ErrorCode::ProtocolViolation.varint(),
                    ErrorCode::ProtocolViolation.reason(),
                );
                return;
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

async fn accept_publish_streams(shared: Arc<Shared>, connection: quinn::Connection) {
    let mut streams = JoinSet::new();
    while let Ok((send, recv)) = connection.accept_bi().await {
        let (shared, connection) = (shared.clone(), connection.clone());
        streams.spawn(async move {
            let (reply_tx, reply_rx) = mpsc::unbounded_channel::<PublishReply>();
            let replies = tokio::spawn(write_each(send, reply_rx));
            let mut reader = FrameReader::new(recv, shared.max_frame);
            loop {
                let mut frames: Vec<PublishFrame> = Vec::new();
                match reader.next_batch(&mut frames).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        close_for(&connection, e);
                        break;
                    }
                }
                let input = Input::Publish {
                    frames,
                    reply: reply_tx.clone(),
                };
                if shared.inbox.send(input).await.is_err() {
                    break;
                }
            }
            drop(reply_tx);
            let _ = replies.await;
        });
    }
}

/// What a delivery holds in memory, roughly: payload, topic and headers,
/// plus a fixed overhead.
pub fn delivery_bytes(delivery: &Delivery) -> usize {
    let event = match delivery {
        Delivery::Event { event, .. } | Delivery::Durable { event, .. } => event,
    };
    let headers: usize = event.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    event.payload.len() + event.topic.as_str().len() + headers + 64
}
