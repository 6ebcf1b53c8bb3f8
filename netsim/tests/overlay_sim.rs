//! The overlay core at scale, on the deterministic simulator. Each test
//! prints its seed; rerun a failure with `SIM_SEED=<seed>`.

use std::collections::BTreeMap;
use std::time::Duration;

use netsim::protocol::sim::{seed, Sim};

/// Longer than the quiet spell rebalancing waits for (5 s), so a settled
/// tree has finished rebalancing too.
const QUIET: Duration = Duration::from_secs(6);
/// Virtual time a tree may take to become whole and stop rebalancing. At
/// 10,000 nodes a cascade of rebalancing moves (one per 5 s quiet spell,
/// each freeing a slot the next fills) outlasted 120 s for
/// SIM_SEED=11380627160760569392 while the tree was whole after 30 ms; it
/// settles well within this. Virtual time costs little wall time here.
const LIMIT: Duration = Duration::from_secs(600);

fn formed(n: usize, k: usize) -> (Sim, u64) {
    let seed = seed();
    eprintln!("n={n} k={k} SIM_SEED={seed}");
    let mut sim = Sim::new(n, k, seed);
    sim.discover(32);
    (sim, seed)
}

/// ⌈log_k(n)⌉: the smallest d with k^d ≥ n.
fn log_k_ceil(n: usize, k: usize) -> u32 {
    let mut depth = 0;
    let mut reach = 1usize;
    while reach < n {
        reach *= k;
        depth += 1;
    }
    depth
}

/// Longer than a node waits before asking again to climb at the same
/// depth (60 s): no node has a climb left.
const SETTLED: Duration = Duration::from_secs(70);

/// All nodes start at once; once settled (joins, pulls and climbs done)
/// the tree is at most ⌈log_k(n)⌉ + 2 deep.
fn converges(n: usize, k: usize) {
    let (mut sim, _) = formed(n, k);
    let took = sim.settle(SETTLED, LIMIT);
    sim.assert_settled_trees();
    let depth = sim.max_depth();
    eprintln!(
        "converged in {took:?} (virtual), settled after {:?}, {:.1} control messages per node, max depth {depth} (⌈log_k n⌉ {}), nodes by depth {:?}",
        sim.elapsed(),
        sim.messages as f64 / n as f64,
        log_k_ceil(n, k),
        sim.depth_histogram()
    );
    assert!(
        depth <= log_k_ceil(n, k) + 2,
        "depth {depth} deeper than ⌈log_k n⌉ + 2"
    );
    // First joins spread over sampled nodes: the root sees its children
    // and a few joiners (each of the 32 smallest nodes picks it with odds
    // 1/(its rank - 1): H(32) ≈ 4 of them on average), not all of them.
    let root = sim.roots()[0];
    let peak = sim.peak_links[root];
    eprintln!("the root held at most {peak} connections at once");
    assert!(peak <= k + 8, "the root held {peak} connections at once");
}

#[test]
fn a_thousand_nodes_converge_to_one_shallow_tree() {
    converges(1000, 8);
}

#[test]
fn ten_thousand_nodes_converge_to_one_shallow_tree() {
    converges(10_000, 8);
}

#[test]
fn a_thousand_nodes_with_four_children_each_stay_shallow() {
    converges(1000, 4);
}

#[test]
fn ten_thousand_nodes_with_four_children_each_stay_shallow() {
    converges(10_000, 4);
}

#[test]
fn a_narrow_tree_stays_shallow() {
    converges(1000, 2);
}

#[test]
#[ignore = "minutes in a debug build; run with --release -- --ignored (docs/overlay.md)"]
fn a_narrow_tree_of_ten_thousand_stays_shallow() {
    converges(10_000, 2);
}

fn crash_fraction(fraction: f64) {
    let (mut sim, seed) = formed(1000, 4);
    sim.settle(QUIET, LIMIT);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed ^ 1);
    let victims: Vec<usize> = sim
        .live()
        .filter(|_| rand::Rng::random_bool(&mut rng, fraction))
        .collect();
    for i in &victims {
        sim.crash(*i);
    }
    let repaired = sim.settle(QUIET, LIMIT);
    sim.assert_settled_trees();
    eprintln!(
        "crashed {} nodes; tree repaired {repaired:?} after the crash",
        victims.len()
    );
}

#[test]
fn the_tree_repairs_after_a_tenth_of_the_nodes_crash() {
    crash_fraction(0.1);
}

#[test]
fn the_tree_repairs_after_half_of_the_nodes_crash() {
    crash_fraction(0.5);
}

#[test]
fn an_inner_node_crash_is_repaired_within_two_seconds() {
    let (mut sim, _) = formed(200, 3);
    sim.settle(QUIET, LIMIT);
    let root = sim.roots()[0];
    let inner = sim
        .live()
        .find(|i| *i != root && sim.nodes[*i].as_ref().unwrap().children().count() > 0)
        .expect("an inner node");
    sim.crash(inner);
    let repaired = sim.settle(QUIET, LIMIT);
    sim.assert_settled_trees();
    eprintln!("inner node crash repaired {repaired:?} after it (idle timeout 1s)");
    assert!(
        repaired <= Duration::from_secs(2),
        "repair took {repaired:?}"
    );
}

