//! The `treescale` binary as a user runs it: the README's flow across three
//! node processes, `status --json`, and clear errors for CLI mistakes.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::processes::*;
use common::{cluster_for, TestCluster};

#[test]
fn the_readme_flow_carries_100_events_across_three_node_processes() {
    let cluster = cluster_for("cli-flow");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (_processes, addrs, _logs) = spawn_nodes(&cluster, 3, &[], &dirs);
    let sub = treescale(
        &cluster,
        &["sub", "--node", &addrs[2], "--count", "100", "orders.eu"],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let publisher = treescale(&cluster, &["pub", "--node", &addrs[0], "orders.eu"]);
    let lines: String = (1..=100).map(|i| format!("{i}\n")).collect();
    publish_and_expect(publisher, sub, &lines, Duration::from_secs(20));

    let statuses = one_tree(&cluster, &addrs);
    let json = &statuses[1];
    assert_eq!(json["id"].as_str().unwrap().len(), 64);
    assert!(json["name"].is_string());
    assert_eq!(json["addr"], addrs[1].as_str());
    let peers = json["peers"].as_array().unwrap();
    assert!(!peers.is_empty(), "{json}");
    for peer in peers {
        assert_eq!(peer["id"].as_str().unwrap().len(), 64);
        assert!(
            addrs.contains(&peer["addr"].as_str().unwrap().to_string()),
            "{peer}"
        );
    }
    assert!(json["subscriptions"].is_array());
}

/// A node at `addr` with no `--name`, its log discarded.
fn unnamed_node(cluster: &TestCluster, addr: &str, dir: &tempfile::TempDir) -> std::process::Child {
    treescale(cluster, &["node", "--listen", addr, "--interface", "lo"])
        .arg("--data-dir")
        .arg(dir.path())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until the nodes at `addrs` form one tree (one root, a parent for
/// every other node); returns their statuses.
fn one_tree(cluster: &TestCluster, addrs: &[String]) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let statuses: Vec<serde_json::Value> = addrs
            .iter()
            .filter_map(|a| status_json(cluster, a))
            .collect();
        let roots: Vec<&serde_json::Value> = statuses.iter().map(|s| &s["root"]).collect();
        let with_parent = statuses.iter().filter(|s| !s["parent"].is_null()).count();
        let whole = statuses.len() == addrs.len()
            && roots.windows(2).all(|w| w[0] == w[1])
            && with_parent == addrs.len() - 1;
        if whole {
            return statuses;
        }
        assert!(Instant::now() < deadline, "no single tree: {statuses:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a command that must fail with one clear `error:` line.
fn assert_fails_clearly(args: &[&str], expected: &str) {
    let output = treescale(&cluster_for("cli-errors"), args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{args:?} succeeded");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines.iter().any(|l| l.contains(expected)),
        "{args:?}: expected {expected:?} in:\n{stderr}"
    );
}

#[test]
fn cli_mistakes_print_one_clear_line_and_fail() {
    assert_fails_clearly(
        &["pub", "--node", "not-an-address", "t", "x"],
        "is not HOST:PORT",
    );
    assert_fails_clearly(
        &["pub", "--node", "127.0.0.1:9", "bad..topic", "x"],
        "cannot publish to",
    );
    assert_fails_clearly(
        &["sub", "--node", "127.0.0.1:9", "a.>.b"],
        "cannot subscribe to",
    );
    let unreachable = format!("127.0.0.1:{}", free_port());
    assert_fails_clearly(
        &["status", "--node", &unreachable, "--connect-timeout", "1s"],
        "cannot reach a node at",
    );
    assert_fails_clearly(
        &["sub", "--interface", "lo", "--connect-timeout", "1s", "x"],
        "no node of cluster",
    );
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    assert_fails_clearly(
        &[
            "node",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data_dir,
            "--interface",
            "nosuch0",
        ],
        "network interface \"nosuch0\" does not exist",
    );
    assert_fails_clearly(
        &[
            "node",
            "--data-dir",
            data_dir,
            "--keep-alive",
            "2s",
            "--idle-timeout",
            "1s",
        ],
        "must be shorter than --idle-timeout",
    );
    assert_fails_clearly(&["node", "--listen", "127.0.0.1:99999"], "is not HOST:PORT");
    assert_fails_clearly(
        &["node", "--data-dir", data_dir, "--store-size", "12parsecs"],
        "unknown unit",
    );
    assert_fails_clearly(
        &["pub", "--qos", "twice", "t", "x"],
        "invalid value 'twice'",
    );
    assert_fails_clearly(&["sub", "--max-events", "5", "t"], "--durable <NAME>");
    let corrupt = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(corrupt.path().join("store")).unwrap();
    std::fs::write(corrupt.path().join("store/data.mdb"), vec![0x5a; 64 * 1024]).unwrap();
    assert_fails_clearly(
        &[
            "node",
            "--listen",
            "127.0.0.1:0",
            "--no-mdns",
            "--data-dir",
            corrupt.path().to_str().unwrap(),
        ],
        "is corrupt or not a treescale store",
    );
    assert_fails_clearly(
        &["node", "--data-dir", data_dir, "--idle-timeout", "400days"],
        "longer than a day",
    );
    let empty = tempfile::tempdir().unwrap();
    let empty = empty.path().to_str().unwrap();
    assert_fails_clearly(
        &["status", "--certs", empty, "--node", "127.0.0.1:9"],
        "no cluster credentials in",
    );
    assert_fails_clearly(
        &[
            "certs", "--certs", empty, "issue", "client", "--name", "a b", "--out", empty,
        ],
        "user names are",
    );
    assert_fails_clearly(
        &["certs", "--certs", empty, "show"],
        "no cluster credentials in",
    );
}

/// The cluster's admin issues a client certificate for alice and grants her
/// orders only; what she may not do fails with a clear line, and the node
/// logs the denials it sees.
#[test]
fn certificates_and_permissions_from_the_command_line() {
    let cluster = cluster_for("cli-permissions");
    let alice = tempfile::tempdir().unwrap();
    let alice_certs = alice.path().join("certs");
    let alice_certs = alice_certs.to_str().unwrap();
    let issued = treescale(
        &cluster,
        &[
            "certs",
            "issue",
            "client",
            "--name",
            "alice",
            "--out",
            alice_certs,
        ],
    )
    .output()
    .unwrap();
    assert!(issued.status.success(), "{issued:?}");
    assert!(String::from_utf8_lossy(&issued.stdout).contains("issued client \"alice\""));
    std::fs::write(
        cluster.certs().join("permissions.toml"),
        "[users.admin]\npublish = [\">\"]\nsubscribe = [\">\"]\n\n\
         [users.alice]\npublish = [\"orders.>\"]\nsubscribe = [\"orders.*\"]\n",
    )
    .unwrap();
    let dirs: Vec<_> = (0..1).map(|_| tempfile::tempdir().unwrap()).collect();
    let (_processes, addrs, logs) = spawn_nodes(&cluster, 1, &[], &dirs);
    let as_alice = |args: &[&str]| {
        let mut command = treescale(&cluster, args);
        command.env("TREESCALE_CERTS", alice_certs);
        command
    };
    let node = addrs[0].as_str();
    let mut status = None;
    for _ in 0..50 {
        let output = as_alice(&["status", "--node", node, "--json"])
            .output()
            .unwrap();
        if output.status.success() {
            status = Some(output);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(status.is_some(), "alice never reached the node");

    let denied_pub = as_alice(&["pub", "--node", node, "billing.eu", "x"])
        .output()
        .unwrap();
    assert!(!denied_pub.status.success());
    let stderr = String::from_utf8_lossy(&denied_pub.stderr);
    assert!(
        stderr.contains(
            "permission denied: user \"alice\" may not publish to billing.eu (allowed: orders.>)"
        ),
        "{stderr}"
    );
    let denied_sub = as_alice(&["sub", "--node", node, "orders.>"])
        .output()
        .unwrap();
    assert!(!denied_sub.status.success());
    let stderr = String::from_utf8_lossy(&denied_sub.stderr);
    assert!(stderr.contains("may not subscribe to orders.>"), "{stderr}");
    let log = logs[0].contents();
    assert!(
        log.contains("permission denied: user \"alice\" may not subscribe to orders.>"),
        "{log}"
    );

    // What she may do works, to an admin's subscriber.
    let sub = treescale(
        &cluster,
        &["sub", "--node", node, "--count", "3", "orders.*"],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let publisher = as_alice(&["pub", "--node", node, "orders.eu"]);
    publish_and_expect(publisher, sub, "1\n2\n3\n", Duration::from_secs(20));

    // A read-only token for alice: she may look, not subscribe.
    let token = treescale(
        &cluster,
        &["certs", "issue", "token", "--name", "alice", "--read-only"],
    )
    .output()
    .unwrap();
    assert!(token.status.success(), "{token:?}");
    let token = String::from_utf8(token.stdout).unwrap();
    let as_viewer = |args: &[&str]| {
        let mut command = treescale(&cluster, args);
        command.env("TREESCALE_TOKEN", token.trim());
        command.env("TREESCALE_CERTS", alice_certs);
        command
    };
    let looked = as_viewer(&["status", "--node", node]).output().unwrap();
    assert!(looked.status.success(), "{looked:?}");
    let denied_sub = as_viewer(&["sub", "--node", node, "orders.eu"])
        .output()
        .unwrap();
    assert!(!denied_sub.status.success());
    let stderr = String::from_utf8_lossy(&denied_sub.stderr);
    assert!(
        stderr.contains("may not subscribe to orders.eu"),
        "{stderr}"
    );

    // A node on a machine without the CA key, issued offline.
    let offline = tempfile::tempdir().unwrap();
    let offline_dir = offline.path().to_str().unwrap();
    let issued = treescale(
        &cluster,
        &["certs", "issue", "node", "--data-dir", offline_dir],
    )
    .output()
    .unwrap();
    assert!(issued.status.success(), "{issued:?}");
    assert!(offline.path().join("node.crt").exists() && offline.path().join("node.key").exists());
    let shown = treescale(&cluster, &["certs", "show"]).output().unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("CA key:      here"), "{shown}");

    // What other TLS stacks make of them: OpenSSL reads every key, and
    // verifies a node as a foreign client would (CA and server name).
    let openssl = |args: &[&str]| Command::new("openssl").args(args).output();
    if openssl(&["version"]).is_err() {
        eprintln!("skipped the OpenSSL checks: no openssl command");
        return;
    }
    let keys = [
        format!("{alice_certs}/client.key"),
        format!("{offline_dir}/node.key"),
        format!("{}/ca.key", cluster.certs().display()),
    ];
    for key in &keys {
        let read = openssl(&["pkey", "-in", key, "-noout"]).unwrap();
        assert!(
            read.status.success(),
            "openssl cannot read {key}: {}",
            String::from_utf8_lossy(&read.stderr)
        );
    }
    let ca = format!("{}/ca.crt", cluster.certs().display());
    let node_cert = format!("{offline_dir}/node.crt");
    let verify = ["verify", "-CAfile", &ca, "-purpose", "sslserver"];
    let verified =
        openssl(&[&verify[..], &["-verify_hostname", "treescale", &node_cert]].concat()).unwrap();
    assert!(
        verified.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );
    let other_name = openssl(
        &[
            &verify[..],
            &["-verify_hostname", "example.com", &node_cert],
        ]
        .concat(),
    )
    .unwrap();
    assert!(
        !other_name.status.success(),
        "only the name treescale is the node's"
    );
}

#[test]
fn node_refuses_a_data_dir_already_in_use() {
    let cluster = cluster_for("cli-lock");
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let args = [
        "node",
        "--listen",
        "127.0.0.1:0",
        "--interface",
        "lo",
        "--data-dir",
        data_dir,
    ];
    let first = treescale(&cluster, &args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _guard = Processes(vec![first]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dir.path().join("node.crt").exists() {
        assert!(Instant::now() < deadline, "first node never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = treescale(&cluster, &args).output().unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("is in use by another treescale node"));
}

#[test]
fn help_explains_each_command() {
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    for command in ["node", "pub", "sub", "status", "demo", "certs", "bench"] {
        assert!(text.contains(command), "--help lacks {command}");
    }
    let sub_help = Command::new(BIN).args(["sub", "--help"]).output().unwrap();
    let sub_help = String::from_utf8_lossy(&sub_help.stdout);
    assert!(sub_help.contains("--count") && sub_help.contains("--certs"));
    let certs_help = Command::new(BIN)
        .args(["certs", "--help"])
        .output()
        .unwrap();
    let certs_help = String::from_utf8_lossy(&certs_help.stdout);
    assert!(certs_help.contains("copy the certs dir"), "{certs_help}");
    // Each command's long help is what `--help` shows.
    let node_help = Command::new(BIN).args(["node", "--help"]).output().unwrap();
    let node_help = String::from_utf8_lossy(&node_help.stdout);
    assert!(
        node_help.contains("With no flags it listens"),
        "{node_help}"
    );
}

#[test]
fn the_demo_runs_and_stops_by_itself() {
    // The demo's nodes inherit the variable: the cluster's leak check sees
    // them (the demo names its own cluster with --cluster).
    let cluster = cluster_for("cli-demo");
    let demo = Command::new(BIN)
        .arg("demo")
        .env("TREESCALE_CLUSTER", &cluster.name)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let output = wait_with_timeout(demo, Duration::from_secs(60));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "demo failed:\n{text}");
    assert!(text.contains("one tree"), "{text}");
    assert!(text.contains("7 node(s)"), "{text}");
    assert!(text.contains("5 events crossed the tree"), "{text}");
    assert!(text.contains("100 of 100 jobs handled"), "{text}");
    assert!(text.contains("tree repaired"), "{text}");
    assert!(
        text.contains("6 node(s)"),
        "the picture after the kill: {text}"
    );
}

fn status_json(cluster: &TestCluster, node: &str) -> Option<serde_json::Value> {
    let output = treescale(cluster, &["status", "--node", node, "--json"])
        .output()
        .ok()?;
    serde_json::from_slice(&output.stdout).ok()
}

fn peer_count(cluster: &TestCluster, node: &str) -> Option<usize> {
    let output = treescale(cluster, &["status", "--node", node, "--json"])
        .output()
        .ok()?;
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    Some(json["peers"].as_array()?.len())
}

#[test]
fn a_killed_node_is_noticed_within_about_a_second() {
    let cluster = cluster_for("cli-kill");
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (mut processes, addrs, _logs) = spawn_nodes(&cluster, 2, &[], &dirs);
    let deadline = Instant::now() + Duration::from_secs(10);
    while peer_count(&cluster, &addrs[0]) != Some(1) {
        assert!(Instant::now() < deadline, "nodes never linked");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SIGKILL: no goodbye, no connection close; only silence.
    processes.0[1].kill().unwrap();
    let killed_at = Instant::now();
    while peer_count(&cluster, &addrs[0]) != Some(0) {
        assert!(
            killed_at.elapsed() < Duration::from_secs(3),
            "dead peer still listed after 3s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("dead peer noticed after {:?}", killed_at.elapsed());
}

#[test]
fn sub_verbose_prints_topic_id_and_origin() {
    let cluster = cluster_for("cli-verbose");
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let _guard = Processes(vec![unnamed_node(&cluster, &addr, &dir)]);
    let sub = treescale(
        &cluster,
        &[
            "sub",
            "--node",
            &addr,
            "--count",
            "1",
            "--verbose",
            "greet.*",
        ],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let published = treescale(
        &cluster,
        &["pub", "--node", &addr, "greet.world", "hello there"],
    )
    .output()
    .unwrap();
    assert!(
        published.status.success(),
        "{}",
        String::from_utf8_lossy(&published.stderr)
    );
    let output = wait_with_timeout(sub, Duration::from_secs(10));
    let line = String::from_utf8(output.stdout).unwrap();
    let fields: Vec<&str> = line.trim_end().splitn(4, ' ').collect();
    assert_eq!(fields[0], "greet.world");
    assert!(fields[1].ends_with("-1"), "event id: {}", fields[1]);
    assert_eq!(fields[2].len(), 10, "short origin id: {}", fields[2]);
    assert_eq!(fields[3], "hello there");
}

/// On a fresh machine (a fresh HOME), `treescale node` with no flags about
/// certificates creates the CA in ~/.config/treescale/certs, and a client
/// command run later with no flags just works.
#[test]
fn the_first_node_on_a_machine_needs_no_certificate_set_up() {
    let cluster = cluster_for("cli-zero-config");
    let home = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let fresh_machine = |args: &[&str]| {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env("HOME", home.path())
            .env("TREESCALE_CLUSTER", &cluster.name)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("TREESCALE_CERTS")
            .env_remove("RUST_LOG");
        command
    };
    let log = NodeLog::new();
    let node = fresh_machine(&["node", "--listen", &addr, "--interface", "lo"])
        .arg("--data-dir")
        .arg(data.path())
        .stderr(log.stdio())
        .spawn()
        .unwrap();
    let _node = Processes(vec![node]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let output = fresh_machine(&["status", "--node", &addr, "--json"])
            .output()
            .unwrap();
        if output.status.success() {
            break output;
        }
        assert!(
            Instant::now() < deadline,
            "status never worked: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            log.contents()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["cluster"], cluster.name.as_str());
    let certs = home.path().join(".config/treescale/certs");
    assert!(certs.join("ca.crt").exists() && certs.join("ca.key").exists());
    assert!(
        log.contents().contains("created a new cluster CA"),
        "{}",
        log.contents()
    );
}

/// A quick `treescale bench` in each mode: the counts must add up. How fast
/// it goes is for the benchmarks, not for a test.
#[test]
fn bench_counts_add_up_in_every_mode() {
    let cluster = cluster_for("cli-bench");
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (_processes, addrs, _logs) = spawn_nodes(&cluster, 2, &[], &dirs);
    let bench = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["bench", "--json", "--drain", "1s"];
        for addr in &addrs {
            args.extend(["--node", addr.as_str()]);
        }
        args.extend(extra);
        let output = treescale(&cluster, &args).output().unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let n = |report: &serde_json::Value, key: &str| report[key].as_u64().unwrap();
    // Fan-out across the two nodes: each of two subscribers accounts for
    // every event, received or lost.
    let fan_out = bench(&["--msgs", "3000", "--pubs", "2", "--subs", "2"]);
    assert_eq!(n(&fan_out, "sent"), 3000, "{fan_out}");
    assert_eq!(
        n(&fan_out, "delivered") - n(&fan_out, "duplicated") + n(&fan_out, "lost"),
        6000,
        "{fan_out}"
    );
    assert!(fan_out["msgs_per_sec"].as_f64().unwrap() > 0.0);
    // A queue group shares them out.
    let group = bench(&["--msgs", "2000", "--subs", "3", "--group", "workers"]);
    assert_eq!(
        n(&group, "delivered") - n(&group, "duplicated") + n(&group, "lost"),
        2000,
        "{group}"
    );
    assert_eq!(group["delivery"], "queue-group");
    // At-least-once: every event confirmed, none lost.
    let durable = bench(&["--msgs", "2000", "--qos", "at-least-once"]);
    assert_eq!(
        (n(&durable, "sent"), n(&durable, "lost")),
        (2000, 0),
        "{durable}"
    );
    // Latency mode at a fixed rate reports ordered percentiles.
    let latency = bench(&["--msgs", "1000", "--rate", "2000"]);
    assert_eq!(latency["mode"], "latency");
    let (p50, p99, p999) = (
        n(&latency, "p50_us"),
        n(&latency, "p99_us"),
        n(&latency, "p999_us"),
    );
    assert!(0 < p50 && p50 <= p99 && p99 <= p999, "{latency}");
}

#[test]
fn a_process_a_test_leaves_running_fails_it_and_is_killed() {
    let cluster = cluster_for("leak-check");
    // A socket that never answers, held for the whole test (a port only
    // found free could be taken by another test's node, and sub end early):
    // sub keeps trying for the whole minute.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let nowhere = silent.local_addr().unwrap().to_string();
    let args = ["sub", "--node", &nowhere, "--connect-timeout", "60s", "x"];
    let child = treescale(&cluster, &args).spawn().unwrap();
    let pid = child.id();
    // Dropped without a kill: the mistake the cluster's check exists for.
    drop(child);
    let caught = std::panic::catch_unwind(move || drop(cluster));
    let panic = caught.expect_err("a leaked process must fail the test");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains(&pid.to_string()), "{message}");
    let stat = format!("/proc/{pid}/stat");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let state = std::fs::read_to_string(&stat).unwrap_or_default();
        let state = state.rsplit(')').next().unwrap_or("").trim_start();
        if state.is_empty() || state.starts_with('Z') {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} still runs: {state}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `sub --count N TOPIC` at `node`, its stdout captured.
fn subscriber(cluster: &TestCluster, node: &str, count: &str, topic: &str) -> std::process::Child {
    treescale(cluster, &["sub", "--node", node, "--count", count, topic])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn pub_to_reaches_only_the_named_node_and_an_unknown_node_is_an_error() {
    let cluster = cluster_for("cli-to");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (_processes, addrs, _logs) = spawn_nodes(&cluster, 3, &[], &dirs);
    // node0 and node2 expect only the broadcast; node1 the two directed
    // events first. A directed event wrongly broadcast would come first.
    let mut subs = Processes(vec![
        subscriber(&cluster, &addrs[0], "1", "alerts"),
        subscriber(&cluster, &addrs[1], "3", "alerts"),
        subscriber(&cluster, &addrs[2], "1", "alerts"),
    ]);
    let statuses = one_tree(&cluster, &addrs);
    let short_id = &statuses[1]["id"].as_str().unwrap()[..10];
    let publish = |extra: &[&str], data: &str| {
        let mut args = vec!["pub", "--node", &addrs[0], "--wait", "10s"];
        args.extend_from_slice(extra);
        args.extend(["alerts", data]);
        let output = treescale(&cluster, &args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        (output.status.success(), stderr)
    };
    let (ok, stderr) = publish(&["--to", "node1"], "to node1 by name");
    assert!(ok, "{stderr}");
    assert!(stderr.contains("for the subscribers of node"), "{stderr}");
    let (ok, stderr) = publish(&["--to", short_id], "to node1 by id");
    assert!(ok, "{stderr}");
    let (ok, stderr) = publish(&["--to", "node7"], "to nobody");
    assert!(!ok, "an unknown node must fail");
    assert!(
        stderr.starts_with("error: no node named \"node7\""),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let (ok, stderr) = publish(&[], "to everyone");
    assert!(ok, "{stderr}");

    let mut outputs = Vec::new();
    for sub in std::mem::take(&mut subs.0) {
        let output = wait_with_timeout(sub, Duration::from_secs(20));
        outputs.push(String::from_utf8(output.stdout).unwrap());
    }
    assert_eq!(outputs[0], "to everyone\n");
    assert_eq!(
        outputs[1],
        "to node1 by name\nto node1 by id\nto everyone\n"
    );
    assert_eq!(outputs[2], "to everyone\n");
}

#[test]
fn pub_at_least_once_exits_with_an_error_naming_its_node_when_the_node_dies() {
    let cluster = cluster_for("cli-pub-dies");
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let log = NodeLog::new();
    let mut node = Processes(vec![spawn_node(&cluster, &addr, "doomed", &[], &dir, &log)]);
    let mut publisher = Processes(vec![treescale(
        &cluster,
        &[
            "pub",
            "--node",
            &addr,
            "--wait",
            "0s",
            "--qos",
            "at-least-once",
            "audit.x",
        ],
    )
    .stdin(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap()]);
    // Fed some lines, its stdin left open: it waits for more when the node
    // dies, and must not wait for ever.
    let mut stdin = publisher.0[0].stdin.take().unwrap();
    let lines: String = (1..=100).map(|i| format!("{i}\n")).collect();
    std::io::Write::write_all(&mut stdin, lines.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    node.0[0].kill().unwrap();
    let output = wait_with_timeout(publisher.0.remove(0), Duration::from_secs(15));
    drop(stdin);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("node doomed ("), "names the node: {stderr}");
    assert!(
        stderr.contains(&format!("at {addr} stopped answering")),
        "{stderr}"
    );
    assert!(stderr.contains("100 event(s) sent"), "{stderr}");
    assert!(stderr.contains("100 confirmed"), "{stderr}");
}

#[test]
fn errors_and_help_say_each_thing_once_and_their_examples_run() {
    let cluster = cluster_for("cli-messages");
    // A port already taken: the cause once, not twice.
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let output = treescale(&cluster, &["node", "--listen", &addr, "--interface", "lo"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert_eq!(
        stderr.matches("Address already in use").count(),
        1,
        "{stderr}"
    );

    // --certs given (here from the environment) is not shown as required.
    let output = treescale(&cluster, &["pub", "--node", "127.0.0.1:9"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("Usage: treescale pub [OPTIONS] <TOPIC> [DATA]"),
        "{stderr}"
    );
    assert!(!stderr.contains("--certs"), "{stderr}");

    // Every example command line in the help is valid shell.
    let mut examples = 0;
    for command in [
        &[][..],
        &["node"],
        &["pub"],
        &["sub"],
        &["tree"],
        &["demo"],
        &["bench"],
        &["certs"],
    ] {
        let mut args = command.to_vec();
        args.push("--help");
        let help = treescale(&cluster, &args).output().unwrap();
        let help = String::from_utf8(help.stdout).unwrap();
        for line in help
            .lines()
            .map(str::trim)
            .filter(|l| l.contains("treescale "))
        {
            let example = line.split("  #").next().unwrap();
            if !(example.starts_with("treescale ") || example.contains("| treescale ")) {
                continue;
            }
            examples += 1;
            let check = Command::new("bash")
                .args(["-n", "-c", example])
                .output()
                .unwrap();
            assert!(
                check.status.success(),
                "`treescale {}` help: {example:?} is not valid shell: {}",
                command.join(" "),
                String::from_utf8_lossy(&check.stderr)
            );
        }
    }
    assert!(examples >= 3, "only {examples} examples found in the help");
}

#[test]
fn a_client_waits_its_whole_connect_timeout_for_a_node() {
    let cluster = cluster_for("cli-connect-timeout");
    let nowhere = format!("127.0.0.1:{}", free_port());
    let started = Instant::now();
    // Longer than one handshake attempt (the 3 s idle timeout).
    let output = treescale(
        &cluster,
        &["status", "--node", &nowhere, "--connect-timeout", "4s"],
    )
    .output()
    .unwrap();
    let waited = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!("cannot reach a node at {nowhere} within 4s")),
        "{stderr}"
    );
    assert!(
        waited >= Duration::from_millis(3900),
        "gave up after {waited:?}"
    );
}

#[test]
fn a_node_is_named_after_its_host_by_default() {
    let cluster = cluster_for("cli-default-name");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _guard = Processes(vec![unnamed_node(&cluster, &addr, &dir)]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = status_json(&cluster, &addr) {
            break status;
        }
        assert!(Instant::now() < deadline, "the node never answered");
        std::thread::sleep(Duration::from_millis(50));
    };
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let host = host.trim().split('.').next().unwrap().to_string();
    assert_eq!(status["name"], format!("{host}-{port}"));
}
