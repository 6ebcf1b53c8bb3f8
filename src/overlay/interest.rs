//! Subscription interest per tree edge, and the routing decision it drives.
//!
//! Each node knows, for every pattern (and queue group), how many
//! subscriptions its own clients hold and how many lie behind each tree
//! edge. It announces to each edge the sum of everything *not* behind that
//! edge, so interest spreads through the tree and an event is sent down an
//! edge only if a subscriber waits somewhere on the far side.

use std::collections::{BTreeMap, BTreeSet};

use crate::identity::NodeId;
use crate::topic::{Pattern, Topic};
use crate::wire::{GroupKey, InterestUpdate, SubscriptionStatus};

use crate::topic::trie::PatternTrie;

/// A subscription of one of this node's own clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalSub {
    /// The client connection.
    pub session: u64,
    /// The client's number for the subscription.
    pub sub: u64,
}

/// Where an event came from, so it is never sent back there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Published by one of this node's clients.
    Local,
    /// Forwarded by a tree neighbour.
    Edge(NodeId),
}

/// How an event reached this node, which decides where it may go next.
#[derive(Debug, Clone, Copy)]
pub struct Arrival<'a> {
    /// Where it came from; it never goes back there.
    pub from: Hop,
    /// The queue groups this node picks a member for; `None` means all
    /// (an event published here).
    pub assigned: Option<&'a [GroupKey]>,
    /// Plain subscribers on this side have the event already (it came as
    /// `Assigned`): it goes only to the groups' members.
    pub only_groups: bool,
}

impl<'a> Arrival<'a> {
    /// An event from `from` that picks members for `assigned`.
    pub fn new(from: Hop, assigned: Option<&'a [GroupKey]>) -> Self {
        Arrival {
            from,
            assigned,
            only_groups: false,
        }
    }
}

/// A change of parents in progress: `new` accepted us while `old` is still
/// our parent. The new edge only brings events down until the change is
/// done: nothing is announced or sent up to it but our subtree's own
/// interest and events, so no interest goes round the loop the two parent
/// edges close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ParentChange {
    new: NodeId,
    old: NodeId,
}

/// Where one event goes from this node.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Route {
    /// Local subscriptions to hand the event to.
    pub local: Vec<LocalSub>,
    /// Edges to forward it on, in id order, each with the queue groups it
    /// must pick a member for. A node has only a few edges, and a map would
    /// allocate for every event.
    pub edges: Vec<(NodeId, Vec<GroupKey>)>,
    /// The event is a repeat: plain subscribers have it already, and it
    /// goes only to the queue groups' members (forwarded as `Assigned`).
    pub only_groups: bool,
    /// Edges to children whose group members went moments ago, each with
    /// the groups that found no member elsewhere: the event goes after
    /// them, as `Assigned` (the plain subscribers there have it by the way
    /// their interest now takes). None of them is in `edges`: an edge in
    /// both takes its groups in its one frame.
    pub lingering: Vec<(NodeId, Vec<GroupKey>)>,
}

impl Route {
    /// The groups to forward with on `edge`, which the route now includes.
    fn edge(&mut self, edge: NodeId) -> &mut Vec<GroupKey> {
        let at = match self.edges.binary_search_by_key(&edge, |(id, _)| *id) {
            Ok(at) => at,
            Err(at) => {
                self.edges.insert(at, (edge, Vec::new()));
                at
            }
        };
        &mut self.edges[at].1
    }

    /// The groups to send after members that went by `edge`.
    fn lingering_edge(&mut self, edge: NodeId) -> &mut Vec<GroupKey> {
        let at = match self.lingering.iter().position(|(id, _)| *id == edge) {
            Some(at) => at,
            None => {
                self.lingering.push((edge, Vec::new()));
                self.lingering.len() - 1
            }
        };
        &mut self.lingering[at].1
    }

    /// The edges the route includes, in id order.
    #[cfg(test)]
    fn edge_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.edges.iter().map(|(id, _)| *id)
    }
}

/// A candidate for a queue group's next event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Member {
    Local(LocalSub),
    Edge(NodeId),
}

