//! Rebalancing: pulls and climbs, and the make-before-break change of
//! parents they end in. A node never leaves its parent for a planned move
//! until the new path carries its subtree's interest; events that come down
//! both paths meanwhile are taken once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::*;
use crate::wire::EventId;

impl Overlay {
    /// Moves nodes up where the tree has room for them: pulls into our
    /// free slots, and climbs to a shallower slot elsewhere.
    pub(super) fn rebalance(&mut self, now: Instant) {
        self.pull_up(now);
        self.climb(now);
    }

    /// With a free slot and a child that has children of its own, asks
    /// that child (the tallest) to send one of them up: the moved subtree
    /// rises a level. Every pull lowers the sum of depths, so it ends. This
    /// flattens the chains that merging trees leave behind.
    pub(super) fn pull_up(&mut self, now: Instant) {
        if self.pulling.is_some_and(|(_, deadline)| deadline > now) {
            return;
        }
        self.pulling = None;
        let Some(child) = self.child_to_pull() else {
            return;
        };
        if self.rebalance_at().is_some_and(|at| at > now) {
            return;
        }
        self.pulling = Some((child, now + self.config.join_timeout));
        self.send(child, OverlayMessage::Pull);
    }

    /// With a free slot, the tallest child that has children of its own.
    pub(super) fn child_to_pull(&self) -> Option<NodeId> {
        if self.children.len() >= self.config.max_children {
            return None;
        }
        self.children
            .iter()
            .map(|c| (self.shape_of(*c).height, *c))
            .filter(|(height, _)| *height >= 1)
            .max()
            .map(|(_, child)| child)
    }

    /// When the quiet spell that rebalancing waits for ends.
    pub(super) fn rebalance_at(&self) -> Option<Instant> {
        self.last_tree_change.map(|at| at + REBALANCE_AFTER)
    }

    /// Our parent has a free slot: send it our tallest child, which stays
    /// our child until it has moved.
    pub(super) fn send_one_up(&mut self, parent: NodeId) {
        let tallest = self
            .children
            .iter()
            .filter(|c| !self.sent_away.contains(c))
            .map(|c| (self.shape_of(*c).height, *c))
            .max();
        if let Some((_, child)) = tallest {
            let addrs = self.link_addrs(parent);
            self.send_away(child, PeerAddrs { id: parent, addrs });
        }
    }

    /// Asks `child` to move under `to`, subtree and all. It stays our
    /// child, and its events keep flowing through us, until it leaves.
    pub(super) fn send_away(&mut self, child: NodeId, to: PeerAddrs) {
        self.sent_away.insert(child);
        self.send(child, OverlayMessage::Move(to));
    }

    /// When we may next ask our ancestors for a shallower slot: deep
    /// enough, attached, and quiet for [`REBALANCE_AFTER`]; at the same
    /// depth again only after [`CLIMB_RETRY`].
    pub(super) fn climb_at(&self) -> Option<Instant> {
        let depth = self.path.len() as u32;
        if self.parent.is_none()
            || self.joining.is_some()
            || self.moving.is_some()
            || depth < CLIMB_FROM_DEPTH
        {
            return None;
        }
        let quiet = self.rebalance_at()?;
        Some(match self.climb_asked {
            Some((asked, again, _)) if asked == depth => quiet.max(again),
            _ => quiet,
        })
    }

    /// Asks our ancestors for a slot at least two levels above our
    /// parent's, when it is time; gives up a climb that timed out.
    pub(super) fn climb(&mut self, now: Instant) {
        let (Some(parent), Some(at)) = (self.parent, self.climb_at()) else {
            return;
        };
        if at > now {
            return;
        }
        let depth = self.path.len() as u32;
        let asks = match self.climb_asked {
            Some((asked, _, asks)) if asked == depth => asks + 1,
            _ => 1,
        };
        let wait = (CLIMB_RETRY * (1 << (asks - 1).min(4))).min(CLIMB_RETRY_MAX);
        self.climb_asked = Some((depth, now + wait, asks));
        self.send(
            parent,
            OverlayMessage::Climb {
                node: self.me,
                depth,
            },
        );
    }

