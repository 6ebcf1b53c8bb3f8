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
    events: mpsc::UnboundedSender<DiscoveryEvent>,
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
        for name in &self.segments {
            let members = segments.entry(name.clone()).or_default();
            for (id, member) in members.iter() {
                if *id == me.id || member.cluster != me.cluster {
                    continue;
                }
                let _ = events.send(DiscoveryEvent::Found {
                    id: *id,
                    addrs: vec![member.addr],
                });
                let _ = member.events.send(DiscoveryEvent::Found {
                    id: me.id,
                    addrs: vec![self.addr],
                });
            }
            let member = Member {
                cluster: me.cluster.clone(),
                addr: self.addr,
                events: events.clone(),
            };
            members.insert(me.id, member);
        }
        self.me = Some(me.id);
        Ok(())
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
