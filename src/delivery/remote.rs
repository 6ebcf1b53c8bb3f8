//! Durable subscriptions attached at another node than their home. The
//! attaching node keeps a proxy for each such client: it asks the home to
//! attach, hands the client what the home sends, and passes its
//! acknowledgements back. The home deletes nothing before the client has
//! acknowledged it, so a path that breaks loses nothing: the proxy attaches
//! again whenever the tree around it changes, and the home then sends again
//! what was not acknowledged. The client drops what it already has.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::identity::NodeId;
use crate::topic::Pattern;
use crate::wire::RemoteMessage;

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