    /// `node`, below us behind `child`, would rise to a slot at least two
    /// levels above its parent. Offer the shallowest we know of (ourselves
    /// first), or ask our parent. Each climb lowers the sum of depths, so
    /// climbing ends. The depth is the one our directory knows, not the
    /// one the message claims, and only a node that lives behind the child
    /// that asked is answered.
    pub(super) fn handle_climb(&mut self, child: NodeId, node: NodeId, now: Instant) {
        if self.directory.next_hop(&Destination::Node(node), None) != NextHop::Edge(child) {
            return;
        }
        let Some(below) = self.directory.depth_below(node) else {
            return;
        };
        self.promised.retain(|_, (_, until)| *until > now);
        if self.promised.contains_key(&node) {
            return;
        }
        let mine = self.path.len() as u32;
        let depth = mine + below;
        if let Some(levels_below) = below.checked_sub(2) {
            if let Some(slot) = self.slot_for_climber(node, levels_below) {
                self.promised
                    .insert(node, (slot.id, now + self.config.join_timeout));
                self.send(child, OverlayMessage::ClimbTo { node, slot });
                return;
            }
        }
        if let Some(parent) = self.new_parent().or(self.parent) {
            self.send(parent, OverlayMessage::Climb { node, depth });
        }
    }

    /// A free slot for `climber` no more than `levels_below` us, not yet
    /// promised to another: ours (empty addresses: the climber knows ours
    /// from its path), else the shallowest in our directory.
    pub(super) fn slot_for_climber(&self, climber: NodeId, levels_below: u32) -> Option<PeerAddrs> {
        let mut promised: HashMap<NodeId, usize> = HashMap::new();
        for (slot, _) in self.promised.values() {
            *promised.entry(*slot).or_default() += 1;
        }
        let promised = |id: NodeId| promised.get(&id).copied().unwrap_or(0);
        if self.children.len() + promised(self.me) < self.config.max_children {
            return Some(PeerAddrs {
                id: self.me,
                addrs: Vec::new(),
            });
        }
        self.directory
            .climb_slot(climber, levels_below, |id, free| {
                promised(id) < free as usize
            })
    }

    /// Passes `message` down to the child that `node` lives behind.
    pub(super) fn send_down_towards(&mut self, node: NodeId, message: OverlayMessage) {
        if let NextHop::Edge(child) = self.directory.next_hop(&Destination::Node(node), None) {
            self.send(child, message);
        }
    }

    /// Our ancestors offered us a shallower slot: move there if the offer
    /// is for where we are.
    pub(super) fn start_climb(&mut self, slot: PeerAddrs, now: Instant) {
        let depth = self.path.len() as u32;
        // An offer for a depth we have left since (or never asked from) is
        // stale: taking it could move us down.
        let asked_here = self.climb_asked.is_some_and(|(asked, _, _)| asked == depth);
        if !asked_here || self.parent == Some(slot.id) {
            return;
        }
        let addrs = if slot.addrs.is_empty() {
            self.path
                .iter()
                .find(|ancestor| ancestor.id == slot.id)
                .map(|ancestor| ancestor.addrs.clone())
                .unwrap_or_default()
        } else {
            slot.addrs
        };
        tracing::debug!(to = %slot.id.short(), "climbing to a shallower slot");
        self.start_move(PeerAddrs { id: slot.id, addrs }, false, now);
    }

    /// Our parent asked us to move under `to`. Make-before-break as for a
    /// climb, but if the move fails we leave the parent anyway.
    pub(super) fn handle_move(&mut self, to: PeerAddrs, now: Instant) {
        match self.moving.as_mut() {
            // A move under way ends with our leaving the parent too.
            Some(moving) => moving.sent = true,
            None => {
                tracing::debug!(to = %to.id.short(), "moved under another node");
                self.start_move(to, true, now);
            }
        }
    }

    /// Joins `to` while we stay with our parent (see [`Moving`]).
    pub(super) fn start_move(&mut self, to: PeerAddrs, sent: bool, now: Instant) {
        let usable = to.id < self.me && (!to.addrs.is_empty() || self.links.contains_key(&to.id));
        if self.parent.is_none() || self.joining.is_some() || self.moving.is_some() {
            return;
        }
        self.moving = Some(Moving {
            to: to.id,
            sent,
            accepted: false,
            deadline: now + self.config.join_timeout,
            hops: 0,
            then: None,
        });
        if !usable {
            self.move_failed(to.id, now);
            return;
        }
        self.ask_to_take_us(to, now);
    }

    /// Sends `Join` to the node we move to, dialling it first if need be.
    fn ask_to_take_us(&mut self, to: PeerAddrs, now: Instant) {
        self.candidates.remember(to.id, to.addrs, now);
        if self.links.contains_key(&to.id) {
            self.send(to.id, OverlayMessage::Join);
        } else {
            self.dial(DialTarget::Node(to.id));
        }
    }

    /// Keeps the link to the parent we left (or the new parent we gave up)
    /// until what it sent us has arrived; one before it closes now.
    fn keep_former_parent(&mut self, former: NodeId, now: Instant) {
        let previous = self.former_parent.replace((former, now + DRAIN_FOR));
        if let Some((previous, _)) = previous.filter(|(previous, _)| *previous != former) {
            self.close_if_unneeded(previous);
        }
    }

