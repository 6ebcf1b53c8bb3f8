//! Each event's path through the node: routed by the overlay core, queued
//! per destination while one input is handled, then handed to each
//! connection's writer under its byte bound.

use std::collections::BTreeMap;

use tokio::sync::mpsc;

use crate::identity::NodeId;
use crate::node::session::SessionHandle;
use crate::overlay::{Hop, LocalSub, NextHop};
use crate::wire::stream::FrameBatch;
use crate::wire::{
    hot, Delivery, Destination, Event, GroupKey, NodeEventFrame, PublishReply, Published, ReplyTo,
    RequestFailure,
};

use super::*;

impl Driver {
    /// Routes one event (or request) and queues it for every destination.
    /// One routed here before is a repeat: it goes only to queue groups
    /// ([`ReplayWindow::take_arrival`] says which are kept).
    pub(super) fn dispatch(&mut self, mut arrival: Arrival<'_>, event: Event) {
        let at = self.input_at;
        let keeping = self.overlay.keeps_replays(at);
        if !self
            .replays
            .take_arrival(&event, keeping, arrival.only_groups, at)
        {
            arrival.only_groups = true;
        }
        let mut route = std::mem::take(&mut self.route);
        route.local.clear();
        route.edges.clear();
        route.lingering.clear();
        self.overlay
            .route(event.id, arrival, &event.topic, &mut route);
        let only_groups = route.only_groups;
        for (edge, groups) in route.lingering.drain(..) {
            self.forward(edge, event_frame(event.clone(), groups, true));
        }
        self.deliver_here(&route.local, &event);
        for (edge, groups) in route.edges.drain(..) {
            self.forward_routed(edge, &event, groups, only_groups);
        }
        self.route = route;
    }

    /// Sends `peer` what the replay window holds for `pattern`: interest in
    /// it came back over that edge after a repair.
    pub(super) fn replay(&mut self, peer: NodeId, pattern: &Pattern) {
        let replays = self.replays.replay(pattern, now());
        if !replays.is_empty() {
            tracing::debug!(peer = %peer.short(), %pattern, events = replays.len(), "replaying after a repair");
        }
        for Replay { event, age } in replays {
            self.counters.events_replayed += 1;
            // Rounded up: a younger date could make a copy look new.
            let age_ms = age
                .as_micros()
                .div_ceil(1000)
                .try_into()
                .unwrap_or(u32::MAX);
            self.forward(peer, NodeEventFrame::Replayed { event, age_ms });
        }
    }

    /// Routes an event replayed by `peer`, unless it was taken here
    /// before: on to plain interest only (the groups' members were chosen
    /// when it was published), and to local subscriptions that began
    /// before it was published.
    pub(super) fn dispatch_replayed(&mut self, peer: NodeId, event: Event, age_ms: u32) {
        let now = now();
        let published = now
            .checked_sub(Duration::from_millis(age_ms.into()))
            .unwrap_or(now);
        let keeping = self.overlay.keeps_replays(now);
        if !self.replays.take_replayed(&event, keeping, published, now) {
            return;
        }
        self.counters.replays_filled += 1;
        let mut route = std::mem::take(&mut self.route);
        route.local.clear();
        route.edges.clear();
        route.lingering.clear();
        let arrival = Arrival::new(Hop::Edge(peer), Some(&[]));
        self.overlay
            .route(event.id, arrival, &event.topic, &mut route);
        let subscriptions = &self.subscriptions;
        route
            .local
            .retain(|sub| subscriptions.get(sub).is_some_and(|s| s.since <= published));
        for (edge, _) in route.edges.drain(..).chain(route.lingering.drain(..)) {
            let event = event.clone();
            self.forward(edge, NodeEventFrame::Replayed { event, age_ms });
        }
        self.deliver_here(&route.local, &event);
        self.route = route;
    }

    /// Routes a client's request with the address of its inbox here, or
    /// answers at once that nothing anywhere would receive it.
    pub(super) fn publish_request(
        &mut self,
        session: u64,
        event: Published,
        request: u64,
        publisher: &mpsc::UnboundedSender<PublishReply>,
    ) {
        let Some(inbox) = self.sessions.get(&session).map(|s| s.inbox) else {
            return;
        };
        self.counters.events_published += 1;
        let mut event = event.at(self.overlay.id());
        event.reply = Some(Box::new(ReplyTo {
            node: self.overlay.id(),
            inbox,
            request,
        }));
        let topic = event.topic.clone();
        // Known subscriptions only: not the edges where some were moments ago.
        let answerable = self.overlay.has_interest(&topic);
        self.dispatch(Arrival::new(Hop::Local, None), event);
        if !answerable {
            self.counters.requests_without_responders += 1;
            let _ = publisher.send(PublishReply::RequestFailed {
                request,
                reason: RequestFailure::NoResponders,
                message: format!("no responders for {topic}"),
            });
        }
    }