/// Interest in one (pattern, group) key.
#[derive(Debug, Default)]
struct KeyInterest {
    local: Vec<LocalSub>,
    /// Count announced by each tree neighbour; never holds a zero.
    edges: BTreeMap<NodeId, u32>,
    /// Smooth weighted round-robin credit of each member (groups only),
    /// kept per direction the events come from: each direction excludes
    /// its own edge, so each needs its own rotation to stay proportional.
    credit: BTreeMap<(Option<NodeId>, Member), i64>,
    /// Child edges whose subscribers went moments ago, with the lingering
    /// generation they went in. Events sent here on counts not yet updated
    /// (or routed before the subscribers' new way was known) still follow
    /// them there: they moved make-before-break, so the old way reaches
    /// them for a moment, and a copy that also takes the new way is taken
    /// once where the two meet. A plain event goes to lingering edges too;
    /// a group event only when it finds no member elsewhere.
    lingering: BTreeMap<NodeId, u64>,
}

impl KeyInterest {
    fn is_empty(&self) -> bool {
        self.is_unused() && self.lingering.is_empty()
    }

    /// No member here or behind any edge now.
    fn is_unused(&self) -> bool {
        self.local.is_empty() && self.edges.is_empty()
    }

    /// What to announce to `edge` for this key: everything not behind it.
    /// Plain interest is announced as presence only, so a second subscriber
    /// behind the same edge costs no messages. During a change of parents,
    /// the new parent's interest is announced nowhere, and the new parent
    /// hears only of our subtree's.
    fn announce_value(&self, edge: NodeId, is_group: bool, change: Option<ParentChange>) -> u32 {
        let counted = |e: NodeId| {
            e != edge && change.is_none_or(|c| e != c.new && !(edge == c.new && e == c.old))
        };
        let total = self.local.len() as u32
            + self
                .edges
                .iter()
                .filter(|(e, _)| counted(**e))
                .map(|(_, c)| *c)
                .sum::<u32>();
        if is_group {
            total
        } else {
            total.min(1)
        }
    }

    /// Picks the group member for the next event: local members weigh 1,
    /// an edge weighs the member count behind it. Only the edges `may_take`
    /// allows are candidates.
    fn pick(&mut self, from: Hop, may_take: impl Fn(NodeId) -> bool, salt: u64) -> Option<Member> {
        let candidates: Vec<(Member, i64)> = self
            .local
            .iter()
            .map(|s| (Member::Local(*s), 1))
            .chain(
                self.edges
                    .iter()
                    .filter(|(e, _)| may_take(**e))
                    .map(|(e, c)| (Member::Edge(*e), *c as i64)),
            )
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let total: i64 = candidates.iter().map(|(_, w)| w).sum();
        let direction = match from {
            Hop::Local => None,
            Hop::Edge(edge) => Some(edge),
        };
        for (member, weight) in &candidates {
            // A new member starts at a credit that depends on who it is,
            // so nodes that each send a few events do not all favour the
            // same member first.
            let start = -((start_offset(salt, member) % total as u64) as i64);
            *self.credit.entry((direction, *member)).or_insert(start) += weight;
        }
        let chosen = candidates
            .iter()
            .map(|(m, _)| (self.credit[&(direction, *m)], *m))
            .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
            .map(|(_, m)| m)?;
        *self
            .credit
            .get_mut(&(direction, chosen))
            .expect("credited above") -= total;
        Some(chosen)
    }

    /// Where the members went from here moments ago, for an event that
    /// finds none now.
    fn lingering_edge(&self, may_take: impl Fn(NodeId) -> bool) -> Option<NodeId> {
        self.lingering.keys().copied().find(|e| may_take(*e))
    }

    /// Forgets the credit of members that no longer exist.
    fn prune_credit(&mut self) {
        let (local, edges) = (&self.local, &self.edges);
        self.credit.retain(|(direction, m), _| {
            let member_exists = match m {
                Member::Local(s) => local.contains(s),
                Member::Edge(e) => edges.contains_key(e),
            };
            member_exists && direction.is_none_or(|d| edges.contains_key(&d))
        });
    }
}

/// All keys of one pattern.
#[derive(Debug)]
struct PatternInterest {
    pattern: Pattern,
    groups: BTreeMap<Option<String>, KeyInterest>,
}

type Key = (Pattern, Option<String>);

/// A fixed pseudo-random number per (salt, member).
fn start_offset(salt: u64, member: &Member) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    salt.hash(&mut hasher);
    member.hash(&mut hasher);
    hasher.finish()
}