    /// The node we move to accepted us. Until the change is done we have
    /// two parents: the new one hears our subtree's interest and directory,
    /// and brings events down; everything else still goes through the old
    /// one. `Settle` follows our interest up the new path; the answer,
    /// `Settled`, says it reached the old path.
    pub(super) fn overlap(&mut self, new: NodeId, now: Instant) {
        let (Some(old), Some(moving)) = (self.parent, self.moving.as_mut()) else {
            return;
        };
        moving.accepted = true;
        moving.deadline = now + self.config.join_timeout;
        if let Some(link) = self.links.get_mut(&new) {
            link.role = Role::NewParent;
        }
        let mut out = Vec::new();
        self.interest.begin_parent_change(new, old, &mut out);
        self.send_interest(out);
        // Our subtree is filed anew along the new path, so events
        // directed to it take that path from where the two meet.
        self.directory.set_own(Some(new), 0);
        self.send(
            new,
            OverlayMessage::Directory(self.directory.full_listing()),
        );
        self.send(
            new,
            OverlayMessage::Settle {
                node: self.me,
                old_parent: old,
                new_parent: new,
            },
        );
        self.repeats.get_or_insert_with(Repeats::default).until = None;
        self.candidates.connected(new, None, now);
    }

    /// A child's `Settle` for `node`: answer it if the old path meets ours
    /// here, else pass it up the way our directory goes (to our new parent
    /// while we move ourselves), so the answer finds its way down.
    pub(super) fn handle_settle(&mut self, node: NodeId, old_parent: NodeId, new_parent: NodeId) {
        let up = self.new_parent().or(self.parent);
        let meets_here = old_parent == self.me || self.directory.holds(old_parent) || up.is_none();
        match up {
            Some(parent) if !meets_here => {
                let settle = OverlayMessage::Settle {
                    node,
                    old_parent,
                    new_parent,
                };
                self.send(parent, settle)
            }
            _ => {
                let settled = OverlayMessage::Settled { node, new_parent };
                self.send_down_towards(node, settled)
            }
        }
    }

    /// The parent we are moving to, once it accepted us.
    pub(super) fn new_parent(&self) -> Option<NodeId> {
        self.moving.as_ref().filter(|m| m.accepted).map(|m| m.to)
    }

    /// `Redirect` from `from`: the slot we were moving to filled. A climb
    /// stays where it is; a node its parent sent away follows the redirect
    /// down to a free slot, as a join does.
    pub(super) fn move_redirected(&mut self, from: NodeId, to: PeerAddrs, now: Instant) {
        let usable = to.id < self.me && !self.suspected(to.id, now);
        let Some(moving) = self.moving.as_mut().filter(|m| m.to == from && !m.accepted) else {
            return;
        };
        moving.hops += 1;
        let follow = moving.sent && moving.hops <= MAX_REDIRECTS && usable;
        if !follow {
            self.move_failed(from, now);
            // The slot was free moments ago: the tree is still changing
            // (often a move whose old parent still holds its child), so
            // the next ask is not one that went unanswered.
            if let Some((depth, again, _)) = self.climb_asked {
                self.climb_asked = Some((depth, again, 0));
            }
            return;
        }
        moving.to = to.id;
        moving.deadline = now + self.config.join_timeout;
        self.ask_to_take_us(to, now);
        self.close_if_unneeded(from);
    }

    /// Our new path carries our subtree's interest to the old one (or the
    /// wait for it ran out): leave the old parent. Copies of events still
    /// on their way down the old path are taken for [`DRAIN_FOR`].
    pub(super) fn switch_parent(&mut self, now: Instant) {
        let Some(moving) = self.moving.take_if(|m| m.accepted) else {
            return;
        };
        let old = self.parent.replace(moving.to);
        if let Some(old) = old.filter(|old| self.links.contains_key(old)) {
            self.send(old, OverlayMessage::Leave);
            if let Some(link) = self.links.get_mut(&old) {
                link.role = Role::Peer;
            }
            self.keep_former_parent(old, now);
        }
        let mut out = Vec::new();
        self.interest.finish_parent_change(&mut out);
        self.send_interest(out);
        let path = self.links.get_mut(&moving.to).and_then(|link| {
            link.role = Role::Parent;
            link.path.clone()
        });
        if let Some(path) = path {
            self.adopt_path(moving.to, path);
        }
        if let Some(repeats) = self.repeats.as_mut() {
            repeats.until = Some(now + DRAIN_FOR);
        }
        self.rejoin.clear();
        self.reported_roots.clear();
        self.reported_shape = None;
        self.report_shape();
        tracing::debug!(parent = %moving.to.short(), "changed parents");
        if let Some(to) = moving.then {
            self.handle_move(to, now);
        }
    }