    /// Sends an answer one hop along the tree path to its requester's
    /// node, or hands it to the requester when it has arrived.
    pub(super) fn dispatch_reply(&mut self, from: Hop, event: Event, to: ReplyTo) {
        if to.node == self.overlay.id() {
            let session = self.inboxes.get(&to.inbox).copied();
            let Some(session) = session.filter(|s| self.sessions.contains_key(s)) else {
                // The requester is gone, or the address was made up.
                self.counters.replies_undeliverable += 1;
                return;
            };
            let delivery = Delivery::Reply {
                request: to.request,
                event,
            };
            deliveries_for(&mut self.deliveries, &self.sessions, session).push(&delivery);
            return;
        }
        match self.overlay.next_hop(from, &Destination::Node(to.node)) {
            NextHop::Edge(peer) => {
                self.forward(peer, NodeEventFrame::Reply { event, to });
            }
            _ => {
                self.counters.events_unroutable += 1;
                tracing::debug!(node = %to.node.short(), "answer for a node not in this tree dropped");
            }
        }
    }

    /// Adds `frame` to the batch for `peer`.
    pub(super) fn forward(&mut self, peer: NodeId, frame: NodeEventFrame) {
        let batch = self.link_batch(peer);
        batch.frames.push(&frame);
        match frame {
            NodeEventFrame::Custody { token, .. } => batch.custody.push(token),
            NodeEventFrame::Ask { .. } | NodeEventFrame::Answer { .. } => batch.questions += 1,
            _ => {}
        }
    }

    /// Adds a routed event to the batch for `peer`. A plain event, nearly
    /// every one, is encoded from the borrowed event, not cloned into a
    /// frame per destination.
    fn forward_routed(
        &mut self,
        peer: NodeId,
        event: &Event,
        groups: Vec<GroupKey>,
        only_groups: bool,
    ) {
        if only_groups || event.reply.is_some() {
            return self.forward(peer, event_frame(event.clone(), groups, only_groups));
        }
        self.link_batch(peer)
            .frames
            .push_with(|out| hot::encode_node_event(event, &groups, out));
    }

    /// The batch for `peer`, begun with room for as many bytes as the last
    /// one held.
    fn link_batch(&mut self, peer: NodeId) -> &mut LinkFrames {
        let links = &self.links;
        self.forwards.entry(peer).or_insert_with(|| LinkFrames {
            frames: FrameBatch::with_room(links.get(&peer).map_or(0, |link| link.last_batch)),
            custody: Vec::new(),
            questions: 0,
        })
    }

    /// Queues `event` for each of these local subscriptions.
    pub(super) fn deliver_here(&mut self, subs: &[LocalSub], event: &Event) {
        for sub in subs {
            let batch = deliveries_for(&mut self.deliveries, &self.sessions, sub.session);
            match &event.reply {
                None => batch.push_with(|out| hot::encode_delivery_event(sub.sub, event, out)),
                Some(reply) => batch.push(&Delivery::Request {
                    sub: sub.sub,
                    event: Event {
                        id: event.id,
                        origin: event.origin,
                        topic: event.topic.clone(),
                        headers: event.headers.clone(),
                        payload: event.payload.clone(),
                        reply: None,
                    },
                    reply: **reply,
                }),
            }
        }
    }

    /// Sends a directed event one hop along the tree path to its node, or
    /// hands it to this node's subscribers when it has arrived.
    pub(super) fn dispatch_directed(&mut self, from: Hop, event: Event, to: Destination) {
        match self.overlay.next_hop(from, &to) {
            NextHop::Here => {
                let mut route = std::mem::take(&mut self.route);
                route.local.clear();
                route.edges.clear();
                self.overlay.route_here(&event.topic, &mut route);
                self.deliver_here(&route.local, &event);
                self.route = route;
            }
            NextHop::Edge(peer) => self.forward(peer, NodeEventFrame::Directed { event, to }),
            NextHop::Unknown => {
                self.counters.events_unroutable += 1;
                tracing::debug!(?to, "directed event for an unknown node dropped");
            }
        }
    }

