//! Command-line arguments and the dispatch to each subcommand.

mod bench;
mod certs;
mod client_commands;
mod demo;
mod node;
mod service;
mod tree;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use treescale::node::DEFAULT_CLUSTER;
use treescale::trust::TrustConfig;
use treescale::{Client, ClientOptions, ConnectionEvent, Reconnect};

#[derive(Parser, Debug)]
#[command(
    name = "treescale",
    version,
    about = "Zero-configuration publish/subscribe over a self-organizing QUIC tree",
    long_about = "TreeScale nodes find each other on the LAN over mDNS, keep encrypted QUIC \
connections, and form a tree along which events travel to every subscriber.\n\n\
Start a node on each machine with `treescale node`, then publish and subscribe through any \
of them:\n\n  treescale node &\n  treescale sub 'orders.>' &\n  echo hello | treescale pub orders.eu\n\n\
A service in two lines:\n\n  treescale reply svc.upper --exec 'tr a-z A-Z' &\n  treescale request svc.upper hello\n\n\
`treescale demo` runs a small cluster on loopback and shows all of it.\n\n\
Every node and client shows a certificate from the cluster CA, which the first node on a \
machine creates in ~/.config/treescale/certs. To add a machine, copy that dir to it \
(docs/security.md).",
    after_help = "Logs go to stderr. Set RUST_LOG (e.g. RUST_LOG=treescale=debug) or pass -v / -vv."
)]
pub struct Cli {
    /// More log output on stderr: -v for debug, -vv for trace.
    #[arg(short = 'v', action = clap::ArgAction::Count, global = true)]
    pub log_verbosity: u8,

    /// Threads that run the node's or client's work [default: one fewer
    /// than the machine's cores, at least 1]. One core is left to the
    /// processes beside it: on 2 cores, a second thread cost ~40% more
    /// round-trip latency and gained no throughput (docs/performance.md).
    #[arg(long, global = true, env = "TREESCALE_THREADS", value_name = "N")]
    pub threads: Option<std::num::NonZeroUsize>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node: discover peers, join the tree, serve clients.
    #[command(long_about = node::NODE_ABOUT)]
    Node(node::NodeArgs),
    /// Publish events: DATA as one event, or one event per line of stdin.
    // The usage is fixed: clap's own, in an error, lists the options given
    // (--certs from the environment too) as if they were required.
    #[command(
        name = "pub",
        override_usage = "treescale pub [OPTIONS] <TOPIC> [DATA]"
    )]
    #[command(long_about = client_commands::PUB_ABOUT)]
    Publish(client_commands::PubArgs),
    /// Subscribe and print each event's payload as one line on stdout.
    #[command(name = "sub", override_usage = "treescale sub [OPTIONS] <TOPIC>")]
    #[command(long_about = client_commands::SUB_ABOUT)]
    Subscribe(client_commands::SubArgs),
    /// Send a request and print the first answer.
    #[command(override_usage = "treescale request [OPTIONS] <TOPIC> [DATA]")]
    #[command(long_about = service::REQUEST_ABOUT)]
    Request(service::RequestArgs),
    /// Answer requests: a fixed response, a shell command's output, or an echo.
    #[command(override_usage = "treescale reply [OPTIONS] <TOPIC> [RESPONSE]")]
    #[command(long_about = service::REPLY_ABOUT)]
    Reply(service::ReplyArgs),
    /// Show a node's id, address, tree position, peers and subscriptions.
    Status(client_commands::StatusArgs),
    /// Draw the live tree: root, depth, children and per-edge RTT.
    #[command(long_about = tree::TREE_ABOUT)]
    Tree(tree::TreeArgs),
    /// Start a cluster on loopback, show discovery, the tree, events crossing it and a repair, then stop.
    #[command(long_about = demo::DEMO_ABOUT)]
    Demo(demo::DemoArgs),
    /// Measure throughput or latency of a cluster, counting every lost or duplicated event.
    #[command(long_about = bench::BENCH_ABOUT)]
    Bench(bench::BenchArgs),
    /// Create the cluster CA, issue node and client certificates.
    #[command(long_about = certs::CERTS_ABOUT)]
    Certs(certs::CertsArgs),
}

