//! `treescale node`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use treescale::node::{Limits, ReplayConfig, DEFAULT_CLUSTER, DEFAULT_PORT};
use treescale::overlay::OverlayConfig;
use treescale::store::{SyncMode, DEFAULT_MAP_SIZE};
use treescale::tls::Liveness;
use treescale::wire::DEFAULT_MAX_FRAME;
use treescale::{Node, NodeConfig};

use super::{parse_addr, parse_size, TrustArgs};

/// The long help of this command: on its variant in [`super::Command`],
/// where clap reads it.
pub const NODE_ABOUT: &str = "Run a node. With no flags it listens on UDP port 7700 on every \
interface, keeps its identity in the per-user data dir, announces itself over mDNS and joins \
every node of its cluster it finds. Its certificate comes from the cluster CA in the certs dir; \
on a machine with none, the first node creates one. Stop it with Ctrl-C.";

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// UDP address for QUIC, for nodes and clients alike.
    #[arg(long, value_name = "ADDR", value_parser = parse_addr, default_value_t = SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)))]
    listen: SocketAddr,

    /// Where the node keeps its key (its identity) and its store of
    /// at-least-once events across restarts. One node per data dir.
    /// Default: $XDG_DATA_HOME/treescale/node, or ~/.local/share/treescale/node.
    #[arg(long, value_name = "DIR", env = "TREESCALE_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// Name shown in status, `tree` and logs, and taken by `pub --to`.
    /// Default: the host name, with -PORT when the port is not 7700.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// Nodes join only nodes of the same cluster.
    #[arg(long, value_name = "NAME", env = "TREESCALE_CLUSTER", default_value = DEFAULT_CLUSTER)]
    cluster: String,

    /// Announce and discover over mDNS only on this interface (repeatable).
    /// Without it, every interface.
    #[arg(long = "interface", value_name = "IFACE")]
    interfaces: Vec<String>,

    /// Always connect to this node address (repeatable): for networks
    /// without multicast.
    #[arg(long = "peer", value_name = "ADDR", value_parser = parse_addr)]
    peers: Vec<SocketAddr>,

    /// Turn mDNS off; only --peer addresses are dialled.
    #[arg(long)]
    no_mdns: bool,

    /// Interval of QUIC keep-alive pings on idle connections.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "250ms")]
    keep_alive: Duration,

    /// Silence after which a peer is declared dead. The LAN default notices
    /// a dead peer within about a second.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "1s")]
    idle_timeout: Duration,

    /// Largest frame accepted from any peer or client, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_FRAME)]
    max_frame: usize,

    /// Most children this node accepts in the tree. A join beyond it is
    /// sent further down, so the tree stays about log_k(nodes) deep.
    #[arg(long, value_name = "K", default_value_t = OverlayConfig::default().max_children as u16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    max_children: u16,

    /// Most the store may hold on disk (the LMDB map size), e.g. 512MiB or
    /// 4GiB. When it is full, at-least-once publishes are refused with an
    /// error; nothing stored is dropped.
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value_t = DEFAULT_MAP_SIZE)]
    store_size: usize,

    /// When commits reach the disk. `always` fsyncs before any event is
    /// confirmed. `never` leaves it to the OS: a killed node loses nothing,
    /// but a power cut may lose recently confirmed events.
    #[arg(long, value_enum, value_name = "WHEN", default_value_t = SyncMode::Always)]
    sync: SyncMode,

    /// Most subscriptions one client connection may hold; one more is
    /// refused with TooManySubscriptions.
    #[arg(long, value_name = "N", default_value_t = Limits::default().subscriptions_per_client, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_subscriptions_per_client: usize,

    /// Most QUIC connections (nodes and clients) from one IP address; one
    /// more is refused before its handshake (QUIC CONNECTION_REFUSED).
    /// Raise it for many clients behind one NAT.
    #[arg(long, value_name = "N", default_value_t = Limits::default().connections_per_address, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_connections_per_address: usize,

    /// Most bytes of deliveries that may wait for one client (e.g. 64MiB).
    /// From a quarter of it on, publishers are held back until the client
    /// catches up; a client that reaches it, or reads nothing for 2s while
    /// a quarter waits, is a slow consumer and is disconnected with
    /// SLOW_CONSUMER. Durable subscribers get what they missed when they
    /// come back.
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value_t = Limits::default().consumer_bytes)]
    max_consumer_bytes: usize,

    /// Most bytes of events that may wait for one linked node (e.g.
    /// 128MiB). From a quarter of it on, event sources are held back until
    /// the link catches up; past it at-most-once events for that node are
    /// dropped and counted (status shows them per peer), and at-least-once
    /// events are sent again later. A replay after a repair (at most
    /// --replay-bytes) is taken whole and may go past it once.
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value_t = Limits::default().link_bytes)]
    max_link_bytes: usize,

    /// How long this node keeps the events it routed, to send them again
    /// to subscribers a failure cut off once the tree is repaired (see
    /// docs/delivery.md). It must outlast --idle-timeout and a re-join;
    /// 0 turns replays off.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "2s")]
    replay_window: Duration,

    /// Most bytes of events the replay window keeps (e.g. 16MiB): at high
    /// rates it spans less time than --replay-window.
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value_t = ReplayConfig::default().max_bytes)]
    replay_bytes: usize,

    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR/metrics,
    /// e.g. 127.0.0.1:9700. Off by default; it listens only where told.
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    metrics: Option<SocketAddr>,

    /// Serve browsers at http://ADDR/, e.g. 127.0.0.1:7780: the live
    /// dashboard (/), the JavaScript client (/treescale.js) and where to
    /// connect (/webtransport.json: the WebTransport URL and the
    /// certificate's SHA-256). At start the node prints the dashboard's
    /// address, with a read-only token when it holds ca.key. Off by
    /// default. Browsers connect over WebTransport to the QUIC port
    /// (--listen) either way.
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    web: Option<SocketAddr>,

    /// A certificate chain (PEM) browsers trust, e.g. one for this node's
    /// domain, shown on WebTransport and on --web (then HTTPS). Without it
    /// the node makes a 10-day certificate, renews it every 5 days, and
    /// pages accept it by its SHA-256 (/webtransport.json says it).
    #[arg(long, value_name = "FILE", requires = "web_key")]
    web_cert: Option<PathBuf>,

    /// The private key (PEM) of --web-cert.
    #[arg(long, value_name = "FILE", requires = "web_cert")]
    web_key: Option<PathBuf>,

    /// Most at-least-once events one client may have awaiting their commit;
    /// past it the node reads no more of that client's publishes until
    /// earlier ones are committed (backpressure, not an error).
    #[arg(long, value_name = "N", default_value_t = Limits::default().pending_publishes, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_pending_publishes: usize,

    /// Most events of a durable subscription delivered to its client and
    /// not yet acknowledged; the rest wait in the queue until it acks.
    #[arg(long, value_name = "N", default_value_t = Limits::default().unacked, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_unacked: usize,

    /// Who may publish and subscribe to what, by the user name in client
    /// certificates (TOML; see docs/security.md). Default: permissions.toml
    /// in the certs dir; without it every client may do everything.
    #[arg(long, value_name = "FILE")]
    permissions: Option<PathBuf>,

    #[command(flatten)]
    trust: TrustArgs,
}

