//! The delivery-guarantee core: at-least-once publishes, custody from hop
//! to hop, the cluster-wide directory of durable subscriptions, and
//! delivery to the client attached to each one homed here.
//!
//! Like the overlay it is sans-IO: no tokio, no clock, no store. Time comes
//! in with each `handle_*` call; what to do comes out of
//! [`DeliveryCore::poll_action`]: writes and reads for the store, messages
//! and custody frames for neighbours, deliveries and answers for clients.
//! The order is always the same: the store commits, then the node
//! acknowledges (to the publisher or the previous hop), then the event
//! moves on. Nothing is acknowledged that is not on disk.
#![warn(missing_docs)]

mod attachments;
mod directory;
mod outbox;
mod releases;
mod remote;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

pub use attachments::Attached;
use attachments::Attachments;
pub use attachments::{DurableDelivery, QueueRead};
use directory::{describe_limits, is_full, Directory};
use outbox::{HomeRoute, Outbox};
use releases::Releases;
use remote::{Proxies, Proxy};

use crate::identity::NodeId;
use crate::store::writer::{Command, Custody, Done, Epoch, Outcome, Target};
use crate::store::{valid_durable_name, QueueStats, Recovered, StoreError};
use crate::topic::Pattern;
use crate::wire::{
    DeliveryMessage, DurableRecord, DurableStatus, DurableTarget, Event, NodeEventFrame,
    PublishRefusal, Remote, RemoteMessage, RequestError, RetentionLimits,
};

/// How long a durable's home remembers which events a publisher has
/// brought, after its last one: longer than any copy of one is expected to
/// wait in an outbox (a dead node's, say) before it arrives.
pub const PUBLISHER_MEMORY: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often publishers past [`PUBLISHER_MEMORY`] are forgotten.
const FORGET_PUBLISHERS_EVERY: Duration = Duration::from_secs(3600);

/// Payload bytes of events per message to a remote attachment (one event
/// always goes, however large).
const REMOTE_BATCH_BYTES: usize = 256 << 10;

/// How often [`DeliveryCore::handle_timeout`] wants to run: resends,
/// retries of unreachable homes, redeliveries and age limits.
pub const TICK: Duration = Duration::from_millis(250);

/// What the core is told when it starts.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryConfig {
    /// Durable events out to a client beyond its last ack.
    pub unacked: usize,
}

/// What runs once the store has committed a write.
pub enum Commit<P> {
    /// Answer a client's at-least-once events; `P` is the driver's
    /// handle on the publisher, passed back untouched.
    Publisher {
        /// The driver's handle on the publisher.
        publisher: P,
        /// The client's session, to which releases go.
        session: u64,
        /// The publisher's sequence numbers of the events the write
        /// carried.
        seqs: Vec<u64>,
    },
    /// Acknowledge custody frames to the node that sent them.
    Peer {
        /// The node that sent them.
        peer: NodeId,
        /// The frames' tokens.
        tokens: Vec<u64>,
    },
    /// Answer a client that created a durable subscription.
    Attach {
        /// The client's session.
        session: u64,
        /// The client's subscription number.
        sub: u64,
        /// The durable subscription's name.
        name: String,
    },
    /// Nothing waits on it.
    Nothing,
}

impl<P> Commit<P> {
    /// Events the write carried, for the store backlog.
    fn events(&self) -> usize {
        match self {
            Commit::Publisher { seqs, .. } => seqs.len(),
            Commit::Peer { tokens, .. } => tokens.len(),
            Commit::Attach { .. } | Commit::Nothing => 0,
        }
    }
}

