//! The driver: the one task that owns both cores and all routing state.
//! It turns what connection tasks, discovery and the store report into
//! calls on the overlay and delivery cores, and their actions into frames
//! for connections' writers. It never waits on a connection, so a slow
//! peer cannot stall the node.
//!
//! - `clients`: client requests and sessions.
//! - `events`: each event's path: routing, batching, backpressure.
//! - `delivery`: the delivery core's actions.
//! - `announcer`: what discovery announces of this node's tree.

mod announcer;
mod asks;
mod clients;
pub(super) mod delivery;
mod events;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use crate::delivery::QueueRead;
use crate::delivery::{Commit, CustodyFrame, DeliveryCore};
use crate::discovery::{Discovery, DiscoveryEvent};
use crate::identity::NodeId;
use crate::node::driver::delivery::Publisher;
use crate::node::link::LinkHandle;
use crate::node::session::SessionHandle;
use crate::overlay::replay::Replay;
use crate::overlay::{
    Action, Arrival, DialTarget, Hop, LocalSub, NewConnection, Overlay, ReplayWindow, Route,
};
use crate::store::reader::{QueueEvents, Reader};
use crate::store::writer::Epoch;
use crate::store::writer::{Outcome, Writer};
use crate::topic::{Pattern, Topic};
use crate::wire::stream::FrameBatch;
use crate::wire::{
    Counters, ErrorCode, Event, NodeEventFrame, NodeMessage, NodeStatus, PeerStatus, PublishFrame,
    PublishReply,
};
use announcer::RootAnnouncer;

use super::{link, now, Input, ReplayConfig, Shared, Topology};
use clients::{disconnect_slow_consumer, mib};
use events::LinkFrames;

/// Longest queue-group name accepted.
const MAX_GROUP_LEN: usize = 64;
/// How often the parent link's RTT is given to the core for the tree picture.
const RTT_REPORT_INTERVAL: Duration = Duration::from_millis(500);
/// At-least-once events handed to the store and not yet committed, past
/// which the driver stops reading new input until the store catches up.
/// This is where a slow disk pushes back on publishers.
const MAX_STORE_BACKLOG: usize = 65536;
/// A congested client whose deliveries make no progress for this long is
/// a slow consumer: while it is congested every publisher waits for it.
pub const STALLED_AFTER: Duration = Duration::from_secs(2);

/// A client's subscription, for unsubscribe and cleanup.
struct Subscription {
    pattern: Pattern,
    group: Option<String>,
    /// When it began: an event replayed after a repair that was published
    /// before is not for it.
    since: Instant,
}

/// A client waiting for interest in a topic.
struct InterestWait {
    session: u64,
    request: u64,
    topic: Topic,
    deadline: Instant,
}

/// The one task that owns the overlay core and all routing state.
pub(super) struct Driver {
    shared: Arc<Shared>,
    overlay: Overlay,
    topology: watch::Sender<Topology>,
    /// The outbox's size, for [`super::Node::custody_held`].
    held: Arc<AtomicU64>,
    addr: SocketAddr,
    // Ordered maps, here and below, so that the order of sends does not
    // depend on hashing and a simulation replays exactly.
    links: BTreeMap<NodeId, LinkHandle>,
    sessions: BTreeMap<u64, SessionHandle>,
    /// The session behind each inbox that answers to requests go to.
    inboxes: HashMap<u64, u64>,
    subscriptions: BTreeMap<LocalSub, Subscription>,
    waits: Vec<InterestWait>,
    /// Questions passed on for clients, by number ([`asks`]).
    asks: HashMap<u64, asks::PendingAsk>,
    next_ask: u64,
    counters: Counters,
    /// The events routed here lately, for interest that comes back after a
    /// repair.
    replays: ReplayWindow<Event>,
    /// When the input being handled came: the time of every event it
    /// carries, read once rather than per event.
    input_at: Instant,
    /// Reused for every routing decision.
    route: Route,
    /// Deliveries and forwards gathered while handling one input, sent as
    /// one batch per destination when it is done.
    deliveries: BTreeMap<u64, FrameBatch>,
    forwards: BTreeMap<NodeId, LinkFrames>,
    /// The store, read through `reader` and written through `writer`,
    /// each on a thread of its own.
    reader: Reader<QueueRead>,
    writer: Writer<Commit<Publisher>>,
    delivery: DeliveryCore<Publisher>,
    /// Held so no second node opens the same data dir.
    _lock: File,
    announcer: RootAnnouncer,
}

