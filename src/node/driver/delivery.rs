//! The driver's side of the delivery core ([`crate::delivery`]): it takes
//! the core's actions to the store, the links and the clients, and brings
//! back what the store did.

use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::clients::error_reply;
use super::events::deliveries_for;
use super::{now, Driver};
use crate::delivery::DeliveryAction;
use crate::overlay::{Hop, NextHop};
use crate::wire::{
    ClientReply, Delivery, DeliveryMessage, Destination, NodeEventFrame, NodeMessage, PublishReply,
    RemoteMessage,
};

/// The driver's handle on a client whose at-least-once events wait for
/// their commit.
pub(crate) struct Publisher {
    pub reply: mpsc::UnboundedSender<PublishReply>,
    pub session: u64,
    /// The client's allowance of pending events, given back once the
    /// commit is answered.
    pub _permits: Vec<OwnedSemaphorePermit>,
}

impl Driver {
    /// Carries out what the delivery core asks for.
    pub(super) fn apply_delivery_actions(&mut self) {
        let overlay = &self.overlay;
        self.delivery.send_custody(now(), |home| {
            match overlay.next_hop(Hop::Local, &Destination::Node(home)) {
                NextHop::Edge(peer) => Some(peer),
                _ => None,
            }
        });
        while let Some(action) = self.delivery.poll_action() {
            match action {
                DeliveryAction::Write(command) => self.writer.send(command),
                DeliveryAction::Read(read) => {
                    let (durable, from, limit) = (read.durable.clone(), read.from, read.limit);
                    self.reader.read(&durable, from, limit, read);
                }
                DeliveryAction::Send { peer, message } => {
                    if let Some(link) = self.links.get(&peer) {
                        let _ = link.control.send(NodeMessage::Delivery(message));
                    }
                }
                DeliveryAction::Forward { peer, token, frame } => {
                    if self.links.contains_key(&peer) {
                        self.forward(peer, frame);
                    } else {
                        self.delivery.handle_unsent(std::iter::once(token));
                    }
                }
                DeliveryAction::Deliver(delivery) => {
                    let batch =
                        deliveries_for(&mut self.deliveries, &self.sessions, delivery.session);
                    batch.push(&Delivery::Durable {
                        sub: delivery.sub,
                        position: delivery.position,
                        event: delivery.event,
                    });
                }
                DeliveryAction::Attached {
                    session,
                    sub,
                    first,
                    backlog,
                } => self.reply(
                    session,
                    ClientReply::DurableAttached {
                        sub,
                        first,
                        backlog,
                    },
                ),
                DeliveryAction::Refuse {
                    session,
                    sub,
                    error,
                    message,
                } => self.reply(session, error_reply(sub, error, message)),
                DeliveryAction::Route { remote, from } => {
                    let hop = from.map_or(Hop::Local, Hop::Edge);
                    let next = self.overlay.next_hop(hop, &Destination::Node(remote.to));
                    let NextHop::Edge(peer) = next else {
                        // No path now: the proxy asks again, the home
                        // sends again what goes unacknowledged.
                        tracing::debug!(to = %remote.to.short(), "no path for a remote attachment's message");
                        continue;
                    };
                    if matches!(remote.message, RemoteMessage::Events(_)) {
                        if self.links.contains_key(&peer) {
                            self.forward(peer, NodeEventFrame::Remote(remote));
                        }
                    } else if let Some(link) = self.links.get(&peer) {
                        let message = DeliveryMessage::Remote(remote);
                        let _ = link.control.send(NodeMessage::Delivery(message));
                    }
                }
                DeliveryAction::Released { session, up_to } => {
                    let publish = self.sessions.get(&session);
                    if let Some(reply) = publish.and_then(|s| s.publish_replies.as_ref()) {
                        let _ = reply.send(PublishReply::Released { up_to });
                    }
                }
                DeliveryAction::Published {
                    publisher,
                    seqs,
                    result,
                } => {
                    // Gone while its events were committed: what the core
                    // keeps for its releases goes too.
                    if !self.sessions.contains_key(&publisher.session) {
                        self.delivery.publisher_gone(publisher.session);
                    }
                    match result {
                        Ok(()) => {
                            if let Some(&up_to) = seqs.iter().max() {
                                let _ = publisher.reply.send(PublishReply::Acked { up_to });
                            }
                        }
                        Err(refusal) => {
                            self.epoch_broken(publisher.session);
                            for seq in seqs {
                                let _ = publisher.reply.send(PublishReply::Refused {
                                    seq,
                                    reason: refusal.reason,
                                    message: refusal.message.clone(),
                                });
                            }
                        }
                    }
                }
            }
        }
    }

    /// An at-least-once event of `session`'s was refused: the events it
    /// takes from now on start a new epoch, as the old one would claim
    /// that none is missing. (A failed commit ends the epoch in the
    /// writer, in the order of the commits.)
    pub(super) fn epoch_broken(&mut self, session: u64) {
        if let Some(handle) = self.sessions.get_mut(&session) {
            handle.refusals += 1;
        }
    }
}