/// Where a command finds the cluster's credentials.
#[derive(Args, Debug, Clone)]
pub struct TrustArgs {
    /// Dir of the cluster credentials: the CA certificate (ca.crt), and the
    /// CA key (ca.key) or a client certificate (client.crt, client.key).
    /// Default: $XDG_CONFIG_HOME/treescale/certs, or ~/.config/treescale/certs.
    /// The first node on a machine creates a CA there; to add a machine,
    /// copy the dir to it.
    #[arg(long, value_name = "DIR", env = "TREESCALE_CERTS")]
    pub certs: Option<PathBuf>,

    /// Labs only: no cluster CA, any node and client is accepted and no
    /// permissions are enforced. Logs a warning.
    #[arg(long)]
    pub insecure: bool,
}

impl TrustArgs {
    pub fn config(&self) -> TrustConfig {
        match (&self.certs, self.insecure) {
            (_, true) => TrustConfig::Insecure,
            (Some(dir), false) => TrustConfig::Dir(dir.clone()),
            (None, false) => TrustConfig::UserDefault,
        }
    }
}

/// How a client command finds its node.
#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    /// Address of a node to use (HOST:PORT); repeat it (or separate with
    /// commas) to name several: the first that answers is used, and the
    /// others when it fails. Without it, the first node of the cluster
    /// found over mDNS is used.
    #[arg(long = "node", value_name = "ADDR", value_parser = parse_addr, env = "TREESCALE_NODE", value_delimiter = ',')]
    pub nodes: Vec<SocketAddr>,

    /// After losing its node, how long to keep trying to reach one (of
    /// --node, or over mDNS) before failing: a duration such as 30s, 0 to
    /// fail at once, or `forever`. Default: 10s for commands that finish
    /// by themselves, forever for `sub` and `reply`.
    #[arg(long, value_name = "DURATION", value_parser = parse_give_up)]
    pub reconnect_for: Option<GiveUp>,

    #[command(flatten)]
    pub reach: ReachArgs,
}

/// How long a client command keeps trying to reconnect; `None` is forever.
#[derive(Debug, Clone, Copy)]
pub struct GiveUp(pub Option<Duration>);

fn parse_give_up(s: &str) -> Result<GiveUp, String> {
    if s == "forever" {
        return Ok(GiveUp(None));
    }
    humantime::parse_duration(s)
        .map(|d| GiveUp(Some(d)))
        .map_err(|e| format!("{s:?} is neither a duration such as 30s nor `forever` ({e})"))
}

/// How long a command that finishes by itself keeps trying to reconnect.
const ONE_SHOT_GIVE_UP: Duration = Duration::from_secs(10);

impl ConnectArgs {
    /// Connects for a command that finishes by itself.
    pub async fn connect(&self, name: &str) -> anyhow::Result<Client> {
        let give_up = self.reconnect_for.unwrap_or(GiveUp(Some(ONE_SHOT_GIVE_UP)));
        self.reach.connect(self.nodes.clone(), give_up, name).await
    }

    /// Connects for a command that runs until stopped.
    pub async fn connect_long_lived(&self, name: &str) -> anyhow::Result<Client> {
        let give_up = self.reconnect_for.unwrap_or(GiveUp(None));
        self.reach.connect(self.nodes.clone(), give_up, name).await
    }
}

/// How a client reaches a node of its cluster, given its address or not.
#[derive(Args, Debug, Clone)]
pub struct ReachArgs {
    /// Only look for nodes on this network interface (repeatable). Without
    /// it, mDNS uses every interface.
    #[arg(long = "interface", value_name = "IFACE")]
    pub interfaces: Vec<String>,

    /// Cluster to look for over mDNS.
    #[arg(long, value_name = "NAME", env = "TREESCALE_CLUSTER", default_value = DEFAULT_CLUSTER)]
    pub cluster: String,

    /// How long to look for the node and connect to it.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "5s")]
    pub connect_timeout: Duration,

