//! The outbox: which at-least-once events the node holds
//! for durable subscriptions homed elsewhere, where each was sent, and what
//! is still unacknowledged. The events themselves are committed in the
//! store before they get here; this only decides when to (re)send.
//!
//! An entry can be for several durable subscriptions whose homes lie
//! behind different edges; each target is sent, acknowledged and resent
//! on its own. An entry is forgotten once every target is acknowledged.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::identity::NodeId;
use crate::store::OutboxEntry;
use crate::wire::NodeEventFrame;

/// Custody frames in flight to one peer before sending waits for acks.
pub const WINDOW: usize = 16384;
/// How long a custody frame may go unacknowledged on a live link before it
/// is sent again. A lost link resends at once; this is the safety net for
/// a peer that took a frame and never answered.
pub const RESEND_AFTER: Duration = Duration::from_secs(15);
/// Entries passed over because their peer's window is full, after which a
/// scan stops: the rest waits for acks, and a scan stays cheap however
/// much is held.
const MAX_SKIPPED: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TargetState {
    Waiting,
    Sent(u64),
    Done,
}

struct Held {
    entry: OutboxEntry,
    targets: Vec<TargetState>,
}

/// One custody frame sent and not yet acknowledged.
struct Sent {
    key: u64,
    peer: NodeId,
    at: Instant,
    targets: Vec<usize>,
}

#[derive(Default)]
pub struct Outbox {
    entries: BTreeMap<u64, Held>,
    /// Entries with a target to send whose next hop was known last time.
    waiting: BTreeSet<u64>,
    /// Entries with a target whose home could not be reached last time;
    /// looked at again only when the tree or the durables change.
    parked: BTreeSet<u64>,
    sent: HashMap<u64, Sent>,
    in_flight: HashMap<NodeId, usize>,
    next_token: u64,
}

/// Where the home of a durable subscription lies from here.
pub enum HomeRoute {
    /// Send towards it over the link to this peer.
    Via(NodeId),
    /// Not reachable now: keep the event.
    Unreachable,
}