fn default_data_dir() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_DATA_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            let home = std::env::var_os("HOME")
                .context("neither XDG_DATA_HOME nor HOME is set; pass --data-dir")?;
            PathBuf::from(home).join(".local/share")
        }
    };
    Ok(base.join("treescale/node"))
}

pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    if args.idle_timeout > Duration::from_secs(24 * 3600) {
        anyhow::bail!(
            "--idle-timeout {:?} is longer than a day; dead peers would go unnoticed",
            args.idle_timeout
        );
    }
    if args.keep_alive >= args.idle_timeout {
        anyhow::bail!(
            "--keep-alive ({:?}) must be shorter than --idle-timeout ({:?}), or healthy peers time out",
            args.keep_alive,
            args.idle_timeout
        );
    }
    if !args.replay_window.is_zero() && args.replay_window <= args.idle_timeout {
        anyhow::bail!(
            "--replay-window ({:?}) must be longer than --idle-timeout ({:?}): a failure is noticed only after it, so the window would hold nothing of what the failure cost; or set 0 to turn replays off",
            args.replay_window,
            args.idle_timeout
        );
    }
    if args.max_consumer_bytes == 0 {
        anyhow::bail!("--max-consumer-bytes must be more than 0, e.g. 64MiB");
    }
    if args.no_mdns && args.peers.is_empty() {
        tracing::warn!(
            "--no-mdns without --peer: this node will only be reached by nodes that dial it"
        );
    }
    let data_dir = match args.data_dir {
        Some(dir) => dir,
        None => default_data_dir()?,
    };
    let mut config = NodeConfig::new(data_dir);
    config.listen = args.listen;
    config.name = args.name;
    config.cluster = args.cluster;
    config.interfaces = args.interfaces;
    config.static_peers = args.peers;
    config.mdns = !args.no_mdns;
    config.liveness = Liveness {
        keep_alive: args.keep_alive,
        idle_timeout: args.idle_timeout,
    };
    config.max_frame = args.max_frame;
    config.overlay.max_children = args.max_children.into();
    config.store.map_size = args.store_size;
    config.store.sync = args.sync;
    config.trust = args.trust.config();
    config.permissions = args.permissions;
    config.metrics = args.metrics;
    config.web = args.web;
    config.web_certificate = args.web_cert.zip(args.web_key);
    config.limits = Limits {
        subscriptions_per_client: args.max_subscriptions_per_client,
        connections_per_address: args.max_connections_per_address,
        consumer_bytes: args.max_consumer_bytes,
        link_bytes: args.max_link_bytes,
        unacked: args.max_unacked,
        pending_publishes: args.max_pending_publishes,
    };
    config.replay = ReplayConfig {
        keep_for: args.replay_window,
        max_bytes: args.replay_bytes,
    };
    // Before the node starts, so a stop meanwhile is a clean one too.
    let stop = super::stop_requested();
    let mut node = Node::start(config).await?;
    eprintln!(
        "treescale node {} ({}) listening on {}",
        node.id().short(),
        node.name(),
        node.addr()
    );
    if let Some(url) = node.dashboard_url() {
        eprintln!("dashboard: {url}");
    }
    tokio::select! {
        _ = stop => {}
        _ = node.wait() => anyhow::bail!("node stopped unexpectedly"),
    }
    node.shutdown().await;
    Ok(())
}
