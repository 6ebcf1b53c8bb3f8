//! What waits for the node, shared by the client, its reader tasks and the
//! task that keeps it connected: replies to requests by number, flushes,
//! answers to requests, each subscription's channel (with what it takes to
//! subscribe again after a reconnect), and at-least-once events awaiting
//! confirmation or release (with the event, to send again after a
//! reconnect).
//!
//! While the client is disconnected nothing new may wait for a reply: a
//! request fails at once rather than wait for an answer that cannot come.
//! Subscriptions and unconfirmed events outlive the connection; once the
//! client is closed for good, everything ends.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use super::deliveries::BatchSender;
use super::request::Answer;
use super::ClientError;
use crate::wire::{ClientReply, ClientRequest, Event, Published, RetentionLimits};

/// The client is not connected (or closed for good): nothing will answer.
#[derive(Debug)]
pub(super) struct Gone;

struct ConfirmationWaiter {
    /// Kept to send again if the connection is lost first.
    event: Published,
    done: oneshot::Sender<Result<(), ClientError>>,
    /// A place in the unconfirmed window, freed with the confirmation.
    _permit: OwnedSemaphorePermit,
}

/// A plain subscription: where its events go, and what it subscribed to.
struct PlainSubscription {
    sender: BatchSender,
    pattern: String,
    group: Option<String>,
}

/// What a durable subscription was attached with.
#[derive(Debug, Clone)]
pub(super) struct DurableSpec {
    pub name: String,
    pub pattern: String,
    pub limits: RetentionLimits,
    pub ack_wait: Duration,
}

struct DurableRun {
    sender: mpsc::Sender<(u64, Event)>,
    spec: DurableSpec,
    /// The last position acknowledged, so a re-attach can say it again.
    acked: u64,
}

#[derive(Default)]
struct Waiting {
    /// Requests (subscribe, status…) waiting for their reply, by number.
    replies: HashMap<u64, oneshot::Sender<ClientReply>>,
    /// Flushes waiting for the node's answer.
    flushes: HashMap<u64, oneshot::Sender<()>>,
    /// Requests waiting for their answer, by number.
    requests: HashMap<u64, oneshot::Sender<Answer>>,
    /// Answers that came for no waiting request.
    late_replies: u64,
    subscriptions: HashMap<u64, PlainSubscription>,
    durables: HashMap<u64, DurableRun>,
    /// At-least-once events waiting for the node's confirmation, by
    /// sequence number.
    confirmations: BTreeMap<u64, ConfirmationWaiter>,
    /// Confirmed and not yet released: if the node dies for good they go
    /// again through another node. By sequence number.
    retained: BTreeMap<u64, Published>,
    /// Payload bytes of `retained`.
    retained_bytes: usize,
    /// The node released every event up to this one.
    released: u64,
    connected: bool,
    closed: bool,
}

pub(super) struct Pending {
    waiting: Mutex<Waiting>,
    /// Most payload bytes retained; see [`super::Reconnect::retain_bytes`].
    retain_bytes: usize,
}

