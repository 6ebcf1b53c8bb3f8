//! The shipped scenarios, and small ones made for a point, run end to end
//! in full-stack mode (real nodes on the simulated network) or protocol
//! mode. Each checks the figures the scenario exists to show.

use std::path::Path;

use netsim::report::{FaultReport, Report, SubscriberReport};
use netsim::scenario::Scenario;

fn shipped(name: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(format!("{name}.toml"));
    Scenario::load(&path).unwrap()
}

fn run(scenario: &Scenario) -> Report {
    let report = netsim::full::run(scenario, scenario.seed).unwrap();
    eprintln!("{}", report.table());
    report
}

/// Runs `scenario` in protocol mode twice and checks the reports are the
/// same, byte for byte.
fn run_protocol_twice(scenario: &Scenario) -> Report {
    let report = netsim::protocol::run(scenario, scenario.seed).unwrap();
    eprintln!("{}", report.table());
    let again = netsim::protocol::run(scenario, scenario.seed).unwrap();
    assert_eq!(
        serde_json::to_string(&report).unwrap(),
        serde_json::to_string(&again).unwrap(),
        "protocol mode does not replay"
    );
    report
}

fn faults<'a>(report: &'a Report, kind: &str) -> Vec<&'a FaultReport> {
    let found: Vec<_> = report.faults.iter().filter(|f| f.kind == kind).collect();
    assert!(!found.is_empty(), "no {kind} fault in the report");
    found
}

fn subscriber<'a>(report: &'a Report, name: &str) -> &'a SubscriberReport {
    report
        .subscribers
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no subscriber {name}"))
}

/// Every confirmed event delivered once, and some were confirmed.
fn assert_durable_complete(report: &Report, name: &str) {
    let s = subscriber(report, name);
    assert!(s.acked > 0, "{name}: nothing was confirmed");
    assert_eq!(s.acked, s.published, "{name}: unconfirmed publishes");
    assert_eq!((s.lost, s.duplicated), (0, 0), "{name}");
    assert_eq!(s.delivered, s.published, "{name}");
}

/// Every subscriber was published to, and got each event once.
fn assert_every_subscriber_got_everything_once(report: &Report) {
    for s in &report.subscribers {
        assert!(s.published > 0, "{s:?}");
        assert_eq!(
            (s.delivered, s.lost, s.duplicated),
            (s.published, 0, 0),
            "{s:?}"
        );
    }
}

fn assert_noticed_and_repaired(fault: &FaultReport, within_ms: u64) {
    let detected = fault
        .detected_ms
        .unwrap_or_else(|| panic!("{fault:?} not noticed"));
    let repaired = fault
        .repaired_ms
        .unwrap_or_else(|| panic!("{fault:?} not repaired"));
    assert!(detected <= repaired, "{fault:?}");
    assert!(
        repaired <= within_ms,
        "{fault:?} took longer than {within_ms} ms"
    );
}

#[test]
fn partition_heal_keeps_every_confirmed_event_and_merges_the_halves() {
    let report = run(&shipped("partition-heal"));
    assert!(report.invariants_ok, "{:?}", report.violations);
    let partition = faults(&report, "partition")[0];
    // Noticed within the idle timeout (1 s) and a little; both halves are
    // trees again within one more dial timeout (virtual time, so this is
    // the same on every machine).
    assert!(partition.detected_ms.unwrap() <= 1500, "{partition:?}");
    assert_noticed_and_repaired(partition, 3_000);
    assert!(partition.held_peak > 0, "nothing waited at the boundary");
    // 15 s cut off at 100 events/s: all of them wait for the heal.
    let held = subscriber(&report, "durable audit").held_peak;
    assert!(held >= 1400, "only {held} events waited for the heal");
    assert_noticed_and_repaired(faults(&report, "heal")[0], 5_000);
    assert_durable_complete(&report, "durable audit");
    assert_eq!(report.final_tree.roots, 1);
}

#[test]
fn crash_restart_of_the_root_and_of_the_durable_home_loses_nothing_confirmed() {
    let report = run(&shipped("crash-restart"));
    assert!(report.invariants_ok, "{:?}", report.violations);
    for crash in faults(&report, "crash") {
        assert_noticed_and_repaired(crash, 5_000);
    }
    for restart in faults(&report, "restart") {
        assert_noticed_and_repaired(restart, 5_000);
    }
    assert_durable_complete(&report, "durable audit");
}

