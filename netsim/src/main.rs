use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use netsim::scenario::{Mode, Scenario};

/// Partition and fault simulation of TreeScale nodes.
///
/// Runs a scenario (nodes, LAN segments, a workload and a fault timeline,
/// in TOML) on virtual time and reports how fast faults were noticed and
/// repaired, and whether any event was lost or duplicated. Exits with 1
/// when an invariant fails, 2 when the scenario cannot run.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one scenario and print its report.
    ///
    /// Example: netsim run netsim/scenarios/partition-heal.toml --svg heal.svg
    Run {
        /// The scenario file (see netsim/scenarios/ and docs/netsim.md).
        scenario: PathBuf,
        /// Seed of every random choice; the same seed gives the same
        /// report. Defaults to the scenario's `seed`.
        #[arg(long)]
        seed: Option<u64>,
        /// Also write the report as JSON to FILE.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Also draw the timeline as SVG to FILE.
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
        /// Drive only the sans-IO overlay core (no QUIC, no store): for
        /// thousands of nodes. Required for scenarios with mode = "protocol".
        #[arg(long)]
        protocol: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NETSIM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .with_timer(VirtualTime)
        .init();
    let Command::Run {
        scenario,
        seed,
        json,
        svg,
        protocol,
    } = Cli::parse().command;
    match run(&scenario, seed, json, svg, protocol) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Log lines carry the simulation's virtual time, not the wall clock.
struct VirtualTime;

impl tracing_subscriber::fmt::time::FormatTime for VirtualTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        match turmoil::sim_elapsed() {
            Some(t) => write!(w, "{:>9.3}s", t.as_secs_f64()),
            None => write!(w, "{:>10}", "-"),
        }
    }
}

fn run(
    path: &std::path::Path,
    seed: Option<u64>,
    json: Option<PathBuf>,
    svg: Option<PathBuf>,
    protocol: bool,
) -> anyhow::Result<bool> {
    let scenario = Scenario::load(path)?;
    if scenario.mode == Mode::Protocol && !protocol {
        anyhow::bail!(
            "scenario {} is for protocol mode (mode = \"protocol\"); run it with --protocol",
            scenario.name
        );
    }
    let seed = seed.unwrap_or(scenario.seed);
    let report = if protocol {
        netsim::protocol::run(&scenario, seed)?
    } else {
        netsim::full::run(&scenario, seed)?
    };
    print!("{}", report.table());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(&path, text + "\n")
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    if let Some(path) = svg {
        std::fs::write(&path, netsim::svg::render(&report))
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    Ok(report.invariants_ok)
}
