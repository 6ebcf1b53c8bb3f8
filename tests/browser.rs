//! The JavaScript client in a real headless Chromium: a page loads
//! `/treescale.js` from a node, connects over WebTransport with a token and
//! the certificate hash, and exchanges events with the CLI on another node.
//!
//! Needs Debian's `chromium` and the npm packages of clients/js (`npm ci`,
//! which `tests/run` does). Without them the test says so and passes, unless
//! `TREESCALE_REQUIRE_BROWSER` is set (as `.ci/run` sets it): then it fails.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster_for;
use common::processes::{free_port, spawn_node, treescale, wait_with_timeout, NodeLog, Processes};
use serde_json::{json, Value};
use treescale::trust::PERMISSIONS_FILE;

const JS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/js");

/// Chromium and the driver's packages, or why the test cannot run.
fn browser() -> Result<PathBuf, String> {
    let chromium = std::env::var_os("TREESCALE_CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| {
            ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
                .iter()
                .map(PathBuf::from)
                .find(|path| path.exists())
        })
        .ok_or("no Chromium (apt-get install chromium)")?;
    if !Path::new(JS_DIR)
        .join("node_modules/puppeteer-core")
        .exists()
    {
        return Err("no puppeteer-core (npm ci in clients/js)".into());
    }
    Ok(chromium)
}

/// Skips with a reason where no browser can run; fails instead where one
/// must (CI).
fn browser_or_skip() -> Option<PathBuf> {
    match browser() {
        Ok(chromium) => Some(chromium),
        Err(why) if std::env::var_os("TREESCALE_REQUIRE_BROWSER").is_some() => {
            panic!("TREESCALE_REQUIRE_BROWSER is set, but: {why}")
        }
        Err(why) => {
            eprintln!("skipped: {why}");
            None
        }
    }
}

/// A page in headless Chromium, driven by clients/js/e2e/browser.mjs one
/// step at a time.
struct Page {
    driver: Child,
    steps: Option<ChildStdin>,
    answers: BufReader<ChildStdout>,
}

impl Page {
    fn open(chromium: &Path, web: &str) -> Page {
        let mut driver = Command::new("node")
            .arg("e2e/browser.mjs")
            .arg("--chromium")
            .arg(chromium)
            .arg("--url")
            .arg(format!("http://{web}/"))
            .current_dir(JS_DIR)
            // Its own process group: Chromium's processes die with it.
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("node runs (apt-get install nodejs)");
        Page {
            steps: driver.stdin.take(),
            answers: BufReader::new(driver.stdout.take().unwrap()),
            driver,
        }
    }

    /// Runs one step in the page: its result, or what failed.
    fn step(&mut self, step: Value) -> Result<Value, String> {
        let steps = self.steps.as_mut().unwrap();
        writeln!(steps, "{step}").unwrap();
        steps.flush().unwrap();
        let mut line = String::new();
        self.answers.read_line(&mut line).unwrap();
        let mut answer: Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("the driver answered {line:?} to {step}"));
        match answer.get_mut("ok") {
            Some(ok) => Ok(ok.take()),
            None => Err(answer["error"].to_string()),
        }
    }

    fn ok(&mut self, step: Value) -> Value {
        let what = step.to_string();
        self.step(step)
            .unwrap_or_else(|e| panic!("{what} failed: {e}"))
    }
}

