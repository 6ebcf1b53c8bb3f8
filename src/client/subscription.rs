//! What a client holds of its subscriptions and at-least-once publishes:
//! the events of a subscription or a durable one, and the node's answer to
//! an event published at least once.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::pending::Pending;
use super::ClientError;
use crate::wire::{ClientRequest, Event, EventId};

/// The events of one subscription, in the order the node sent them.
pub struct Subscription {
    pub(super) sub: u64,
    pub(super) events: mpsc::UnboundedReceiver<(Vec<Event>, u32)>,
    /// Room in the buffer, returned as batches are taken.
    pub(super) room: Arc<Semaphore>,
    /// What is left of the batch received last.
    pub(super) ready: std::vec::IntoIter<Event>,
    pub(super) requests: mpsc::UnboundedSender<ClientRequest>,
    pub(super) pending: Arc<Pending>,
}

impl Subscription {
    /// The next event; `None` once the connection is gone.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.ready.next() {
                return Some(event);
            }
            let (batch, room) = self.events.recv().await?;
            self.room.add_permits(room as usize);
            self.ready = batch.into_iter();
        }
    }

    /// The events that arrived together: what is left of the batch the
    /// last [`Subscription::next`] came from, else the next batch, in
    /// order and never empty; `None` once the connection is gone. For
    /// consumers that handle events in bulk: one wake-up for many events.
    pub async fn next_batch(&mut self) -> Option<Vec<Event>> {
        // Collecting a vec's own iterator reuses its allocation.
        let rest: Vec<Event> = std::mem::take(&mut self.ready).collect();
        if !rest.is_empty() {
            return Some(rest);
        }
        let (batch, room) = self.events.recv().await?;
        self.room.add_permits(room as usize);
        Some(batch)
    }

    /// Stops the subscription; events already received are discarded.
    /// Dropping the subscription does the same.
    pub fn unsubscribe(self) {
        drop(self);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.room.close();
        self.pending.remove_subscription(self.sub);
        let _ = self
            .requests
            .send(ClientRequest::Unsubscribe { sub: self.sub });
    }
}

/// The node's answer to one at-least-once event.
pub struct Confirmation {
    pub(super) id: EventId,
    pub(super) rx: oneshot::Receiver<Result<(), ClientError>>,
}

impl Confirmation {
    pub fn id(&self) -> EventId {
        self.id
    }

    /// Waits until the node has stored the event, or refused it.
    pub async fn confirmed(self) -> Result<EventId, ClientError> {
        match self.rx.await {
            Ok(Ok(())) => Ok(self.id),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClientError::Unconfirmed(self.id)),
        }
    }
}

/// One event of a durable subscription, at its position in the queue.
#[derive(Debug, Clone)]
pub struct DurableEvent {
    pub position: u64,
    pub event: Event,
}

/// The events of a durable subscription, each exactly once and in order.
/// Acknowledge what is handled with [`DurableSubscription::ack`]; what is
/// not acknowledged within the ack wait is delivered again (and skipped
/// here if it was already handed out).
pub struct DurableSubscription {
    pub(super) acker: DurableAcker,
    /// The position the next event handed out must have.
    pub(super) next: u64,
    pub(super) backlog: u64,
    pub(super) events: mpsc::Receiver<(u64, Event)>,
}

impl DurableSubscription {
    /// Events the node held for this subscription when it attached.
    pub fn backlog(&self) -> u64 {
        self.backlog
    }

    /// The next event; `None` once the connection is gone.
    pub async fn next(&mut self) -> Option<DurableEvent> {
        loop {
            let (position, event) = self.events.recv().await?;
            if let Some(event) = self.in_order(position, event) {
                return Some(event);
            }
        }
    }

    /// The next event if one has arrived, without waiting: for consumers
    /// that take what is there in bulk after each [`DurableSubscription::next`].
    pub fn try_next(&mut self) -> Option<DurableEvent> {
        while let Ok((position, event)) = self.events.try_recv() {
            if let Some(event) = self.in_order(position, event) {
                return Some(event);
            }
        }
        None
    }

    /// Positions count up by one: an earlier one is a redelivery of what
    /// was handed out, a later one follows a delivery the node dropped and
    /// will send again.
    fn in_order(&mut self, position: u64, event: Event) -> Option<DurableEvent> {
        if position < self.next {
            self.acker.redelivered(position, self.events.is_empty());
        }
        if position != self.next {
            return None;
        }
        self.next += 1;
        Some(DurableEvent { position, event })
    }

    /// Whether every event received so far has been handed out.
    pub fn is_caught_up(&self) -> bool {
        self.events.is_empty()
    }

    /// Confirms every event up to and including `position`: the node may
    /// delete them.
    pub fn ack(&self, position: u64) {
        self.acker.ack(position);
    }

    /// A handle that acknowledges for this subscription from elsewhere (a
    /// task handling events it was passed, say), while it lasts.
    pub fn acker(&self) -> DurableAcker {
        self.acker.clone()
    }
}

impl Drop for DurableSubscription {
    /// Detaches; the subscription and its stored events stay on the node.
    fn drop(&mut self) {
        let acker = &self.acker;
        acker.pending.remove_durable(acker.sub);
        let _ = acker
            .requests
            .send(ClientRequest::Unsubscribe { sub: acker.sub });
    }
}

/// Acknowledges the events of one durable subscription; from
/// [`DurableSubscription::acker`]. Does nothing once the subscription is
/// dropped.
#[derive(Clone)]
pub struct DurableAcker {
    pub(super) sub: u64,
    pub(super) requests: mpsc::UnboundedSender<ClientRequest>,
    pub(super) pending: Arc<Pending>,
}

/// While the node delivers again what was acknowledged, the ack is said
/// again once per this many positions (and at the end of each burst).
const REACK_EVERY: u64 = 256;

impl DurableAcker {
    /// Confirms every event up to and including `position`: the node may
    /// delete them.
    pub fn ack(&self, position: u64) {
        // Said again to the node of the next connection, if it is lost.
        self.pending.durable_acked(self.sub, position);
        let _ = self.requests.send(ClientRequest::AckDurable {
            sub: self.sub,
            position,
        });
    }

    /// The node delivered `position` again. If it was acknowledged, the
    /// node lost that ack (a restart before the ack reached its disk, or
    /// an ack said again to a re-attach before it sent anything, which it
    /// ignores): the redelivered events are never handed out again, so
    /// nothing else would acknowledge them, and a window of them would
    /// stall the subscription for good.
    fn redelivered(&self, position: u64, burst_ends: bool) {
        let acked = self.pending.durable_ack(self.sub);
        let due = position == acked || position.is_multiple_of(REACK_EVERY) || burst_ends;
        if position <= acked && due {
            let _ = self.requests.send(ClientRequest::AckDurable {
                sub: self.sub,
                position: acked,
            });
        }
    }
}