    /// The move to `target`, if under way, failed. A climb stays where it
    /// is and asks again after a quiet spell (another slot may be free); a
    /// node its parent sent away leaves it and joins as after a loss.
    pub(super) fn move_failed(&mut self, target: NodeId, now: Instant) {
        let Some(moving) = self.moving.take_if(|m| m.to == target) else {
            return;
        };
        if moving.accepted {
            let mut out = Vec::new();
            self.interest.abandon_parent_change(&mut out);
            self.send_interest(out);
            if let Some(link) = self.links.get_mut(&target) {
                link.role = Role::Peer;
                self.send(target, OverlayMessage::Leave);
                self.keep_former_parent(target, now);
            }
            if let Some(repeats) = self.repeats.as_mut() {
                repeats.until = Some(now + DRAIN_FOR);
            }
            // File our subtree back along the old path.
            let rtt = self.directory.own().rtt_us;
            self.directory.set_own(self.parent, rtt);
            if let Some(parent) = self.parent {
                self.send(
                    parent,
                    OverlayMessage::Directory(self.directory.full_listing()),
                );
            }
        }
        if moving.sent {
            if let Some(parent) = self.parent {
                self.send(parent, OverlayMessage::Leave);
                if let Some(link) = self.links.get_mut(&parent) {
                    link.role = Role::Peer;
                }
                // What the parent still sends goes down, once each.
                self.keep_former_parent(parent, now);
                self.repeats.get_or_insert_with(Repeats::default).until = Some(now + DRAIN_FOR);
                self.leave_parent(now);
                // As for the move itself, no scouts: the ancestors we
                // return to are alive (a mass of moves would have every
                // moved node dial every one). If this join fails too, the
                // next one sends them.
                match self.join_choices(now).first() {
                    Some(&target) => self.ask_to_join(target, 0, now),
                    None => self.start_join(now),
                }
            }
        } else {
            let depth = self.path.len() as u32;
            let asks = self.climb_asked.map_or(0, |(_, _, asks)| asks);
            self.climb_asked = Some((depth, now + REBALANCE_AFTER, asks));
        }
        self.close_if_unneeded(target);
    }

    /// A move that ran out of time: one not yet accepted failed; one
    /// accepted whose `Settled` did not come changes parents anyway (the
    /// new path most likely carries our interest; the links of the one
    /// that did not answer are being repaired). The copies of events taken
    /// after a change stop being counted once the old path has drained.
    pub(super) fn move_timeouts(&mut self, now: Instant) {
        let due = self.moving.as_ref().filter(|m| m.deadline <= now);
        if let Some((accepted, to)) = due.map(|m| (m.accepted, m.to)) {
            if accepted {
                self.switch_parent(now);
            } else {
                self.move_failed(to, now);
            }
        }
        if let Some((former, _)) = self.former_parent.filter(|(_, until)| *until <= now) {
            self.former_parent = None;
            self.close_if_unneeded(former);
        }
        if self
            .repeats
            .as_ref()
            .is_some_and(|r| r.until.is_some_and(|until| until <= now))
        {
            self.repeats = None;
        }
    }

