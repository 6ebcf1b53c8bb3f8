//! Who lives in this node's subtree, and through which child.
//!
//! Each node reports its subtree (itself included) to its parent, as deltas
//! after a first full listing. So every node can route a directed event
//! down to any node below it, or else up to its parent, and the root holds
//! the whole tree for `treescale tree`. The cost is one entry per node per
//! ancestor: N·depth entries in all, and a join costs depth messages.
//!
//! The same entries tell where the free slots of the subtree are, and how
//! deep: a full node sends a joiner straight to the shallowest one it may
//! take (see [`Directory::slot_for`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;

use crate::identity::NodeId;
use crate::wire::{Destination, DirectoryEntry, DirectoryUpdate, PeerAddrs};

/// Where a directed event goes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextHop {
    /// The event is for this node.
    Here,
    /// Send it over the link to this neighbour.
    Edge(NodeId),
    /// Not below us, and we are the root: no such node in this tree.
    Unknown,
}

#[derive(Debug)]
pub struct Directory {
    /// This node's own entry.
    own: DirectoryEntry,
    /// Every node below us: its entry and the child it lies behind.
    below: BTreeMap<NodeId, (NodeId, DirectoryEntry)>,
    /// Node ids by name, for names given as destinations.
    by_name: HashMap<String, NodeId>,
    /// Subtree size behind each child, for balancing joins.
    sizes: HashMap<NodeId, u32>,
    slots: Slots,
}

impl Directory {
    pub fn new(own: DirectoryEntry) -> Self {
        let mut slots = Slots::default();
        slots.upsert(own.id, &own);
        Directory {
            own,
            below: BTreeMap::new(),
            by_name: HashMap::new(),
            sizes: HashMap::new(),
            slots,
        }
    }

    /// The shallowest node below us with a free slot that `joiner` may
    /// take (heap order: its id is smaller than the joiner's), with its
    /// address. Among several at that depth, the largest such id, which
    /// leaves the small ids' slots to the small joiners that need them.
    pub fn slot_for(&self, joiner: NodeId) -> Option<(NodeId, Vec<SocketAddr>)> {
        let id = self.slots.best(self.own.id, joiner)?;
        let (_, entry) = self.below.get(&id)?;
        (!entry.addrs.is_empty()).then(|| (id, entry.addrs.clone()))
    }

    /// For `climber`, a node below us at most `max_depth` levels down with a
    /// free slot it may take (heap order), the shallowest first; `open`
    /// says whether a node with that many free slots has one left (some
    /// may be promised to other climbers already).
    pub fn climb_slot(
        &self,
        climber: NodeId,
        max_depth: u32,
        open: impl Fn(NodeId, u32) -> bool,
    ) -> Option<PeerAddrs> {
        if max_depth == 0 {
            return None;
        }
        self.slots
            .free
            .range(1..=max_depth)
            .flat_map(|(_, level)| level.range(..climber).rev())
            .filter(|id| open(**id, self.slots.free_slots(**id)))
            .find_map(|id| {
                let addrs = self.addrs_below(*id)?;
                Some(PeerAddrs {
                    id: *id,
                    addrs: addrs.to_vec(),
                })
            })
    }

    /// How many levels below us `id` is, when its chain of parents up to us
    /// is known.
    pub fn depth_below(&self, id: NodeId) -> Option<u32> {
        self.slots.depth.get(&id).copied()
    }

    /// Whether `id` is in our subtree (below us).
    pub fn holds(&self, id: NodeId) -> bool {
        self.below.contains_key(&id)
    }

    /// Nodes behind `child`, the child included.
    pub fn subtree_size(&self, child: NodeId) -> u32 {
        self.sizes.get(&child).copied().unwrap_or(1)
    }

    /// Nodes in this node's subtree, itself included.
    pub fn size(&self) -> u32 {
        self.below.len() as u32 + 1
    }

    /// The update that tells a new parent our whole subtree.
    pub fn full_listing(&self) -> DirectoryUpdate {
        let mut upsert = vec![self.own.clone()];
        upsert.extend(self.below.values().map(|(_, e)| e.clone()));
        DirectoryUpdate {
            upsert,
            remove: Vec::new(),
        }
    }