    /// Hands each destination its batch; the driver never waits on a
    /// connection. A client whose backlog passed its bound is disconnected
    /// as a slow consumer; a link past its bound has its batch dropped and
    /// counted.
    pub(super) fn flush_batches(&mut self) {
        let limit = self.shared.limits.consumer_bytes;
        for (session, mut batch) in std::mem::take(&mut self.deliveries) {
            let Some(handle) = self.sessions.get_mut(&session) else {
                continue;
            };
            let (events, bytes) = (batch.frames(), batch.bytes());
            if handle.slow {
                self.counters.events_dropped += events as u64;
                continue;
            }
            // Only what already waits counts against the limit: one batch
            // is always taken, however large (a durable window of big
            // events), so memory stays under the limit plus a batch.
            let queued = handle.backlog.bytes();
            if queued > limit {
                let why = format!(
                    "{} of deliveries waited, over the node's limit of {} (--max-consumer-bytes)",
                    mib(queued),
                    mib(limit)
                );
                disconnect_slow_consumer(session, handle, &why);
                self.counters.events_dropped += events as u64;
                continue;
            }
            handle.last_batch = bytes;
            batch.fit();
            handle.backlog.add(bytes, events as u64);
            if handle.deliveries.send(batch).is_ok() {
                self.counters.events_delivered += events as u64;
            } else {
                // The client is going: never written, so not held.
                handle.backlog.remove(bytes);
                handle.backlog.remove_events(events as u64);
            }
        }
        let limit = self.shared.limits.link_bytes;
        for (peer, batch) in std::mem::take(&mut self.forwards) {
            let Some(link) = self.links.get_mut(&peer) else {
                continue;
            };
            let LinkFrames {
                mut frames,
                custody,
                questions,
            } = batch;
            // The backlog counts frames, as the link's writer does; the
            // counters count events.
            let (queued_frames, bytes) = (frames.frames() as u64, frames.bytes());
            let events = queued_frames - questions;
            let queued = link.backlog.bytes();
            if queued > limit {
                self.counters.events_dropped += events;
                if let Some(dropped) = link.dropped.count(events, now()) {
                    tracing::warn!(peer = %peer.short(), dropped, queued, limit,
                        "link not keeping up; events dropped (--max-link-bytes); at-least-once ones are sent again");
                }
                // Custody frames are not lost with the batch: they go
                // again, as if unacknowledged.
                self.delivery.handle_unsent(custody.into_iter());
                continue;
            }
            link.last_batch = bytes;
            frames.fit();
            link.backlog.add(bytes, queued_frames);
            if link.events.send(frames).is_ok() {
                self.counters.events_forwarded += events;
            } else {
                link.backlog.remove(bytes);
                link.backlog.remove_events(queued_frames);
                self.delivery.handle_unsent(custody.into_iter());
            }
        }
    }
}

/// Frames for one link gathered while handling one input, and the custody
/// tokens among them: a batch dropped for a full queue sends those again.
pub(super) struct LinkFrames {
    pub frames: FrameBatch,
    pub custody: Vec<u64>,
    /// Of the frames, questions and answers ([`super::asks`]): not events.
    pub questions: u64,
}

/// The batch of deliveries for `session`, begun with room for as many bytes
/// as its last one held.
pub(super) fn deliveries_for<'a>(
    deliveries: &'a mut BTreeMap<u64, FrameBatch>,
    sessions: &BTreeMap<u64, SessionHandle>,
    session: u64,
) -> &'a mut FrameBatch {
    deliveries.entry(session).or_insert_with(|| {
        FrameBatch::with_room(sessions.get(&session).map_or(0, |s| s.last_batch))
    })
}

/// The frame that forwards `event` to a neighbour: a request carries its
/// answer's address beside the event, and a repeat goes only to groups.
fn event_frame(mut event: Event, groups: Vec<GroupKey>, only_groups: bool) -> NodeEventFrame {
    let reply = event.reply.take();
    if only_groups {
        return NodeEventFrame::Assigned {
            event,
            groups,
            reply: reply.map(|r| *r),
        };
    }
    match reply {
        None => NodeEventFrame::Event { event, groups },
        Some(reply) => NodeEventFrame::Request {
            event,
            groups,
            reply: *reply,
        },
    }
}