/// The interest table of one node.
#[derive(Debug, Default)]
pub struct InterestTable {
    /// Varies round-robin starting points between nodes.
    salt: u64,
    trie: PatternTrie<PatternInterest>,
    /// The current tree edges; only they exchange interest.
    edges: BTreeSet<NodeId>,
    /// Last value announced to each edge per key, so only changes are sent.
    announced: BTreeMap<NodeId, BTreeMap<Key, u32>>,
    parent_change: Option<ParentChange>,
    /// Counts the ticks that age lingering edges out.
    linger_generation: u64,
    /// Some edge may be lingering.
    lingers: bool,
}

impl InterestTable {
    /// A table whose round-robin starting points derive from `salt`.
    pub fn new(salt: u64) -> Self {
        InterestTable {
            salt,
            ..Default::default()
        }
    }

    pub fn add_local(
        &mut self,
        pattern: &Pattern,
        group: Option<&str>,
        sub: LocalSub,
        out: &mut Vec<(NodeId, InterestUpdate)>,
    ) {
        self.key_mut(pattern, group).local.push(sub);
        self.reannounce(pattern, group, false, out);
    }

    pub fn remove_local(
        &mut self,
        pattern: &Pattern,
        group: Option<&str>,
        sub: LocalSub,
        out: &mut Vec<(NodeId, InterestUpdate)>,
    ) {
        let key = self.key_mut(pattern, group);
        key.local.retain(|s| *s != sub);
        key.prune_credit();
        self.reannounce(pattern, group, false, out);
    }

    /// Records what a tree neighbour announced. Updates from a neighbour
    /// that is not (or no longer) a tree edge are ignored. Group members
    /// that went from behind a `child` linger there for a moment. Returns
    /// whether plain interest in the pattern is new on the edge.
    pub fn set_edge_interest(
        &mut self,
        edge: NodeId,
        child: bool,
        update: &InterestUpdate,
        out: &mut Vec<(NodeId, InterestUpdate)>,
    ) -> bool {
        if !self.edges.contains(&edge) {
            return false;
        }
        let mut gained = false;
        let group = update.group.as_deref();
        let generation = self.linger_generation;
        let key = self.key_mut(&update.pattern, group);
        if update.count == 0 {
            let went = key.edges.remove(&edge).is_some() && child;
            if went {
                key.lingering.insert(edge, generation);
            }
            key.prune_credit();
            self.lingers |= went;
        } else {
            gained = key.edges.insert(edge, update.count).is_none() && group.is_none();
            key.lingering.remove(&edge);
        }
        self.reannounce(&update.pattern, group, update.repair, out);
        gained
    }

    /// A neighbour became a tree edge: tell it all interest on this side,
    /// marked as coming back after a `repair` if it does.
    pub fn add_edge(
        &mut self,
        edge: NodeId,
        repair: bool,
        out: &mut Vec<(NodeId, InterestUpdate)>,
    ) {
        if !self.edges.insert(edge) {
            return;
        }
        let mut sent = BTreeMap::new();
        let change = self.parent_change;
        self.trie.for_each(|pi| {
            for (group, key) in &pi.groups {
                let count = key.announce_value(edge, group.is_some(), change);
                if count > 0 {
                    sent.insert((pi.pattern.clone(), group.clone()), count);
                    out.push((edge, update(&pi.pattern, group, count, repair)));
                }
            }
        });
        self.announced.insert(edge, sent);
    }

    /// A tree edge is gone: forget what lay behind it, and withdraw that
    /// interest from the other edges. The group members behind a `child`
    /// linger there for a moment: it may have moved make-before-break.
    pub fn remove_edge(
        &mut self,
        edge: NodeId,
        child: bool,
        out: &mut Vec<(NodeId, InterestUpdate)>,
    ) {
        if !self.edges.remove(&edge) {
            return;
        }
        self.announced.remove(&edge);
        let mut touched: Vec<Key> = Vec::new();
        let generation = self.linger_generation;
        self.trie.for_each(|pi| {
            for (group, key) in pi.groups.iter_mut() {
                if key.edges.remove(&edge).is_some() {
                    if child {
                        key.lingering.insert(edge, generation);
                    }
                    key.prune_credit();
                    touched.push((pi.pattern.clone(), group.clone()));
                }
            }
        });
        self.lingers |= child && !touched.is_empty();
        for (pattern, group) in touched {
            self.reannounce(&pattern, group.as_deref(), false, out);
        }
    }

