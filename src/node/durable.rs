//! The driver's side of delivery guarantees: at-least-once publishes,
//! custody frames between nodes, the cluster-wide set of durable
//! subscriptions, and delivery to the client attached to a durable
//! subscription homed here.
//!
//! The order is always the same: the store commits, then the node
//! acknowledges (to the publisher or the previous hop), then the event
//! moves on. Nothing is acknowledged that is not on disk.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::custody::Hop as CustodyHop;
use super::{deliveries_for, error_reply, now, Driver};
use crate::identity::NodeId;
use crate::overlay::{Hop, NextHop};
use crate::store::writer::{Command, Custody, Done, Outcome, Target};
use crate::store::{valid_durable_name, QueueStats, StoreError};
use crate::topic::Pattern;
use crate::wire::{
    ClientReply, Delivery, Destination, DurableRecord, DurableStatus, DurableTarget, Event,
    NodeMessage, PublishRefusal, PublishReply, RequestError, RetentionLimits,
};

/// Events read from the store per delivery batch.
const READ_CHUNK: usize = 512;
/// A full durable subscription takes events again below this share of
/// each limit, so the flag does not flap on every event.
const RESUME_BELOW_PERCENT: u64 = 90;

/// What to do once the store has committed a command.
pub(crate) enum AfterCommit {
    /// Acknowledge a client's at-least-once events.
    Publisher {
        reply: mpsc::UnboundedSender<PublishReply>,
        seqs: Vec<u64>,
        /// The client's allowance of pending events, given back once the
        /// commit is answered (and at once if nothing was taken).
        _permits: Vec<OwnedSemaphorePermit>,
    },
    /// Acknowledge custody frames to the node that sent them.
    Peer {
        peer: NodeId,
        tokens: Vec<u64>,
    },
    /// Answer a client that created a durable subscription.
    Attach {
        session: u64,
        sub: u64,
        name: String,
    },
    Nothing,
}

impl AfterCommit {
    /// Events the command carried, for the store backlog count.
    fn events(&self) -> usize {
        match self {
            AfterCommit::Publisher { seqs, .. } => seqs.len(),
            AfterCommit::Peer { tokens, .. } => tokens.len(),
            AfterCommit::Attach { .. } | AfterCommit::Nothing => 0,
        }
    }
}

/// The client attached to a durable subscription homed here.
pub(crate) struct Attachment {
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
}

impl Driver {
    /// A client's at-least-once event: refused if a durable subscription it
    /// is for is full, else routed to live subscribers at once and handed
    /// to the store for the durable ones.
    pub(super) fn publish_at_least_once(
        &mut self,
        mut event: Event,
        items: &mut Vec<Custody>,
        seqs: &mut Vec<u64>,
        reply: &mpsc::UnboundedSender<PublishReply>,
    ) {
        let me = self.overlay.id();
        // Held until every durable it is for has it.
        event.compact();
        let mut here = Vec::new();
        let mut onward = Vec::new();
        for record in self.durables.values() {
            if !record.pattern.matches(&event.topic) {
                continue;
            }
            if record.full {
                self.counters.events_refused += 1;
                let _ = reply.send(PublishReply::Refused {
                    seq: event.id.seq,
                    reason: PublishRefusal::RetentionLimit,
                    message: format!(
                        "durable subscription {} is at its retention limit ({}); its subscriber must catch up first",
                        record.name,
                        describe_limits(&record.limits)
                    ),
                });
                return;
            }
            let target = Target {
                durable: record.name.clone(),
                seq: None,
            };
            if record.home == me {
                here.push(target);
            } else {
                onward.push(target);
            }
        }
        self.counters.events_published += 1;
        seqs.push(event.id.seq);
        self.dispatch(Hop::Local, event.clone(), None);
        items.push(Custody {
            event,
            here,
            onward,
        });
    }