    /// When [`Overlay::move_timeouts`] next has something to do.
    pub(super) fn move_timeout(&self) -> Option<Instant> {
        [
            self.moving.as_ref().map(|m| m.deadline),
            self.former_parent.map(|(_, until)| until),
            self.repeats.as_ref().and_then(|r| r.until),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// A planned change of parents in progress: a climb we asked for, or a
/// move our parent asked of us. Make-before-break: we join the new parent
/// while we keep the old, and leave the old once our subtree's interest
/// has reached, along the new path, the node where it meets the old one.
/// Until then events come down both paths, and [`Repeats`] takes each once.
#[derive(Debug, Clone)]
pub(super) struct Moving {
    /// The node we move under.
    pub to: NodeId,
    /// Our parent asked us to go: if the move fails we leave it anyway.
    pub sent: bool,
    /// `to` accepted us; we wait for `Settled`.
    pub accepted: bool,
    /// When the join, or the wait for `Settled`, gives up.
    pub deadline: Instant,
    /// Redirects followed (a node sent away follows them, as a join does).
    pub hops: u32,
    /// Where the new parent asked us to go on to, before the change was
    /// done: we go once it is.
    pub then: Option<PeerAddrs>,
}

/// How long after a change of parents copies of events may still come
/// down the old path: they are taken then, once each. Longer than the old
/// parent keeps sending after us (it lingers one to two
/// [`super::LINGER_TICK`]s from our `Leave`).
pub(super) const DRAIN_FOR: Duration = Duration::from_secs(3);

/// Event ids remembered at most while copies can come by two paths: at a
/// million events a second, the last 65 ms; the second copy of an event
/// trails the first by about the round trip between the two paths.
const REMEMBERED: usize = 1 << 16;

/// The events routed while copies may come by two paths (a change of
/// parents and the drain after it). A copy seen before goes only to queue
/// groups: each group's assignment travels one path, the plain
/// subscribers' copies both.
#[derive(Debug, Default)]
pub(super) struct Repeats {
    seen: HashSet<EventId>,
    order: VecDeque<EventId>,
    /// When the drain ends; `None` while the change is under way.
    pub until: Option<Instant>,
}

impl Repeats {
    /// Whether `id` was routed here before; remembers it.
    pub fn seen_before(&mut self, id: EventId) -> bool {
        if !self.seen.insert(id) {
            return true;
        }
        self.order.push_back(id);
        if self.order.len() > REMEMBERED {
            if let Some(oldest) = self.order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::tests::{addr, dials, drain, id, joined, peer, sent};
    use crate::topic::Pattern;
    use crate::wire::{DirectoryEntry, DirectoryUpdate, GroupKey, InterestUpdate};

    #[test]
    fn a_deep_node_climbs_to_a_slot_its_ancestors_offer_and_keeps_its_parent_until_accepted() {
        let now = Instant::now();
        let quiet = now + REBALANCE_AFTER;
        // Depth 3: parent 30, then 20, then the root 10.
        let mut overlay = joined(50, 30, vec![peer(20), peer(10)], now);
        overlay.handle_timeout(quiet);
        let asked = drain(&mut overlay);
        assert_eq!(
            sent(&asked, id(30)),
            vec![&OverlayMessage::Climb {
                node: id(50),
                depth: 3
            }]
        );
        // The root offers itself; the offer comes down through 30.
        let offer = OverlayMessage::ClimbTo {
            node: id(50),
            slot: PeerAddrs {
                id: id(10),
                addrs: Vec::new(),
            },
        };
        overlay.handle_message(id(30), offer, quiet);
        assert_eq!(
            dials(&mut overlay),
            vec![id(10)],
            "the root's address is on the path"
        );
        overlay.handle_link_up(id(10), addr(10), Some(DialTarget::Node(id(10))), quiet);
        let joins = drain(&mut overlay);
        assert!(sent(&joins, id(10)).contains(&&OverlayMessage::Join));
        assert_eq!(
            overlay.parent(),
            Some(id(30)),
            "no parent change before the accept"
        );
        // Accepted: both are parents until the new path carries our
        // interest to where it meets the old one.
        overlay.handle_message(id(10), OverlayMessage::Accept, quiet);
        let accepted = drain(&mut overlay);
        assert_eq!(overlay.parent(), Some(id(30)), "the old parent stays");
        assert!(sent(&accepted, id(30)).is_empty());
        let settle = OverlayMessage::Settle {
            node: id(50),
            old_parent: id(30),
            new_parent: id(10),
        };
        assert_eq!(sent(&accepted, id(10)).last(), Some(&&settle));
        let settled = |new: u8| OverlayMessage::Settled {
            node: id(50),
            new_parent: id(new),
        };
        // A late answer to an earlier move, to another new parent, is not ours.
        overlay.handle_message(id(30), settled(20), quiet);
        assert_eq!(overlay.parent(), Some(id(30)));
        overlay.handle_message(id(10), settled(10), quiet);
        let moved = drain(&mut overlay);
        assert_eq!(overlay.parent(), Some(id(10)));
        assert!(sent(&moved, id(30)).contains(&&OverlayMessage::Leave));
    }

    #[test]
    fn a_node_offered_no_slot_asks_again_ever_more_rarely() {
        let now = Instant::now();
        let mut overlay = joined(50, 30, vec![peer(20), peer(10)], now);
        let mut asked_at = Vec::new();
        let mut at = now;
        while at < now + Duration::from_secs(2000) {
            at += Duration::from_secs(1);
            overlay.handle_timeout(at);
            let actions = drain(&mut overlay);
            if sent(&actions, id(30))
                .iter()
                .any(|m| matches!(m, OverlayMessage::Climb { .. }))
            {
                asked_at.push((at - now).as_secs());
            }
        }
        assert_eq!(asked_at, vec![5, 65, 185, 425, 905, 1505]);
    }

    #[test]
    fn a_climb_to_a_slot_that_filled_leaves_the_node_where_it_was() {
        let start = Instant::now();
        let mut overlay = joined(50, 30, vec![peer(20), peer(10)], start);
        let offer = OverlayMessage::ClimbTo {
            node: id(50),
            slot: peer(15),
        };
        overlay.handle_message(id(30), offer.clone(), start);
        assert!(
            dials(&mut overlay).is_empty(),
            "an offer it did not ask for"
        );
        let now = start + REBALANCE_AFTER;
        overlay.handle_timeout(now);
        drain(&mut overlay);
        overlay.handle_message(id(30), offer, now);
        overlay.handle_link_up(id(15), addr(15), Some(DialTarget::Node(id(15))), now);
        drain(&mut overlay);
        overlay.handle_message(id(15), OverlayMessage::Redirect(peer(40)), now);
        let after = drain(&mut overlay);
        assert_eq!(overlay.parent(), Some(id(30)));
        assert!(
            after.iter().all(|a| !matches!(a, Action::Dial { .. })),
            "{after:?}"
        );
        assert!(sent(&after, id(30)).is_empty());
        // A slot was free moments ago: the node asks again after a quiet
        // spell, and if that ask goes unanswered, again after the first
        // wait (60 s), not a doubled one.
        let climbs_at = |overlay: &mut Overlay, from: Instant, secs: u64| {
            (1..=secs)
                .filter(|s| {
                    overlay.handle_timeout(from + Duration::from_secs(*s));
                    let asked = drain(overlay);
                    sent(&asked, id(30))
                        .iter()
                        .any(|m| matches!(m, OverlayMessage::Climb { .. }))
                })
                .collect::<Vec<u64>>()
        };
        assert_eq!(climbs_at(&mut overlay, now, 70), vec![5, 65]);
    }

    #[test]
    fn an_inner_node_offers_a_climber_a_free_slot_it_knows_or_passes_the_question_up() {
        let now = Instant::now();
        // 20 at depth 1 under the root 10, with children 30 and 31.
        let mut overlay = joined(20, 10, vec![], now);
        for child in [30, 31] {
            overlay.handle_link_up(id(child), addr(child), None, now);
            overlay.handle_message(id(child), OverlayMessage::Join, now);
        }
        drain(&mut overlay);
        let climb = |node: u8, depth: u32| OverlayMessage::Climb {
            node: id(node),
            depth,
        };
        let entry = |n: u8, parent: u8| DirectoryEntry {
            id: id(n),
            name: format!("n{n}"),
            parent: Some(id(parent)),
            rtt_us: 0,
            max_children: 8,
            addrs: Vec::new(),
            epoch: 0,
        };
        let listing = |entries: Vec<DirectoryEntry>| {
            OverlayMessage::Directory(DirectoryUpdate {
                upsert: entries,
                remove: Vec::new(),
            })
        };
        // 60 is not in the directory yet: no answer, whatever it claims.
        overlay.handle_message(id(30), climb(60, 9), now);
        assert!(drain(&mut overlay).is_empty());
        overlay.handle_message(
            id(30),
            listing(vec![entry(30, 20), entry(40, 30), entry(60, 40)]),
            now,
        );
        overlay.handle_message(id(31), listing(vec![entry(31, 20)]), now);
        drain(&mut overlay);
        // Asked by the wrong child: no answer.
        overlay.handle_message(id(31), climb(60, 4), now);
        assert!(drain(&mut overlay).is_empty());
        // 60, at depth 4, may rise to depth 2 or less: 20, at depth 1, has
        // a free slot.
        overlay.handle_message(id(30), climb(60, 4), now);
        let offered = drain(&mut overlay);
        assert!(matches!(
            sent(&offered, id(30)).as_slice(),
            [OverlayMessage::ClimbTo { node, slot }] if *node == id(60) && slot.id == id(20)
        ));
        // Asking again while the offer stands gets nothing more.
        overlay.handle_message(id(30), climb(60, 4), now);
        assert!(drain(&mut overlay).is_empty());
        // 31, at depth 2, could only rise to the root: 20 asks up, with the
        // depth its directory knows.
        overlay.handle_message(id(31), climb(31, 7), now);
        let passed = drain(&mut overlay);
        assert_eq!(sent(&passed, id(10)), vec![&climb(31, 2)]);
    }

    #[test]
    fn a_node_moved_under_its_grandparent_dials_it_once() {
        let now = Instant::now();
        let mut overlay = joined(50, 30, vec![peer(20)], now);
        overlay.handle_message(id(30), OverlayMessage::Move(peer(20)), now);
        // Two dials would race to a duplicate connection and fail the join.
        assert_eq!(dials(&mut overlay), vec![id(20)]);
    }

    /// 50, at depth 3 under 30, 20 and the root 10, climbing to the root:
    /// accepted there, and waiting for `Settled`.
    fn climbing_to_the_root(now: Instant) -> Overlay {
        let mut overlay = joined(50, 30, vec![peer(20), peer(10)], now);
        overlay.handle_timeout(now + REBALANCE_AFTER);
        let slot = PeerAddrs {
            id: id(10),
            addrs: Vec::new(),
        };
        let offer = OverlayMessage::ClimbTo { node: id(50), slot };
        overlay.handle_message(id(30), offer, now);
        overlay.handle_link_up(id(10), addr(10), Some(DialTarget::Node(id(10))), now);
        overlay.handle_message(id(10), OverlayMessage::Accept, now);
        drain(&mut overlay);
        overlay
    }

    fn interest(pattern: &str, group: Option<&str>) -> OverlayMessage {
        OverlayMessage::Interest(InterestUpdate {
            pattern: Pattern::new(pattern).unwrap(),
            group: group.map(str::to_string),
            count: 1,
            repair: false,
        })
    }

    fn event(seq: u64) -> EventId {
        EventId { publisher: 7, seq }
    }

    /// Where event `seq` on `topic` goes when it comes from `from`.
    fn route(
        overlay: &mut Overlay,
        seq: u64,
        from: Hop,
        topic: &str,
        assigned: Option<&[GroupKey]>,
    ) -> Route {
        let mut route = Route::default();
        let arrival = Arrival::new(from, assigned);
        overlay.route(event(seq), arrival, &Topic::new(topic).unwrap(), &mut route);
        route
    }

    fn edges(route: &Route) -> Vec<NodeId> {
        route.edges.iter().map(|(edge, _)| *edge).collect()
    }

    #[test]
    fn a_mover_keeps_both_parents_until_settled_and_takes_each_event_once() {
        let now = Instant::now();
        let mut overlay = climbing_to_the_root(now);
        let news = LocalSub { session: 1, sub: 1 };
        let worker = LocalSub { session: 1, sub: 2 };
        overlay.subscribe(&Pattern::new("news").unwrap(), None, news);
        overlay.subscribe(&Pattern::new("jobs").unwrap(), Some("g"), worker);
        // Someone outside our subtree reads the news: both parents say so.
        overlay.handle_message(id(30), interest("news", None), now);
        overlay.handle_message(id(10), interest("news", None), now);
        let jobs = [GroupKey {
            pattern: Pattern::new("jobs").unwrap(),
            group: "g".into(),
        }];

        // The first copy is delivered; the second, by the other path, is not.
        let first = route(&mut overlay, 1, Hop::Edge(id(30)), "news", Some(&[]));
        assert_eq!(first.local, vec![news]);
        assert!(first.edges.is_empty(), "never up to the new parent");
        let second = route(&mut overlay, 1, Hop::Edge(id(10)), "news", Some(&[]));
        assert!(second.local.is_empty() && second.edges.is_empty());
        assert!(second.only_groups);
        // A group's assignment travels one path: a copy that carries it is
        // served even when it comes second.
        let plain = route(&mut overlay, 2, Hop::Edge(id(30)), "jobs", Some(&[]));
        assert!(plain.local.is_empty());
        let assigned = route(&mut overlay, 2, Hop::Edge(id(10)), "jobs", Some(&jobs));
        assert_eq!(assigned.local, vec![worker]);
        // A copy for the groups only can come first (after members moved,
        // from the node they left): the plain copy behind it is still new.
        let mut early = Route::default();
        let only_groups = Arrival {
            only_groups: true,
            ..Arrival::new(Hop::Edge(id(10)), Some(&[]))
        };
        let news_topic = Topic::new("news").unwrap();
        overlay.route(event(100), only_groups, &news_topic, &mut early);
        assert!(early.local.is_empty());
        let full = route(&mut overlay, 100, Hop::Edge(id(30)), "news", Some(&[]));
        assert_eq!(full.local, vec![news], "the plain copy is delivered");
        // What is published here goes up the old path only.
        let up = route(&mut overlay, 3, Hop::Local, "news", None);
        assert_eq!(edges(&up), vec![id(30)]);

        let settled = OverlayMessage::Settled {
            node: id(50),
            new_parent: id(10),
        };
        overlay.handle_message(id(10), settled, now);
        let switched = drain(&mut overlay);
        assert_eq!(overlay.parent(), Some(id(10)));
        assert!(sent(&switched, id(30)).contains(&&OverlayMessage::Leave));
        let up = route(&mut overlay, 4, Hop::Local, "news", None);
        assert_eq!(edges(&up), vec![id(10)]);
        // What was on its way down the old path goes only down.
        let late = route(&mut overlay, 5, Hop::Edge(id(30)), "news", Some(&[]));
        assert_eq!(late.local, vec![news]);
        assert!(late.edges.is_empty(), "not back up the new path");

        // Once the old path has drained, its link closes and ids are no
        // longer remembered.
        let drained = now + DRAIN_FOR;
        assert!(overlay.poll_timeout().is_some_and(|at| at <= drained));
        overlay.handle_timeout(drained);
        let closed = drain(&mut overlay);
        assert!(closed.contains(&Action::Disconnect { peer: id(30) }));
        let again = route(&mut overlay, 1, Hop::Edge(id(10)), "news", Some(&[]));
        assert_eq!(again.local, vec![news]);
    }

    #[test]
    fn settle_climbs_the_new_path_to_where_the_old_parent_is_below() {
        let now = Instant::now();
        // 20 under the root 10, with child 30; 50 has just moved under 30
        // from its old parent 40, which is elsewhere in the tree.
        let mut overlay = joined(20, 10, vec![], now);
        overlay.handle_link_up(id(30), addr(30), None, now);
        overlay.handle_message(id(30), OverlayMessage::Join, now);
        let listing = |entries: &[(u8, u8)]| {
            OverlayMessage::Directory(DirectoryUpdate {
                upsert: entries
                    .iter()
                    .map(|(n, parent)| DirectoryEntry {
                        id: id(*n),
                        name: format!("n{n}"),
                        parent: Some(id(*parent)),
                        rtt_us: 0,
                        max_children: 8,
                        addrs: Vec::new(),
                        epoch: 0,
                    })
                    .collect(),
                remove: Vec::new(),
            })
        };
        overlay.handle_message(id(30), listing(&[(30, 20), (50, 30)]), now);
        drain(&mut overlay);
        let settle = OverlayMessage::Settle {
            node: id(50),
            old_parent: id(40),
            new_parent: id(30),
        };
        overlay.handle_message(id(30), settle.clone(), now);
        assert_eq!(
            sent(&drain(&mut overlay), id(10)),
            vec![&settle],
            "passed up"
        );
        // Had 40 been below us, the paths would meet here.
        overlay.handle_message(id(30), listing(&[(40, 30)]), now);
        drain(&mut overlay);
        overlay.handle_message(id(30), settle, now);
        let answered = drain(&mut overlay);
        assert_eq!(
            sent(&answered, id(30)),
            vec![&OverlayMessage::Settled {
                node: id(50),
                new_parent: id(30)
            }]
        );
        assert!(sent(&answered, id(10)).is_empty());
    }

    #[test]
    fn a_parent_keeps_the_child_it_sends_up_until_it_leaves() {
        let now = Instant::now();
        let mut overlay = joined(20, 10, vec![], now);
        overlay.handle_link_up(id(30), addr(30), None, now);
        overlay.handle_message(id(30), OverlayMessage::Join, now);
        drain(&mut overlay);
        overlay.handle_message(id(10), OverlayMessage::Pull, now);
        let pulled = drain(&mut overlay);
        assert!(matches!(
            sent(&pulled, id(30)).as_slice(),
            [OverlayMessage::Move(to)] if to.id == id(10)
        ));
        assert!(overlay.is_child(id(30)), "its events still flow through us");
        assert_eq!(overlay.children_sent_away(), 1);
        overlay.handle_message(id(30), OverlayMessage::Leave, now);
        assert!(!overlay.is_child(id(30)));
        assert_eq!(overlay.children_sent_away(), 0);
    }

    #[test]
    fn a_mover_whose_new_parent_is_lost_stays_and_files_its_subtree_back() {
        let now = Instant::now();
        let mut overlay = climbing_to_the_root(now);
        overlay.handle_link_down(id(10), now);
        assert_eq!(overlay.parent(), Some(id(30)));
        let actions = drain(&mut overlay);
        assert!(sent(&actions, id(30)).iter().any(
            |m| matches!(m, OverlayMessage::Directory(update) if update.upsert[0].id == id(50))
        ));
        // Interest published here still goes up the old path.
        overlay.handle_message(id(30), interest("news", None), now);
        let up = route(&mut overlay, 1, Hop::Local, "news", None);
        assert_eq!(edges(&up), vec![id(30)]);
    }

    #[test]
    fn a_node_sent_away_whose_move_fails_leaves_its_parent_anyway() {
        let now = Instant::now();
        let mut overlay = joined(50, 30, vec![peer(20), peer(10)], now);
        overlay.handle_message(id(30), OverlayMessage::Move(peer(20)), now);
        assert_eq!(dials(&mut overlay), vec![id(20)]);
        assert_eq!(overlay.parent(), Some(id(30)), "make before break");
        overlay.handle_dial_failed(DialTarget::Node(id(20)), now);
        let actions = drain(&mut overlay);
        assert!(sent(&actions, id(30)).contains(&&OverlayMessage::Leave));
        assert_eq!(overlay.parent(), None);
    }
}