fn split_and_heal(parts: u32) {
    let (mut sim, _) = formed(1000, 8);
    sim.settle(QUIET, LIMIT);
    sim.partition(|i| (i as u32) % parts);
    sim.settle(QUIET, LIMIT);
    sim.assert_settled_trees();
    assert_eq!(sim.roots().len(), parts as usize, "one tree per side");
    sim.heal();
    let merged = sim.settle(QUIET, LIMIT);
    sim.assert_settled_trees();
    assert_eq!(sim.roots().len(), 1);
    eprintln!("{parts} sides merged {merged:?} after the heal");
}

#[test]
fn two_sides_of_a_partition_merge_after_the_heal() {
    split_and_heal(2);
}

#[test]
fn three_sides_of_a_partition_merge_after_the_heal() {
    split_and_heal(3);
}

#[test]
fn every_subscriber_receives_each_event_exactly_once() {
    let (mut sim, seed) = formed(1000, 8);
    sim.settle(QUIET, LIMIT);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed ^ 2);
    let subscribers: Vec<usize> = (0..50)
        .map(|_| rand::Rng::random_range(&mut rng, 0..1000))
        .collect();
    for (n, i) in subscribers.iter().enumerate() {
        sim.subscribe(*i, "orders.>", None, n as u64);
    }
    sim.run_for(Duration::from_secs(1));
    for origin in [0, 17, 999] {
        let got = sim.publish(origin, "orders.eu.paris");
        let expected: BTreeMap<(usize, u64), usize> = subscribers
            .iter()
            .enumerate()
            .map(|(n, i)| ((*i, n as u64), 1))
            .collect();
        assert_eq!(got, expected, "published on {origin}");
    }
    assert!(sim.publish(5, "invoices.eu").is_empty());
}

#[test]
fn a_broadcast_to_everyone_costs_n_minus_one_transmissions() {
    let (mut sim, _) = formed(1000, 8);
    sim.settle(QUIET, LIMIT);
    for i in 0..1000 {
        sim.subscribe(i, "all", None, 1);
    }
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.transmissions(123, "all"), 999);
}

#[test]
fn queue_group_members_share_evenly() {
    let (mut sim, seed) = formed(500, 4);
    sim.settle(QUIET, LIMIT);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed ^ 3);
    let mut members: Vec<usize> = (0..10)
        .map(|_| rand::Rng::random_range(&mut rng, 0..500))
        .collect();
    members.sort();
    members.dedup();
    for (n, i) in members.iter().enumerate() {
        sim.subscribe(*i, "jobs.*", Some("workers"), n as u64);
    }
    sim.run_for(Duration::from_secs(1));
    let mut shares: BTreeMap<(usize, u64), usize> = BTreeMap::new();
    let events = 10_000;
    for e in 0..events {
        let got = sim.publish(e % 500, "jobs.resize");
        assert_eq!(
            got.values().sum::<usize>(),
            1,
            "exactly one member per event"
        );
        *shares.entry(*got.keys().next().unwrap()).or_default() += 1;
    }
    let fair = events as f64 / members.len() as f64;
    for (member, share) in &shares {
        let off = (*share as f64 - fair).abs() / fair;
        assert!(
            off <= 0.05,
            "member {member:?} got {share}, fair share {fair:.0}"
        );
    }
    assert_eq!(shares.len(), members.len(), "every member got work");
}

#[test]
fn directed_events_follow_the_tree_path_to_their_node() {
    let (mut sim, seed) = formed(1000, 8);
    sim.settle(QUIET, LIMIT);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed ^ 4);
    let depth = sim.max_depth() as usize;
    for _ in 0..500 {
        let origin = rand::Rng::random_range(&mut rng, 0..1000);
        let target = rand::Rng::random_range(&mut rng, 0..1000);
        let hops = sim.send_directed(origin, target).expect("delivered");
        assert!(hops <= 2 * depth, "{hops} hops in a tree of depth {depth}");
    }
}

#[test]
fn a_leaving_group_member_s_share_moves_to_the_others() {
    let (mut sim, _) = formed(300, 4);
    sim.settle(QUIET, LIMIT);
    let members = [10, 150, 290];
    for (n, i) in members.iter().enumerate() {
        sim.subscribe(*i, "tasks", Some("pool"), n as u64);
    }
    sim.run_for(Duration::from_secs(1));
    sim.unsubscribe(150, "tasks", Some("pool"), 1);
    // Let the change settle, then nothing sent after it may be lost.
    sim.run_for(Duration::from_secs(1));
    let mut shares: BTreeMap<(usize, u64), usize> = BTreeMap::new();
    for e in 0..3000 {
        let got = sim.publish(e % 300, "tasks");
        assert_eq!(
            got.values().sum::<usize>(),
            1,
            "event {e} reached one member"
        );
        *shares.entry(*got.keys().next().unwrap()).or_default() += 1;
    }
    assert_eq!(
        shares.keys().copied().collect::<Vec<_>>(),
        vec![(10, 0), (290, 2)]
    );
    for share in shares.values() {
        assert!((*share as f64 - 1500.0).abs() <= 75.0, "{shares:?}");
    }
}