/// Clients holding two nodes each: the publishers' node crashes (and the
/// node a publisher moved to), a durable home crashes with its
/// subscriber's node; confirmed events all arrive, once.
#[test]
fn clients_that_move_between_their_two_nodes_lose_and_duplicate_nothing() {
    let report = run_protocol_twice(&shipped("clients-move"));
    assert!(report.invariants_ok, "{:?}", report.violations);
    assert_eq!(faults(&report, "crash").len(), 3);
    for crash in faults(&report, "crash") {
        assert_noticed_and_repaired(crash, 5_000);
    }
    for name in ["durable audit-0", "durable audit-1", "durable audit-2"] {
        assert_durable_complete(&report, name);
    }
    // Its home was down for 7 s at 200 events/s: they waited for it.
    let held = subscriber(&report, "durable audit-0").held_peak;
    assert!(held >= 1000, "only {held} events waited for the home");
}

#[test]
fn a_lossy_link_delays_but_loses_nothing() {
    let report = run(&shipped("lossy-link"));
    assert!(report.invariants_ok, "{:?}", report.violations);
    // 25 s of 10% loss on every link of the publishers' node.
    assert!(
        report.datagrams_dropped > 100,
        "{}",
        report.datagrams_dropped
    );
    assert_eq!(report.final_tree.roots, 1);
    assert_durable_complete(&report, "durable audit");
    for s in &report.subscribers {
        assert!(s.published > 0);
        assert_eq!((s.lost, s.duplicated), (0, 0), "{s:?}");
    }
}

#[test]
fn a_flapping_link_is_noticed_and_repaired_every_time() {
    let report = run(&shipped("flapping"));
    assert!(report.invariants_ok, "{:?}", report.violations);
    let downs = faults(&report, "flap-down");
    assert_eq!(downs.len(), 5);
    for fault in downs.into_iter().chain(faults(&report, "flap-up")) {
        assert_noticed_and_repaired(fault, 3_000);
    }
    assert_noticed_and_repaired(faults(&report, "one-way")[0], 4_000);
    assert_durable_complete(&report, "durable audit");
}

#[test]
fn a_three_way_split_forms_three_trees_then_one() {
    let report = run(&shipped("three-way-split"));
    assert!(report.invariants_ok, "{:?}", report.violations);
    assert_noticed_and_repaired(faults(&report, "partition")[0], 3_000);
    assert_noticed_and_repaired(faults(&report, "heal")[0], 5_000);
    assert_durable_complete(&report, "durable audit");
    assert_durable_complete(&report, "durable shipping");
}

#[test]
fn segments_that_meet_only_through_a_backbone_become_one_tree() {
    let scenario = shipped("segments");
    for seed in 1..=20 {
        let report = netsim::full::run(&scenario, seed).unwrap();
        let table = report.table();
        assert!(report.invariants_ok, "seed {seed}:\n{table}");
        let formed = report.formed_ms.unwrap_or(u64::MAX);
        assert!(
            formed <= 3_000,
            "seed {seed}: one tree only after {formed} ms\n{table}"
        );
        assert_eq!(report.final_tree.roots, 1, "seed {seed}:\n{table}");
        // The centre segment crashes, the root with it for some seeds: west
        // and east become one tree again through their backbone nodes.
        for crash in faults(&report, "crash") {
            if crash.detected_ms.is_some() {
                assert_noticed_and_repaired(crash, 5_000);
            }
        }
        // Published in the west segment, subscribed to in the east.
        let s = subscriber(&report, "orders.> #0");
        assert!(s.published > 0, "seed {seed}:\n{table}");
        assert_eq!(s.delivered, s.published, "seed {seed}:\n{table}");
    }
}

const SMALL: &str = r#"
name = "small"
duration = "14s"
[tree]
max_children = 1
[[segment]]
name = "lan"
nodes = ["a", "b", "c"]
[[publisher]]
node = "a"
topic = "t.x"
rate = 50
qos = "at-least-once"
from = "2s"
[[subscriber]]
node = "c"
pattern = "t.>"
durable = "d"
[[fault]]
at = "5s"
kind = "crash"
node = "b"
[[fault]]
at = "8s"
kind = "restart"
node = "b"
"#;

#[test]
fn the_same_seed_gives_the_same_report() {
    let scenario = Scenario::parse(SMALL).unwrap();
    let first = serde_json::to_string(&netsim::full::run(&scenario, 7).unwrap()).unwrap();
    let second = serde_json::to_string(&netsim::full::run(&scenario, 7).unwrap()).unwrap();
    assert_eq!(first, second);
}

