//! The clients attached to durable subscriptions homed here: what each was
//! sent, what it acknowledged, and what to read for it next. At most
//! `unacked` events beyond a client's last ack are out at once; what it
//! does not acknowledge within its ack wait is sent again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::store::QueueStats;
use crate::wire::Event;

/// Events read from the store per read.
const READ_CHUNK: usize = 512;

struct Attachment {
    /// Tells this attachment from an earlier one of the same name.
    id: u64,
    session: u64,
    sub: u64,
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
    /// Attaches `(session, sub)` to durable `name`, whose queue holds
    /// `stats`: delivery starts at the oldest event held.
    pub fn attach(
        &mut self,
        name: &str,
        session: u64,
        sub: u64,
        ack_wait: Duration,
        stats: &QueueStats,
        now: Instant,
    ) {
        self.next_id += 1;
        self.by_name.insert(
            name.to_string(),
            Attachment {
                id: self.next_id,
                session,
                sub,
                sent: stats.first - 1,
                acked: stats.first - 1,
                ack_wait,
                progress_at: now,
                reading: false,
            },
        );
    }

    pub fn is_attached(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Whether `(session, sub)` names an attachment.
    pub fn uses(&self, session: u64, sub: u64) -> bool {
        self.by_name
            .values()
            .any(|a| (a.session, a.sub) == (session, sub))
    }

    /// Detaches a gone client's attachments, or the one it dropped.
    /// Returns whether there was one.
    pub fn detach(&mut self, session: u64, sub: Option<u64>) -> bool {
        let before = self.by_name.len();
        self.by_name
            .retain(|_, a| !(a.session == session && sub.is_none_or(|s| s == a.sub)));
        before != self.by_name.len()
    }

    /// Detaches whatever client durable `name` has.
    pub fn remove(&mut self, name: &str) {
        self.by_name.remove(name);
    }

    /// The client of `(session, sub)` has handled everything up to
    /// `position`. Returns the durable's name and the position, when that
    /// is progress.
    pub fn acknowledged(
        &mut self,
        session: u64,
        sub: u64,
        position: u64,
        now: Instant,
    ) -> Option<(String, u64)> {
        let (name, attachment) = self
            .by_name
            .iter_mut()
            .find(|(_, a)| (a.session, a.sub) == (session, sub))?;
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

    /// The store answered `read`. Returns the deliveries it makes, or
    /// `None` if the read is stale: the client went, or was rewound while
    /// the read was out.
    pub fn read_done(
        &mut self,
        read: &QueueRead,
        events: Vec<(u64, Event)>,
    ) -> Option<Vec<DurableDelivery>> {
        let attachment = self
            .by_name
            .get_mut(&read.durable)
            .filter(|a| a.id == read.attachment)?;
        attachment.reading = false;
        if attachment.sent + 1 != read.from {
            return None;
        }
        let deliveries = events
            .into_iter()
            .map(|(position, event)| {
                attachment.sent = position;
                DurableDelivery {
                    session: attachment.session,
                    sub: attachment.sub,
                    position,
                    event,
                }
            })
            .collect();
        Some(deliveries)
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