    /// Every entry of the subtree, this node first.
    pub fn entries(&self) -> Vec<DirectoryEntry> {
        self.full_listing().upsert
    }

    /// Changes our own entry; returns the update for our parent, if any.
    pub fn set_own(&mut self, parent: Option<NodeId>, rtt_us: u64) -> Option<DirectoryUpdate> {
        if self.own.parent == parent && self.own.rtt_us == rtt_us {
            return None;
        }
        if self.own.parent != parent {
            self.own.epoch += 1;
        }
        self.own.parent = parent;
        self.own.rtt_us = rtt_us;
        // Our own parent lies above us: for the slots, we stay the top.
        let top = DirectoryEntry {
            parent: None,
            ..self.own.clone()
        };
        self.slots.upsert(self.own.id, &top);
        Some(DirectoryUpdate {
            upsert: vec![self.own.clone()],
            remove: Vec::new(),
        })
    }

    pub fn own(&self) -> &DirectoryEntry {
        &self.own
    }

    /// The addresses a node below us was seen at, by its parent.
    pub fn addrs_below(&self, id: NodeId) -> Option<&[SocketAddr]> {
        let (_, entry) = self.below.get(&id)?;
        (!entry.addrs.is_empty()).then_some(entry.addrs.as_slice())
    }

    /// Applies what `child`, reached at `child_addr`, reported; returns
    /// what to pass up. A child's report of its subtree is the newest word
    /// on it: a node filed behind another child has moved there (its old
    /// parent's removal may still be on the way), so it is filed anew.
    /// Removals count only from the child a node is filed behind, so a late
    /// removal from its old place does not undo the move.
    pub fn apply(
        &mut self,
        child: NodeId,
        child_addr: SocketAddr,
        update: DirectoryUpdate,
    ) -> DirectoryUpdate {
        let mut passed = DirectoryUpdate::default();
        for id in update.remove {
            if self.below.get(&id).is_some_and(|(via, _)| *via == child) {
                self.forget(id);
                passed.remove.push(id);
            }
        }
        let stale = self.stale_entries(child, &update.upsert);
        for mut entry in update.upsert {
            if entry.id == self.own.id || stale.contains(&entry.id) {
                continue;
            }
            if entry.id == child {
                entry.addrs = vec![child_addr];
            }
            match self.below.get(&entry.id).map(|(via, _)| *via) {
                Some(via) if via == child => {}
                Some(old_via) => {
                    if let Some(size) = self.sizes.get_mut(&old_via) {
                        *size = size.saturating_sub(1);
                    }
                    *self.sizes.entry(child).or_insert(0) += 1;
                }
                None => *self.sizes.entry(child).or_insert(0) += 1,
            }
            self.by_name.insert(entry.name.clone(), entry.id);
            self.slots.upsert(self.own.id, &entry);
            self.below.insert(entry.id, (child, entry.clone()));
            passed.upsert.push(entry);
        }
        passed
    }

    /// The entries of `child`'s report that are older news than what is
    /// filed behind another child: a smaller epoch (the node moved since),
    /// or the same epoch under a parent whose entry in the report is stale
    /// (its subtree moved with it) or that we know lives elsewhere. A node that moved reports from its new
    /// place, while its old subtree may still list it for a moment.
    fn stale_entries(&self, child: NodeId, upsert: &[DirectoryEntry]) -> HashSet<NodeId> {
        let reported: HashMap<NodeId, &DirectoryEntry> = upsert.iter().map(|e| (e.id, e)).collect();
        let mut verdicts: HashMap<NodeId, bool> = HashMap::new();
        for entry in upsert {
            let mut chain = Vec::new();
            let mut at = entry;
            let stale = loop {
                if let Some(verdict) = verdicts.get(&at.id) {
                    break *verdict;
                }
                chain.push(at.id);
                match self.below.get(&at.id) {
                    None => break false,
                    Some((via, _)) if *via == child => break false,
                    Some((_, filed)) if filed.epoch != at.epoch => break at.epoch < filed.epoch,
                    // Unmoved itself: as fresh as the report of its parent,
                    // or stale if we know its parent lives behind another
                    // child. Heap order rules out cycles, but reports come
                    // from the network.
                    Some(_) => match (at.parent, at.parent.and_then(|p| reported.get(&p))) {
                        (_, Some(parent)) if chain.len() <= upsert.len() => at = parent,
                        (Some(parent), _) => {
                            break self
                                .below
                                .get(&parent)
                                .is_some_and(|(via, _)| *via != child)
                        }
                        (None, _) => break false,
                    },
                }
            };
            for id in chain {
                verdicts.insert(id, stale);
            }
        }
        verdicts
            .into_iter()
            .filter_map(|(id, stale)| stale.then_some(id))
            .collect()
    }