#[test]
fn a_durable_home_that_never_returns_is_reported_as_loss() {
    // The subscriber's node crashes for good: what was confirmed for it
    // cannot be delivered, and the run must say so.
    let text = SMALL.replace(
        "at = \"8s\"\nkind = \"restart\"\nnode = \"b\"",
        "at = \"9s\"\nkind = \"crash\"\nnode = \"c\"",
    );
    let report = run(&Scenario::parse(&text).unwrap());
    assert!(!report.invariants_ok);
    let lost = report
        .violations
        .iter()
        .find(|v| v.invariant == "acknowledged-event-lost")
        .expect("a lost acknowledged event is named");
    assert!(lost
        .event
        .as_deref()
        .is_some_and(|e| e.starts_with("publisher-0/")));
    assert!(subscriber(&report, "durable d").lost > 0);
}

#[test]
fn churn_among_two_thousand_cores_is_repaired_every_round() {
    let mut text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/churn-at-scale.toml"),
    )
    .unwrap();
    for (from, to) in [
        ("count = 10000", "count = 2000"),
        ("rounds = 8", "rounds = 3"),
        ("duration = \"70s\"", "duration = \"40s\""),
        ("\"n-4242\"", "\"n-424\""),
        ("\"n-9001\"", "\"n-1901\""),
    ] {
        assert!(
            text.contains(from),
            "churn-at-scale.toml no longer has {from}"
        );
        text = text.replace(from, to);
    }
    let report = run_protocol_twice(&Scenario::parse(&text).unwrap());
    assert!(report.invariants_ok, "{:?}", report.violations);
    let rounds = faults(&report, "churn");
    assert_eq!(rounds.len(), 4);
    for round in rounds {
        assert_noticed_and_repaired(round, 4_000);
    }
    assert_eq!(report.final_tree.roots, 1);
    for s in &report.subscribers {
        assert!(s.delivered > 0 && s.duplicated == 0, "{s:?}");
    }
}

#[test]
fn durable_subscribers_among_a_thousand_cores_lose_and_duplicate_nothing_confirmed() {
    let report = run_protocol_twice(&shipped("durable-at-scale"));
    assert!(report.invariants_ok, "{:?}", report.violations);
    assert_eq!(report.nodes, 1000);
    assert_eq!(faults(&report, "churn").len(), 4);
    for fault in faults(&report, "churn")
        .into_iter()
        .chain(faults(&report, "partition"))
    {
        assert!(fault.detected_ms.is_some(), "{fault:?} not noticed");
    }
    let durables: Vec<&SubscriberReport> = report
        .subscribers
        .iter()
        .filter(|s| s.kind == "durable")
        .collect();
    assert_eq!(durables.len(), 20);
    for durable in durables {
        assert_durable_complete(&report, &durable.name);
    }
}

#[test]
fn planned_moves_under_load_lose_and_duplicate_nothing() {
    let report = run_protocol_twice(&shipped("moves-under-load"));
    assert!(report.invariants_ok, "{:?}", report.violations);
    let moves = report
        .final_tree
        .direct_moves
        .expect("protocol mode counts");
    assert!(
        moves >= 100,
        "only {moves} planned moves: the scenario tests little"
    );
    assert_every_subscriber_got_everything_once(&report);
}

#[test]
fn after_half_of_the_nodes_crash_replays_fill_every_surviving_subscriber_s_gap() {
    // The shipped scenario at a tenth of its size, to fit in CI: 1,000
    // nodes, and the subscribers among them.
    let mut scenario = shipped("mass-crash");
    scenario.segments[0].count = 1000;
    let index = |node: &str| node["n-".len()..].parse::<usize>().unwrap();
    scenario.subscribers.retain(|s| index(&s.node) < 1000);
    assert!(
        scenario.subscribers.len() >= 5,
        "{:?}",
        scenario.subscribers
    );
    let report = run_protocol_twice(&scenario);
    assert!(report.invariants_ok, "{:?}", report.violations);
    assert_noticed_and_repaired(faults(&report, "mass-crash")[0], 1500);
    let replayed = report
        .final_tree
        .events_replayed
        .expect("protocol mode counts");
    assert!(
        replayed > 0,
        "nothing was replayed: the crash cut no one off"
    );
    assert_every_subscriber_got_everything_once(&report);
}

#[test]
fn a_mass_start_does_not_funnel_through_the_root_and_settles_shallow() {
    let report = run_protocol_twice(&shipped("mass-start"));
    assert!(report.invariants_ok, "{:?}", report.violations);
    let tree = &report.final_tree;
    assert_eq!(tree.roots, 1);
    let peak = tree.root_peak_links.expect("protocol mode counts links");
    // k = 8 children, and a few joiners, climbers or probes at once.
    assert!(peak <= 8 + 6, "the root held {peak} connections at once");
    // ⌈log_8 1000⌉ = 4.
    assert!(tree.max_depth <= 4 + 2, "{tree:?}");
    assert_every_subscriber_got_everything_once(&report);
}
