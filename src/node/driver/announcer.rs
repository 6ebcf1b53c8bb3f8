//! What discovery says about this node's tree: its root, once a new one
//! has held for a moment. A tree merging changes its nodes' roots several
//! times within a moment, and each announcement goes to every node of the
//! LAN.

use std::time::{Duration, Instant};

use crate::discovery::Discovery;
use crate::identity::NodeId;

/// How long a new root must hold before discovery announces it.
const ROOT_ANNOUNCE_AFTER: Duration = Duration::from_millis(250);

pub(super) struct RootAnnouncer {
    /// Announces this node (and its root) until dropped, which says
    /// goodbye.
    discovery: Option<Box<dyn Discovery>>,
    /// A new root, and when it has held long enough to announce.
    pending: Option<(NodeId, Instant)>,
    /// The root discovery announces now.
    announced: NodeId,
}

impl RootAnnouncer {
    /// Discovery starts by announcing `me` as its own root.
    pub fn new(discovery: Option<Box<dyn Discovery>>, me: NodeId) -> RootAnnouncer {
        RootAnnouncer {
            discovery,
            pending: None,
            announced: me,
        }
    }

    /// The tree's root changed to `root` at `now`.
    pub fn root_changed(&mut self, root: NodeId, now: Instant) {
        self.pending = Some((root, now + ROOT_ANNOUNCE_AFTER));
    }

    /// Announces the new root if it has held until `now`.
    pub fn announce_due(&mut self, now: Instant) {
        let Some((root, _)) = self.pending.filter(|(_, at)| *at <= now) else {
            return;
        };
        self.pending = None;
        if root != self.announced {
            self.announced = root;
            if let Some(discovery) = self.discovery.as_mut() {
                discovery.announce_root(root);
            }
        }
    }

    /// When [`RootAnnouncer::announce_due`] has something to do.
    pub fn wake(&self) -> Option<Instant> {
        self.pending.map(|(_, at)| at)
    }

    /// Says goodbye on the LAN.
    pub fn goodbye(&mut self) {
        drop(self.discovery.take());
    }
}