    /// Forgets everything behind `child`; returns the removals to pass up.
    pub fn remove_child(&mut self, child: NodeId) -> DirectoryUpdate {
        let gone: Vec<NodeId> = self
            .below
            .iter()
            .filter(|(_, (via, _))| *via == child)
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            self.forget(*id);
        }
        self.sizes.remove(&child);
        DirectoryUpdate {
            upsert: Vec::new(),
            remove: gone,
        }
    }

    fn forget(&mut self, id: NodeId) {
        self.slots.remove(self.own.id, id);
        if let Some((via, entry)) = self.below.remove(&id) {
            if self.by_name.get(&entry.name) == Some(&id) {
                self.by_name.remove(&entry.name);
            }
            if let Some(size) = self.sizes.get_mut(&via) {
                *size = size.saturating_sub(1);
            }
        }
    }

    /// The next hop towards `to`, given our parent.
    pub fn next_hop(&self, to: &Destination, parent: Option<NodeId>) -> NextHop {
        let id = match to {
            Destination::Node(id) => Some(*id),
            Destination::Named(name) if *name == self.own.name => Some(self.own.id),
            Destination::Named(name) => self.by_name.get(name).copied(),
        };
        match id {
            Some(id) if id == self.own.id => NextHop::Here,
            Some(id) if self.below.contains_key(&id) => NextHop::Edge(self.below[&id].0),
            _ => parent.map_or(NextHop::Unknown, NextHop::Edge),
        }
    }
}

/// The tree below us as parent pointers, indexed by where free slots are.
#[derive(Debug, Default)]
struct Slots {
    parent_of: HashMap<NodeId, NodeId>,
    kids: HashMap<NodeId, BTreeSet<NodeId>>,
    capacity: HashMap<NodeId, u32>,
    /// Depth below us, for nodes whose chain of parents up to us is known.
    depth: HashMap<NodeId, u32>,
    /// Nodes with a free slot, by depth.
    free: BTreeMap<u32, BTreeSet<NodeId>>,
}

impl Slots {
    fn upsert(&mut self, top: NodeId, entry: &DirectoryEntry) {
        let id = entry.id;
        self.capacity.insert(id, entry.max_children);
        let old = self.parent_of.get(&id).copied();
        if old != entry.parent {
            if let Some(old) = old {
                self.parent_of.remove(&id);
                if let Some(kids) = self.kids.get_mut(&old) {
                    kids.remove(&id);
                }
                self.refresh_free(old);
            }
            if let Some(parent) = entry.parent {
                self.parent_of.insert(id, parent);
                self.kids.entry(parent).or_default().insert(id);
                self.refresh_free(parent);
            }
        }
        self.refresh_depths(top, id);
    }

    fn remove(&mut self, top: NodeId, id: NodeId) {
        self.unlist(id);
        self.depth.remove(&id);
        self.capacity.remove(&id);
        if let Some(parent) = self.parent_of.remove(&id) {
            if let Some(kids) = self.kids.get_mut(&parent) {
                kids.remove(&id);
            }
            self.refresh_free(parent);
        }
        // Its children, if still listed, are cut off until they move.
        let kids: Vec<NodeId> = self.kids.get(&id).into_iter().flatten().copied().collect();
        for kid in kids {
            self.refresh_depths(top, kid);
        }
    }

    fn unlist(&mut self, id: NodeId) {
        if let Some(depth) = self.depth.get(&id) {
            if let Some(level) = self.free.get_mut(depth) {
                level.remove(&id);
                if level.is_empty() {
                    self.free.remove(depth);
                }
            }
        }
    }