    /// `new` accepted us while `old` stays our parent: tell `new` our
    /// subtree's interest, and keep what it tells us for when the change
    /// is done.
    pub fn begin_parent_change(
        &mut self,
        new: NodeId,
        old: NodeId,
        out: &mut Vec<(NodeId, InterestUpdate)>,
    ) {
        self.parent_change = Some(ParentChange { new, old });
        self.add_edge(new, false, out);
    }

    /// The change of parents is done: the old parent's edge goes, and the
    /// new one counts as any edge.
    pub fn finish_parent_change(&mut self, out: &mut Vec<(NodeId, InterestUpdate)>) {
        let Some(change) = self.parent_change.take() else {
            return;
        };
        self.remove_edge(change.old, false, out);
        self.reannounce_all(out);
    }

    /// The change of parents failed: the new parent's edge goes.
    pub fn abandon_parent_change(&mut self, out: &mut Vec<(NodeId, InterestUpdate)>) {
        if let Some(change) = self.parent_change.take() {
            self.remove_edge(change.new, false, out);
        }
    }

    /// Decides where an event goes; never to `not_to`, nor, during a change
    /// of parents, up to the new parent, nor from it to the old one.
    pub fn route(
        &mut self,
        arrival: Arrival<'_>,
        not_to: Option<NodeId>,
        topic: &Topic,
        route: &mut Route,
    ) {
        let salt = self.salt;
        let Arrival {
            from,
            assigned,
            only_groups,
        } = arrival;
        let change = self.parent_change;
        let may_take = |edge: NodeId| {
            from != Hop::Edge(edge)
                && not_to != Some(edge)
                && change
                    .is_none_or(|c| edge != c.new && !(from == Hop::Edge(c.new) && edge == c.old))
        };
        route.only_groups = only_groups;
        self.trie.for_each_match(topic, |pi| {
            for (group, key) in pi.groups.iter_mut() {
                match group {
                    None if only_groups => {}
                    None => {
                        route.local.extend_from_slice(&key.local);
                        for edge in key.edges.keys().chain(key.lingering.keys()) {
                            if may_take(*edge) {
                                route.edge(*edge);
                            }
                        }
                    }
                    Some(name) => {
                        let is_assigned = assigned.is_none_or(|keys| {
                            keys.iter()
                                .any(|k| k.pattern == pi.pattern && &k.group == name)
                        });
                        if !is_assigned {
                            continue;
                        }
                        let group_key = || GroupKey {
                            pattern: pi.pattern.clone(),
                            group: name.clone(),
                        };
                        match key.pick(from, may_take, salt) {
                            Some(Member::Local(sub)) => route.local.push(sub),
                            Some(Member::Edge(edge)) => route.edge(edge).push(group_key()),
                            None => {
                                if let Some(edge) = key.lingering_edge(may_take) {
                                    route.lingering_edge(edge).push(group_key());
                                }
                            }
                        }
                    }
                }
            }
        });
        // An edge the event takes anyway takes its lingering groups in the
        // same frame. Sent apart, the groups-only copy would go first, and
        // where it lands the full copy after it would count as a repeat
        // and reach the groups only, not the plain subscribers.
        let Route {
            edges, lingering, ..
        } = route;
        lingering.retain_mut(|(edge, groups)| {
            match edges.binary_search_by_key(edge, |(id, _)| *id) {
                Ok(at) => {
                    edges[at].1.append(groups);
                    false
                }
                Err(_) => true,
            }
        });
    }

    /// Where an event addressed to this node is delivered: every matching
    /// plain subscription here, and one local member of each matching group.
    pub fn route_local(&mut self, topic: &Topic, route: &mut Route) {
        let salt = self.salt;
        self.trie.for_each_match(topic, |pi| {
            for (group, key) in pi.groups.iter_mut() {
                match group {
                    None => route.local.extend_from_slice(&key.local),
                    Some(_) => {
                        if let Some(Member::Local(sub)) = key.pick(Hop::Local, |_| false, salt) {
                            route.local.push(sub);
                        }
                    }
                }
            }
        });
    }

    /// Whether any subscription anywhere in the tree matches `topic`.
    pub fn has_interest(&mut self, topic: &Topic) -> bool {
        let mut found = false;
        self.trie.for_each_match(topic, |pi| {
            found |= pi.groups.values().any(|key| !key.is_unused());
        });
        found
    }

