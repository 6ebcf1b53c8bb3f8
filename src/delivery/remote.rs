//! Durable subscriptions attached at another node than their home. The
//! attaching node keeps a proxy for each such client: it asks the home to
//! attach, hands the client what the home sends, and passes its
//! acknowledgements back. The home deletes nothing before the client has
//! acknowledged it, so a path that breaks loses nothing: the proxy attaches
//! again when its links change, when it sees a gap, or when the home no
//! longer knows it, and the home then sends again what was not
//! acknowledged. The client drops what it already has. Both the home's
//! side and the proxy's are here.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{Attached, DeliveryAction, DeliveryCore};
use crate::identity::NodeId;
use crate::store::QueueStats;
use crate::topic::Pattern;
use crate::wire::{Remote, RemoteMessage, RequestError};

/// How often an attachment not yet answered is asked for again.
pub const RETRY_ATTACH: Duration = Duration::from_secs(1);
/// How often a proxy tells the home it is still there.
pub const KEEPALIVE: Duration = Duration::from_secs(2);
/// How long a home keeps a remote attachment it hears nothing from.
pub const SILENCE: Duration = Duration::from_secs(10);
/// How long a proxy keeps asking a home that answers that another client
/// is attached: the home may not yet have let go of this client's
/// previous attachment (through a node that died, say).
pub const IN_USE_PATIENCE: Duration = Duration::from_secs(15);

/// One local client attached to a durable subscription homed elsewhere.
pub struct Proxy {
    pub session: u64,
    pub sub: u64,
    pub name: String,
    pub home: NodeId,
    pub pattern: Pattern,
    pub ack_wait: Duration,
    /// The last position the client acknowledged.
    pub acked: u64,
    /// The client has been told it is attached.
    pub attached: bool,
    /// The home has answered the last attach request; until it does, the
    /// request goes again every [`RETRY_ATTACH`] (it may have found no
    /// path, or been lost on the way).
    pub answered: bool,
    /// The path to the home may have changed: attach again at once.
    pub reattach: bool,
    /// The last position handed to the client.
    pub delivered: u64,
    /// When the home was last written to.
    pub sent_at: Instant,
    /// When the client asked to attach.
    pub since: Instant,
}

impl Proxy {
    /// The attach request, as sent (and sent again).
    pub fn attach_message(&self) -> RemoteMessage {
        RemoteMessage::Attach {
            name: self.name.clone(),
            pattern: self.pattern.clone(),
            acked: self.acked,
            ack_wait_ms: self.ack_wait.as_millis().clamp(1, u32::MAX as u128) as u32,
        }
    }

    /// What to send the home now, if anything: the attach request again
    /// while unanswered, a keepalive once attached.
    pub fn due(&mut self, now: Instant) -> Option<RemoteMessage> {
        if std::mem::take(&mut self.reattach) {
            self.answered = false;
            self.sent_at = now;
            return Some(self.attach_message());
        }
        let (every, message) = if self.answered {
            let ack = RemoteMessage::Ack {
                position: self.acked,
            };
            (KEEPALIVE, ack)
        } else {
            (RETRY_ATTACH, self.attach_message())
        };
        if now.duration_since(self.sent_at) < every {
            return None;
        }
        self.sent_at = now;
        Some(message)
    }
}

/// The proxies of this node, by attachment number. Ordered, so that a
/// simulation replays exactly.
#[derive(Default)]
pub struct Proxies {
    by_attach: BTreeMap<u64, Proxy>,
    next_attach: u64,
}

impl Proxies {
    /// Keeps `proxy`; returns its attachment number. `unix_ms` is the
    /// time, from which the first number is made: a restarted node does
    /// not reuse a number a home may still hold for its predecessor.
    pub fn insert(&mut self, proxy: Proxy, unix_ms: u64) -> u64 {
        if self.next_attach == 0 {
            self.next_attach = unix_ms << 20;
        }
        self.next_attach += 1;
        self.by_attach.insert(self.next_attach, proxy);
        self.next_attach
    }

    pub fn get_mut(&mut self, attach: u64) -> Option<&mut Proxy> {
        self.by_attach.get_mut(&attach)
    }