impl Drop for Page {
    /// Ends the driver's input so it closes the browser; kills the whole
    /// group if that takes too long.
    fn drop(&mut self) {
        self.steps.take();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.driver.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let group = format!("-{}", self.driver.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.driver.wait();
    }
}

fn lines(prefix: &str, count: usize) -> String {
    (1..=count).map(|i| format!("{prefix}{i}\n")).collect()
}

#[test]
fn a_page_exchanges_events_with_the_cli_through_two_nodes() {
    let Some(chromium) = browser_or_skip() else {
        return;
    };
    let cluster = cluster_for("browser");
    std::fs::write(
        cluster.certs().join(PERMISSIONS_FILE),
        "[users.admin]\npublish = [\">\"]\nsubscribe = [\">\"]\n\
         [users.page]\npublish = [\"page.>\", \"svc.cli\"]\nsubscribe = [\"feed.>\", \"svc.page\"]\n",
    )
    .unwrap();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let logs = [NodeLog::new(), NodeLog::new()];
    let addrs: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let web = format!("127.0.0.1:{}", free_port());
    let mut nodes = Processes(Vec::new());
    nodes.0.push(spawn_node(
        &cluster,
        &addrs[0],
        "web",
        &["--web", &web],
        &dirs[0],
        &logs[0],
    ));
    nodes.0.push(spawn_node(
        &cluster,
        &addrs[1],
        "other",
        &[],
        &dirs[1],
        &logs[1],
    ));
    common::processes::wait_for_port(&web, Duration::from_secs(10));

    let mut page = Page::open(&chromium, &web);
    let token = |name: &str, ttl: u64| {
        cluster
            .ca()
            .issue_token(name, Duration::from_secs(ttl))
            .unwrap()
    };

    // Refused tokens surface in the page as typed errors with the node's code.
    for bad in ["not.a.token".to_string(), token("page", 3600) + "x"] {
        let refused = page.ok(json!({"step": "connectRefused", "token": bad}));
        assert_eq!(refused["name"], "TreeScaleError", "{refused}");
        assert_eq!(refused["code"], "TOKEN_REFUSED", "{refused}");
        assert!(
            refused["message"]
                .as_str()
                .unwrap()
                .starts_with("token refused: "),
            "{refused}"
        );
    }

    let welcome = page.ok(json!({"step": "connect", "token": token("page", 3600)}));
    assert_eq!(welcome["user"], "page");
    assert_eq!(welcome["node"]["name"], "web");
    let denied = page.ok(json!({"step": "subscribeRefused", "pattern": "secret.>"}));
    assert_eq!(denied["code"], "PermissionDenied", "{denied}");

    // 1,000 events from the CLI on the other node reach the page exactly
    // once, in order.
    page.ok(json!({"step": "subscribe", "pattern": "feed.>"}));
    let mut publisher = treescale(
        &cluster,
        &["pub", "--node", &addrs[1], "--wait", "10s", "feed.in"],
    );
    let mut publisher = publisher
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sent = lines("e", 1000);
    publisher
        .stdin
        .take()
        .unwrap()
        .write_all(sent.as_bytes())
        .unwrap();
    let published = wait_with_timeout(publisher, Duration::from_secs(30));
    assert!(
        published.status.success(),
        "pub failed: {}",
        String::from_utf8_lossy(&published.stderr)
    );
    let received = page.ok(json!({"step": "received", "count": 1000, "timeoutMs": 15000}));
    let received: Vec<String> = serde_json::from_value(received).unwrap();
    let expected: Vec<String> = sent.lines().map(String::from).collect();
    assert_eq!(received, expected);
    // Exactly once: nothing more comes.
    let after = page.ok(json!({"step": "received", "count": 1001, "timeoutMs": 300}));
    assert_eq!(after.as_array().unwrap().len(), 1000);

    // 1,000 from the page reach a CLI subscriber on the other node.
    let subscriber = treescale(
        &cluster,
        &["sub", "--node", &addrs[1], "--count", "1000", "page.out"],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut subscriber = Processes(vec![subscriber]);
    let published = page.ok(json!({"step": "publish", "topic": "page.out", "count": 1000}));
    assert_eq!(published, 1000, "{published}");
    let output = wait_with_timeout(subscriber.0.remove(0), Duration::from_secs(15));
    assert!(output.status.success());
    assert_eq!(String::from_utf8(output.stdout).unwrap(), lines("p", 1000));

    // Requests both ways: the page answers the CLI, and asks it.
    page.ok(json!({"step": "respond", "pattern": "svc.page"}));
    let deadline = Instant::now() + Duration::from_secs(10);
    let answer = loop {
        let asked = treescale(
            &cluster,
            &["request", "--node", &addrs[1], "svc.page", "hello"],
        )
        .output()
        .unwrap();
        // Until the page's subscription reaches the other node: no responders.
        if asked.status.success() || Instant::now() > deadline {
            break asked;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(answer.status.success(), "{answer:?}");
    assert_eq!(String::from_utf8(answer.stdout).unwrap(), "HELLO\n");
    let replier = treescale(
        &cluster,
        &["reply", "--node", &addrs[1], "svc.cli", "from the cli"],
    )
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    let _replier = Processes(vec![replier]);
    let answered =
        page.ok(json!({"step": "request", "topic": "svc.cli", "data": "hi", "waitMs": 10000}));
    assert_eq!(answered["answer"], "from the cli", "{answered}");
    let unanswered = page.ok(json!({"step": "request", "topic": "page.nobody", "data": "hi"}));
    assert_eq!(unanswered["code"], "NoResponders", "{unanswered}");

    assert_eq!(page.ok(json!({"step": "close"})), "closed");
}

#[test]
fn the_dashboard_draws_the_tree_and_follows_a_node_s_death() {
    let Some(chromium) = browser_or_skip() else {
        return;
    };
    let cluster = cluster_for("dashboard");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let logs: Vec<NodeLog> = (0..3).map(|_| NodeLog::new()).collect();
    let web = format!("127.0.0.1:{}", free_port());
    let mut nodes = Processes(Vec::new());
    for (i, (dir, log)) in dirs.iter().zip(&logs).enumerate() {
        let addr = format!("127.0.0.1:{}", free_port());
        let extra: &[&str] = if i == 0 { &["--web", &web] } else { &[] };
        nodes.0.push(spawn_node(
            &cluster,
            &addr,
            &format!("node{i}"),
            extra,
            dir,
            log,
        ));
    }
    // The node prints the dashboard's address with a read-only token, as
    // a person starting it would see.
    let deadline = Instant::now() + Duration::from_secs(10);
    let url = loop {
        let log = logs[0].contents();
        if let Some(line) = log.lines().find(|l| l.starts_with("dashboard: ")) {
            break line["dashboard: ".len()..].to_string();
        }
        assert!(Instant::now() < deadline, "no dashboard address in the log");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(url.starts_with(&format!("http://{web}/#token=")), "{url}");

    let mut page = Page::open(&chromium, &web);
    page.ok(json!({"step": "goto", "url": url}));
    let shown = page.ok(json!({"step": "dashboardNodes", "count": 3, "timeoutMs": 15000}));
    assert_eq!(shown["nodes"], 3, "{shown}");
    assert_eq!(shown["rows"], 3, "{shown}");
    assert!(
        shown["state"].as_str().unwrap().contains("as dashboard"),
        "{shown}"
    );
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("dashboard.png");
    page.ok(json!({"step": "screenshot", "path": screenshot}));
    eprintln!("dashboard screenshot: {}", screenshot.display());

    // SIGKILL: no goodbye; the tree repairs, and the picture follows.
    nodes.0[2].kill().unwrap();
    let shown = page.ok(json!({"step": "dashboardNodes", "count": 2, "timeoutMs": 15000}));
    assert_eq!(shown["nodes"], 2, "{shown}");
    page.ok(json!({"step": "screenshot", "path": artifacts.join("dashboard-after-kill.png")}));
}

/// Events per second into a page from the CLI publisher, 128 B each, beside
/// a Rust client subscribed on the same node in the same run. A benchmark,
/// not a test: `cargo test --release --test browser -- --ignored
/// --nocapture`; docs/performance.md has its figures.
#[test]
#[ignore]
fn browser_throughput() {
    let Some(chromium) = browser_or_skip() else {
        return;
    };
    const EVENTS: usize = 200_000;
    let cluster = cluster_for("browser-bench");
    let dir = tempfile::tempdir().unwrap();
    let log = NodeLog::new();
    let addr = format!("127.0.0.1:{}", free_port());
    let web = format!("127.0.0.1:{}", free_port());
    let _node = Processes(vec![spawn_node(
        &cluster,
        &addr,
        "bench",
        &["--web", &web],
        &dir,
        &log,
    )]);
    common::processes::wait_for_port(&web, Duration::from_secs(10));
    let mut page = Page::open(&chromium, &web);
    let token = cluster
        .ca()
        .issue_token("admin", Duration::from_secs(3600))
        .unwrap();
    page.ok(json!({"step": "connect", "token": token}));
    page.ok(json!({"step": "countEvents", "pattern": "bench.x", "count": EVENTS, "idleMs": 3000}));

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let peer = runtime.spawn({
        let options = cluster.client_options(addr.parse().unwrap());
        async move {
            let client = treescale::Client::connect(options).await.unwrap();
            let mut subscription = client.subscribe("bench.x").await.unwrap();
            let mut received = 0;
            let (mut first, mut last) = (Instant::now(), Instant::now());
            while let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_secs(3), subscription.next()).await
            {
                last = Instant::now();
                if received == 0 {
                    first = last;
                }
                received += 1;
                if received == EVENTS {
                    break;
                }
            }
            (received, (last - first).as_secs_f64())
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let payload = "x".repeat(127) + "\n";
    let mut publisher = treescale(&cluster, &["pub", "--node", &addr, "bench.x"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = publisher.stdin.take().unwrap();
    let started = Instant::now();
    let feed = std::thread::spawn(move || {
        for _ in 0..EVENTS {
            stdin.write_all(payload.as_bytes()).unwrap();
        }
    });
    feed.join().unwrap();
    let published = wait_with_timeout(publisher, Duration::from_secs(120));
    let publishing = started.elapsed().as_secs_f64();
    assert!(published.status.success(), "{published:?}");
    let counted = page.ok(json!({"step": "counted"}));
    let (peer_received, peer_seconds) = runtime.block_on(peer).unwrap();
    let page_received = counted["received"].as_u64().unwrap() as usize;
    let page_rate = page_received as f64 / counted["seconds"].as_f64().unwrap();
    let peer_rate = peer_received as f64 / peer_seconds;
    println!(
        "{EVENTS} events of 128 B from `treescale pub` ({:.0}/s published):\n  \
         page (WebTransport, Chromium): {page_received} received, {page_rate:.0}/s\n  \
         Rust client (QUIC), same node:  {peer_received} received, {peer_rate:.0}/s\n  \
         page/Rust: {:.2}",
        EVENTS as f64 / publishing,
        page_rate / peer_rate
    );
}