/// What the driver is made of when the node starts.
pub(super) struct DriverParts {
    pub shared: Arc<Shared>,
    pub overlay: Overlay,
    pub topology: watch::Sender<Topology>,
    pub held: Arc<AtomicU64>,
    pub addr: SocketAddr,
    pub reader: Reader<QueueRead>,
    pub writer: Writer<Commit<Publisher>>,
    pub delivery: DeliveryCore<Publisher>,
    pub lock: File,
    pub discovery: Option<Box<dyn Discovery>>,
    pub replay: ReplayConfig,
}

impl Driver {
    pub(super) fn new(parts: DriverParts) -> Driver {
        let announcer = RootAnnouncer::new(parts.discovery, parts.overlay.id());
        Driver {
            shared: parts.shared,
            overlay: parts.overlay,
            topology: parts.topology,
            held: parts.held,
            addr: parts.addr,
            links: BTreeMap::new(),
            sessions: BTreeMap::new(),
            inboxes: HashMap::new(),
            subscriptions: BTreeMap::new(),
            replays: ReplayWindow::new(parts.replay.keep_for, parts.replay.max_bytes, now()),
            input_at: now(),
            waits: Vec::new(),
            asks: HashMap::new(),
            next_ask: 0,
            counters: Counters::default(),
            route: Route::default(),
            deliveries: BTreeMap::new(),
            forwards: BTreeMap::new(),
            reader: parts.reader,
            writer: parts.writer,
            delivery: parts.delivery,
            _lock: parts.lock,
            announcer,
        }
    }