    pub fn remove(&mut self, attach: u64) -> Option<Proxy> {
        self.by_attach.remove(&attach)
    }

    /// The attachment of a local client's subscription.
    pub fn find(&self, session: u64, sub: u64) -> Option<u64> {
        self.by_attach
            .iter()
            .find(|(_, p)| (p.session, p.sub) == (session, sub))
            .map(|(attach, _)| *attach)
    }

    /// The attachments of a gone client, or the one it dropped.
    pub fn of(&self, session: u64, sub: Option<u64>) -> Vec<u64> {
        self.by_attach
            .iter()
            .filter(|(_, p)| p.session == session && sub.is_none_or(|s| s == p.sub))
            .map(|(attach, _)| *attach)
            .collect()
    }

    /// Whether a local client is attached through a proxy to durable
    /// `name`, and whether its home has answered the last request.
    pub fn state_of(&self, name: &str) -> Option<bool> {
        self.by_attach
            .values()
            .find(|p| p.name == name)
            .map(|p| p.answered)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (u64, &mut Proxy)> {
        self.by_attach.iter_mut().map(|(attach, p)| (*attach, p))
    }
}

/// The core's side of remote attachments: as the home, and as the node
/// a client attached at.
impl<P> DeliveryCore<P> {
    /// The tree around this node changed: what was on its way between a
    /// home and a proxy here may be lost, so each proxy attaches again and
    /// its home sends again what was not acknowledged.
    pub(super) fn reattach_proxies(&mut self) {
        for (_, proxy) in self.proxies.iter_mut() {
            proxy.reattach = true;
        }
    }

    /// Proxies ask their homes again or say they are still there; homes
    /// drop remote attachments gone silent.
    pub(super) fn remote_tick(&mut self, now: Instant) {
        let mut due = Vec::new();
        for (attach, proxy) in self.proxies.iter_mut() {
            if let Some(message) = proxy.due(now) {
                due.push((proxy.home, attach, message));
            }
        }
        for (home, attach, message) in due {
            self.route(home, attach, message);
        }
        let silent: Vec<Attached> = self
            .remote_heard
            .iter()
            .filter(|(_, heard)| now.duration_since(**heard) >= SILENCE)
            .map(|(client, _)| *client)
            .collect();
        for client in silent {
            tracing::info!(?client, "remote attachment gone silent; detached");
            self.remote_heard.remove(&client);
            self.attachments.detach_client(client);
        }
    }

