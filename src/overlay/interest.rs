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

/// Where one event goes from this node.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Route {
    /// Local subscriptions to hand the event to.
    pub local: Vec<LocalSub>,
    /// Edges to forward it on, in id order, each with the queue groups it
    /// must pick a member for. A node has only a few edges, and a map would
    /// allocate for every event.
    pub edges: Vec<(NodeId, Vec<GroupKey>)>,
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
}

impl KeyInterest {
    fn is_empty(&self) -> bool {
        self.local.is_empty() && self.edges.is_empty()
    }

    /// What to announce to `edge` for this key: everything not behind it.
    /// Plain interest is announced as presence only, so a second subscriber
    /// behind the same edge costs no messages.
    fn announce_value(&self, edge: NodeId, is_group: bool) -> u32 {
        let total = self.local.len() as u32
            + self
                .edges
                .iter()
                .filter(|(e, _)| **e != edge)
                .map(|(_, c)| *c)
                .sum::<u32>();
        if is_group {
            total
        } else {
            total.min(1)
        }
    }

    /// Picks the group member for the next event: local members weigh 1,
    /// an edge weighs the member count behind it. With `local_only`, only
    /// this node's own members are candidates.
    fn pick(&mut self, from: Hop, local_only: bool, salt: u64) -> Option<Member> {
        let candidates: Vec<(Member, i64)> = self
            .local
            .iter()
            .map(|s| (Member::Local(*s), 1))
            .chain(
                self.edges
                    .iter()
                    .filter(|(e, _)| !local_only && from != Hop::Edge(**e))
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
        self.reannounce(pattern, group, out);
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
        self.reannounce(pattern, group, out);
    }

    /// Records what a tree neighbour announced. Updates from a neighbour
    /// that is not (or no longer) a tree edge are ignored.
    pub fn set_edge_interest(
        &mut self,
        edge: NodeId,
        update: &InterestUpdate,
        out: &mut Vec<(NodeId, InterestUpdate)>,
    ) {
        if !self.edges.contains(&edge) {
            return;
        }
        let group = update.group.as_deref();
        let key = self.key_mut(&update.pattern, group);
        if update.count == 0 {
            key.edges.remove(&edge);
            key.prune_credit();
        } else {
            key.edges.insert(edge, update.count);
        }
        self.reannounce(&update.pattern, group, out);
    }

    /// A neighbour became a tree edge: tell it all interest on this side.
    pub fn add_edge(&mut self, edge: NodeId, out: &mut Vec<(NodeId, InterestUpdate)>) {
        if !self.edges.insert(edge) {
            return;
        }
        let mut sent = BTreeMap::new();
        self.trie.for_each(|pi| {
            for (group, key) in &pi.groups {
                let count = key.announce_value(edge, group.is_some());
                if count > 0 {
                    sent.insert((pi.pattern.clone(), group.clone()), count);
                    out.push((edge, update(&pi.pattern, group, count)));
                }
            }
        });
        self.announced.insert(edge, sent);
    }

    /// A tree edge is gone: forget what lay behind it, and withdraw that
    /// interest from the other edges.
    pub fn remove_edge(&mut self, edge: NodeId, out: &mut Vec<(NodeId, InterestUpdate)>) {
        if !self.edges.remove(&edge) {
            return;
        }
        self.announced.remove(&edge);
        let mut touched: Vec<Key> = Vec::new();
        self.trie.for_each(|pi| {
            for (group, key) in pi.groups.iter_mut() {
                if key.edges.remove(&edge).is_some() {
                    key.prune_credit();
                    touched.push((pi.pattern.clone(), group.clone()));
                }
            }
        });
        for (pattern, group) in touched {
            self.reannounce(&pattern, group.as_deref(), out);
        }
    }

    /// Decides where an event goes. `assigned` lists the queue groups this
    /// node must pick a member for; `None` means all (a local publish).
    pub fn route(
        &mut self,
        from: Hop,
        topic: &Topic,
        assigned: Option<&[GroupKey]>,
        route: &mut Route,
    ) {
        let salt = self.salt;
        self.trie.for_each_match(topic, |pi| {
            for (group, key) in pi.groups.iter_mut() {
                match group {
                    None => {
                        route.local.extend_from_slice(&key.local);
                        for edge in key.edges.keys() {
                            if from != Hop::Edge(*edge) {
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
                        match key.pick(from, false, salt) {
                            Some(Member::Local(sub)) => route.local.push(sub),
                            Some(Member::Edge(edge)) => route.edge(edge).push(GroupKey {
                                pattern: pi.pattern.clone(),
                                group: name.clone(),
                            }),
                            None => {}
                        }
                    }
                }
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
                        if let Some(Member::Local(sub)) = key.pick(Hop::Local, true, salt) {
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
        self.trie.for_each_match(topic, |_| found = true);
        found
    }

    pub fn status(&mut self) -> Vec<SubscriptionStatus> {
        let mut rows = Vec::new();
        self.trie.for_each(|pi| {
            for (group, key) in &pi.groups {
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

    fn key_mut(&mut self, pattern: &Pattern, group: Option<&str>) -> &mut KeyInterest {
        let pi = self.trie.entry(pattern, || PatternInterest {
            pattern: pattern.clone(),
            groups: BTreeMap::new(),
        });
        pi.groups.entry(group.map(str::to_string)).or_default()
    }

    /// Sends each edge the new value of one key where it changed, and drops
    /// the key once nothing is left of it.
    fn reannounce(
        &mut self,
        pattern: &Pattern,
        group: Option<&str>,
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
            let count = key.announce_value(*edge, group.is_some());
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
            out.push((*edge, update(pattern, &owned_group, count)));
        }
        if key.is_empty() {
            pi.groups.remove(&owned_group);
            if pi.groups.is_empty() {
                self.trie.remove(pattern);
            }
        }
    }
}

fn update(pattern: &Pattern, group: &Option<String>, count: u32) -> InterestUpdate {
    InterestUpdate {
        pattern: pattern.clone(),
        group: group.clone(),
        count,
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

    #[test]
    fn local_interest_is_announced_to_every_edge_once() {
        let mut table = InterestTable::default();
        let mut out = Vec::new();
        table.add_edge(node(1), &mut out);
        table.add_edge(node(2), &mut out);
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
        table.add_edge(node(1), &mut out);
        table.add_edge(node(2), &mut out);
        table.set_edge_interest(node(1), &update(&pat("x"), &None, 1), &mut out);
        assert_eq!(out, vec![(node(2), update(&pat("x"), &None, 1))]);
    }

    #[test]
    fn events_follow_interest_and_never_return() {
        let mut table = InterestTable::default();
        let mut out = Vec::new();
        table.add_edge(node(1), &mut out);
        table.add_edge(node(2), &mut out);
        table.set_edge_interest(node(1), &update(&pat("a.>"), &None, 1), &mut out);
        table.set_edge_interest(node(2), &update(&pat("a.b"), &None, 1), &mut out);
        table.add_local(&pat("*.b"), None, SUB, &mut out);

        let mut route = Route::default();
        table.route(Hop::Edge(node(1)), &topic("a.b"), Some(&[]), &mut route);
        assert_eq!(route.local, vec![SUB]);
        assert_eq!(route.edge_ids().collect::<Vec<_>>(), vec![node(2)]);

        let mut route = Route::default();
        table.route(Hop::Local, &topic("a.c"), None, &mut route);
        assert!(route.local.is_empty());
        assert_eq!(route.edge_ids().collect::<Vec<_>>(), vec![node(1)]);
    }

    #[test]
    fn removing_an_edge_withdraws_its_interest_elsewhere() {
        let mut table = InterestTable::default();
        let mut out = Vec::new();
        table.add_edge(node(1), &mut out);
        table.add_edge(node(2), &mut out);
        table.set_edge_interest(node(1), &update(&pat("x"), &None, 1), &mut out);
        out.clear();
        table.remove_edge(node(1), &mut out);
        assert_eq!(out, vec![(node(2), update(&pat("x"), &None, 0))]);
        assert!(!table.has_interest(&topic("x")));
        // A late update from the removed edge is ignored.
        table.set_edge_interest(node(1), &update(&pat("x"), &None, 1), &mut out);
        assert!(!table.has_interest(&topic("x")));
    }

    #[test]
    fn group_members_are_chosen_in_proportion_to_their_counts() {
        let mut table = InterestTable::default();
        let mut out = Vec::new();
        let g = Some("workers".to_string());
        table.add_edge(node(1), &mut out);
        table.add_edge(node(2), &mut out);
        table.set_edge_interest(node(1), &update(&pat("jobs"), &g, 2), &mut out);
        table.set_edge_interest(node(2), &update(&pat("jobs"), &g, 1), &mut out);
        table.add_local(&pat("jobs"), g.as_deref(), SUB, &mut out);
        let mut shares: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..4000 {
            let mut route = Route::default();
            table.route(Hop::Local, &topic("jobs"), None, &mut route);
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
        table.add_edge(node(1), &mut out);
        table.add_local(&pat("jobs"), Some("g"), SUB, &mut out);
        let mut route = Route::default();
        table.route(Hop::Edge(node(1)), &topic("jobs"), Some(&[]), &mut route);
        assert!(route.local.is_empty());
        let assigned = [GroupKey {
            pattern: pat("jobs"),
            group: "g".into(),
        }];
        table.route(
            Hop::Edge(node(1)),
            &topic("jobs"),
            Some(&assigned),
            &mut route,
        );
        assert_eq!(route.local, vec![SUB]);
    }
}