    pub(super) async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Input>,
        mut discovery: mpsc::UnboundedReceiver<DiscoveryEvent>,
        mut stored: mpsc::UnboundedReceiver<Outcome<Commit<Publisher>>>,
        mut reads: mpsc::UnboundedReceiver<(QueueRead, QueueEvents)>,
        mut shutdown: oneshot::Receiver<()>,
    ) {
        self.overlay.handle_timeout(now());
        self.apply_actions();
        let mut rtt_tick = tokio::time::interval(RTT_REPORT_INTERVAL);
        let mut custody_tick = tokio::time::interval(crate::delivery::TICK);
        loop {
            let wake = self.next_wake();
            let store_keeps_up = self.delivery.store_backlog() < MAX_STORE_BACKLOG;
            // Biased: a fixed order of polling keeps simulations replayable.
            // Rare, cheap inputs first; the inbox, which can be busy without
            // pause, after them.
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                outcome = stored.recv() => match outcome {
                    Some(outcome) => self.delivery.handle_stored(outcome, now()),
                    None => {
                        tracing::error!("the store's writer stopped; the node cannot keep its guarantees and stops");
                        break;
                    }
                },
                Some((read, events)) = reads.recv() => self.delivery.handle_read(read, events),
                _ = custody_tick.tick() => {
                    self.delivery.handle_timeout(now());
                    self.find_stalled_clients();
                    self.expire_asks(now());
                }
                _ = rtt_tick.tick() => {
                    for link in self.links.values() {
                        self.shared.metrics.link_rtt.observe(link.connection.rtt().as_secs_f64());
                    }
                    let parent = self.overlay.parent().and_then(|p| self.links.get(&p));
                    if let Some(link) = parent {
                        self.overlay.handle_parent_rtt(link.connection.rtt());
                    }
                }
                Some(event) = discovery.recv() => self.handle_discovery(event),
                input = inbox.recv(), if store_keeps_up => match input {
                    Some(input) => self.handle(input),
                    None => break,
                },
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {
                    self.overlay.handle_timeout(now());
                }
            }
            // The timer branch comes after the inbox, so a busy inbox must
            // not keep the core's timers (joins, retries) from running.
            if self.next_wake() <= now() {
                self.overlay.handle_timeout(now());
            }
            self.apply_delivery_actions();
            // Before the batches go: replays join them.
            self.apply_actions();
            self.flush_batches();
            self.answer_waits();
            self.publish_topology();
            self.held
                .store(self.delivery.outbox_len().0 as u64, Ordering::Relaxed);
        }
        tracing::info!("node shutting down");
        let code = ErrorCode::ShuttingDown;
        self.shared.endpoint.close(code.varint(), code.reason());
        self.announcer.goodbye();
        // Waits for the writer to commit what it was given.
        drop(self.writer);
        let _ =
            tokio::time::timeout(Duration::from_secs(1), self.shared.endpoint.wait_idle()).await;
    }

    fn next_wake(&self) -> Instant {
        let far = now() + Duration::from_secs(3600);
        let waits = self.waits.iter().map(|w| w.deadline);
        let announce = self.announcer.wake();
        self.overlay
            .poll_timeout()
            .into_iter()
            .chain(waits)
            .chain(announce)
            .min()
            .unwrap_or(far)
    }

    fn handle_discovery(&mut self, event: DiscoveryEvent) {
        match event {
            DiscoveryEvent::Found { id, addrs, root } => {
                tracing::debug!(peer = %id.short(), ?addrs, root = ?root.map(|r| r.short()), "discovered");
                self.overlay.handle_discovered(id, addrs, root, now());
            }
            DiscoveryEvent::Lost { id } => {
                tracing::debug!(peer = %id.short(), "peer left discovery");
                self.overlay.handle_vanished(id);
            }
        }
    }

    fn handle(&mut self, input: Input) {
        self.input_at = now();
        match input {
            Input::LinkUp { handle, dialed } => {
                self.link_up(handle, dialed);
            }
            Input::LinkDown {
                peer,
                conn_id,
                parted,
            } => {
                if self.links.get(&peer).is_some_and(|l| l.conn_id == conn_id) {
                    self.links.remove(&peer);
                    if parted {
                        self.overlay.handle_link_closed(peer, now());
                    } else {
                        self.overlay.handle_link_down(peer, now());
                    }
                    self.delivery.handle_link_down(peer);
                }
            }
            Input::DialFailed { target } => self.overlay.handle_dial_failed(target, now()),
            Input::Overlay {
                peer,
                conn_id,
                message,
            } => {
                if self.is_current(peer, conn_id) {
                    self.overlay.handle_message(peer, message, now());
                }
            }
            Input::Delivery {
                peer,
                conn_id,
                message,
            } => {
                if self.is_current(peer, conn_id) {
                    self.delivery.handle_message(peer, message, now());
                }
            }
            Input::NodeEvents {
                peer,
                conn_id,
                frames,
            } => {
                if !self.is_current(peer, conn_id) {
                    return;
                }
                let mut custody = Vec::new();
                for frame in frames {
                    // Questions and answers are not events.
                    let question = matches!(
                        frame,
                        NodeEventFrame::Ask { .. } | NodeEventFrame::Answer { .. }
                    );
                    self.counters.events_received += u64::from(!question);
                    match frame {
                        NodeEventFrame::Event { event, groups } => {
                            let arrival = Arrival::new(Hop::Edge(peer), Some(&groups));
                            self.dispatch(arrival, event);
                        }
                        NodeEventFrame::Assigned {
                            mut event,
                            groups,
                            reply,
                        } => {
                            event.reply = reply.map(Box::new);
                            let arrival = Arrival {
                                only_groups: true,
                                ..Arrival::new(Hop::Edge(peer), Some(&groups))
                            };
                            self.dispatch(arrival, event);
                        }
                        NodeEventFrame::Directed { event, to } => {
                            self.dispatch_directed(Hop::Edge(peer), event, to)
                        }
                        NodeEventFrame::Replayed { event, age_ms } => {
                            self.dispatch_replayed(peer, event, age_ms)
                        }
                        NodeEventFrame::Request {
                            mut event,
                            groups,
                            reply,
                        } => {
                            event.reply = Some(Box::new(reply));
                            // Interest withdrawn on the way: the requester
                            // times out, as for a lost answer.
                            self.dispatch(Arrival::new(Hop::Edge(peer), Some(&groups)), event);
                        }
                        NodeEventFrame::Reply { event, to } => {
                            self.dispatch_reply(Hop::Edge(peer), event, to)
                        }
                        NodeEventFrame::Remote(remote) => {
                            self.delivery.handle_remote(peer, remote, now())
                        }
                        NodeEventFrame::Ask {
                            to,
                            from,
                            ask,
                            question,
                        } => self.handle_ask(Hop::Edge(peer), to, from, ask, question),
                        NodeEventFrame::Answer { to, ask, answer } => {
                            self.handle_answer(Hop::Edge(peer), to, ask, answer)
                        }
                        NodeEventFrame::Custody {
                            token,
                            event,
                            epoch,
                            targets,
                        } => custody.push(CustodyFrame {
                            token,
                            event,
                            epoch,
                            targets,
                        }),
                    }
                }
                if !custody.is_empty() {
                    self.delivery.handle_custody(peer, custody, now());
                }
            }
            Input::SessionOpen { session, handle } => {
                self.inboxes.insert(handle.inbox, session);
                self.sessions.insert(session, handle);
            }
            Input::SessionClosed { session } => self.session_closed(session),
            Input::Request { session, request } => self.request(session, request),
            Input::Scrape { reply } => {
                let _ = reply.send(self.status());
            }
            Input::Publish {
                session,
                frames,
                reply,
                permits,
            } => {
                let (mut custody, mut seqs) = (Vec::new(), Vec::new());
                if let Some(handle) = self.sessions.get_mut(&session) {
                    if handle.publish_replies.is_none() {
                        handle.publish_replies = Some(reply.clone());
                    }
                }
                for frame in frames {
                    match frame {
                        PublishFrame::Event(event) => {
                            self.counters.events_published += 1;
                            self.dispatch(
                                Arrival::new(Hop::Local, None),
                                event.at(self.overlay.id()),
                            );
                        }
                        PublishFrame::Directed { event, to } => {
                            self.counters.events_published += 1;
                            let event = event.at(self.overlay.id());
                            self.dispatch_directed(Hop::Local, event, to);
                        }
                        PublishFrame::AtLeastOnce(event) => {
                            let seq = event.id.seq;
                            let generation = self.sessions.get(&session).map_or(0, |h| h.refusals);
                            let epoch = Epoch::Connection {
                                session,
                                generation,
                            };
                            match self.delivery.admit(event.at(self.overlay.id()), epoch) {
                                Ok(item) => {
                                    self.counters.events_published += 1;
                                    seqs.push(seq);
                                    self.dispatch(
                                        Arrival::new(Hop::Local, None),
                                        item.event.clone(),
                                    );
                                    custody.push(item);
                                }
                                Err(refusal) => {
                                    self.epoch_broken(session);
                                    let _ = reply.send(PublishReply::Refused {
                                        seq,
                                        reason: refusal.reason,
                                        message: refusal.message,
                                    });
                                }
                            }
                        }
                        PublishFrame::Request { event, request } => {
                            self.publish_request(session, event, request, &reply)
                        }
                        PublishFrame::Reply { event, to } => {
                            self.counters.events_published += 1;
                            let event = event.at(self.overlay.id());
                            self.dispatch_reply(Hop::Local, event, to);
                        }
                        PublishFrame::Flush(token) => {
                            // Everything before the flush has been routed.
                            self.flush_batches();
                            let _ = reply.send(PublishReply::Flushed(token));
                        }
                    }
                }
                let then = Commit::Publisher {
                    publisher: Publisher {
                        reply,
                        session,
                        _permits: permits,
                    },
                    session,
                    seqs,
                };
                self.delivery.take_custody(custody, then, now());
            }
        }
    }

    fn is_current(&self, peer: NodeId, conn_id: u64) -> bool {
        self.links.get(&peer).is_some_and(|l| l.conn_id == conn_id)
    }

    /// Takes a new connection to a node; the overlay decides which of two
    /// to the same peer survives.
    fn link_up(&mut self, handle: LinkHandle, dialed: Option<DialTarget>) {
        let peer = handle.hello.id;
        let addr = handle.connection.remote_address();
        match self.overlay.handle_link_up(peer, addr, dialed, now()) {
            NewConnection::Link => {
                tracing::info!(peer = %peer.short(), name = %handle.hello.name, remote = %addr, "linked");
                self.links.insert(peer, handle);
                self.delivery.handle_link_up(peer);
            }
            NewConnection::CloseDuplicate => {
                tracing::debug!(peer = %peer.short(), "closing duplicate connection");
                handle.close(ErrorCode::DuplicateConnection);
            }
            NewConnection::ReplaceOld => {
                tracing::debug!(peer = %peer.short(), "replacing connection");
                if let Some(old) = self.links.insert(peer, handle) {
                    old.close(ErrorCode::DuplicateConnection);
                }
                // What went over the old connection may not have arrived.
                self.delivery.handle_link_replaced(peer);
                self.delivery.handle_link_up(peer);
            }
        }
    }

    fn apply_actions(&mut self) {
        while let Some(action) = self.overlay.poll_action() {
            match action {
                Action::Send { peer, message } => {
                    if let Some(link) = self.links.get(&peer) {
                        let _ = link.control.send(NodeMessage::Overlay(message));
                    }
                }
                Action::Disconnect { peer } => {
                    // What was routed to it before goes first (custody
                    // and drop counts see it), as a link's close would
                    // otherwise lose it silently.
                    self.flush_batches();
                    if let Some(link) = self.links.remove(&peer) {
                        tracing::debug!(peer = %peer.short(), "closing link no longer needed");
                        link.close(ErrorCode::Closed);
                    }
                }
                Action::Dial { target, addrs } => {
                    let span = tracing::debug_span!("dial", ?target);
                    tokio::spawn(link::dial(self.shared.clone(), target, addrs).instrument(span));
                }
                Action::Replay { peer, pattern } => self.replay(peer, &pattern),
            }
        }
    }

    /// Tells watchers, and discovery, about a changed place in the tree;
    /// compares first, so an unchanged tree costs no allocation.
    fn publish_topology(&mut self) {
        let position = self.overlay.position();
        if position.root != self.topology.borrow().root {
            self.announcer.root_changed(position.root, now());
        }
        self.announcer.announce_due(now());
        let parent = self.overlay.parent();
        if parent != self.topology.borrow().parent {
            // The handshake measured the new edge already: show it in the
            // tree now, not at the next periodic report.
            if let Some(link) = parent.and_then(|p| self.links.get(&p)) {
                self.overlay.handle_parent_rtt(link.connection.rtt());
                self.apply_actions();
            }
        }
        let unchanged = {
            let seen = self.topology.borrow();
            seen.parent == parent
                && seen.root == position.root
                && seen.depth == position.depth
                && seen.children.iter().copied().eq(self.overlay.children())
                && seen.links.iter().eq(self.links.keys())
        };
        if !unchanged {
            self.topology.send_replace(Topology {
                parent,
                root: position.root,
                depth: position.depth,
                children: self.overlay.children().collect(),
                links: self.links.keys().copied().collect(),
            });
        }
    }

    fn status(&mut self) -> NodeStatus {
        let parent = self.overlay.parent();
        let mut peers: Vec<PeerStatus> = self
            .links
            .iter()
            .map(|(id, link)| PeerStatus {
                id: *id,
                name: link.hello.name.clone(),
                addr: link.connection.remote_address().to_string(),
                rtt_us: link.connection.rtt().as_micros() as u64,
                role: if parent == Some(*id) {
                    "parent"
                } else if self.overlay.is_child(*id) {
                    "child"
                } else {
                    "peer"
                }
                .to_string(),
                queued_bytes: link.backlog.bytes() as u64,
                events_dropped: link.dropped.total,
            })
            .collect();
        peers.sort_by_key(|p| p.id);
        let position = self.overlay.position();
        let (outbox, outbox_unreachable) = self.delivery.outbox_len();
        let delivered = self.delivery.counters();
        NodeStatus {
            id: self.overlay.id(),
            name: self.shared.name.clone(),
            cluster: self.shared.cluster.clone(),
            addr: self.addr.to_string(),
            root: position.root,
            root_addrs: self.overlay.root_addrs().map(|r| r.addrs.clone()),
            parent,
            depth: position.depth,
            subtree: self.overlay.subtree_size(),
            peers,
            subscriptions: self.overlay.subscriptions(),
            durables: self.delivery.durable_status(),
            outbox: outbox as u64,
            outbox_unreachable: outbox_unreachable as u64,
            connections: self.shared.endpoint.open_connections() as u64,
            clients: self.sessions.len() as u64,
            congested: self.shared.pressure.congested() as u64,
            counters: Counters {
                events_stored: delivered.events_stored,
                events_refused: self.counters.events_refused + delivered.events_refused,
                events_redelivered: delivered.events_redelivered,
                operations_denied: self.shared.operations_denied.load(Ordering::Relaxed),
                publishes_throttled: self.shared.publishes_throttled.load(Ordering::Relaxed),
                ..self.counters.clone()
            },
        }
    }
}