    /// Custody frames from a peer: the targets homed here join their
    /// queues, the rest the outbox.
    pub(super) fn custody_from_peer(
        &self,
        mut event: Event,
        targets: Vec<DurableTarget>,
        items: &mut Vec<Custody>,
    ) {
        // Held until every durable it is for has it.
        event.compact();
        let me = self.overlay.id();
        let (mut here, mut onward) = (Vec::new(), Vec::new());
        for target in targets {
            let is_here = self.durables.get(&target.durable).map(|r| r.home) == Some(me);
            let target = Target {
                durable: target.durable,
                seq: Some(target.seq),
            };
            if is_here {
                here.push(target);
            } else {
                onward.push(target);
            }
        }
        items.push(Custody {
            event,
            here,
            onward,
        });
    }

    /// Hands events to the store; `then` runs once they are committed.
    pub(super) fn take_custody(&mut self, items: Vec<Custody>, then: AfterCommit) {
        if items.is_empty() {
            return;
        }
        self.store_backlog += then.events();
        let stored_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.writer.send(Command::Take {
            items,
            stored_ms,
            then,
        });
    }

    /// The store committed (or failed) a command.
    pub(super) fn stored(&mut self, outcome: Outcome<AfterCommit>) {
        let then = outcome.then.unwrap_or(AfterCommit::Nothing);
        self.store_backlog = self.store_backlog.saturating_sub(then.events());
        match outcome.result {
            Ok(done) => {
                self.apply_done(done);
                self.committed(then);
            }
            Err(error) => self.not_committed(then, error),
        }
    }

    fn apply_done(&mut self, done: Done) {
        for (key, entry) in done.outbox {
            self.outbox.insert(key, entry);
        }
        for (name, stats) in done.queues {
            let before = self.queues.insert(name.clone(), stats);
            let grown = stats.next - before.map_or(stats.first, |b| b.next.max(stats.first));
            self.counters.events_stored += grown;
            self.update_fullness(&name);
            self.deliver_durable(&name);
        }
    }

    fn committed(&mut self, then: AfterCommit) {
        match then {
            AfterCommit::Publisher { reply, seqs, .. } => {
                if let Some(&up_to) = seqs.iter().max() {
                    let _ = reply.send(PublishReply::Acked { up_to });
                }
            }
            AfterCommit::Peer { peer, tokens } => {
                if let Some(link) = self.links.get(&peer) {
                    let _ = link.control.send(NodeMessage::CustodyAck(tokens));
                }
            }
            AfterCommit::Attach { session, sub, name } => self.attach(session, sub, &name),
            AfterCommit::Nothing => {}
        }
    }

    fn not_committed(&mut self, then: AfterCommit, error: StoreError) {
        match then {
            AfterCommit::Publisher { reply, seqs, .. } => {
                tracing::error!(events = seqs.len(), "at-least-once events refused: {error}");
                let reason = if error.is_full() {
                    PublishRefusal::StoreFull
                } else {
                    PublishRefusal::StoreError
                };
                self.counters.events_refused += seqs.len() as u64;
                for seq in seqs {
                    let _ = reply.send(PublishReply::Refused {
                        seq,
                        reason,
                        message: error.to_string(),
                    });
                }
            }
            // Not acknowledged, so the peer keeps the events and sends them
            // again later.
            AfterCommit::Peer { peer, tokens } => tracing::error!(
                peer = %peer.short(), events = tokens.len(),
                "cannot take custody of events: {error}"
            ),
            AfterCommit::Attach { session, sub, .. } => {
                self.reply(
                    session,
                    error_reply(sub, RequestError::Store, error.to_string()),
                );
            }
            AfterCommit::Nothing => tracing::error!("store write failed: {error}"),
        }
    }

    /// A peer acknowledged custody frames: what it now holds, this node
    /// may forget.
    pub(super) fn custody_acknowledged(&mut self, peer: NodeId, tokens: &[u64]) {
        let keys = self.outbox.acknowledged(peer, tokens);
        if !keys.is_empty() {
            self.writer.send(Command::Forget { keys });
        }
    }

    /// Sends what the outbox may send now, towards each durable's home.
    pub(super) fn send_custody(&mut self) {
        let me = self.overlay.id();
        let (durables, overlay, links) = (&self.durables, &self.overlay, &self.links);
        let sends = self.outbox.poll_sends(now(), links.len(), |durable| {
            let Some(home) = durables.get(durable).map(|r| r.home) else {
                return CustodyHop::Unreachable;
            };
            match overlay.next_hop(&Destination::Node(home)) {
                NextHop::Edge(peer) if home != me && links.contains_key(&peer) => {
                    CustodyHop::Peer(peer)
                }
                _ => CustodyHop::Unreachable,
            }
        });
        for (peer, frame) in sends {
            self.forward(peer, frame);
        }
    }