impl Outbox {
    pub fn insert(&mut self, key: u64, entry: OutboxEntry) {
        let targets = vec![TargetState::Waiting; entry.targets.len()];
        self.entries.insert(key, Held { entry, targets });
        self.waiting.insert(key);
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Entries with a target that cannot be reached now.
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// A peer committed the frames with these tokens. Returns the keys of
    /// entries now fully handed on, for the store to forget.
    pub fn acknowledged(&mut self, peer: NodeId, tokens: &[u64]) -> Vec<u64> {
        let mut finished = Vec::new();
        for token in tokens {
            let Some(sent) = self.sent.remove(token) else {
                continue;
            };
            if sent.peer != peer {
                // Only the peer it went to may acknowledge it.
                self.sent.insert(*token, sent);
                continue;
            }
            self.release(peer);
            let Some(held) = self.entries.get_mut(&sent.key) else {
                continue;
            };
            for i in sent.targets {
                if held.targets[i] == TargetState::Sent(*token) {
                    held.targets[i] = TargetState::Done;
                }
            }
            if held.targets.iter().all(|t| *t == TargetState::Done) {
                self.entries.remove(&sent.key);
                finished.push(sent.key);
            }
        }
        finished
    }

    /// The link to `peer` is gone: what was sent over it goes again.
    pub fn link_down(&mut self, peer: NodeId) {
        let tokens: Vec<u64> = self
            .sent
            .iter()
            .filter(|(_, s)| s.peer == peer)
            .map(|(t, _)| *t)
            .collect();
        for token in tokens {
            self.unsend(token);
        }
        self.in_flight.remove(&peer);
    }

    /// Frames unacknowledged for longer than [`RESEND_AFTER`] go again.
    pub fn expire(&mut self, now: Instant) {
        let tokens: Vec<u64> = self
            .sent
            .iter()
            .filter(|(_, s)| now.duration_since(s.at) >= RESEND_AFTER)
            .map(|(t, _)| *t)
            .collect();
        self.resend(tokens.into_iter());
    }

    /// These frames never left: send them again.
    pub fn resend(&mut self, tokens: impl Iterator<Item = u64>) {
        for token in tokens {
            if let Some(peer) = self.sent.get(&token).map(|s| s.peer) {
                self.release(peer);
            }
            self.unsend(token);
        }
    }

    /// Gives parked entries another chance: the tree or the durables changed.
    pub fn unpark(&mut self) {
        self.waiting.append(&mut self.parked);
    }

    /// Custody frames to send now, in key order, as far as each peer's
    /// window allows. `route` says where each durable's home lies; `links`
    /// is how many peers it can name.
    pub fn poll_sends(
        &mut self,
        now: Instant,
        links: usize,
        mut route: impl FnMut(&str) -> HomeRoute,
    ) -> Vec<(NodeId, NodeEventFrame)> {
        let mut frames = Vec::new();
        let mut full_peers: Vec<NodeId> = Vec::new();
        let mut skipped = 0;
        let mut cursor = None;
        loop {
            let next = match cursor {
                None => self.waiting.first().copied(),
                Some(last) => self.waiting.range(last + 1..).next().copied(),
            };
            let Some(key) = next else { break };
            cursor = Some(key);
            if (links > 0 && full_peers.len() >= links) || skipped >= MAX_SKIPPED {
                break;
            }
            let Some(held) = self.entries.get_mut(&key) else {
                self.waiting.remove(&key);
                continue;
            };
            let mut by_peer: Vec<(NodeId, Vec<usize>)> = Vec::new();
            let mut unreachable = false;
            for (i, state) in held.targets.iter().enumerate() {
                if *state != TargetState::Waiting {
                    continue;
                }
                match route(&held.entry.targets[i].durable) {
                    HomeRoute::Via(peer) => match by_peer.iter_mut().find(|(p, _)| *p == peer) {
                        Some((_, targets)) => targets.push(i),
                        None => by_peer.push((peer, vec![i])),
                    },
                    HomeRoute::Unreachable => unreachable = true,
                }
            }
            let mut blocked = false;
            for (peer, targets) in by_peer {
                let in_flight = self.in_flight.entry(peer).or_default();
                if *in_flight >= WINDOW {
                    blocked = true;
                    if !full_peers.contains(&peer) {
                        full_peers.push(peer);
                    }
                    continue;
                }
                *in_flight += 1;
                let token = self.next_token;
                self.next_token += 1;
                for &i in &targets {
                    held.targets[i] = TargetState::Sent(token);
                }
                frames.push((
                    peer,
                    NodeEventFrame::Custody {
                        token,
                        event: held.entry.event.clone(),
                        epoch: held.entry.epoch,
                        targets: targets
                            .iter()
                            .map(|&i| held.entry.targets[i].clone())
                            .collect(),
                    },
                ));
                self.sent.insert(
                    token,
                    Sent {
                        key,
                        peer,
                        at: now,
                        targets,
                    },
                );
            }
            if blocked {
                skipped += 1;
            } else {
                self.waiting.remove(&key);
                if unreachable {
                    self.parked.insert(key);
                }
            }
        }
        frames
    }

    fn unsend(&mut self, token: u64) {
        let Some(sent) = self.sent.remove(&token) else {
            return;
        };
        if let Some(held) = self.entries.get_mut(&sent.key) {
            for i in sent.targets {
                if held.targets[i] == TargetState::Sent(token) {
                    held.targets[i] = TargetState::Waiting;
                }
            }
            self.waiting.insert(sent.key);
        }
    }

    fn release(&mut self, peer: NodeId) {
        if let Some(n) = self.in_flight.get_mut(&peer) {
            *n = n.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::topic::Topic;
    use crate::wire::{DurableTarget, Event, EventId};

    fn entry(targets: &[&str]) -> OutboxEntry {
        OutboxEntry {
            event: Event {
                id: EventId {
                    publisher: 1,
                    seq: 1,
                },
                origin: NodeId::from_bytes([1; 32]),
                topic: Topic::new("t").unwrap(),
                headers: Vec::new(),
                payload: Bytes::new(),
                reply: None,
            },
            epoch: 1,
            targets: targets
                .iter()
                .map(|d| DurableTarget {
                    durable: d.to_string(),
                    seq: 1,
                })
                .collect(),
        }
    }

    fn peer(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }

    fn token(frame: &NodeEventFrame) -> u64 {
        match frame {
            NodeEventFrame::Custody { token, .. } => *token,
            other => panic!("not custody: {other:?}"),
        }
    }

    #[test]
    fn targets_behind_different_edges_are_sent_and_acknowledged_apart() {
        let mut outbox = Outbox::default();
        outbox.insert(1, entry(&["a", "b"]));
        let now = Instant::now();
        let sends = outbox.poll_sends(now, 2, |d| {
            HomeRoute::Via(if d == "a" { peer(2) } else { peer(3) })
        });
        assert_eq!(sends.len(), 2);
        assert!(outbox
            .poll_sends(now, 2, |_| HomeRoute::Via(peer(2)))
            .is_empty());
        let (to_a, to_b) = (token(&sends[0].1), token(&sends[1].1));
        assert!(outbox.acknowledged(peer(2), &[to_a]).is_empty());
        assert!(
            outbox.acknowledged(peer(2), &[to_b]).is_empty(),
            "only the peer it went to may acknowledge"
        );
        assert_eq!(outbox.acknowledged(peer(3), &[to_b]), vec![1]);
        assert_eq!(outbox.len(), 0);
    }

    #[test]
    fn a_lost_link_or_a_silent_peer_means_sending_again() {
        let mut outbox = Outbox::default();
        outbox.insert(1, entry(&["a"]));
        let now = Instant::now();
        assert_eq!(
            outbox.poll_sends(now, 2, |_| HomeRoute::Via(peer(2))).len(),
            1
        );
        outbox.link_down(peer(2));
        let again = outbox.poll_sends(now, 2, |_| HomeRoute::Via(peer(3)));
        assert_eq!(again[0].0, peer(3));
        outbox.expire(now + RESEND_AFTER / 2);
        assert!(outbox
            .poll_sends(now, 2, |_| HomeRoute::Via(peer(3)))
            .is_empty());
        outbox.expire(now + RESEND_AFTER);
        let third = outbox.poll_sends(now, 2, |_| HomeRoute::Via(peer(3)));
        assert_eq!(third.len(), 1);
        // The old token no longer counts; the newest does.
        assert!(outbox
            .acknowledged(peer(3), &[token(&again[0].1)])
            .is_empty());
        assert_eq!(outbox.acknowledged(peer(3), &[token(&third[0].1)]), vec![1]);
    }

    #[test]
    fn unreachable_homes_park_until_the_tree_changes() {
        let mut outbox = Outbox::default();
        outbox.insert(1, entry(&["a"]));
        let now = Instant::now();
        // No links at all (a partition): still parked, so status counts it.
        assert!(outbox
            .poll_sends(now, 0, |_| HomeRoute::Unreachable)
            .is_empty());
        assert_eq!(outbox.parked(), 1);
        assert!(outbox
            .poll_sends(now, 2, |_| HomeRoute::Via(peer(2)))
            .is_empty());
        outbox.unpark();
        assert_eq!(
            outbox.poll_sends(now, 2, |_| HomeRoute::Via(peer(2))).len(),
            1
        );
    }

    #[test]
    fn the_window_bounds_what_is_in_flight() {
        let mut outbox = Outbox::default();
        for key in 0..(WINDOW as u64 + 10) {
            outbox.insert(key, entry(&["a"]));
        }
        let now = Instant::now();
        let sends = outbox.poll_sends(now, 2, |_| HomeRoute::Via(peer(2)));
        assert_eq!(sends.len(), WINDOW);
        let first = token(&sends[0].1);
        assert_eq!(outbox.acknowledged(peer(2), &[first]), vec![0]);
        assert_eq!(
            outbox.poll_sends(now, 2, |_| HomeRoute::Via(peer(2))).len(),
            1
        );
    }
}