/// What the driver must do for the core.
pub enum DeliveryAction<P> {
    /// Hand to the store's writer; its outcome goes to
    /// [`DeliveryCore::handle_stored`].
    Write(Command<Commit<P>>),
    /// Read from the store; the result goes to
    /// [`DeliveryCore::handle_read`].
    Read(QueueRead),
    /// Send on the control stream of the link to `peer`.
    Send {
        /// The neighbour.
        peer: NodeId,
        /// The message.
        message: DeliveryMessage,
    },
    /// Send a custody frame over the link to `peer`. If it cannot be
    /// queued, hand `token` to [`DeliveryCore::handle_unsent`].
    Forward {
        /// The neighbour.
        peer: NodeId,
        /// The frame's token.
        token: u64,
        /// The custody frame.
        frame: NodeEventFrame,
    },
    /// An event for a client attached to a durable subscription.
    Deliver(DurableDelivery),
    /// A durable subscription was stored: tell the client it is attached.
    Attached {
        /// The client's session.
        session: u64,
        /// The client's subscription number.
        sub: u64,
        /// Position of the first event it will get.
        first: u64,
        /// Events waiting for it.
        backlog: u64,
    },
    /// Answer a client's durable subscription with an error.
    Refuse {
        /// The client's session.
        session: u64,
        /// The client's subscription number.
        sub: u64,
        /// Why, as an error kind.
        error: RequestError,
        /// Why, for people.
        message: String,
    },
    /// A publisher's at-least-once events are stored (`Ok`) or refused.
    Published {
        /// The driver's handle on the publisher.
        publisher: P,
        /// The publisher's sequence numbers of the events.
        seqs: Vec<u64>,
        /// Stored, or why not.
        result: Result<(), Refusal>,
    },
    /// Send towards node `remote.to` along the tree: events on the event
    /// stream of the next hop, the rest on its control stream. Dropped if
    /// the tree has no path (or it leads back to `from`, the neighbour it
    /// came from); the sender tries again.
    Route {
        /// The message.
        remote: Remote,
        /// The neighbour it came from, when relayed.
        from: Option<NodeId>,
    },
    /// Every at-least-once event of session `session` up to `up_to` is
    /// in the custody of the next node on its way: tell its client.
    Released {
        /// The client's session.
        session: u64,
        /// The publisher's sequence number released up to.
        up_to: u64,
    },
}

/// A custody frame from a neighbour.
pub struct CustodyFrame {
    /// The sender's token for it, to acknowledge.
    pub token: u64,
    /// The event.
    pub event: Event,
    /// The publisher's epoch at the event's origin.
    pub epoch: u64,
    /// The durable subscriptions it is for.
    pub targets: Vec<DurableTarget>,
}

/// Why at-least-once events were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The reason, as a code.
    pub reason: PublishRefusal,
    /// The reason, for people.
    pub message: String,
}

/// Why a client cannot attach to a durable subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachRefusal {
    /// The reason, as an error kind.
    pub error: RequestError,
    /// The reason, for people.
    pub message: String,
}

/// What the core has counted since it started.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeliveryCounters {
    /// Events added to the queues of durable subscriptions homed here.
    pub events_stored: u64,
    /// At-least-once events refused to publishers.
    pub events_refused: u64,
    /// Durable deliveries sent again because their ack did not come in time.
    pub events_redelivered: u64,
}

/// A wall clock read from the core's monotonic `now`: retention ages are
/// kept in ms since the Unix epoch, which outlive the process.
#[derive(Debug, Clone, Copy)]
struct WallClock {
    at: Instant,
    unix_ms: u64,
}

impl WallClock {
    fn unix_ms(&self, now: Instant) -> u64 {
        self.unix_ms + now.saturating_duration_since(self.at).as_millis() as u64
    }
}

/// A client waiting for its durable subscription to be stored.
struct PendingAttach {
    session: u64,
    sub: u64,
    ack_wait: Duration,
}

/// The delivery-guarantee state of one node.
pub struct DeliveryCore<P> {
    me: NodeId,
    config: DeliveryConfig,
    clock: WallClock,
    directory: Directory,
    /// What the queue of each durable subscription homed here holds.
    queues: HashMap<String, QueueStats>,
    attachments: Attachments,
    pending_attach: HashMap<String, PendingAttach>,
    outbox: Outbox,
    releases: Releases,
    /// Local clients attached to durable subscriptions homed elsewhere.
    proxies: Proxies,
    /// Remote attachments here, with when their node was last heard.
    remote_heard: BTreeMap<Attached, Instant>,
    /// Neighbours linked now.
    links: BTreeSet<NodeId>,
    /// Events handed to the store and not yet committed.
    store_backlog: usize,
    counters: DeliveryCounters,
    next_tick: Instant,
    next_forget_publishers: Instant,
    actions: VecDeque<DeliveryAction<P>>,
}

