//! mDNS discovery: every node registers `_treescale._udp.local.` with its
//! id, protocol version, cluster, CA fingerprint, name and tree root in
//! TXT, and browses for the rest.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mdns_sd::{IfKind, ResolvedService, ServiceDaemon, ServiceEvent, ServiceInfo};
use tokio::sync::mpsc;

use super::{Announcement, Discovery, DiscoveryError, DiscoveryEvent};
use crate::identity::NodeId;
use crate::wire::PROTOCOL_VERSION;

/// The DNS-SD service type every TreeScale node registers.
pub const SERVICE_TYPE: &str = "_treescale._udp.local.";

/// Nodes of other CAs remembered (each logged once); past it the set
/// starts over.
const MAX_FOREIGN_REMEMBERED: usize = 1024;
/// TXT values are at most 255 bytes with their key; names are cut to fit.
const MAX_NAME_IN_TXT: usize = 200;

/// mDNS on all interfaces, or only on the ones named.
pub struct MdnsDiscovery {
    interfaces: Vec<String>,
    running: Option<Running>,
}

struct Running {
    daemon: ServiceDaemon,
    fullname: String,
    /// What is announced, kept to announce it again when the root changes.
    me: Announcement,
}

impl MdnsDiscovery {
    /// `interfaces` empty means every interface.
    pub fn new(interfaces: Vec<String>) -> Self {
        MdnsDiscovery {
            interfaces,
            running: None,
        }
    }
}

impl Discovery for MdnsDiscovery {
    fn start(
        &mut self,
        me: &Announcement,
        events: mpsc::UnboundedSender<DiscoveryEvent>,
    ) -> Result<(), DiscoveryError> {
        let daemon = daemon_on(&self.interfaces)?;
        let info = service_info(me)?;
        let fullname = info.get_fullname().to_string();
        daemon.register(info)?;
        let browse = daemon.browse(SERVICE_TYPE)?;
        let (me_id, cluster, ca) = (me.id, me.cluster.clone(), me.ca.clone());
        tokio::spawn(async move {
            // Goodbyes name the instance only, so remember whose it was.
            let mut ids: HashMap<String, NodeId> = HashMap::new();
            // Nodes of another CA, each reported once.
            let mut foreign: HashSet<NodeId> = HashSet::new();
            while let Ok(event) = browse.recv_async().await {
                let report = match event {
                    ServiceEvent::ServiceResolved(service) => match peer_of(&service, &cluster) {
                        Some(peer) if peer.ca != ca => {
                            // Forged announcements must not grow it forever.
                            if foreign.len() >= MAX_FOREIGN_REMEMBERED {
                                foreign.clear();
                            }
                            if foreign.insert(peer.id) {
                                tracing::warn!(node = %peer.id.short(), addrs = ?peer.addrs, their_ca = %peer.ca, our_ca = %ca,
                                    "ignoring a node of cluster {cluster:?} with another CA: not ours to join");
                            }
                            continue;
                        }
                        Some(peer) if peer.id != me_id => {
                            ids.insert(service.get_fullname().to_string(), peer.id);
                            DiscoveryEvent::Found {
                                id: peer.id,
                                addrs: peer.addrs,
                                root: peer.root,
                            }
                        }
                        _ => continue,
                    },
                    ServiceEvent::ServiceRemoved(_, fullname) => match ids.remove(&fullname) {
                        Some(id) => DiscoveryEvent::Lost { id },
                        None => continue,
                    },
                    _ => continue,
                };
                if events.send(report).is_err() {
                    return;
                }
            }
        });
        self.running = Some(Running {
            daemon,
            fullname,
            me: me.clone(),
        });
        Ok(())
    }

    fn announce_root(&mut self, root: NodeId) {
        let Some(running) = self.running.as_mut() else {
            return;
        };
        running.me.root = root;
        // Registering the same instance again announces its new TXT
        // record; browsers that cached the old one resolve it again.
        let registered = service_info(&running.me).and_then(|info| running.daemon.register(info));
        if let Err(e) = registered {
            tracing::warn!("cannot announce the new root on mDNS: {e}");
        }
    }
}

/// The TXT record that announces `me`: key and value, in the order
/// docs/protocol.md lists them.
pub fn txt_record(me: &Announcement) -> Vec<(&'static str, String)> {
    let mut name = me.name.clone();
    name.truncate(name.floor_char_boundary(MAX_NAME_IN_TXT));
    vec![
        ("id", me.id.to_string()),
        ("v", PROTOCOL_VERSION.to_string()),
        ("cluster", me.cluster.clone()),
        ("ca", me.ca.clone()),
        ("name", name),
        ("root", me.root.to_string()),
    ]
}

