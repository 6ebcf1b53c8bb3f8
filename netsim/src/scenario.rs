//! Scenarios are data: a TOML file names the nodes and their LAN segments,
//! the workload, and a timeline of faults. `load` checks every name and
//! number, so a typo is an error that says where, not a silent no-op.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Virtual time the scenario runs for.
    #[serde(deserialize_with = "duration")]
    pub duration: Duration,
    /// Used when `--seed` is not given.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `protocol` scenarios only run with `--protocol` (the overlay core
    /// alone, for scale).
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub network: Network,
    #[serde(default)]
    pub tree: Tree,
    #[serde(rename = "segment")]
    pub segments: Vec<Segment>,
    #[serde(default, rename = "publisher")]
    pub publishers: Vec<Publisher>,
    #[serde(default, rename = "subscriber")]
    pub subscribers: Vec<Subscriber>,
    #[serde(default, rename = "fault")]
    pub faults: Vec<Fault>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Real nodes (QUIC, TLS, stores) on a simulated network.
    #[default]
    Full,
    /// Only the sans-IO overlay core.
    Protocol,
}

/// Conditions of every link unless a fault changes one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    #[serde(default = "default_latency", deserialize_with = "duration")]
    pub latency: Duration,
    #[serde(default, deserialize_with = "duration")]
    pub jitter: Duration,
}

