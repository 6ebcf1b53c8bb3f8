//! What waits for the node, shared by the client and its reader tasks:
//! replies to requests by number, flushes, answers to requests, each
//! subscription's channel, and at-least-once events awaiting confirmation.
//! Once the connection is gone nothing more is registered, so nothing waits
//! for an answer that cannot come.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use super::deliveries::BatchSender;
use super::request::Answer;
use super::ClientError;
use crate::wire::{ClientReply, Event};

/// The connection is gone: nothing will answer.
#[derive(Debug)]
pub(super) struct Gone;

type ConfirmationWaiter = (
    oneshot::Sender<Result<(), ClientError>>,
    OwnedSemaphorePermit,
);

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
    /// Where each subscription's events go.
    subscriptions: HashMap<u64, BatchSender>,
    /// Where each durable subscription's events go, with their positions.
    durables: HashMap<u64, mpsc::Sender<(u64, Event)>>,
    /// At-least-once events waiting for the node's confirmation, by
    /// sequence number; each holds a permit of the unconfirmed window.
    confirmations: BTreeMap<u64, ConfirmationWaiter>,
    closed: bool,
}

#[derive(Default)]
pub(super) struct Pending {
    waiting: Mutex<Waiting>,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `insert` unless the connection is gone.
    fn register(&self, insert: impl FnOnce(&mut Waiting)) -> Result<(), Gone> {
        let mut waiting = self.lock();
        if waiting.closed {
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

    /// The node replied to request `number`.
    pub fn replied(&self, number: u64, reply: ClientReply) {
        if let Some(waiter) = self.lock().replies.remove(&number) {
            let _ = waiter.send(reply);
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
    pub fn give_up(&self, request: u64) {
        self.lock().requests.remove(&request);
    }

    pub fn late_replies(&self) -> u64 {
        self.lock().late_replies
    }

    pub fn add_subscription(&self, sub: u64, sender: BatchSender) -> Result<(), Gone> {
        self.register(|w| {
            w.subscriptions.insert(sub, sender);
        })
    }

    pub fn remove_subscription(&self, sub: u64) {
        self.lock().subscriptions.remove(&sub);
    }

    /// A copy of subscription `sub`'s channel, so no lock is held while
    /// sending on it.
    pub fn subscription(&self, sub: u64) -> Option<BatchSender> {
        self.lock().subscriptions.get(&sub).cloned()
    }

    pub fn add_durable(&self, sub: u64, sender: mpsc::Sender<(u64, Event)>) -> Result<(), Gone> {
        self.register(|w| {
            w.durables.insert(sub, sender);
        })
    }

    pub fn remove_durable(&self, sub: u64) {
        self.lock().durables.remove(&sub);
    }

    pub fn durable(&self, sub: u64) -> Option<mpsc::Sender<(u64, Event)>> {
        self.lock().durables.get(&sub).cloned()
    }

    /// Waits for the node to confirm at-least-once event `seq`, holding
    /// `permit` of the unconfirmed window until then.
    pub fn confirmation(
        &self,
        seq: u64,
        permit: OwnedSemaphorePermit,
    ) -> Result<oneshot::Receiver<Result<(), ClientError>>, Gone> {
        let (tx, rx) = oneshot::channel();
        self.register(|w| {
            w.confirmations.insert(seq, (tx, permit));
        })?;
        Ok(rx)
    }

    /// The node stored every event up to `up_to`.
    pub fn confirmed_up_to(&self, up_to: u64) {
        let mut waiting = self.lock();
        let later = waiting.confirmations.split_off(&(up_to + 1));
        for (_, (waiter, _permit)) in std::mem::replace(&mut waiting.confirmations, later) {
            let _ = waiter.send(Ok(()));
        }
    }

    /// The node refused event `seq`.
    pub fn refused(&self, seq: u64, error: ClientError) {
        if let Some((waiter, _permit)) = self.lock().confirmations.remove(&seq) {
            let _ = waiter.send(Err(error));
        }
    }

    /// The connection is gone: every subscription ends, and every request,
    /// flush and confirmation still awaited fails.
    pub fn close(&self) {
        let mut waiting = self.lock();
        *waiting = Waiting {
            closed: true,
            late_replies: waiting.late_replies,
            ..Waiting::default()
        };
    }
}