/// The DNS-SD service that announces `me`.
fn service_info(me: &Announcement) -> Result<ServiceInfo, mdns_sd::Error> {
    let instance = format!("ts-{}", &me.id.to_string()[..32]);
    let host = format!("{instance}.local.");
    let properties: HashMap<String, String> = txt_record(me)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let ip = me.addr.ip();
    let mut info = if ip.is_unspecified() {
        ServiceInfo::new(
            SERVICE_TYPE,
            &instance,
            &host,
            (),
            me.addr.port(),
            properties,
        )?
        .enable_addr_auto()
    } else {
        ServiceInfo::new(
            SERVICE_TYPE,
            &instance,
            &host,
            ip,
            me.addr.port(),
            properties,
        )?
    };
    // The instance name is derived from the node id, so it cannot clash;
    // skipping the probe saves most of a second at start.
    info.set_requires_probe(false);
    Ok(info)
}

impl Drop for MdnsDiscovery {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            // Unregistering multicasts a goodbye, so peers forget us at once.
            let _ = running.daemon.unregister(&running.fullname);
            let _ = running.daemon.shutdown();
        }
    }
}

/// Browses until a node of `cluster` whose CA has fingerprint `ca`
/// answers, for clients given no address.
pub async fn find_node(
    cluster: &str,
    ca: &str,
    interfaces: &[String],
    timeout: Duration,
) -> Result<Option<(NodeId, Vec<SocketAddr>)>, DiscoveryError> {
    let daemon = daemon_on(interfaces)?;
    let browse = daemon.browse(SERVICE_TYPE)?;
    let found = tokio::time::timeout(timeout, async {
        let mut warned = false;
        while let Ok(event) = browse.recv_async().await {
            if let ServiceEvent::ServiceResolved(service) = event {
                match peer_of(&service, cluster) {
                    Some(peer) if peer.ca == ca => return Some((peer.id, peer.addrs)),
                    Some(peer) if !warned => {
                        warned = true;
                        tracing::warn!(node = %peer.id.short(), their_ca = %peer.ca, our_ca = %ca,
                            "found a node of cluster {cluster:?} with another CA; is the certs dir (--certs) this cluster's?");
                    }
                    _ => {}
                }
            }
        }
        None
    })
    .await
    .unwrap_or(None);
    let _ = daemon.shutdown();
    Ok(found)
}

/// A daemon restricted to `interfaces`, after checking that each exists.
fn daemon_on(interfaces: &[String]) -> Result<ServiceDaemon, DiscoveryError> {
    let present = if_addrs::get_if_addrs().map_err(DiscoveryError::Interfaces)?;
    for wanted in interfaces {
        if !present.iter().any(|i| &i.name == wanted) {
            let mut names: Vec<&str> = present.iter().map(|i| i.name.as_str()).collect();
            names.sort();
            names.dedup();
            return Err(DiscoveryError::NoSuchInterface {
                name: wanted.clone(),
                available: names.join(", "),
            });
        }
    }
    if interfaces.is_empty() && present.iter().all(|i| i.is_loopback()) {
        tracing::warn!(
            "no network interface but loopback: mDNS will only find nodes on this machine; \
             use --peer ADDR to reach others"
        );
    }
    let daemon = ServiceDaemon::new()?;
    if !interfaces.is_empty() {
        daemon.disable_interface(IfKind::All)?;
        for name in interfaces {
            daemon.enable_interface(IfKind::Name(name.clone()))?;
        }
    }
    Ok(daemon)
}

/// A node seen on mDNS.
struct Peer {
    id: NodeId,
    addrs: Vec<SocketAddr>,
    /// The root of its tree, when it announced one.
    root: Option<NodeId>,
    /// Fingerprint of its cluster CA.
    ca: String,
}

/// The node a resolved service describes, if it is one of ours, of this
/// cluster and of a protocol version we speak.
fn peer_of(service: &ResolvedService, cluster: &str) -> Option<Peer> {
    if service.get_property_val_str("cluster") != Some(cluster) {
        return None;
    }
    if service.get_property_val_str("v") != Some(&PROTOCOL_VERSION.to_string()) {
        tracing::debug!(
            service = service.get_fullname(),
            "ignoring a node of another protocol version"
        );
        return None;
    }
    let id: NodeId = service.get_property_val_str("id")?.parse().ok()?;
    let port = service.get_port();
    let mut addrs: Vec<SocketAddr> = service
        .get_addresses()
        .iter()
        .map(|ip| ip.to_ip_addr())
        // Link-local IPv6 needs a scope id the socket address lacks.
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    addrs.sort();
    let ca = service
        .get_property_val_str("ca")
        .unwrap_or_default()
        .to_string();
    let root = service
        .get_property_val_str("root")
        .and_then(|root| root.parse().ok());
    (!addrs.is_empty()).then_some(Peer {
        id,
        addrs,
        root,
        ca,
    })
}