    /// The patterns of plain interest behind `edge`.
    pub fn plain_patterns_of(&mut self, edge: NodeId) -> Vec<Pattern> {
        let mut patterns = Vec::new();
        self.trie.for_each(|pi| {
            if pi
                .groups
                .get(&None)
                .is_some_and(|key| key.edges.contains_key(&edge))
            {
                patterns.push(pi.pattern.clone());
            }
        });
        patterns
    }

    /// Whether some edge may be lingering; [`InterestTable::age_lingering`]
    /// should run a tick from now.
    pub fn lingers(&self) -> bool {
        self.lingers
    }

    /// A tick passed: edges that lingered since before the last one stop.
    pub fn age_lingering(&mut self) {
        let before = self.linger_generation;
        let mut emptied: Vec<Pattern> = Vec::new();
        let mut left = false;
        self.trie.for_each(|pi| {
            for key in pi.groups.values_mut() {
                key.lingering.retain(|_, went| *went >= before);
                left |= !key.lingering.is_empty();
            }
            pi.groups.retain(|_, key| !key.is_empty());
            if pi.groups.is_empty() {
                emptied.push(pi.pattern.clone());
            }
        });
        for pattern in emptied {
            self.trie.remove(&pattern);
        }
        self.linger_generation += 1;
        self.lingers = left;
    }

    pub fn status(&mut self) -> Vec<SubscriptionStatus> {
        let mut rows = Vec::new();
        self.trie.for_each(|pi| {
            for (group, key) in pi.groups.iter().filter(|(_, key)| !key.is_unused()) {
                rows.push(SubscriptionStatus {
                    pattern: pi.pattern.clone(),
                    group: group.clone(),
                    local: key.local.len() as u32,
                    edges: key.edges.iter().map(|(e, c)| (*e, *c)).collect(),
                });
            }
        });
        rows.sort_by(|a, b| (&a.pattern, &a.group).cmp(&(&b.pattern, &b.group)));
        rows
    }

    /// Sends every edge what changed for any key: after a change of
    /// parents, the new parent's interest now counts towards the others.
    fn reannounce_all(&mut self, out: &mut Vec<(NodeId, InterestUpdate)>) {
        let mut keys: Vec<Key> = Vec::new();
        self.trie.for_each(|pi| {
            keys.extend(pi.groups.keys().map(|g| (pi.pattern.clone(), g.clone())));
        });
        for (pattern, group) in keys {
            self.reannounce(&pattern, group.as_deref(), false, out);
        }
    }

    fn key_mut(&mut self, pattern: &Pattern, group: Option<&str>) -> &mut KeyInterest {
        let pi = self.trie.entry(pattern, || PatternInterest {
            pattern: pattern.clone(),
            groups: BTreeMap::new(),
        });
        pi.groups.entry(group.map(str::to_string)).or_default()
    }

    /// Sends each edge the new value of one key where it changed, and drops
    /// the key once nothing is left of it.
    /// `repair` marks what is announced as interest that comes back after
    /// a repair.
    fn reannounce(
        &mut self,
        pattern: &Pattern,
        group: Option<&str>,
        repair: bool,
        out: &mut Vec<(NodeId, InterestUpdate)>,
    ) {
        let owned_group = group.map(str::to_string);
        let Some(pi) = self.trie.get_mut(pattern) else {
            return;
        };
        let Some(key) = pi.groups.get(&owned_group) else {
            return;
        };
        let map_key: Key = (pattern.clone(), owned_group.clone());
        for edge in &self.edges {
            let count = key.announce_value(*edge, group.is_some(), self.parent_change);
            let announced = self.announced.entry(*edge).or_default();
            let before = announced.get(&map_key).copied().unwrap_or(0);
            if count == before {
                continue;
            }
            if count == 0 {
                announced.remove(&map_key);
            } else {
                announced.insert(map_key.clone(), count);
            }
            out.push((*edge, update(pattern, &owned_group, count, repair)));
        }
        if key.is_empty() {
            pi.groups.remove(&owned_group);
            if pi.groups.is_empty() {
                self.trie.remove(pattern);
            }
        }
    }
}

