//! Who lives in this node's subtree, and through which child.
//!
//! Each node reports its subtree (itself included) to its parent, as deltas
//! after a first full listing. So every node can route a directed event
//! down to any node below it, or else up to its parent, and the root holds
//! the whole tree for `treescale tree`. The cost is one entry per node per
//! ancestor: N·depth entries in all, and a join costs depth messages.

use std::collections::{BTreeMap, HashMap};

use crate::identity::NodeId;
use crate::wire::{Destination, DirectoryEntry, DirectoryUpdate};

/// Where a directed event goes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextHop {
    /// The event is for this node.
    Here,
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
}

impl Directory {
    pub fn new(own: DirectoryEntry) -> Self {
        Directory {
            own,
            below: BTreeMap::new(),
            by_name: HashMap::new(),
            sizes: HashMap::new(),
        }
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
        self.own.parent = parent;
        self.own.rtt_us = rtt_us;
        Some(DirectoryUpdate {
            upsert: vec![self.own.clone()],
            remove: Vec::new(),
        })
    }

    pub fn own(&self) -> &DirectoryEntry {
        &self.own
    }

    /// Applies what `child` reported; returns what to pass up. Entries that
    /// claim to be us, or to lie behind another child, are ignored: the
    /// child's report is only about its own subtree.
    pub fn apply(&mut self, child: NodeId, update: DirectoryUpdate) -> DirectoryUpdate {
        let mut passed = DirectoryUpdate::default();
        for id in update.remove {
            if self.below.get(&id).is_some_and(|(via, _)| *via == child) {
                self.forget(id);
                passed.remove.push(id);
            }
        }
        for entry in update.upsert {
            if entry.id == self.own.id {
                continue;
            }
            if self
                .below
                .get(&entry.id)
                .is_some_and(|(via, _)| *via != child)
            {
                continue;
            }
            if !self.below.contains_key(&entry.id) {
                *self.sizes.entry(child).or_insert(0) += 1;
            }
            self.by_name.insert(entry.name.clone(), entry.id);
            self.below.insert(entry.id, (child, entry.clone()));
            passed.upsert.push(entry);
        }
        passed
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
        }
    }

    #[test]
    fn routes_down_to_known_nodes_and_up_otherwise() {
        let mut dir = Directory::new(DirectoryEntry {
            id: id(1),
            name: "n1".into(),
            parent: None,
            rtt_us: 0,
        });
        let passed = dir.apply(
            id(2),
            DirectoryUpdate {
                upsert: vec![entry(2, 1), entry(5, 2)],
                remove: vec![],
            },
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
    fn a_child_cannot_claim_nodes_behind_another_child() {
        let mut dir = Directory::new(DirectoryEntry {
            id: id(1),
            name: "n1".into(),
            parent: None,
            rtt_us: 0,
        });
        dir.apply(
            id(2),
            DirectoryUpdate {
                upsert: vec![entry(2, 1), entry(7, 2)],
                remove: vec![],
            },
        );
        let passed = dir.apply(
            id(3),
            DirectoryUpdate {
                upsert: vec![entry(3, 1), entry(7, 3)],
                remove: vec![id(2)],
            },
        );
        assert_eq!(passed.upsert.len(), 1, "only the child's own claim passes");
        assert!(passed.remove.is_empty());
        assert_eq!(
            dir.next_hop(&Destination::Node(id(7)), None),
            NextHop::Edge(id(2))
        );
    }
}
