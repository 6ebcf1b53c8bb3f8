//! The driver's side of the delivery core ([`crate::delivery`]): it takes
//! the core's actions to the store, the links and the clients, and brings
//! back what the store did.

use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::clients::error_reply;
use super::events::deliveries_for;
use super::{now, Driver};
use crate::delivery::{AttachRefusal, DeliveryAction};
use crate::identity::NodeId;
use crate::overlay::{Hop, NextHop};
use crate::wire::{ClientReply, Delivery, Destination, NodeMessage, PublishReply, RequestError};

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
                } => match result {
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
                },
            }
        }
    }

    /// An at-least-once event of `session`'s was refused: the events it
    /// takes from now on start a new epoch, as the old one would claim
    /// that none is missing.
    pub(super) fn epoch_broken(&mut self, session: u64) {
        if let Some(handle) = self.sessions.get_mut(&session) {
            handle.epoch = None;
        }
    }

    /// Why a client must attach to durable `name` at its home, with where
    /// that is.
    pub(super) fn attach_elsewhere(&self, name: &str, home: NodeId) -> (RequestError, String) {
        let entry = self.overlay.tree().into_iter().find(|e| e.id == home);
        let mut place = match entry {
            Some(entry) => format!("node {} ({})", entry.name, home.short()),
            None => format!("node {}", home.short()),
        };
        let connect = match self.overlay.known_addrs(home) {
            Some(addrs) if !addrs.is_empty() => {
                place += &format!(" at {}", addrs[0]);
                format!("--node {}", addrs[0])
            }
            // `treescale tree --json` lists every node's address.
            _ => "--node; `treescale tree --json` lists each node's address".to_string(),
        };
        (
            RequestError::DurableElsewhere,
            format!("durable subscription {name} lives on {place}, which stores its events; connect to that node to receive them ({connect})"),
        )
    }

    /// Answers a refused durable subscription.
    pub(super) fn attach_refused(
        &self,
        sub: u64,
        name: &str,
        refusal: AttachRefusal,
    ) -> ClientReply {
        let (error, message) = match refusal {
            AttachRefusal::Refused(error, message) => (error, message),
            AttachRefusal::Elsewhere { home } => self.attach_elsewhere(name, home),
        };
        error_reply(sub, error, message)
    }
}
