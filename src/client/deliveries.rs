//! The client's reader tasks: replies on the control stream, answers on
//! the publish stream, and deliveries, each handed to what waits for it.

use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};

use super::pending::Pending;
use super::request::Answer;
use super::{ClientError, SUBSCRIPTION_BUFFER_BYTES};
use crate::wire::stream::FrameReader;
use crate::wire::{compact_events, ClientReply, Delivery, Event, PublishReply, DEFAULT_MAX_FRAME};

/// Hands each reply on the control stream to the request waiting for it.
pub(super) async fn read_replies(mut reader: FrameReader, pending: Arc<Pending>) {
    while let Ok(Some(reply)) = reader.next::<ClientReply>().await {
        let number = match &reply {
            ClientReply::Subscribed { sub }
            | ClientReply::Unsubscribed { sub }
            | ClientReply::DurableAttached { sub, .. } => *sub,
            ClientReply::Status { request, .. }
            | ClientReply::Interest { request, .. }
            | ClientReply::Tree { request, .. }
            | ClientReply::Error { request, .. } => *request,
            ClientReply::Welcome { .. } => continue,
        };
        pending.replied(number, reply);
    }
}

/// Hands the node's answers on the publish stream to what waits for them.
pub(super) async fn read_publish_replies(mut reader: FrameReader, pending: Arc<Pending>) {
    while let Ok(Some(reply)) = reader.next::<PublishReply>().await {
        match reply {
            PublishReply::Flushed(token) => pending.flushed(token),
            PublishReply::Acked { up_to } => pending.confirmed_up_to(up_to),
            PublishReply::Released { up_to } => pending.released_up_to(up_to),
            PublishReply::Refused {
                seq,
                reason,
                message,
            } => pending.refused(seq, ClientError::PublishRefused { reason, message }),
            PublishReply::RequestFailed {
                request,
                reason,
                message,
            } => pending.answered(request, Answer::Failed(reason, message)),
        }
    }
}

/// Where a plain subscription's batches go. The channel is bounded in
/// bytes, not batches, by `room`: a batch may hold one event or a
/// thousand.
#[derive(Clone)]
pub(super) struct BatchSender {
    pub events: mpsc::UnboundedSender<(Vec<Event>, u32)>,
    /// A permit per byte sent and not yet taken by the subscription; each
    /// batch carries how many it took.
    pub room: Arc<Semaphore>,
}

/// What an event counts against its subscription's buffer.
fn buffered_bytes(event: &Event) -> usize {
    event.payload.len() + event.topic.as_str().len() + 64
}

/// Consecutive events of one delivery batch for the same subscription.
#[derive(Default)]
struct SubscriptionRun {
    sub: Option<u64>,
    target: Option<BatchSender>,
    events: Vec<Event>,
}

impl SubscriptionRun {
    /// Sends the events gathered so far to their subscription, if it
    /// still exists, once it has room for them.
    async fn send(&mut self) {
        let events = std::mem::take(&mut self.events);
        let Some(target) = &self.target else {
            return;
        };
        if events.is_empty() {
            return;
        }
        let bytes: usize = events.iter().map(buffered_bytes).sum();
        // A batch larger than the whole buffer takes all of it.
        let n = bytes.min(SUBSCRIPTION_BUFFER_BYTES) as u32;
        // The subscription returns the permits as it takes the batch, and
        // closes the semaphore when dropped, so this never waits on a
        // subscription that is gone.
        if let Ok(permits) = target.room.acquire_many(n).await {
            permits.forget();
            let _ = target.events.send((events, n));
        }
    }
}

/// Hands each delivery to its subscription, or an answer to its request,
/// until the connection is gone.
pub(super) async fn read_deliveries(connection: quinn::Connection, pending: Arc<Pending>) {
    while let Ok(stream) = connection.accept_uni().await {
        let mut reader = FrameReader::new(stream, DEFAULT_MAX_FRAME);
        let mut batch = Vec::new();
        while let Ok(true) = reader.next_batch::<Delivery>(&mut batch).await {
            // Handed to the application, which may keep them: not views
            // that keep whole receive buffers.
            compact_events(&mut batch, |delivery| match delivery {
                Delivery::Event { event, .. }
                | Delivery::Durable { event, .. }
                | Delivery::Request { event, .. }
                | Delivery::Reply { event, .. } => Some(event),
            });
            // Most of a batch is for one subscription: its events go to it
            // together, and its channel is looked up (under a lock) once.
            let mut run = SubscriptionRun::default();
            let total = batch.len();
            for (i, delivery) in batch.drain(..).enumerate() {
                let (sub, event) = match delivery {
                    Delivery::Event { sub, event } => (sub, event),
                    Delivery::Request {
                        sub,
                        mut event,
                        reply,
                    } => {
                        event.reply = Some(Box::new(reply));
                        (sub, event)
                    }
                    Delivery::Durable {
                        sub,
                        position,
                        event,
                    } => {
                        run.send().await;
                        if let Some(target) = pending.durable(sub) {
                            let _ = target.send((position, event)).await;
                        }
                        continue;
                    }
                    Delivery::Reply { request, event } => {
                        pending.answered(request, Answer::Reply(event));
                        continue;
                    }
                };
                if run.sub != Some(sub) {
                    run.send().await;
                    run.sub = Some(sub);
                    run.target = pending.subscription(sub);
                    if i == 0 {
                        // Most batches are one subscription's: room for
                        // all, as growing moves every event.
                        run.events.reserve(total);
                    }
                }
                run.events.push(event);
            }
            run.send().await;
        }
    }
}