    /// Runs every custody tick: resends what went unacknowledged, retries
    /// unreachable homes, and redelivers to slow durable clients.
    pub(super) fn custody_tick(&mut self) {
        let now = now();
        self.outbox.expire(now);
        self.outbox.unpark();
        let names: Vec<String> = self.attached.keys().cloned().collect();
        for name in names {
            let attachment = self.attached.get_mut(&name).expect("listed above");
            if attachment.sent > attachment.acked
                && now.duration_since(attachment.progress_at) >= attachment.ack_wait
            {
                let unacked = attachment.sent - attachment.acked;
                tracing::debug!(durable = %name, unacked, "no ack in time; delivering again");
                self.counters.events_redelivered += unacked;
                attachment.sent = attachment.acked;
                attachment.progress_at = now;
            }
            self.deliver_durable(&name);
        }
        let homed_here: Vec<String> = self
            .durables
            .values()
            .filter(|r| r.home == self.overlay.id() && r.limits.max_age_ms > 0)
            .map(|r| r.name.clone())
            .collect();
        for name in homed_here {
            self.update_fullness(&name);
        }
    }

    /// Durable records from a peer: keep the newer of each, store them and
    /// pass the changes on to every other link.
    pub(super) fn merge_durables(&mut self, from: NodeId, records: Vec<DurableRecord>) {
        let me = self.overlay.id();
        let mut changed = Vec::new();
        for record in records {
            let newer = match self.durables.get(&record.name) {
                Some(known) => record.supersedes(known),
                None => true,
            };
            if !newer {
                continue;
            }
            if let Some(known) = self.durables.get(&record.name) {
                if known.home == me && record.home != me {
                    tracing::warn!(durable = %record.name, home = %record.home.short(),
                        "a durable subscription of the same name was created on another node; that one wins");
                    self.attached.remove(&record.name);
                }
            }
            self.durables.insert(record.name.clone(), record.clone());
            changed.push(record);
        }
        if !changed.is_empty() {
            self.outbox.unpark();
            self.writer.send(Command::PutDurables {
                records: changed.clone(),
                then: AfterCommit::Nothing,
            });
            self.announce_durables(changed, Some(from));
        }
    }

    /// Tells linked peers (all but `except`) about these records.
    pub(super) fn announce_durables(&self, records: Vec<DurableRecord>, except: Option<NodeId>) {
        for (peer, link) in &self.links {
            if Some(*peer) != except {
                let _ = link.control.send(NodeMessage::Durables(records.clone()));
            }
        }
    }

    /// A new link learns every durable subscription this node knows.
    pub(super) fn introduce_durables(&self, peer: NodeId) {
        if let Some(link) = self.links.get(&peer) {
            if !self.durables.is_empty() {
                let all = self.durables.values().cloned().collect();
                let _ = link.control.send(NodeMessage::Durables(all));
            }
        }
    }