impl Default for Network {
    fn default() -> Self {
        Network {
            latency: default_latency(),
            jitter: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tree {
    /// Children a node accepts (the tree's degree bound).
    #[serde(default = "default_max_children")]
    pub max_children: usize,
}

impl Default for Tree {
    fn default() -> Self {
        Tree {
            max_children: default_max_children(),
        }
    }
}

/// Nodes that see each other's announcements, as on one LAN.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    pub name: String,
    /// Named nodes; a node may be on several segments.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Or this many nodes named `<segment>-<i>`.
    #[serde(default)]
    pub count: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Qos {
    #[default]
    AtMostOnce,
    AtLeastOnce,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publisher {
    /// The node its client connects to.
    pub node: String,
    /// A second node its client holds (protocol mode): while its node is
    /// down it publishes there, first sending again what its node had not
    /// released, as the client library does.
    #[serde(default)]
    pub fallback: Option<String>,
    pub topic: String,
    /// Events per second.
    pub rate: u32,
    /// Payload bytes (at least 16, for the event's number).
    #[serde(default = "default_size")]
    pub size: usize,
    #[serde(default)]
    pub qos: Qos,
    #[serde(default, deserialize_with = "duration")]
    pub from: Duration,
    /// Defaults to the end of the scenario.
    #[serde(default, deserialize_with = "optional_duration")]
    pub until: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscriber {
    pub node: String,
    /// A second node its client holds (protocol mode): while its node is
    /// down it subscribes there (a durable one attaches there, away from
    /// its home).
    #[serde(default)]
    pub fallback: Option<String>,
    pub pattern: String,
    /// A queue group: each event goes to one member. Members are the
    /// subscribers with the same group name, reported together.
    #[serde(default)]
    pub group: Option<String>,
    /// A durable subscription of this name: receives at-least-once events
    /// and must lose none of them.
    #[serde(default)]
    pub durable: Option<String>,
}

impl Subscriber {
    /// The report row this subscriber (number `index`) belongs to:
    /// queue-group members share one, since together they should get each
    /// event once.
    pub fn row(&self, index: usize) -> String {
        match (&self.group, &self.durable) {
            (Some(group), _) => format!("group {group}"),
            (_, Some(durable)) => format!("durable {durable}"),
            _ => format!("{} #{index}", self.pattern),
        }
    }

    /// Its lane in the SVG timeline: what it is, and where.
    pub fn lane(&self, index: usize) -> String {
        match self.kind() {
            // The row names groups and durables already.
            "plain" => format!("{} (plain) on {}", self.row(index), self.node),
            _ => format!("{} on {}", self.row(index), self.node),
        }
    }

    pub fn kind(&self) -> &'static str {
        match (&self.group, &self.durable) {
            (Some(_), _) => "group",
            (_, Some(_)) => "durable",
            _ => "plain",
        }
    }
}

// No `deny_unknown_fields` here: serde does not allow it with `flatten`;
// `FaultKind` denies them instead.
#[derive(Debug, Clone, Deserialize)]
pub struct Fault {
    #[serde(deserialize_with = "duration")]
    pub at: Duration,
    #[serde(flatten)]
    pub kind: FaultKind,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum FaultKind {
    /// Cuts every link between nodes of different sets; a node in no set
    /// stays with the first.
    Partition { sets: Vec<Vec<String>> },
    /// Drops what `from` sends to `to`; the other direction still works.
    OneWay { from: Vec<String>, to: Vec<String> },
    /// Ends every partition and one-way cut.
    Heal,
    /// Stops a node at once (no goodbye); its data dir is kept.
    Crash { node: String },
    /// Starts a crashed node again on its data dir.
    Restart { node: String },
    /// Drops this share of datagrams between two nodes, both ways; `"*"`
    /// as the second name means every other node.
    Loss { between: [String; 2], percent: f64 },
    /// Sets the latency and jitter between two nodes (or, with `"*"`, one
    /// node and every other).
    Latency {
        between: [String; 2],
        #[serde(deserialize_with = "duration")]
        latency: Duration,
        #[serde(default, deserialize_with = "duration")]
        jitter: Duration,
    },
    /// Cuts the link between two sets, then heals it, `times` times, each
    /// state lasting `period`.
    Flap {
        between: [Vec<String>; 2],
        #[serde(deserialize_with = "duration")]
        period: Duration,
        times: u32,
    },
    /// Crashes `percent` of the nodes at once (chosen by the seed), for
    /// good. Nodes that publishers and subscribers use are spared: the
    /// report shows what the others' failure cost them.
    MassCrash { percent: f64 },
    /// Every `every`, crashes `percent` of the running nodes (chosen by
    /// the seed) and restarts those crashed the round before, `rounds`
    /// times.
    Churn {
        percent: f64,
        #[serde(deserialize_with = "duration")]
        every: Duration,
        rounds: u32,
    },
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read scenario {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("scenario {}: {e}", path.display()))
    }

    /// Parses and checks a scenario given as TOML text.
    pub fn parse(text: &str) -> anyhow::Result<Scenario> {
        let scenario: Scenario =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("not a valid scenario: {e}"))?;
        scenario.check()?;
        Ok(scenario)
    }

    /// The subscribers' report rows (see [`Subscriber::row`]) and the
    /// subscriber numbers in each.
    pub fn subscriber_rows(&self) -> BTreeMap<String, Vec<usize>> {
        let mut rows: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, s) in self.subscribers.iter().enumerate() {
            rows.entry(s.row(i)).or_default().push(i);
        }
        rows
    }

    /// The nodes of these subscribers, as the report shows them: `d,b`.
    pub fn nodes_of(&self, members: &[usize]) -> String {
        let nodes: Vec<&str> = members
            .iter()
            .map(|&m| self.subscribers[m].node.as_str())
            .collect();
        nodes.join(",")
    }

    /// The nodes publishers' and subscribers' clients use, fallbacks too.
    pub fn client_nodes(&self) -> Vec<&String> {
        let publishers = self.publishers.iter().map(|p| (&p.node, &p.fallback));
        let subscribers = self.subscribers.iter().map(|s| (&s.node, &s.fallback));
        publishers
            .chain(subscribers)
            .flat_map(|(node, fallback)| std::iter::once(node).chain(fallback))
            .collect()
    }

    /// Every node, in the order they are first named.
    pub fn nodes(&self) -> Vec<String> {
        let mut seen = BTreeSet::new();
        let mut nodes = Vec::new();
        for segment in &self.segments {
            for name in segment.members() {
                if seen.insert(name.clone()) {
                    nodes.push(name);
                }
            }
        }
        nodes
    }

    fn check(&self) -> anyhow::Result<()> {
        use anyhow::bail;
        let nodes: BTreeSet<String> = self.nodes().into_iter().collect();
        if nodes.is_empty() {
            bail!("no nodes: add a [[segment]] with `nodes = [...]` or `count = N`");
        }
        let known = |name: &String, what: &str| -> anyhow::Result<()> {
            if !nodes.contains(name) {
                bail!("{what} names node {name:?}, which no [[segment]] has");
            }
            Ok(())
        };
        if self.tree.max_children == 0 {
            bail!("tree.max_children must be at least 1");
        }
        let fallback = |node: &String, fallback: &Option<String>, what: &str| {
            let Some(fallback) = fallback else {
                return Ok(());
            };
            known(fallback, what)?;
            if fallback == node {
                bail!("{what} on {node}: its fallback must be another node");
            }
            if self.mode != Mode::Protocol {
                bail!("{what} on {node}: fallback nodes are modelled in protocol mode only (mode = \"protocol\")");
            }
            Ok(())
        };
        for p in &self.publishers {
            known(&p.node, "a [[publisher]]")?;
            fallback(&p.node, &p.fallback, "a [[publisher]]")?;
            if !(1..=MAX_RATE).contains(&p.rate) {
                bail!(
                    "publisher on {}: rate must be 1 to {MAX_RATE} events/s",
                    p.node
                );
            }
            if p.size < 16 {
                bail!("publisher on {}: size must be at least 16 bytes", p.node);
            }
            treescale::topic::Topic::new(&p.topic)
                .map_err(|e| anyhow::anyhow!("publisher on {}: {e}", p.node))?;
        }
        for s in &self.subscribers {
            known(&s.node, "a [[subscriber]]")?;
            fallback(&s.node, &s.fallback, "a [[subscriber]]")?;
            if s.group.is_some() && s.durable.is_some() {
                bail!(
                    "subscriber on {}: choose group or durable, not both",
                    s.node
                );
            }
            treescale::topic::Pattern::new(&s.pattern)
                .map_err(|e| anyhow::anyhow!("subscriber on {}: {e}", s.node))?;
        }
        for fault in &self.faults {
            let what = format!("the fault at {:?}", fault.at);
            if fault.at > self.duration {
                bail!("{what} is after the end of the scenario");
            }
            match &fault.kind {
                FaultKind::Partition { sets } => {
                    if sets.len() < 2 {
                        bail!("{what}: a partition needs at least two sets");
                    }
                    sets.iter().flatten().try_for_each(|n| known(n, &what))?;
                    let mut seen = BTreeSet::new();
                    if let Some(twice) = sets.iter().flatten().find(|n| !seen.insert(*n)) {
                        bail!("{what}: node {twice:?} is in two sets");
                    }
                }
                FaultKind::OneWay { from, to } => {
                    from.iter().chain(to).try_for_each(|n| known(n, &what))?
                }
                FaultKind::Crash { node } | FaultKind::Restart { node } => known(node, &what)?,
                FaultKind::Loss { between, percent } => {
                    known(&between[0], &what)?;
                    if between[1] != "*" {
                        known(&between[1], &what)?;
                    }
                    if !(0.0..=100.0).contains(percent) {
                        bail!("{what}: percent must be between 0 and 100");
                    }
                }
                FaultKind::Latency { between, .. } => {
                    known(&between[0], &what)?;
                    if between[1] != "*" {
                        known(&between[1], &what)?;
                    }
                }
                FaultKind::Flap { between, times, .. } => {
                    between.iter().flatten().try_for_each(|n| known(n, &what))?;
                    if *times == 0 {
                        bail!("{what}: times must be at least 1");
                    }
                }
                FaultKind::Churn { percent, .. } | FaultKind::MassCrash { percent } => {
                    if !(0.0..=100.0).contains(percent) {
                        bail!("{what}: percent must be between 0 and 100");
                    }
                }
                FaultKind::Heal => {}
            }
        }
        Ok(())
    }
}

impl Segment {
    pub fn members(&self) -> Vec<String> {
        let counted = (0..self.count).map(|i| format!("{}-{i}", self.name));
        self.nodes.iter().cloned().chain(counted).collect()
    }
}

/// Events per second one publisher may send: far above what a simulated
/// run can carry, and low enough that its interval is never zero.
const MAX_RATE: u32 = 100_000;

fn default_seed() -> u64 {
    1
}

fn default_latency() -> Duration {
    Duration::from_millis(1)
}

fn default_max_children() -> usize {
    treescale::overlay::OverlayConfig::default().max_children
}

fn default_size() -> usize {
    128
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "{text:?} is not a duration like \"250ms\" or \"10s\": {e}"
        ))
    })
}

fn optional_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    duration(deserializer).map(Some)
}