    /// Re-files `id` as free or full at its current depth.
    fn refresh_free(&mut self, id: NodeId) {
        self.unlist(id);
        let Some(depth) = self.depth.get(&id).copied() else {
            return;
        };
        let kids = self.kids.get(&id).map_or(0, |k| k.len() as u32);
        if kids < self.capacity.get(&id).copied().unwrap_or(0) {
            self.free.entry(depth).or_default().insert(id);
        }
    }

    /// Recomputes the depth of `id` and of everything below it.
    fn refresh_depths(&mut self, top: NodeId, id: NodeId) {
        let mut stack = vec![id];
        // Heap order rules out cycles, but entries come from the network.
        let mut seen = std::collections::HashSet::new();
        while let Some(node) = stack.pop() {
            if !seen.insert(node) {
                continue;
            }
            self.unlist(node);
            let depth = if node == top {
                Some(0)
            } else {
                self.parent_of
                    .get(&node)
                    .and_then(|p| self.depth.get(p))
                    .map(|d| d + 1)
            };
            match depth {
                Some(depth) => {
                    self.depth.insert(node, depth);
                }
                None => {
                    self.depth.remove(&node);
                }
            }
            self.refresh_free(node);
            stack.extend(self.kids.get(&node).into_iter().flatten().copied());
        }
    }

    fn free_slots(&self, id: NodeId) -> u32 {
        let kids = self.kids.get(&id).map_or(0, |k| k.len() as u32);
        self.capacity
            .get(&id)
            .copied()
            .unwrap_or(0)
            .saturating_sub(kids)
    }

    fn best(&self, top: NodeId, joiner: NodeId) -> Option<NodeId> {
        self.free
            .iter()
            .filter(|(depth, _)| **depth > 0)
            .find_map(|(_, level)| level.range(..joiner).next_back().copied())
            .filter(|id| *id != top)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }

    fn entry(n: u8, parent: u8) -> DirectoryEntry {
        DirectoryEntry {
            id: id(n),
            name: format!("n{n}"),
            parent: Some(id(parent)),
            rtt_us: 0,
            max_children: 2,
            // As the entry's own parent filled it in.
            addrs: vec![addr(n)],
            epoch: 0,
        }
    }