    /// `treescale sub --durable`: creates the durable subscription here,
    /// or attaches the client to the one that exists.
    pub(super) fn subscribe_durable(
        &mut self,
        session: u64,
        sub: u64,
        name: String,
        pattern: String,
        limits: RetentionLimits,
        ack_wait: Duration,
    ) -> Option<ClientReply> {
        let refuse = |error, message: String| Some(error_reply(sub, error, message));
        if !valid_durable_name(&name) {
            return refuse(
                RequestError::InvalidDurableName,
                format!("durable name {name:?} must be 1 to 64 letters, digits, '-', '_' or '.'"),
            );
        }
        let pattern = match Pattern::new(pattern) {
            Ok(pattern) => pattern,
            Err(e) => return refuse(RequestError::InvalidPattern, e.to_string()),
        };
        if self.sub_in_use(session, sub) {
            return refuse(
                RequestError::DuplicateSubscription,
                format!("subscription {sub} already exists"),
            );
        }
        if self.attached.contains_key(&name) {
            return refuse(
                RequestError::DurableInUse,
                format!("durable subscription {name} already has a client attached; only one may be at a time"),
            );
        }
        let me = self.overlay.id();
        let record = match self.durables.get(&name) {
            Some(known) if known.home != me => {
                let home = self.overlay.tree().into_iter().find(|e| e.id == known.home);
                let mut place = match home {
                    Some(entry) => format!("node {} ({})", entry.name, known.home.short()),
                    None => format!("node {}", known.home.short()),
                };
                let connect = match self.overlay.known_addrs(known.home) {
                    Some(addrs) if !addrs.is_empty() => {
                        place += &format!(" at {}", addrs[0]);
                        format!("--node {}", addrs[0])
                    }
                    // `treescale tree --json` lists every node's address.
                    _ => "--node; `treescale tree --json` lists each node's address".to_string(),
                };
                return refuse(
                    RequestError::DurableElsewhere,
                    format!("durable subscription {name} lives on {place}, which stores its events; connect to that node to receive them ({connect})"),
                );
            }
            Some(known) if known.pattern != pattern => {
                return refuse(
                    RequestError::DurableMismatch,
                    format!(
                        "durable subscription {name} exists with pattern {}, not {pattern}",
                        known.pattern
                    ),
                );
            }
            Some(known) if known.limits == limits => {
                self.pending_attach
                    .insert(name.clone(), (session, sub, ack_wait));
                self.attach(session, sub, &name);
                return None;
            }
            Some(known) => DurableRecord {
                version: known.version + 1,
                limits,
                ..known.clone()
            },
            None => DurableRecord {
                name: name.clone(),
                pattern,
                home: me,
                version: 1,
                limits,
                full: false,
            },
        };
        tracing::info!(durable = %name, pattern = %record.pattern, "durable subscription stored");
        self.durables.insert(name.clone(), record.clone());
        self.pending_attach
            .insert(name.clone(), (session, sub, ack_wait));
        self.writer.send(Command::PutDurables {
            records: vec![record.clone()],
            then: AfterCommit::Attach { session, sub, name },
        });
        self.announce_durables(vec![record], None);
        None
    }

    /// Attaches the client once its durable subscription is stored.
    fn attach(&mut self, session: u64, sub: u64, name: &str) {
        let Some((_, _, ack_wait)) = self
            .pending_attach
            .remove(name)
            .filter(|(s, n, _)| (*s, *n) == (session, sub))
        else {
            return;
        };
        if !self.sessions.contains_key(&session) {
            return;
        }
        let stats = *self.queues.entry(name.to_string()).or_insert(QueueStats {
            first: 1,
            next: 1,
            ..Default::default()
        });
        self.attached.insert(
            name.to_string(),
            Attachment {
                session,
                sub,
                sent: stats.first - 1,
                acked: stats.first - 1,
                ack_wait,
                progress_at: now(),
            },
        );
        tracing::debug!(durable = %name, backlog = stats.len(), "client attached");
        self.reply(
            session,
            ClientReply::DurableAttached {
                sub,
                first: stats.first,
                backlog: stats.len(),
            },
        );
        self.deliver_durable(name);
    }

    /// The client of `sub` has handled everything up to `position`.
    pub(super) fn durable_acked(&mut self, session: u64, sub: u64, position: u64) {
        let Some((name, attachment)) = self
            .attached
            .iter_mut()
            .find(|(_, a)| (a.session, a.sub) == (session, sub))
        else {
            return;
        };
        let position = position.min(attachment.sent);
        if position <= attachment.acked {
            return;
        }
        attachment.acked = position;
        attachment.progress_at = now();
        let name = name.clone();
        self.writer.send(Command::Consumed {
            durable: name.clone(),
            position,
        });
        self.deliver_durable(&name);
    }

    /// Whether `(session, sub)` names a durable attachment.
    pub(super) fn sub_in_use(&self, session: u64, sub: u64) -> bool {
        self.attached
            .values()
            .any(|a| (a.session, a.sub) == (session, sub))
    }

    /// Detaches durable subscriptions of a gone client, or one it dropped.
    pub(super) fn detach(&mut self, session: u64, sub: Option<u64>) -> bool {
        let before = self.attached.len();
        self.attached
            .retain(|_, a| !(a.session == session && sub.is_none_or(|s| s == a.sub)));
        before != self.attached.len()
    }

