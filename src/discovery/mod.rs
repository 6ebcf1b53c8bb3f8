//! How nodes find each other. Discovery only reports candidates; the
//! overlay core decides whom to connect to, and static `--peer` addresses
//! go straight to it, so a network without multicast still works.

mod mdns;

use std::net::SocketAddr;

use tokio::sync::mpsc;

use crate::identity::NodeId;

pub use mdns::{find_node, txt_record, MdnsDiscovery, SERVICE_TYPE};

/// What a node announces about itself.
#[derive(Debug, Clone)]
pub struct Announcement {
    pub id: NodeId,
    pub name: String,
    pub cluster: String,
    /// Fingerprint of its cluster CA: nodes of another CA are not dialled.
    pub ca: String,
    /// The address its QUIC endpoint is bound to.
    pub addr: SocketAddr,
    /// The root of its tree: a node that sees another root through it can
    /// tell that two trees should merge.
    pub root: NodeId,
}

/// A change in the set of nodes of this node's cluster that can be seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryEvent {
    /// A node was seen, or seen again, at these addresses, in the tree of
    /// `root` when it announced one.
    Found {
        id: NodeId,
        addrs: Vec<SocketAddr>,
        root: Option<NodeId>,
    },
    /// A node said goodbye, or its announcement expired.
    Lost { id: NodeId },
}

/// Why discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("network interface {name:?} does not exist; interfaces here: {available}")]
    NoSuchInterface { name: String, available: String },
    #[error("mDNS failed: {0}; use --no-mdns with --peer ADDR on networks without multicast")]
    Mdns(#[from] mdns_sd::Error),
    #[error("cannot list network interfaces: {0}")]
    Interfaces(std::io::Error),
}

/// A source of peers. The mDNS implementation is for real networks; the
/// simulator supplies its own.
pub trait Discovery: Send + 'static {
    /// Starts announcing `me` and sending the nodes of its cluster to
    /// `events`. Stops, saying goodbye where it can, when dropped.
    fn start(
        &mut self,
        me: &Announcement,
        events: mpsc::UnboundedSender<DiscoveryEvent>,
    ) -> Result<(), DiscoveryError>;

    /// Announces that the node's tree now has root `root`.
    fn announce_root(&mut self, root: NodeId);
}