    #[command(flatten)]
    pub trust: TrustArgs,

    /// Show this token (from `treescale certs issue token`) instead of a
    /// certificate; the certs dir then needs only ca.crt. Prefer the
    /// environment variable: other users can read command lines.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "TREESCALE_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

impl ReachArgs {
    /// Connects to `node` (or the first node mDNS finds) without
    /// reconnecting: for benchmarks, where a lost connection is a failure.
    pub async fn connect_once(
        &self,
        node: Option<SocketAddr>,
        name: &str,
    ) -> anyhow::Result<Client> {
        let nodes = node.into_iter().collect();
        self.connect(nodes, GiveUp(Some(Duration::ZERO)), name)
            .await
    }

    /// Connects to the first of `nodes` that answers, or to the first node
    /// mDNS finds; says on stderr, a line each, when the connection is lost
    /// and when it is back.
    pub async fn connect(
        &self,
        nodes: Vec<SocketAddr>,
        give_up: GiveUp,
        name: &str,
    ) -> anyhow::Result<Client> {
        let options = ClientOptions {
            nodes,
            cluster: self.cluster.clone(),
            interfaces: self.interfaces.clone(),
            name: name.to_string(),
            connect_timeout: self.connect_timeout,
            trust: self.trust.config(),
            token: self.token.clone(),
            reconnect: Reconnect {
                give_up: give_up.0,
                ..Reconnect::default()
            },
            ..ClientOptions::default()
        };
        let client = Client::connect(options).await?;
        let mut events = client.connection_events();
        tokio::spawn(async move {
            while let Ok(event) = events.recv().await {
                match event {
                    ConnectionEvent::Disconnected { reason } => {
                        eprintln!("disconnected: {reason}; reconnecting")
                    }
                    ConnectionEvent::Reconnected { node, name, addr } => {
                        eprintln!("reconnected to node {name} ({}) at {addr}", node.short())
                    }
                    // The command says why it fails.
                    ConnectionEvent::Closed { .. } => return,
                }
            }
        });
        Ok(client)
    }
}

/// Accepts `IP:PORT` or `HOST:PORT`.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    s.to_socket_addrs()
        .map_err(|e| format!("{s:?} is not HOST:PORT ({e})"))?
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

/// Accepts a byte count with an optional unit: `4096`, `64KiB`, `512MiB`,
/// `4GiB` (KB, MB and GB are taken as the same powers of 1024).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    let number: usize = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as 512MiB"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use KiB, MiB or GiB")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Resolves on Ctrl-C or SIGTERM (`kill`), so that a command stopped either
/// way closes its connections cleanly. The handlers are installed by the
/// call, not by the first poll: call it before the command's work starts,
/// and poll it where the command waits.
pub fn stop_requested() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, Signal, SignalKind};
        async fn received(signal: Option<Signal>) {
            match signal {
                Some(mut signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        let interrupt = signal(SignalKind::interrupt()).ok();
        let terminate = signal(SignalKind::terminate()).ok();
        async move {
            tokio::select! {
                _ = received(interrupt) => {}
                _ = received(terminate) => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// An error with its causes, each said once: a cause whose text the
/// message already quotes (as many do, to name what to do next) is left
/// out.
pub fn describe(error: &anyhow::Error) -> String {
    let mut out = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

pub fn init_logging(cli: &Cli) {
    // Client commands keep stderr quiet unless asked; a node reports its life.
    let base = match (&cli.command, cli.log_verbosity) {
        (_, 2..) => "trace",
        (_, 1) => "debug",
        (Command::Node(_), 0) => "info",
        (_, 0) => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("warn,treescale={base}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Node(args) => node::run(args).await,
        Command::Publish(args) => client_commands::publish(args).await,
        Command::Subscribe(args) => client_commands::subscribe(args).await,
        Command::Request(args) => service::request(args).await,
        Command::Reply(args) => service::reply(args).await,
        Command::Status(args) => client_commands::status(args).await,
        Command::Tree(args) => tree::run(args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Certs(args) => certs::run(args),
        Command::Bench(args) => bench::run(args).await,
    }
}
