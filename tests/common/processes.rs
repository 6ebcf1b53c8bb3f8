//! Running the `treescale` binary: node processes that die with the test,
//! their logs shown when it fails.

use std::io::Write;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_treescale");

/// Child processes killed when the test ends, pass or fail.
pub struct Processes(pub Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A file for a node's log, shown if the test fails.
pub struct NodeLog(tempfile::NamedTempFile);

impl NodeLog {
    pub fn new() -> Self {
        NodeLog(tempfile::NamedTempFile::new().unwrap())
    }

    /// What the node has logged so far.
    pub fn contents(&self) -> String {
        std::fs::read_to_string(self.0.path()).unwrap_or_default()
    }

    /// Appends, so a restarted node's log follows its first life's.
    pub fn stdio(&self) -> Stdio {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(self.0.path())
            .unwrap();
        Stdio::from(file)
    }
}

impl Drop for NodeLog {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.0.path()).unwrap_or_default();
            eprintln!("---- node log ----\n{log}");
        }
    }
}

/// The binary, run as a member of `cluster`: its name and its certs dir.
pub fn treescale(cluster: &super::TestCluster, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env("TREESCALE_CLUSTER", &cluster.name)
        .env("TREESCALE_CERTS", cluster.certs())
        .env_remove("RUST_LOG");
    command
}

/// Processes still running (not zombies) that were started for cluster
/// `name`, found by the `TREESCALE_CLUSTER` in their environment: their
/// pids and command lines.
pub fn running_in_cluster(name: &str) -> Vec<(u32, String)> {
    let marker = format!("TREESCALE_CLUSTER={name}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut running = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let proc = entry.path();
        let Ok(environ) = std::fs::read(proc.join("environ")) else {
            continue;
        };
        if !environ
            .split(|b| *b == 0)
            .any(|var| var == marker.as_bytes())
        {
            continue;
        }
        // The state follows the command name in parentheses: Z is a zombie.
        let stat = std::fs::read_to_string(proc.join("stat")).unwrap_or_default();
        let state = stat.rsplit(')').next().unwrap_or("").trim_start();
        if state.starts_with('Z') || stat.is_empty() {
            continue;
        }
        let command = std::fs::read(proc.join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        running.push((pid, command.trim().to_string()));
    }
    running
}

/// A port for a node to listen on later, free now for UDP and TCP.
///
/// Not one the kernel hands out for port 0: a client's ephemeral socket,
/// opened between this call and the node's bind, would take it (CI saw it).
/// Ports come from just below the ephemeral range, each at most once per
/// test process; test binaries run one at a time.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let span = 10_000.min(ephemeral_low - 1024);
    let start = std::process::id() % span;
    loop {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = (ephemeral_low - span + offset) as u16;
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        if udp.is_ok() && tcp.is_ok() {
            return port;
        }
    }
}

/// Waits until something accepts TCP connections at `addr` (a node's
/// `--web` or `--metrics` side, once it has started).
pub fn wait_for_port(addr: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens at {addr} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn wait_with_timeout(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Starts `n` nodes of `cluster` on 127.0.0.1 with mDNS on lo, each with
/// `extra` arguments; returns them, their addresses and their logs.
pub fn spawn_nodes(
    cluster: &super::TestCluster,
    n: usize,
    extra: &[&str],
    dirs: &[tempfile::TempDir],
) -> (Processes, Vec<String>, Vec<NodeLog>) {
    let addrs: Vec<String> = (0..n)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let logs: Vec<NodeLog> = (0..n).map(|_| NodeLog::new()).collect();
    let mut processes = Processes(Vec::new());
    for i in 0..n {
        let node = spawn_node(
            cluster,
            &addrs[i],
            &format!("node{i}"),
            extra,
            &dirs[i],
            &logs[i],
        );
        processes.0.push(node);
    }
    (processes, addrs, logs)
}

/// Starts one node of `cluster` at `addr` with mDNS on lo; used again with
/// the same `dir` it restarts that node.
pub fn spawn_node(
    cluster: &super::TestCluster,
    addr: &str,
    name: &str,
    extra: &[&str],
    dir: &tempfile::TempDir,
    log: &NodeLog,
) -> Child {
    treescale(
        cluster,
        &[
            "node",
            "--listen",
            addr,
            "--interface",
            "lo",
            "--name",
            name,
            "-v",
        ],
    )
    .args(extra)
    .arg("--data-dir")
    .arg(dir.path())
    .stderr(log.stdio())
    .spawn()
    .unwrap()
}

/// Runs `publisher` (a `treescale pub` command) with `lines` on stdin, one
/// event per line, and checks that it succeeds and that `subscriber` (a
/// running `treescale sub --count N`) prints exactly those lines.
pub fn publish_and_expect(mut publisher: Command, subscriber: Child, lines: &str, limit: Duration) {
    let mut publisher = publisher
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    publisher
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    let published = wait_with_timeout(publisher, limit);
    assert!(
        published.status.success(),
        "pub failed: {}",
        String::from_utf8_lossy(&published.stderr)
    );
    let received = wait_with_timeout(subscriber, limit);
    assert!(received.status.success());
    assert_eq!(String::from_utf8(received.stdout).unwrap(), lines);
}
