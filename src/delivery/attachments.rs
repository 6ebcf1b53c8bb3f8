//! The clients attached to durable subscriptions homed here: what each was
//! sent, what it acknowledged, and what to read for it next. At most
//! `unacked` events beyond a client's last ack are out at once; what it
//! does not acknowledge within its ack wait is sent again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::identity::NodeId;
use crate::store::QueueStats;
use crate::wire::Event;

/// Events read from the store per read.
const READ_CHUNK: usize = 512;

/// Who is attached to a durable subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Attached {
    /// A client of this node.
    Local {
        /// The client's session.
        session: u64,
        /// The client's subscription number.
        sub: u64,
    },
    /// A client of another node, through it.
    Remote {
        /// The node the client attached at.
        node: NodeId,
        /// That node's number for the attachment.
        attach: u64,
    },
}

struct Attachment {
    /// Tells this attachment from an earlier one of the same name.
    id: u64,
    client: Attached,
    /// Last position handed to the client.
    sent: u64,
    /// Last position the client acknowledged.
    acked: u64,
    ack_wait: Duration,
    /// When the client last made progress; with `ack_wait`, when to send
    /// again.
    progress_at: Instant,
    /// A read for it is out.
    reading: bool,
}

/// Events to read from a durable subscription's queue for its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRead {
    /// The durable subscription whose queue to read.
    pub durable: String,
    /// The attachment it is for.
    pub attachment: u64,
    /// The first position to read.
    pub from: u64,
    /// Most events to read.
    pub limit: usize,
}

/// One event for an attached client.
#[derive(Debug, Clone, PartialEq)]
pub struct DurableDelivery {
    /// The client's session.
    pub session: u64,
    /// The client's subscription number.
    pub sub: u64,
    /// The event's position in the queue, which the client acknowledges.
    pub position: u64,
    /// The event.
    pub event: Event,
}

#[derive(Default)]
pub struct Attachments {
    by_name: BTreeMap<String, Attachment>,
    next_id: u64,
}

impl Attachments {
    /// Attaches `client` to durable `name`, whose queue holds `stats`:
    /// delivery starts after `acked`, or at the oldest event held.
    pub fn attach(
        &mut self,
        name: &str,
        client: Attached,
        acked: u64,
        ack_wait: Duration,
        stats: &QueueStats,
        now: Instant,
    ) {
        self.next_id += 1;
        let acked = acked.max(stats.first - 1);
        self.by_name.insert(
            name.to_string(),
            Attachment {
                id: self.next_id,
                client,
                sent: acked,
                acked,
                ack_wait,
                progress_at: now,
                reading: false,
            },
        );
    }

    /// Who is attached to durable `name`.
    pub fn client(&self, name: &str) -> Option<Attached> {
        self.by_name.get(name).map(|a| a.client)
    }

    /// Whether `client` is attached.
    pub fn uses(&self, client: Attached) -> bool {
        self.by_name.values().any(|a| a.client == client)
    }

    /// Detaches a gone local client's attachments, or the one it dropped.
    /// Returns whether there was one.
    pub fn detach(&mut self, session: u64, sub: Option<u64>) -> bool {
        let before = self.by_name.len();
        self.by_name.retain(|_, a| match a.client {
            Attached::Local { session: s, sub: n } => {
                !(s == session && sub.is_none_or(|sub| sub == n))
            }
            Attached::Remote { .. } => true,
        });
        before != self.by_name.len()
    }

    /// Detaches whatever client durable `name` has.
    pub fn remove(&mut self, name: &str) {
        self.by_name.remove(name);
    }

    /// `client` has handled everything up to `position`. Returns the
    /// durable's name and the position, when that is progress.
    pub fn acknowledged(
        &mut self,
        client: Attached,
        position: u64,
        now: Instant,
    ) -> Option<(String, u64)> {
        let (name, attachment) = self.by_name.iter_mut().find(|(_, a)| a.client == client)?;
        let position = position.min(attachment.sent);
        if position <= attachment.acked {
            return None;
        }
        attachment.acked = position;
        attachment.progress_at = now;
        Some((name.clone(), position))
    }

    /// Rewinds every client that acknowledged nothing within its ack wait,
    /// so what it was sent goes again. Returns how many events that is.
    pub fn rewind_overdue(&mut self, now: Instant) -> u64 {
        let mut again = 0;
        for (name, attachment) in &mut self.by_name {
            if attachment.sent > attachment.acked
                && now.duration_since(attachment.progress_at) >= attachment.ack_wait
            {
                let unacked = attachment.sent - attachment.acked;
                tracing::debug!(durable = %name, unacked, "no ack in time; delivering again");
                again += unacked;
                attachment.sent = attachment.acked;
                attachment.progress_at = now;
            }
        }
        again
    }

    pub fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }

    /// What to read next for durable `name`'s client, whose queue holds
    /// `stats`: from after the last sent, up to `unacked` beyond its last
    /// ack. `None` while a read is out or nothing more may go.
    pub fn next_read(&mut self, name: &str, stats: &QueueStats, unacked: u64) -> Option<QueueRead> {
        let attachment = self.by_name.get_mut(name)?;
        // Positions below the queue's first were consumed: nothing to send.
        attachment.sent = attachment.sent.max(stats.first - 1);
        attachment.acked = attachment.acked.max(stats.first - 1);
        let allowed = (attachment.acked + unacked).min(stats.next - 1);
        if attachment.reading || attachment.sent >= allowed {
            return None;
        }
        attachment.reading = true;
        Some(QueueRead {
            durable: name.to_string(),
            attachment: attachment.id,
            from: attachment.sent + 1,
            limit: ((allowed - attachment.sent) as usize).min(READ_CHUNK),
        })
    }

    /// The store answered `read`. Returns who the events go to, or `None`
    /// if the read is stale: the client went, or was rewound while the
    /// read was out.
    pub fn read_done(&mut self, read: &QueueRead, events: &[(u64, Event)]) -> Option<Attached> {
        let attachment = self
            .by_name
            .get_mut(&read.durable)
            .filter(|a| a.id == read.attachment)?;
        attachment.reading = false;
        if attachment.sent + 1 != read.from {
            return None;
        }
        if let Some((last, _)) = events.last() {
            attachment.sent = *last;
        }
        Some(attachment.client)
    }

    /// Sends again, from after `acked`, what was sent to `client` and not
    /// acknowledged: its path may have lost it.
    pub fn rewind(&mut self, client: Attached, acked: u64, now: Instant) {
        if let Some(attachment) = self.by_name.values_mut().find(|a| a.client == client) {
            attachment.acked = attachment.acked.max(acked);
            attachment.sent = attachment.acked;
            attachment.progress_at = now;
        }
    }

    /// Detaches `client`, wherever it is attached.
    pub fn detach_client(&mut self, client: Attached) {
        self.by_name.retain(|_, a| a.client != client);
    }

    /// A read that failed: the next attempt may go.
    pub fn read_failed(&mut self, read: &QueueRead) {
        if let Some(attachment) = self
            .by_name
            .get_mut(&read.durable)
            .filter(|a| a.id == read.attachment)
        {
            attachment.reading = false;
        }
    }
}