    /// Sends the attached client what it may have now: from the position
    /// after the last sent, up to the node's `limits.unacked` beyond its
    /// last ack.
    fn deliver_durable(&mut self, name: &str) {
        let (Some(attachment), Some(stats)) = (self.attached.get_mut(name), self.queues.get(name))
        else {
            return;
        };
        attachment.sent = attachment.sent.max(stats.first - 1);
        attachment.acked = attachment.acked.max(stats.first - 1);
        let last = stats.next - 1;
        let unacked = self.shared.limits.unacked as u64;
        let allowed = (attachment.acked + unacked).min(last);
        while attachment.sent < allowed {
            let count = ((allowed - attachment.sent) as usize).min(READ_CHUNK);
            let events = match self.store.read_queue(name, attachment.sent + 1, count) {
                Ok(events) if !events.is_empty() => events,
                Ok(_) => break,
                Err(e) => {
                    tracing::error!(durable = %name, "cannot read queued events: {e}");
                    break;
                }
            };
            let batch = deliveries_for(&mut self.deliveries, &self.sessions, attachment.session);
            for (position, event) in events {
                attachment.sent = position;
                batch.push(&Delivery::Durable {
                    sub: attachment.sub,
                    position,
                    event,
                });
            }
        }
    }

    /// Every durable subscription known, with its queue where it is homed here.
    pub(super) fn durable_status(&self) -> Vec<DurableStatus> {
        let mut all: Vec<DurableStatus> = self
            .durables
            .values()
            .map(|record| {
                let stats = self
                    .queues
                    .get(&record.name)
                    .filter(|_| record.home == self.overlay.id());
                DurableStatus {
                    name: record.name.clone(),
                    pattern: record.pattern.clone(),
                    home: record.home,
                    full: record.full,
                    attached: self.attached.contains_key(&record.name),
                    held: stats.map(|s| s.len()),
                    held_bytes: stats.map(|s| s.bytes),
                }
            })
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Marks a durable subscription homed here full or not, by its limits,
    /// and tells the cluster when that changes.
    fn update_fullness(&mut self, name: &str) {
        let me = self.overlay.id();
        let (Some(record), Some(stats)) = (self.durables.get(name), self.queues.get(name)) else {
            return;
        };
        if record.home != me {
            return;
        }
        let limits = record.limits;
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let age_ms = if stats.is_empty() {
            0
        } else {
            now_ms.saturating_sub(stats.oldest_ms)
        };
        let over = |value: u64, limit: u64, percent: u64| {
            limit > 0 && value.saturating_mul(100) >= limit.saturating_mul(percent)
        };
        let full = if record.full {
            over(stats.len(), limits.max_events, RESUME_BELOW_PERCENT)
                || over(stats.bytes, limits.max_bytes, RESUME_BELOW_PERCENT)
                || over(age_ms, limits.max_age_ms, RESUME_BELOW_PERCENT)
        } else {
            over(stats.len(), limits.max_events, 100)
                || over(stats.bytes, limits.max_bytes, 100)
                || over(age_ms, limits.max_age_ms, 100)
        };
        if full == record.full {
            return;
        }
        if full {
            tracing::warn!(durable = %name, held = stats.len(), bytes = stats.bytes,
                "durable subscription reached a retention limit; publishers are refused until its subscriber catches up");
        } else {
            tracing::info!(durable = %name, "durable subscription takes events again");
        }
        let record = DurableRecord {
            full,
            version: record.version + 1,
            ..record.clone()
        };
        self.durables.insert(name.to_string(), record.clone());
        self.writer.send(Command::PutDurables {
            records: vec![record.clone()],
            then: AfterCommit::Nothing,
        });
        self.announce_durables(vec![record], None);
    }
}

fn describe_limits(limits: &RetentionLimits) -> String {
    let mut parts = vec![
        format!("max {} events", limits.max_events),
        format!("max {} bytes", limits.max_bytes),
    ];
    if limits.max_age_ms > 0 {
        parts.push(format!(
            "max age {}",
            humantime::format_duration(Duration::from_millis(limits.max_age_ms))
        ));
    }
    parts.join(", ")
}
