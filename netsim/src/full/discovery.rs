//! Discovery on the simulated LAN: nodes on a segment see each other as
//! mDNS would show them. A node that stops says no goodbye (like a crash);
//! one that starts again is announced again to everyone on its segments.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use treescale::discovery::{Announcement, Discovery, DiscoveryError, DiscoveryEvent};
use treescale::NodeId;

/// Every announcing node, by segment.
#[derive(Default)]
pub struct Lan {
    segments: Mutex<BTreeMap<String, BTreeMap<NodeId, Member>>>,
}

#[derive(Clone)]
struct Member {
    cluster: String,
    addr: SocketAddr,
    /// The root it announces.
    root: NodeId,
    events: mpsc::UnboundedSender<DiscoveryEvent>,
}

impl Member {
    fn found(&self, id: NodeId) -> DiscoveryEvent {
        DiscoveryEvent::Found {
            id,
            addrs: vec![self.addr],
            root: Some(self.root),
        }
    }
}

pub struct SimDiscovery {
    lan: Arc<Lan>,
    segments: Vec<String>,
    /// The host's address: the node's endpoint is bound to 0.0.0.0.
    addr: SocketAddr,
    me: Option<NodeId>,
}

impl SimDiscovery {
    pub fn new(lan: Arc<Lan>, segments: Vec<String>, addr: SocketAddr) -> Self {
        SimDiscovery {
            lan,
            segments,
            addr,
            me: None,
        }
    }
}

impl Discovery for SimDiscovery {
    fn start(
        &mut self,
        me: &Announcement,
        events: mpsc::UnboundedSender<DiscoveryEvent>,
    ) -> Result<(), DiscoveryError> {
        let mut segments = self.lan.segments.lock().unwrap_or_else(|e| e.into_inner());
        let mine = Member {
            cluster: me.cluster.clone(),
            addr: self.addr,
            root: me.root,
            events: events.clone(),
        };
        for name in &self.segments {
            let members = segments.entry(name.clone()).or_default();
            for (id, member) in members.iter() {
                if *id == me.id || member.cluster != me.cluster {
                    continue;
                }
                let _ = events.send(member.found(*id));
                let _ = member.events.send(mine.found(me.id));
            }
            members.insert(me.id, mine.clone());
        }
        self.me = Some(me.id);
        Ok(())
    }

    /// As mDNS does for a changed TXT record: everyone on the node's
    /// segments sees it again.
    fn announce_root(&mut self, root: NodeId) {
        let Some(me) = self.me else { return };
        let mut segments = self.lan.segments.lock().unwrap_or_else(|e| e.into_inner());
        for name in &self.segments {
            let Some(members) = segments.get_mut(name) else {
                continue;
            };
            let Some(mine) = members.get_mut(&me) else {
                continue;
            };
            mine.root = root;
            let mine = mine.clone();
            for (id, member) in members.iter() {
                if *id != me && member.cluster == mine.cluster {
                    let _ = member.events.send(mine.found(me));
                }
            }
        }
    }
}

impl Drop for SimDiscovery {
    fn drop(&mut self) {
        let Some(me) = self.me else { return };
        let mut segments = self.lan.segments.lock().unwrap_or_else(|e| e.into_inner());
        for name in &self.segments {
            if let Some(members) = segments.get_mut(name) {
                members.remove(&me);
            }
        }
    }
}