fn update(pattern: &Pattern, group: &Option<String>, count: u32, repair: bool) -> InterestUpdate {
    InterestUpdate {
        pattern: pattern.clone(),
        group: group.clone(),
        count,
        repair,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }
    fn pat(s: &str) -> Pattern {
        Pattern::new(s).unwrap()
    }
    fn topic(s: &str) -> Topic {
        Topic::new(s).unwrap()
    }
    const SUB: LocalSub = LocalSub { session: 1, sub: 1 };

    /// The edges a plain event on `topic` from `from` is forwarded on.
    fn forwarded(table: &mut InterestTable, from: NodeId, topic_name: &str) -> Vec<NodeId> {
        let mut route = Route::default();
        let arrival = Arrival::new(Hop::Edge(from), Some(&[]));
        table.route(arrival, None, &topic(topic_name), &mut route);
        route.edge_ids().collect()
    }

    #[test]
    fn local_interest_is_announced_to_every_edge_once() {
        let mut table = InterestTable::default();
        let mut out = Vec::new();
        table.add_edge(node(1), false, &mut out);
        table.add_edge(node(2), false, &mut out);
        assert!(out.is_empty());
        table.add_local(&pat("a.*"), None, SUB, &mut out);
        assert_eq!(out.len(), 2);
        out.clear();
        // A second plain subscriber changes nothing upstream.
        table.add_local(&pat("a.*"), None, LocalSub { session: 2, sub: 1 }, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn interest_is_not_echoed_back_to_its_edge() {
        let mut table = InterestTable::default();
        let mut out = Vec::new();
        table.add_edge(node(1), false, &mut out);
        table.add_edge(node(2), false, &mut out);
        table.set_edge_interest(node(1), true, &update(&pat("x"), &None, 1, false), &mut out);
        assert_eq!(out, vec![(node(2), update(&pat("x"), &None, 1, false))]);
    }

    #[test]
    fn events_follow_interest_and_never_return() {
        let mut table = InterestTable::default();
        let mut out = Vec::new();
        table.add_edge(node(1), false, &mut out);
        table.add_edge(node(2), false, &mut out);
        table.set_edge_interest(
            node(1),
            true,
            &update(&pat("a.>"), &None, 1, false),
            &mut out,
        );
        table.set_edge_interest(
            node(2),
            true,
            &update(&pat("a.b"), &None, 1, false),
            &mut out,
        );
        table.add_local(&pat("*.b"), None, SUB, &mut out);

        let mut route = Route::default();
        table.route(
            Arrival::new(Hop::Edge(node(1)), Some(&[])),
            None,
            &topic("a.b"),
            &mut route,
        );
        assert_eq!(route.local, vec![SUB]);
        assert_eq!(route.edge_ids().collect::<Vec<_>>(), vec![node(2)]);

        let mut route = Route::default();
        table.route(
            Arrival::new(Hop::Local, None),
            None,
            &topic("a.c"),
            &mut route,
        );
        assert!(route.local.is_empty());
        assert_eq!(route.edge_ids().collect::<Vec<_>>(), vec![node(1)]);
    }

    #[test]
    fn removing_an_edge_withdraws_its_interest_elsewhere() {
        let mut table = InterestTable::default();
        let mut out = Vec::new();
        table.add_edge(node(1), false, &mut out);
        table.add_edge(node(2), false, &mut out);
        table.set_edge_interest(node(1), true, &update(&pat("x"), &None, 1, false), &mut out);
        out.clear();
        table.remove_edge(node(1), true, &mut out);
        assert_eq!(out, vec![(node(2), update(&pat("x"), &None, 0, false))]);
        assert!(!table.has_interest(&topic("x")));
        // A late update from the removed edge is ignored.
        table.set_edge_interest(node(1), true, &update(&pat("x"), &None, 1, false), &mut out);
        assert!(!table.has_interest(&topic("x")));
    }

    #[test]
    fn group_members_are_chosen_in_proportion_to_their_counts() {
        let mut table = InterestTable::default();
        let mut out = Vec::new();
        let g = Some("workers".to_string());
        table.add_edge(node(1), false, &mut out);
        table.add_edge(node(2), false, &mut out);
        table.set_edge_interest(node(1), true, &update(&pat("jobs"), &g, 2, false), &mut out);
        table.set_edge_interest(node(2), true, &update(&pat("jobs"), &g, 1, false), &mut out);
        table.add_local(&pat("jobs"), g.as_deref(), SUB, &mut out);
        let mut shares: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..4000 {
            let mut route = Route::default();
            table.route(
                Arrival::new(Hop::Local, None),
                None,
                &topic("jobs"),
                &mut route,
            );
            assert_eq!(
                route.local.len() + route.edges.len(),
                1,
                "exactly one member"
            );
            let who = if route.local.is_empty() {
                format!("{:?}", route.edge_ids().next().unwrap())
            } else {
                "local".into()
            };
            *shares.entry(who).or_default() += 1;
        }
        assert_eq!(shares["local"], 1000);
        assert_eq!(shares[&format!("{:?}", node(1))], 2000);
        assert_eq!(shares[&format!("{:?}", node(2))], 1000);
    }

    #[test]
    fn forwarded_events_only_pick_members_for_assigned_groups() {
        let mut table = InterestTable::default();
        let mut out = Vec::new();
        table.add_edge(node(1), false, &mut out);
        table.add_local(&pat("jobs"), Some("g"), SUB, &mut out);
        let mut route = Route::default();
        table.route(
            Arrival::new(Hop::Edge(node(1)), Some(&[])),
            None,
            &topic("jobs"),
            &mut route,
        );
        assert!(route.local.is_empty());
        let assigned = [GroupKey {
            pattern: pat("jobs"),
            group: "g".into(),
        }];
        let arrival = Arrival::new(Hop::Edge(node(1)), Some(&assigned));
        table.route(arrival, None, &topic("jobs"), &mut route);
        assert_eq!(route.local, vec![SUB]);
    }

    #[test]
    fn during_a_change_of_parents_the_new_one_hears_only_our_subtree() {
        let (old, child, new) = (node(1), node(2), node(3));
        let mut table = InterestTable::default();
        let mut out = Vec::new();
        table.add_edge(old, false, &mut out);
        table.add_edge(child, false, &mut out);
        table.add_local(&pat("mine"), None, SUB, &mut out);
        table.set_edge_interest(
            child,
            true,
            &update(&pat("below"), &None, 1, false),
            &mut out,
        );
        table.set_edge_interest(
            old,
            false,
            &update(&pat("above"), &None, 1, false),
            &mut out,
        );
        out.clear();

        table.begin_parent_change(new, old, &mut out);
        let told: Vec<&str> = out.iter().map(|(_, u)| u.pattern.as_str()).collect();
        assert!(out.iter().all(|(edge, _)| *edge == new));
        assert_eq!(
            told,
            vec!["below", "mine"],
            "not what lies above the old parent"
        );
        out.clear();
        // What the new parent says is kept, and passed on to no one yet.
        table.set_edge_interest(
            new,
            false,
            &update(&pat("beyond"), &None, 1, false),
            &mut out,
        );
        table.set_edge_interest(
            new,
            false,
            &update(&pat("above"), &None, 1, false),
            &mut out,
        );
        assert!(out.is_empty());
        // Events come down from either parent, and go up the old one only.
        let none: Vec<NodeId> = Vec::new();
        assert_eq!(
            forwarded(&mut table, new, "above"),
            none,
            "not across to the old parent"
        );
        assert_eq!(forwarded(&mut table, child, "above"), vec![old]);

        table.finish_parent_change(&mut out);
        // The child now hears of what lies beyond the new parent; the new
        // parent hears nothing new.
        assert_eq!(out, vec![(child, update(&pat("beyond"), &None, 1, false))]);
        assert_eq!(forwarded(&mut table, child, "above"), vec![new]);
    }

    #[test]
    fn group_members_that_left_through_a_child_linger_there_for_a_tick() {
        let (parent, child) = (node(1), node(2));
        let g = Some("g".to_string());
        let jobs = [GroupKey {
            pattern: pat("jobs"),
            group: "g".into(),
        }];
        let mut table = InterestTable::default();
        let mut out = Vec::new();
        table.add_edge(parent, false, &mut out);
        table.add_edge(child, false, &mut out);
        table.set_edge_interest(child, true, &update(&pat("jobs"), &g, 1, false), &mut out);
        table.set_edge_interest(parent, false, &update(&pat("jobs"), &g, 1, false), &mut out);
        // The parent's members go: they do not linger up there.
        table.set_edge_interest(parent, false, &update(&pat("jobs"), &g, 0, false), &mut out);
        // The child's went too, moments ago: an event assigned here on old
        // counts follows them, as a copy for the group only.
        table.remove_edge(child, true, &mut out);
        assert!(!table.has_interest(&topic("jobs")), "no responders now");
        let lingering = |table: &mut InterestTable| {
            let mut route = Route::default();
            let arrival = Arrival::new(Hop::Edge(parent), Some(&jobs));
            table.route(arrival, None, &topic("jobs"), &mut route);
            assert!(route.edges.is_empty());
            route.lingering
        };
        assert_eq!(lingering(&mut table), vec![(child, jobs.to_vec())]);
        assert!(table.lingers());
        table.age_lingering();
        assert_eq!(lingering(&mut table).len(), 1, "a tick at least");
        table.age_lingering();
        assert!(lingering(&mut table).is_empty(), "two ticks at most");
        assert!(!table.lingers());
        assert!(table.status().is_empty());
    }

    #[test]
    fn an_edge_where_plain_and_group_interest_linger_gets_one_full_copy_for_both() {
        let (parent, child) = (node(1), node(2));
        let g = Some("g".to_string());
        let jobs = GroupKey {
            pattern: pat("jobs"),
            group: "g".into(),
        };
        let mut table = InterestTable::default();
        let mut out = Vec::new();
        table.add_edge(parent, false, &mut out);
        table.add_edge(child, false, &mut out);
        table.set_edge_interest(
            child,
            true,
            &update(&pat("jobs"), &None, 1, false),
            &mut out,
        );
        table.set_edge_interest(child, true, &update(&pat("jobs"), &g, 1, false), &mut out);
        // The child's subscribers, plain and the group's member, went
        // moments ago: both still follow them there.
        table.remove_edge(child, true, &mut out);
        let mut route = Route::default();
        let arrival = Arrival::new(Hop::Edge(parent), Some(std::slice::from_ref(&jobs)));
        table.route(arrival, None, &topic("jobs"), &mut route);
        assert_eq!(route.edges, vec![(child, vec![jobs])]);
        assert!(
            route.lingering.is_empty(),
            "no groups-only copy ahead of it"
        );
        assert!(!route.only_groups);
    }

    #[test]
    fn plain_events_still_follow_subscribers_that_just_left_through_a_child() {
        let (parent, child) = (node(1), node(2));
        let mut table = InterestTable::default();
        let mut out = Vec::new();
        table.add_edge(parent, false, &mut out);
        table.add_edge(child, false, &mut out);
        table.set_edge_interest(
            child,
            true,
            &update(&pat("news"), &None, 1, false),
            &mut out,
        );
        table.remove_edge(child, true, &mut out);
        // A full copy: the moved subscribers' node takes it once.
        assert_eq!(forwarded(&mut table, parent, "news"), vec![child]);
        table.age_lingering();
        table.age_lingering();
        assert!(forwarded(&mut table, parent, "news").is_empty());
    }

    #[test]
    fn a_repeat_goes_to_the_groups_only() {
        let mut table = InterestTable::default();
        let mut out = Vec::new();
        let worker = LocalSub { session: 2, sub: 1 };
        table.add_edge(node(1), false, &mut out);
        table.add_local(&pat("jobs"), None, SUB, &mut out);
        table.add_local(&pat("jobs"), Some("g"), worker, &mut out);
        let jobs = [GroupKey {
            pattern: pat("jobs"),
            group: "g".into(),
        }];
        let arrival = Arrival {
            only_groups: true,
            ..Arrival::new(Hop::Edge(node(1)), Some(&jobs))
        };
        let mut route = Route::default();
        table.route(arrival, None, &topic("jobs"), &mut route);
        assert_eq!(route.local, vec![worker]);
        assert!(route.only_groups);
    }

    #[test]
    fn interest_coming_back_after_a_repair_reports_its_gain_and_stays_marked_on_its_way() {
        let mut table = InterestTable::default();
        let mut out = Vec::new();
        for n in 1..=3 {
            table.add_edge(node(n), false, &mut out);
        }
        let back = update(&pat("x"), &None, 1, true);
        assert!(
            table.set_edge_interest(node(1), true, &back, &mut out),
            "new on the edge"
        );
        assert_eq!(out, vec![(node(2), back.clone()), (node(3), back.clone())]);
        out.clear();
        // Known on that edge already: no gain, and nothing goes further.
        assert!(!table.set_edge_interest(node(1), true, &back, &mut out));
        assert!(out.is_empty());
        // New on a second edge; of the others, only the first hears of it.
        assert!(table.set_edge_interest(node(2), true, &back, &mut out));
        assert_eq!(out, vec![(node(1), back)]);
        // Group members are chosen when an event is published: no gain.
        let group = update(&pat("x"), &Some("g".into()), 1, true);
        assert!(!table.set_edge_interest(node(3), true, &group, &mut out));
    }
}