    /// A message for a remote attachment: relayed on unless it is for this
    /// node.
    pub fn handle_remote(&mut self, peer: NodeId, remote: Remote, now: Instant) {
        if remote.to != self.me {
            let from = Some(peer);
            self.actions
                .push_back(DeliveryAction::Route { remote, from });
            return;
        }
        let client = Attached::Remote {
            node: remote.from,
            attach: remote.attach,
        };
        match remote.message {
            RemoteMessage::Attach {
                name,
                pattern,
                acked,
                ack_wait_ms,
            } => {
                let ack_wait = Duration::from_millis(ack_wait_ms.into());
                let answer = self.attach_remote(client, &name, &pattern, acked, ack_wait, now);
                self.route(remote.from, remote.attach, answer);
                self.deliver(&name);
            }
            RemoteMessage::Ack { position } => {
                if self.attachments.uses(client) {
                    self.remote_heard.insert(client, now);
                    self.acknowledge(client, position, now);
                } else {
                    // Restarted, or let go of a proxy it stopped hearing:
                    // the proxy attaches again.
                    let message = "not attached here: attach again".to_string();
                    let error = RequestError::UnknownSubscription;
                    let answer = RemoteMessage::Refused { error, message };
                    self.route(remote.from, remote.attach, answer);
                }
            }
            RemoteMessage::Detach => {
                self.remote_heard.remove(&client);
                self.attachments.detach_client(client);
            }
            RemoteMessage::Attached { first, backlog } => {
                let Some(proxy) = self.proxies.get_mut(remote.attach) else {
                    return;
                };
                proxy.answered = true;
                // An answer to attaching again after a change of path
                // tells the client nothing new.
                if !std::mem::replace(&mut proxy.attached, true) {
                    proxy.delivered = proxy.acked.max(first.saturating_sub(1));
                    tracing::debug!(durable = %proxy.name, backlog, "attached at its home");
                    let (session, sub) = (proxy.session, proxy.sub);
                    self.actions.push_back(DeliveryAction::Attached {
                        session,
                        sub,
                        first,
                        backlog,
                    });
                }
            }
            RemoteMessage::Refused {
                error: RequestError::UnknownSubscription,
                ..
            } => {
                if let Some(proxy) = self.proxies.get_mut(remote.attach) {
                    proxy.reattach = true;
                }
            }
            RemoteMessage::Refused {
                error: RequestError::DurableInUse,
                ..
            } if self
                .proxies
                .get_mut(remote.attach)
                .is_some_and(|proxy| now.duration_since(proxy.since) < IN_USE_PATIENCE) =>
            {
                // Asked again in a second.
                tracing::debug!("durable subscription in use at its home; asking again");
            }
            RemoteMessage::Refused { error, message } => {
                if let Some(proxy) = self.proxies.remove(remote.attach) {
                    tracing::warn!(durable = %proxy.name, "its home refused the attachment: {message}");
                    self.actions.push_back(DeliveryAction::Refuse {
                        session: proxy.session,
                        sub: proxy.sub,
                        error,
                        message,
                    });
                }
            }
            RemoteMessage::Events(events) => {
                let Some(proxy) = self.proxies.get_mut(remote.attach) else {
                    return;
                };
                // A gap: what came before was lost on the way.
                if events
                    .first()
                    .is_some_and(|(first, _)| *first > proxy.delivered + 1)
                {
                    proxy.reattach = true;
                    return;
                }
                if let Some((last, _)) = events.last() {
                    proxy.delivered = proxy.delivered.max(*last);
                }
                let (session, sub) = (proxy.session, proxy.sub);
                self.hand_to_client(session, sub, events);
            }
        }
    }

    /// A client of another node attaches to durable `name` homed here;
    /// returns the answer. The same attachment asking again means its
    /// path changed: what it was sent and did not acknowledge goes again.
    fn attach_remote(
        &mut self,
        client: Attached,
        name: &str,
        pattern: &Pattern,
        acked: u64,
        ack_wait: Duration,
        now: Instant,
    ) -> RemoteMessage {
        let refuse = |error, message: String| RemoteMessage::Refused { error, message };
        let record = match self.directory.get(name) {
            Some(record) if record.home == self.me => record,
            _ => {
                return refuse(
                    RequestError::DurableElsewhere,
                    format!("durable subscription {name} is not homed at the node asked"),
                )
            }
        };
        if record.pattern != *pattern {
            return refuse(
                RequestError::DurableMismatch,
                format!(
                    "durable subscription {name} exists with pattern {}, not {pattern}",
                    record.pattern
                ),
            );
        }
        let stats = *self.queues.entry(name.to_string()).or_insert(QueueStats {
            first: 1,
            next: 1,
            ..Default::default()
        });
        if self.pending_attach.contains_key(name) {
            return refuse(
                RequestError::DurableInUse,
                format!("durable subscription {name} is being attached by a client of its home"),
            );
        }
        // An acknowledgement past the queue's end (a queue made again
        // since) means nothing here.
        let acked = acked.min(stats.next - 1);
        match self.attachments.client(name) {
            Some(attached) if attached == client => self.attachments.rewind(client, acked, now),
            Some(_) => {
                return refuse(
                    RequestError::DurableInUse,
                    format!("durable subscription {name} already has a client attached; only one may be at a time"),
                )
            }
            None => {
                self.attachments
                    .attach(name, client, acked, ack_wait, &stats, now);
                tracing::debug!(durable = %name, backlog = stats.len(), "client of another node attached");
            }
        }
        self.remote_heard.insert(client, now);
        RemoteMessage::Attached {
            first: stats.first,
            backlog: stats.len(),
        }
    }

    /// Sends `message` about attachment `attach` towards node `to`.
    pub(super) fn route(&mut self, to: NodeId, attach: u64, message: RemoteMessage) {
        let remote = Remote {
            to,
            from: self.me,
            attach,
            message,
        };
        self.actions
            .push_back(DeliveryAction::Route { remote, from: None });
    }
}