    fn top(n: u8) -> Directory {
        Directory::new(DirectoryEntry {
            id: id(n),
            name: format!("n{n}"),
            parent: None,
            rtt_us: 0,
            max_children: 2,
            addrs: Vec::new(),
            epoch: 0,
        })
    }

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 17000 + n as u16))
    }

    fn update(upsert: Vec<DirectoryEntry>, remove: Vec<NodeId>) -> DirectoryUpdate {
        DirectoryUpdate { upsert, remove }
    }

    #[test]
    fn joiners_go_to_the_shallowest_free_slot_they_may_take() {
        // 1 ── 2 ── 5
        //   │    └─ 6 ── 9
        //   └─ 3 (free)
        let mut dir = top(1);
        dir.apply(
            id(2),
            addr(2),
            update(
                vec![entry(2, 1), entry(5, 2), entry(6, 2), entry(9, 6)],
                vec![],
            ),
        );
        dir.apply(id(3), addr(3), update(vec![entry(3, 1)], vec![]));
        assert_eq!(dir.slot_for(id(200)), Some((id(3), vec![addr(3)])));
        // Both level-1 nodes full: the next level has the slots, and of
        // those the joiner may take, the largest id wins.
        dir.apply(
            id(3),
            addr(3),
            update(vec![entry(4, 3), entry(7, 3)], vec![]),
        );
        assert_eq!(dir.slot_for(id(8)), Some((id(7), vec![addr(7)])));
        assert_eq!(dir.slot_for(id(6)).map(|(id, _)| id), Some(id(5)));
        assert_eq!(dir.slot_for(id(4)), None, "no free slot owner below 4");
        // A subtree that leaves frees a slot higher up.
        dir.apply(id(2), addr(2), update(vec![], vec![id(6), id(9)]));
        assert_eq!(dir.slot_for(id(8)).map(|(id, _)| id), Some(id(2)));
    }

    #[test]
    fn routes_down_to_known_nodes_and_up_otherwise() {
        let mut dir = top(1);
        let passed = dir.apply(
            id(2),
            addr(2),
            update(vec![entry(2, 1), entry(5, 2)], vec![]),
        );
        assert_eq!(passed.upsert.len(), 2);
        assert_eq!(dir.size(), 3);
        assert_eq!(dir.subtree_size(id(2)), 2);
        assert_eq!(
            dir.next_hop(&Destination::Node(id(5)), None),
            NextHop::Edge(id(2))
        );
        assert_eq!(
            dir.next_hop(&Destination::Named("n5".into()), None),
            NextHop::Edge(id(2))
        );
        assert_eq!(
            dir.next_hop(&Destination::Named("n1".into()), None),
            NextHop::Here
        );
        assert_eq!(
            dir.next_hop(&Destination::Node(id(9)), Some(id(0))),
            NextHop::Edge(id(0))
        );
        assert_eq!(
            dir.next_hop(&Destination::Node(id(9)), None),
            NextHop::Unknown
        );

        let removed = dir.remove_child(id(2));
        assert_eq!(removed.remove.len(), 2);
        assert_eq!(dir.size(), 1);
        assert_eq!(
            dir.next_hop(&Destination::Named("n5".into()), None),
            NextHop::Unknown
        );
    }

    #[test]
    fn a_moved_node_is_not_brought_back_by_its_old_subtree_s_late_report() {
        let moved = |n: u8, parent: u8| DirectoryEntry {
            epoch: 1,
            ..entry(n, parent)
        };
        let mut dir = top(1);
        dir.apply(
            id(2),
            addr(2),
            update(vec![entry(2, 1), entry(7, 2), entry(9, 7)], vec![]),
        );
        // 7 climbed from under 2 to under 3, and reported from there; then
        // 2, which had not yet heard 7 leave, listed its whole subtree.
        dir.apply(
            id(3),
            addr(3),
            update(vec![entry(3, 1), moved(7, 3), entry(9, 7)], vec![]),
        );
        let passed = dir.apply(
            id(2),
            addr(2),
            update(vec![entry(2, 1), entry(7, 2), entry(9, 7)], vec![]),
        );
        assert_eq!(passed.upsert, vec![entry(2, 1)], "only 2 itself is news");
        // 9 moved with 7; the removals from 2's side come late.
        dir.apply(id(2), addr(2), update(vec![], vec![id(7), id(9)]));
        for n in [7, 9] {
            assert_eq!(
                dir.next_hop(&Destination::Node(id(n)), None),
                NextHop::Edge(id(3)),
                "node {n}"
            );
        }
        // A report of 9 alone from 2's side is stale too: 7, its parent,
        // lives behind 3.
        let passed = dir.apply(id(2), addr(2), update(vec![entry(9, 7)], vec![]));
        assert!(passed.upsert.is_empty());
        assert_eq!(
            dir.next_hop(&Destination::Node(id(9)), None),
            NextHop::Edge(id(3))
        );
    }

    #[test]
    fn a_subtree_reported_by_its_new_parent_survives_the_old_one_s_removal() {
        let mut dir = top(1);
        dir.apply(
            id(2),
            addr(2),
            update(vec![entry(2, 1), entry(7, 2), entry(9, 7)], vec![]),
        );
        // 7 moved under 3 (with 9) before we learned that 2 lost it.
        let passed = dir.apply(
            id(3),
            addr(3),
            update(vec![entry(3, 1), entry(7, 3), entry(9, 7)], vec![]),
        );
        assert_eq!(passed.upsert.len(), 3);
        assert_eq!(
            dir.next_hop(&Destination::Node(id(9)), None),
            NextHop::Edge(id(3))
        );
        // The old child's removal arrives late and changes nothing.
        let passed = dir.apply(id(2), addr(2), update(vec![], vec![id(7), id(9)]));
        assert!(passed.remove.is_empty());
        assert_eq!(
            dir.next_hop(&Destination::Node(id(9)), None),
            NextHop::Edge(id(3))
        );
        assert_eq!(dir.subtree_size(id(3)), 3);
        assert_eq!(dir.subtree_size(id(2)), 1);
        // Losing child 2 altogether keeps what moved.
        dir.remove_child(id(2));
        assert_eq!(dir.size(), 4);
    }
}
