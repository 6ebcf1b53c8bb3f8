//! The delivery core of one simulated node, with its store in memory: what
//! at-least-once publishers and durable subscribers need in protocol mode.
//! The store outlives a crash, as a data dir on disk does; the core and
//! its writer do not.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use treescale::delivery::{Commit, DeliveryAction, DeliveryConfig, DeliveryCore};
use treescale::store::writer::{Outcome, Writer};
use treescale::store::{MemoryStore, Store};
use treescale::wire::{DeliveryMessage, Event, RetentionLimits};
use treescale::NodeId;

/// A publisher's at-least-once event as the simulator names it: the
/// publisher's number and the event's.
pub type PublishKey = (usize, u64);

/// How long a durable delivery waits for its ack before it goes again.
const ACK_WAIT: Duration = Duration::from_secs(5);
/// Durable events out to a client beyond its last ack (the node's default).
const UNACKED: usize = 1024;

/// One node's delivery core, its writer (committing inline, so a crash
/// loses nothing the core was told is stored) and the clients of its
/// durable subscriptions.
pub struct NodeDelivery {
    pub core: DeliveryCore<PublishKey>,
    store: Arc<dyn Store>,
    writer: Writer<Commit<PublishKey>>,
    outcomes: mpsc::UnboundedReceiver<Outcome<Commit<PublishKey>>>,
}

/// What a node's delivery core did that the scenario sees.
pub enum Seen {
    /// The node confirmed (or refused) a publisher's event.
    Confirmed(PublishKey, bool),
    /// A durable client got an event for the first time.
    Handed { sub: u64, event: Event },
    /// A durable client is attached.
    Attached { sub: u64 },
    /// A durable client was refused.
    Refused { sub: u64, message: String },
    /// The node released a publisher connection's events up to `up_to`.
    Released { session: u64, up_to: u64 },
}

/// What a node's delivery core asks of the network.
pub enum Outgoing {
    Control(NodeId, treescale::wire::DeliveryMessage),
    Custody {
        peer: NodeId,
        token: u64,
        frame: treescale::wire::NodeEventFrame,
    },
}

impl NodeDelivery {
    /// Starts node `me`'s core from what its store holds.
    pub fn start(me: NodeId, store: Arc<MemoryStore>, now: Instant) -> NodeDelivery {
        let store: Arc<dyn Store> = store;
        let recovered = store.recover().expect("a store in memory recovers");
        let (tx, outcomes) = mpsc::unbounded_channel();
        let writer = Writer::start(store.clone(), &recovered, tx, true);
        let config = DeliveryConfig { unacked: UNACKED };
        NodeDelivery {
            // The simulated wall clock starts at the Unix epoch.
            core: DeliveryCore::new(me, config, recovered, now, 0),
            store,
            writer,
            outcomes,
        }
    }

    /// Attaches durable client `sub` to `name`, creating it here if new;
    /// a refusal is seen as [`Seen::Refused`].
    pub fn subscribe(
        &mut self,
        session: u64,
        sub: u64,
        name: &str,
        pattern: &str,
        now: Instant,
        seen: &mut Vec<Seen>,
    ) {
        let limits = RetentionLimits::default();
        let result = self.core.subscribe(
            session,
            sub,
            name.into(),
            pattern.into(),
            limits,
            ACK_WAIT,
            now,
        );
        if let Err(refusal) = result {
            // Two subscribers naming one durable on different nodes, say.
            let message = format!("durable {name}: {refusal:?}");
            seen.push(Seen::Refused { sub, message });
        }
    }

    /// Carries out what the core asks for: the store's part here, the
    /// network's into `out`, what the scenario sees into `seen`. `next_hop`
    /// is the overlay's way towards a node. `handed` is the last position
    /// handed to each durable client (by subscription number), wherever it
    /// is attached: a redelivery is not handed over twice, as the client
    /// library does it.
    pub fn run(
        &mut self,
        now: Instant,
        next_hop: impl Fn(NodeId) -> Option<NodeId>,
        handed: &mut BTreeMap<u64, u64>,
        out: &mut Vec<Outgoing>,
        seen: &mut Vec<Seen>,
    ) {
        self.core.send_custody(now, &next_hop);
        loop {
            while let Ok(outcome) = self.outcomes.try_recv() {
                self.core.handle_stored(outcome, now);
            }
            let Some(action) = self.core.poll_action() else {
                return;
            };
            match action {
                DeliveryAction::Write(command) => self.writer.send(command),
                DeliveryAction::Read(read) => {
                    let result = self.store.read_queue(&read.durable, read.from, read.limit);
                    self.core.handle_read(read, result);
                }
                DeliveryAction::Send { peer, message } => {
                    out.push(Outgoing::Control(peer, message))
                }
                // The simulated links carry one stream: events for a
                // remote attachment travel with the control messages.
                // The simulated tree has no loops to guard against.
                DeliveryAction::Route { remote, .. } => {
                    if let Some(peer) = next_hop(remote.to) {
                        out.push(Outgoing::Control(peer, DeliveryMessage::Remote(remote)))
                    }
                }
                DeliveryAction::Forward { peer, token, frame } => {
                    out.push(Outgoing::Custody { peer, token, frame })
                }
                DeliveryAction::Deliver(delivery) => {
                    // The client acknowledges at once; a redelivery of what
                    // it already has is not handed over again.
                    let last = handed.entry(delivery.sub).or_default();
                    if delivery.position > *last {
                        *last = delivery.position;
                        seen.push(Seen::Handed {
                            sub: delivery.sub,
                            event: delivery.event,
                        });
                    }
                    self.core
                        .handle_ack(delivery.session, delivery.sub, delivery.position, now);
                }
                DeliveryAction::Attached { sub, .. } => seen.push(Seen::Attached { sub }),
                DeliveryAction::Refuse { sub, message, .. } => {
                    seen.push(Seen::Refused { sub, message })
                }
                DeliveryAction::Published {
                    publisher, result, ..
                } => seen.push(Seen::Confirmed(publisher, result.is_ok())),
                DeliveryAction::Released { session, up_to } => {
                    seen.push(Seen::Released { session, up_to })
                }
            }
        }
    }
}