impl<P> DeliveryCore<P> {
    /// The core of node `me`, from what its store recovered. `now` and
    /// `unix_ms` are the same moment on the monotonic and the wall clock.
    pub fn new(
        me: NodeId,
        config: DeliveryConfig,
        recovered: Recovered,
        now: Instant,
        unix_ms: u64,
    ) -> Self {
        let mut outbox = Outbox::default();
        for (key, entry) in recovered.outbox {
            outbox.insert(key, entry);
        }
        DeliveryCore {
            me,
            config,
            clock: WallClock { at: now, unix_ms },
            directory: Directory::new(recovered.durables),
            queues: recovered.queues,
            attachments: Attachments::default(),
            pending_attach: HashMap::new(),
            outbox,
            releases: Releases::default(),
            proxies: Proxies::default(),
            remote_heard: BTreeMap::new(),
            links: BTreeSet::new(),
            store_backlog: 0,
            counters: DeliveryCounters::default(),
            next_tick: now + TICK,
            next_forget_publishers: now,
            actions: VecDeque::new(),
        }
    }

    /// The next thing to do, in the order decided.
    pub fn poll_action(&mut self) -> Option<DeliveryAction<P>> {
        self.actions.pop_front()
    }

    /// When [`DeliveryCore::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Instant {
        self.next_tick
    }

    /// Events handed to the store and not yet committed: a driver stops
    /// taking new ones while this is high.
    pub fn store_backlog(&self) -> usize {
        self.store_backlog
    }

    /// What the core has counted.
    pub fn counters(&self) -> DeliveryCounters {
        self.counters
    }

    /// Outbox entries held, and how many of them cannot reach their home now.
    pub fn outbox_len(&self) -> (usize, usize) {
        (self.outbox.len(), self.outbox.parked())
    }

    /// A link to `peer` is up: it learns every durable subscription known
    /// here, and held events may now have a way home.
    pub fn handle_link_up(&mut self, peer: NodeId) {
        self.links.insert(peer);
        if !self.directory.is_empty() {
            let all = self.directory.records().cloned().collect();
            self.send(peer, DeliveryMessage::Durables(all));
        }
        self.outbox.unpark();
        self.reattach_proxies();
    }

    /// The link to `peer` was replaced by a new connection: what went over
    /// the old one may not have arrived.
    pub fn handle_link_replaced(&mut self, peer: NodeId) {
        self.outbox.link_down(peer);
        self.reattach_proxies();
    }

    /// The link to `peer` is gone: what was sent over it goes again.
    pub fn handle_link_down(&mut self, peer: NodeId) {
        self.links.remove(&peer);
        self.outbox.link_down(peer);
        self.outbox.unpark();
        self.reattach_proxies();
    }

    /// A client's at-least-once event, stamped with this node as origin,
    /// in the publisher's `epoch` (see [`Custody::epoch`]): refused if a
    /// durable subscription it is for is full, else what the store must
    /// take custody of. The caller routes it to live subscribers too, and
    /// hands the items to [`DeliveryCore::take_custody`].
    pub fn admit(&mut self, mut event: Event, epoch: Epoch) -> Result<Custody, Refusal> {
        // Held until every durable it is for has it.
        event.compact();
        let (mut here, mut onward) = (Vec::new(), Vec::new());
        for record in self.directory.matching(&event.topic) {
            if record.full {
                self.counters.events_refused += 1;
                return Err(Refusal {
                    reason: PublishRefusal::RetentionLimit,
                    message: format!(
                        "durable subscription {} is at its retention limit ({}); its subscriber must catch up first",
                        record.name,
                        describe_limits(&record.limits)
                    ),
                });
            }
            let target = Target {
                durable: record.name.clone(),
                seq: None,
            };
            if record.home == self.me {
                here.push(target);
            } else {
                onward.push(target);
            }
        }
        Ok(Custody {
            event,
            epoch,
            here,
            onward,
        })
    }

    /// Hands events to the store; `then` runs once they are committed.
    pub fn take_custody(&mut self, items: Vec<Custody>, then: Commit<P>, now: Instant) {
        if items.is_empty() {
            return;
        }
        self.store_backlog += then.events();
        self.actions.push_back(DeliveryAction::Write(Command::Take {
            items,
            stored_ms: self.clock.unix_ms(now),
            then,
        }));
    }

    /// Custody frames from `peer`: the targets homed here join their
    /// queues, the rest the outbox; `peer` is acknowledged once stored.
    pub fn handle_custody(&mut self, peer: NodeId, frames: Vec<CustodyFrame>, now: Instant) {
        let mut tokens = Vec::with_capacity(frames.len());
        let mut items = Vec::with_capacity(frames.len());
        for CustodyFrame {
            token,
            mut event,
            epoch,
            targets,
        } in frames
        {
            tokens.push(token);
            event.compact();
            let (mut here, mut onward) = (Vec::new(), Vec::new());
            for target in targets {
                let is_here = self.directory.get(&target.durable).map(|r| r.home) == Some(self.me);
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
                epoch: Epoch::Given(epoch),
                here,
                onward,
            });
        }
        self.take_custody(items, Commit::Peer { peer, tokens }, now);
    }

    /// The store committed (or failed) a write.
    pub fn handle_stored(&mut self, outcome: Outcome<Commit<P>>, now: Instant) {
        let then = outcome.then.unwrap_or(Commit::Nothing);
        self.store_backlog = self.store_backlog.saturating_sub(then.events());
        match outcome.result {
            Ok(done) => {
                let released = match &then {
                    Commit::Publisher { session, seqs, .. } => {
                        let outbox = done.outbox.iter().map(|(key, e)| (*key, e.event.id.seq));
                        let up_to = self.releases.committed(*session, seqs, outbox);
                        up_to.map(|up_to| (*session, up_to))
                    }
                    _ => None,
                };
                self.apply_done(done, now);
                self.committed(then, now);
                if let Some((session, up_to)) = released {
                    self.actions
                        .push_back(DeliveryAction::Released { session, up_to });
                }
            }
            Err(error) => self.not_committed(then, error),
        }
    }

    fn apply_done(&mut self, done: Done, now: Instant) {
        for (key, entry) in done.outbox {
            self.outbox.insert(key, entry);
        }
        for (name, stats) in done.queues {
            let before = self.queues.insert(name.clone(), stats);
            let grown = stats.next - before.map_or(stats.first, |b| b.next.max(stats.first));
            self.counters.events_stored += grown;
            self.update_fullness(&name, now);
            self.deliver(&name);
        }
    }

    fn committed(&mut self, then: Commit<P>, now: Instant) {
        match then {
            Commit::Publisher {
                publisher, seqs, ..
            } => self.actions.push_back(DeliveryAction::Published {
                publisher,
                seqs,
                result: Ok(()),
            }),
            Commit::Peer { peer, tokens } => {
                if self.links.contains(&peer) {
                    self.send(peer, DeliveryMessage::CustodyAck(tokens));
                }
            }
            Commit::Attach { session, sub, name } => self.attach(session, sub, &name, now),
            Commit::Nothing => {}
        }
    }

    fn not_committed(&mut self, then: Commit<P>, error: StoreError) {
        match then {
            Commit::Publisher {
                publisher, seqs, ..
            } => {
                let events = seqs.len();
                tracing::error!(events, "at-least-once events refused: {error}");
                let reason = if error.is_full() {
                    PublishRefusal::StoreFull
                } else {
                    PublishRefusal::StoreError
                };
                self.counters.events_refused += events as u64;
                self.actions.push_back(DeliveryAction::Published {
                    publisher,
                    seqs,
                    result: Err(Refusal {
                        reason,
                        message: error.to_string(),
                    }),
                });
            }
            // Not acknowledged, so the peer keeps the events and sends them
            // again later.
            Commit::Peer { peer, tokens } => tracing::error!(
                peer = %peer.short(), events = tokens.len(),
                "cannot take custody of events: {error}"
            ),
            Commit::Attach { session, sub, name } => {
                self.pending_attach.remove(&name);
                self.actions.push_back(DeliveryAction::Refuse {
                    session,
                    sub,
                    error: RequestError::Store,
                    message: error.to_string(),
                });
            }
            Commit::Nothing => tracing::error!("store write failed: {error}"),
        }
    }

    /// A control message from the linked node `peer`.
    pub fn handle_message(&mut self, peer: NodeId, message: DeliveryMessage, now: Instant) {
        match message {
            DeliveryMessage::Durables(records) => self.handle_durables(peer, records),
            DeliveryMessage::CustodyAck(tokens) => self.handle_custody_ack(peer, &tokens),
            DeliveryMessage::Remote(remote) => self.handle_remote(peer, remote, now),
        }
    }

    /// `peer` acknowledged custody frames: what it now holds, this node may
    /// forget.
    fn handle_custody_ack(&mut self, peer: NodeId, tokens: &[u64]) {
        let keys = self.outbox.acknowledged(peer, tokens);
        if keys.is_empty() {
            return;
        }
        for (session, up_to) in self.releases.forgotten(&keys) {
            self.actions
                .push_back(DeliveryAction::Released { session, up_to });
        }
        self.actions
            .push_back(DeliveryAction::Write(Command::Forget { keys }));
    }

    /// Client session `session` is gone: its releases go nowhere, and
    /// its epochs end.
    pub fn publisher_gone(&mut self, session: u64) {
        self.releases.closed(session);
        self.actions
            .push_back(DeliveryAction::Write(Command::ConnectionGone { session }));
    }

    /// Custody frames the driver could not queue for their link: they go
    /// again, as if unacknowledged.
    pub fn handle_unsent(&mut self, tokens: impl Iterator<Item = u64>) {
        self.outbox.resend(tokens);
    }

    /// Sends what the outbox may send now, towards each durable's home.
    /// `next_hop` names the neighbour on the way to a node, if the tree
    /// holds it.
    pub fn send_custody(&mut self, now: Instant, next_hop: impl Fn(NodeId) -> Option<NodeId>) {
        let (me, directory, links) = (self.me, &self.directory, &self.links);
        let sends = self.outbox.poll_sends(now, links.len(), |durable| {
            let home = directory.get(durable).map(|r| r.home);
            match home.filter(|home| *home != me).and_then(&next_hop) {
                Some(peer) if links.contains(&peer) => HomeRoute::Via(peer),
                _ => HomeRoute::Unreachable,
            }
        });
        for (peer, frame) in sends {
            let NodeEventFrame::Custody { token, .. } = frame else {
                unreachable!("the outbox sends custody frames only");
            };
            self.actions
                .push_back(DeliveryAction::Forward { peer, token, frame });
        }
    }

    /// Resends what went unacknowledged, retries unreachable homes,
    /// redelivers to slow durable clients and applies age limits.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + TICK;
        if now >= self.next_forget_publishers {
            self.next_forget_publishers = now + FORGET_PUBLISHERS_EVERY;
            let memory = PUBLISHER_MEMORY.as_millis() as u64;
            let idle_before_ms = self.clock.unix_ms(now).saturating_sub(memory);
            self.actions
                .push_back(DeliveryAction::Write(Command::ForgetPublishers {
                    idle_before_ms,
                }));
        }
        self.remote_tick(now);
        self.outbox.expire(now);
        self.outbox.unpark();
        self.counters.events_redelivered += self.attachments.rewind_overdue(now);
        for name in self.attachments.names() {
            self.deliver(&name);
        }
        let aged: Vec<String> = self
            .directory
            .records()
            .filter(|r| r.home == self.me && r.limits.max_age_ms > 0)
            .map(|r| r.name.clone())
            .collect();
        for name in aged {
            self.update_fullness(&name, now);
        }
    }

    /// Durable records from `from`: keep the newer of each, store them and
    /// pass the changes on to every other link.
    fn handle_durables(&mut self, from: NodeId, records: Vec<DurableRecord>) {
        let mut changed = Vec::new();
        for record in records {
            if !self.directory.is_newer(&record) {
                continue;
            }
            if let Some(known) = self.directory.get(&record.name) {
                if known.home == self.me && record.home != self.me {
                    tracing::warn!(durable = %record.name, home = %record.home.short(),
                        "a durable subscription of the same name was created on another node; that one wins");
                    self.attachments.remove(&record.name);
                }
            }
            self.directory.insert(record.clone());
            changed.push(record);
        }
        if !changed.is_empty() {
            self.outbox.unpark();
            self.actions
                .push_back(DeliveryAction::Write(Command::PutDurables {
                    records: changed.clone(),
                    then: Commit::Nothing,
                }));
            self.announce(changed, Some(from));
        }
    }

    /// A client subscribes to durable `name`: creates it here, or attaches
    /// the client to the one that exists. The answer comes as an action.
    #[allow(clippy::too_many_arguments)]
    pub fn subscribe(
        &mut self,
        session: u64,
        sub: u64,
        name: String,
        pattern: String,
        limits: RetentionLimits,
        ack_wait: Duration,
        now: Instant,
    ) -> Result<(), AttachRefusal> {
        let refuse = |error, message: String| Err(AttachRefusal { error, message });
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
        if self.attachments.client(&name).is_some() || self.proxies.state_of(&name).is_some() {
            return refuse(
                RequestError::DurableInUse,
                format!("durable subscription {name} already has a client attached; only one may be at a time"),
            );
        }
        let pending = PendingAttach {
            session,
            sub,
            ack_wait,
        };
        let record = match self.directory.get(&name) {
            Some(known) if known.pattern != pattern => {
                return refuse(
                    RequestError::DurableMismatch,
                    format!(
                        "durable subscription {name} exists with pattern {}, not {pattern}",
                        known.pattern
                    ),
                );
            }
            Some(known) if known.home != self.me => {
                let home = known.home;
                let proxy = Proxy {
                    session,
                    sub,
                    name,
                    home,
                    pattern,
                    ack_wait,
                    acked: 0,
                    attached: false,
                    answered: false,
                    reattach: false,
                    delivered: 0,
                    sent_at: now,
                    since: now,
                };
                let message = proxy.attach_message();
                let attach = self.proxies.insert(proxy, self.clock.unix_ms(now));
                self.route(home, attach, message);
                return Ok(());
            }
            Some(known) if known.limits == limits => {
                self.pending_attach.insert(name.clone(), pending);
                self.attach(session, sub, &name, now);
                return Ok(());
            }
            Some(known) => DurableRecord {
                version: known.version + 1,
                limits,
                ..known.clone()
            },
            None => DurableRecord {
                name: name.clone(),
                pattern,
                home: self.me,
                version: 1,
                limits,
                full: false,
            },
        };
        tracing::info!(durable = %name, pattern = %record.pattern, "durable subscription stored");
        self.directory.insert(record.clone());
        self.pending_attach.insert(name.clone(), pending);
        self.actions
            .push_back(DeliveryAction::Write(Command::PutDurables {
                records: vec![record.clone()],
                then: Commit::Attach { session, sub, name },
            }));
        self.announce(vec![record], None);
        Ok(())
    }

    /// Attaches the client once its durable subscription is stored.
    fn attach(&mut self, session: u64, sub: u64, name: &str, now: Instant) {
        let Some(pending) = self
            .pending_attach
            .remove(name)
            .filter(|p| (p.session, p.sub) == (session, sub))
        else {
            return;
        };
        let stats = *self.queues.entry(name.to_string()).or_insert(QueueStats {
            first: 1,
            next: 1,
            ..Default::default()
        });
        let client = Attached::Local { session, sub };
        self.attachments
            .attach(name, client, 0, pending.ack_wait, &stats, now);
        tracing::debug!(durable = %name, backlog = stats.len(), "client attached");
        self.actions.push_back(DeliveryAction::Attached {
            session,
            sub,
            first: stats.first,
            backlog: stats.len(),
        });
        self.deliver(name);
    }

    /// The client of `(session, sub)` has handled everything up to
    /// `position`.
    pub fn handle_ack(&mut self, session: u64, sub: u64, position: u64, now: Instant) {
        if let Some(attach) = self.proxies.find(session, sub) {
            if let Some(proxy) = self.proxies.get_mut(attach) {
                proxy.acked = proxy.acked.max(position);
                proxy.sent_at = now;
                let home = proxy.home;
                self.route(home, attach, RemoteMessage::Ack { position });
            }
            return;
        }
        self.acknowledge(Attached::Local { session, sub }, position, now);
    }

    fn acknowledge(&mut self, client: Attached, position: u64, now: Instant) {
        let Some((name, position)) = self.attachments.acknowledged(client, position, now) else {
            return;
        };
        self.actions
            .push_back(DeliveryAction::Write(Command::Consumed {
                durable: name.clone(),
                position,
            }));
        self.deliver(&name);
    }

    /// Whether `(session, sub)` names a durable attachment, here or
    /// through a proxy.
    pub fn is_attached(&self, session: u64, sub: u64) -> bool {
        self.attachments.uses(Attached::Local { session, sub })
            || self.proxies.find(session, sub).is_some()
    }

    /// Detaches a gone client's durable subscriptions, or the one it
    /// dropped. Returns whether there was one.
    pub fn detach(&mut self, session: u64, sub: Option<u64>) -> bool {
        self.pending_attach
            .retain(|_, p| !(p.session == session && sub.is_none_or(|s| s == p.sub)));
        let proxied = self.proxies.of(session, sub);
        for attach in &proxied {
            if let Some(proxy) = self.proxies.remove(*attach) {
                self.route(proxy.home, *attach, RemoteMessage::Detach);
            }
        }
        self.attachments.detach(session, sub) || !proxied.is_empty()
    }

    /// The store answered a [`DeliveryAction::Read`].
    pub fn handle_read(&mut self, read: QueueRead, result: Result<Vec<(u64, Event)>, StoreError>) {
        match result {
            Ok(events) => match self.attachments.read_done(&read, &events) {
                Some(_) if events.is_empty() => {}
                Some(Attached::Local { session, sub }) => {
                    self.hand_to_client(session, sub, events);
                    self.deliver(&read.durable);
                }
                Some(Attached::Remote { node, attach }) => {
                    for events in remote_batches(events) {
                        self.route(node, attach, RemoteMessage::Events(events));
                    }
                    self.deliver(&read.durable);
                }
                // Reads run beside the core: a client rewound (or a new
                // one attached) while this one was out reads again now.
                None => self.deliver(&read.durable),
            },
            Err(e) => {
                tracing::error!(durable = %read.durable, "cannot read queued events: {e}");
                self.attachments.read_failed(&read);
            }
        }
    }

    /// Hands a local client these events of its durable subscription.
    fn hand_to_client(&mut self, session: u64, sub: u64, events: Vec<(u64, Event)>) {
        let deliveries = events.into_iter().map(|(position, event)| {
            DeliveryAction::Deliver(DurableDelivery {
                session,
                sub,
                position,
                event,
            })
        });
        self.actions.extend(deliveries);
    }

    /// Asks the store for what the client of durable `name` may have now.
    fn deliver(&mut self, name: &str) {
        let Some(stats) = self.queues.get(name) else {
            return;
        };
        if let Some(read) = self
            .attachments
            .next_read(name, stats, self.config.unacked as u64)
        {
            self.actions.push_back(DeliveryAction::Read(read));
        }
    }

    /// Every durable subscription known, with its queue where it is homed
    /// here.
    pub fn durable_status(&self) -> Vec<DurableStatus> {
        // The directory is ordered by name.
        self.directory
            .records()
            .map(|record| {
                let stats = self
                    .queues
                    .get(&record.name)
                    .filter(|_| record.home == self.me);
                DurableStatus {
                    name: record.name.clone(),
                    pattern: record.pattern.clone(),
                    home: record.home,
                    full: record.full,
                    attached: self.attachments.client(&record.name).is_some()
                        || self.proxies.state_of(&record.name) == Some(true),
                    waiting_for_home: self.proxies.state_of(&record.name) == Some(false),
                    held: stats.map(|s| s.len()),
                    held_bytes: stats.map(|s| s.bytes),
                }
            })
            .collect()
    }

    /// Marks a durable subscription homed here full or not, by its limits,
    /// and tells the cluster when that changes.
    fn update_fullness(&mut self, name: &str, now: Instant) {
        let (Some(record), Some(stats)) = (self.directory.get(name), self.queues.get(name)) else {
            return;
        };
        if record.home != self.me {
            return;
        }
        let full = is_full(record, stats, self.clock.unix_ms(now));
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
        self.directory.insert(record.clone());
        self.actions
            .push_back(DeliveryAction::Write(Command::PutDurables {
                records: vec![record.clone()],
                then: Commit::Nothing,
            }));
        self.announce(vec![record], None);
    }

    /// Tells linked peers (all but `except`) about these records.
    fn announce(&mut self, records: Vec<DurableRecord>, except: Option<NodeId>) {
        let peers: Vec<NodeId> = self
            .links
            .iter()
            .copied()
            .filter(|p| Some(*p) != except)
            .collect();
        for peer in peers {
            self.send(peer, DeliveryMessage::Durables(records.clone()));
        }
    }

    fn send(&mut self, peer: NodeId, message: DeliveryMessage) {
        self.actions
            .push_back(DeliveryAction::Send { peer, message });
    }
}

/// Splits events for a remote attachment into messages of bounded size.
fn remote_batches(events: Vec<(u64, Event)>) -> Vec<Vec<(u64, Event)>> {
    let mut batches: Vec<Vec<(u64, Event)>> = Vec::new();
    let mut bytes = 0;
    for item in events {
        let size = item.1.payload.len();
        match batches.last_mut() {
            Some(batch) if bytes + size <= REMOTE_BATCH_BYTES => batch.push(item),
            _ => {
                batches.push(vec![item]);
                bytes = 0;
            }
        }
        bytes += size;
    }
    batches
}

#[cfg(test)]
mod tests;