impl Pending {
    pub fn new(retain_bytes: usize) -> Self {
        Pending {
            waiting: Mutex::default(),
            retain_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `insert` if the client is connected.
    fn register(&self, insert: impl FnOnce(&mut Waiting)) -> Result<(), Gone> {
        let mut waiting = self.lock();
        if !waiting.connected || waiting.closed {
            return Err(Gone);
        }
        insert(&mut waiting);
        Ok(())
    }

    /// Waits for the reply to request `number`.
    pub fn reply_to(&self, number: u64) -> Result<oneshot::Receiver<ClientReply>, Gone> {
        let (tx, rx) = oneshot::channel();
        self.register(|w| {
            w.replies.insert(number, tx);
        })?;
        Ok(rx)
    }

    /// Waits for the reply to a request made while restoring the client's
    /// state on a new connection, before the client counts as connected.
    pub fn restore_reply_to(&self, number: u64) -> oneshot::Receiver<ClientReply> {
        let (tx, rx) = oneshot::channel();
        self.lock().replies.insert(number, tx);
        rx
    }

    /// The node replied to request `number`. A refusal nobody waits for
    /// any more is for a durable subscription restored without waiting for
    /// its home: the subscription ends (its stream of events closes).
    pub fn replied(&self, number: u64, reply: ClientReply) {
        let mut waiting = self.lock();
        if let Some(waiter) = waiting.replies.remove(&number) {
            let _ = waiter.send(reply);
        } else if let ClientReply::Error { message, .. } = reply {
            if waiting.durables.remove(&number).is_some() {
                tracing::warn!(sub = number, "a durable subscription ends: {message}");
            }
        }
    }

    /// Waits for the node to answer flush `token`.
    pub fn flush(&self, token: u64) -> Result<oneshot::Receiver<()>, Gone> {
        let (tx, rx) = oneshot::channel();
        self.register(|w| {
            w.flushes.insert(token, tx);
        })?;
        Ok(rx)
    }

    pub fn flushed(&self, token: u64) {
        if let Some(waiter) = self.lock().flushes.remove(&token) {
            let _ = waiter.send(());
        }
    }

    /// Waits for the answer to request `request`.
    pub fn answer_to(&self, request: u64) -> Result<oneshot::Receiver<Answer>, Gone> {
        let (tx, rx) = oneshot::channel();
        self.register(|w| {
            w.requests.insert(request, tx);
        })?;
        Ok(rx)
    }

    /// An answer to `request`; counted as late when nothing waits for it.
    pub fn answered(&self, request: u64, answer: Answer) {
        let mut waiting = self.lock();
        match waiting.requests.remove(&request) {
            Some(waiter) => {
                let _ = waiter.send(answer);
            }
            None => waiting.late_replies += 1,
        }
    }

    /// Request `request` timed out: an answer from now on is late.
    /// Drops the wait for the control reply numbered `number`.
    pub fn forget_reply(&self, number: u64) {
        self.lock().replies.remove(&number);
    }

    pub fn give_up(&self, request: u64) {
        self.lock().requests.remove(&request);
    }

    pub fn late_replies(&self) -> u64 {
        self.lock().late_replies
    }

    pub fn add_subscription(
        &self,
        sub: u64,
        sender: BatchSender,
        pattern: &str,
        group: Option<String>,
    ) -> Result<(), Gone> {
        let subscription = PlainSubscription {
            sender,
            pattern: pattern.to_string(),
            group,
        };
        self.register(|w| {
            w.subscriptions.insert(sub, subscription);
        })
    }

    pub fn remove_subscription(&self, sub: u64) {
        self.lock().subscriptions.remove(&sub);
    }

    /// A copy of subscription `sub`'s channel, so no lock is held while
    /// sending on it.
    pub fn subscription(&self, sub: u64) -> Option<BatchSender> {
        Some(self.lock().subscriptions.get(&sub)?.sender.clone())
    }

    /// Registers durable subscription `sub`, whose subscriber has handled
    /// everything up to `handled` already.
    pub fn add_durable(
        &self,
        sub: u64,
        sender: mpsc::Sender<(u64, Event)>,
        spec: DurableSpec,
        handled: u64,
    ) -> Result<(), Gone> {
        self.register(|w| {
            w.durables.insert(
                sub,
                DurableRun {
                    sender,
                    spec,
                    acked: handled,
                },
            );
        })
    }

    pub fn remove_durable(&self, sub: u64) {
        self.lock().durables.remove(&sub);
    }

    pub fn durable(&self, sub: u64) -> Option<mpsc::Sender<(u64, Event)>> {
        Some(self.lock().durables.get(&sub)?.sender.clone())
    }

    /// Durable subscription `sub` acknowledged up to `position`.
    pub fn durable_acked(&self, sub: u64, position: u64) {
        if let Some(run) = self.lock().durables.get_mut(&sub) {
            run.acked = run.acked.max(position);
        }
    }

    /// The last position durable subscription `sub` acknowledged (or was
    /// registered as having handled).
    pub fn durable_ack(&self, sub: u64) -> u64 {
        self.lock().durables.get(&sub).map_or(0, |run| run.acked)
    }

    /// What to send a new connection so every subscription is as it was:
    /// one request per subscription, with its number, then the
    /// acknowledgements of durable ones.
    pub fn restore_requests(&self) -> (Vec<(u64, ClientRequest)>, Vec<ClientRequest>) {
        let waiting = self.lock();
        let mut subscribe: Vec<(u64, ClientRequest)> = waiting
            .subscriptions
            .iter()
            .map(|(&sub, s)| {
                let request = ClientRequest::Subscribe {
                    sub,
                    pattern: s.pattern.clone(),
                    group: s.group.clone(),
                };
                (sub, request)
            })
            .collect();
        let mut acks = Vec::new();
        for (&sub, run) in &waiting.durables {
            let request = ClientRequest::SubscribeDurable {
                sub,
                name: run.spec.name.clone(),
                pattern: run.spec.pattern.clone(),
                limits: run.spec.limits,
                ack_wait_ms: ack_wait_ms(run.spec.ack_wait),
            };
            subscribe.push((sub, request));
            if run.acked > 0 {
                acks.push(ClientRequest::AckDurable {
                    sub,
                    position: run.acked,
                });
            }
        }
        (subscribe, acks)
    }

    /// Waits for the node to confirm at-least-once `event`, holding
    /// `permit` of the unconfirmed window until then. Allowed while
    /// disconnected: the event goes out with the others after a reconnect.
    pub fn confirmation(
        &self,
        event: Published,
        permit: OwnedSemaphorePermit,
    ) -> Result<oneshot::Receiver<Result<(), ClientError>>, Gone> {
        let (tx, rx) = oneshot::channel();
        let mut waiting = self.lock();
        if waiting.closed {
            return Err(Gone);
        }
        waiting.confirmations.insert(
            event.id.seq,
            ConfirmationWaiter {
                event,
                done: tx,
                _permit: permit,
            },
        );
        Ok(rx)
    }

    /// The at-least-once events not yet released, in order: they go again
    /// on a new connection. Whatever the new node, the events from the
    /// first of them on reach it in order, which is what lets durable
    /// homes drop the copies that also arrive through the old node.
    pub fn unreleased(&self) -> Vec<Published> {
        let waiting = self.lock();
        let mut events: Vec<Published> = waiting.retained.values().cloned().collect();
        events.extend(waiting.confirmations.values().map(|w| w.event.clone()));
        events.sort_by_key(|event| event.id.seq);
        events
    }

    /// The node stored every event up to `up_to`: each is kept until it is
    /// released too, as far as the bound allows.
    pub fn confirmed_up_to(&self, up_to: u64) {
        let mut waiting = self.lock();
        let later = waiting.confirmations.split_off(&(up_to + 1));
        for (seq, waiter) in std::mem::replace(&mut waiting.confirmations, later) {
            let _ = waiter.done.send(Ok(()));
            if seq > waiting.released {
                waiting.retained_bytes += waiter.event.payload.len();
                waiting.retained.insert(seq, waiter.event);
            }
        }
        // The oldest go first: forgetting from the front keeps what is
        // sent again in order and without holes.
        while waiting.retained_bytes > self.retain_bytes {
            let Some((_, event)) = waiting.retained.pop_first() else {
                break;
            };
            waiting.retained_bytes -= event.payload.len();
        }
    }

    /// The node handed every event up to `up_to` on: none need go again.
    pub fn released_up_to(&self, up_to: u64) {
        let mut waiting = self.lock();
        waiting.released = waiting.released.max(up_to);
        let later = waiting.retained.split_off(&(up_to + 1));
        for event in std::mem::replace(&mut waiting.retained, later).into_values() {
            waiting.retained_bytes -= event.payload.len();
        }
    }

    /// The node refused event `seq`.
    pub fn refused(&self, seq: u64, error: ClientError) {
        if let Some(waiter) = self.lock().confirmations.remove(&seq) {
            let _ = waiter.done.send(Err(error));
        }
    }

    /// The client's state is restored on a new connection: requests may
    /// wait for replies again.
    pub fn connected(&self) {
        self.lock().connected = true;
    }

    /// The connection is lost: every request and flush still awaited fails
    /// (their answers cannot come); subscriptions and unconfirmed events
    /// wait for the next connection.
    pub fn disconnected(&self) {
        let mut waiting = self.lock();
        waiting.connected = false;
        waiting.replies.clear();
        waiting.flushes.clear();
        waiting.requests.clear();
    }

    /// Subscription `sub` cannot be restored: it ends.
    pub fn end_subscription(&self, sub: u64) {
        let mut waiting = self.lock();
        waiting.subscriptions.remove(&sub);
        waiting.durables.remove(&sub);
    }

    /// The client is closed for good: every subscription ends, and every
    /// request, flush and confirmation still awaited fails.
    pub fn close(&self) {
        let mut waiting = self.lock();
        *waiting = Waiting {
            closed: true,
            released: waiting.released,
            late_replies: waiting.late_replies,
            ..Waiting::default()
        };
    }
}

/// A durable subscription's ack wait as the protocol carries it.
pub(super) fn ack_wait_ms(ack_wait: Duration) -> u32 {
    ack_wait.as_millis().clamp(1, u32::MAX as u128) as u32
}
