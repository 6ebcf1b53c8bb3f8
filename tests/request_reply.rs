//! Request/reply: answers come straight back across the tree, queue
//! groups share requests, and what cannot be answered fails clearly.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::processes::*;
use common::*;
use futures_util::{stream, StreamExt};
use treescale::wire::ReplyTo;
use treescale::{Client, ClientError, NodeId};

/// Answers every request on `topic` in `group` with `name:payload`, until
/// the subscription ends; returns how many it answered.
fn serve(
    client: Client,
    topic: &'static str,
    group: &'static str,
    name: String,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut requests = client.subscribe_group(topic, group).await.unwrap();
        let mut answered = 0;
        while let Ok(Some(request)) =
            tokio::time::timeout(Duration::from_secs(2), requests.next()).await
        {
            let answer = format!("{name}:{}", String::from_utf8_lossy(&request.payload));
            client.respond(&request, answer).await.unwrap();
            answered += 1;
        }
        answered
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_group_on_three_nodes_answers_each_request_once_and_evenly() {
    let (cluster, nodes, clients, _dirs) = tree_of_nodes("rr-group", 3).await;
    let mut responders = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let responder = client(&cluster, node.addr()).await;
        responders.push(serve(responder, "svc.echo", "echo", format!("r{i}")));
    }
    eventually(
        Duration::from_secs(5),
        "three members known everywhere",
        || async {
            for client in &clients {
                if client.status().await.unwrap().group_members("echo") != 3 {
                    return false;
                }
            }
            true
        },
    )
    .await;

    // 10,000 requests from the three nodes, 100 in flight on each.
    const REQUESTS: usize = 10_000;
    let answers: Vec<(usize, String)> = stream::iter(0..REQUESTS)
        .map(|i| {
            let requester = &clients[i % 3];
            async move {
                let answer = requester
                    .request("svc.echo", format!("{i}"), Duration::from_secs(10))
                    .await
                    .unwrap_or_else(|e| panic!("request {i}: {e}"));
                (i, String::from_utf8(answer.payload.to_vec()).unwrap())
            }
        })
        .buffer_unordered(300)
        .collect()
        .await;
    let mut shares: HashMap<String, usize> = HashMap::new();
    for (i, answer) in &answers {
        let (by, payload) = answer.split_once(':').unwrap();
        assert_eq!(payload, i.to_string(), "the answer is to its own request");
        *shares.entry(by.to_string()).or_default() += 1;
    }
    assert_eq!(answers.len(), REQUESTS);
    let answered: Vec<u64> = {
        let mut counts = Vec::new();
        for responder in responders {
            counts.push(responder.await.unwrap());
        }
        counts
    };
    // Each request was answered once: the responders' counts add up, and
    // no answer came late or twice.
    assert_eq!(
        answered.iter().sum::<u64>(),
        REQUESTS as u64,
        "{answered:?}"
    );
    for client in &clients {
        assert_eq!(client.late_replies(), 0);
    }
    eprintln!("shares {shares:?}");
    for share in shares.values() {
        let even = REQUESTS as f64 / 3.0;
        let off = (*share as f64 - even).abs() / even;
        assert!(off <= 0.05, "unbalanced shares {shares:?}");
    }
    assert_eq!(shares.len(), 3, "{shares:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_responders_fail_at_once_and_silent_ones_time_out() {
    let (_cluster, _nodes, clients, _dirs) = tree_of_nodes("rr-errors", 2).await;
    let requester = &clients[0];

    let started = Instant::now();
    match requester
        .request("svc.nobody", "x", Duration::from_secs(5))
        .await
    {
        Err(ClientError::NoResponders { topic }) => assert_eq!(topic, "svc.nobody"),
        other => panic!("expected no responders, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(100),
        "no responders took {took:?}"
    );

    // A subscriber on the other node that reads requests but does not
    // answer in time.
    let mut silent = clients[1].subscribe("svc.slow").await.unwrap();
    assert!(requester
        .wait_for_interest("svc.slow", Duration::from_secs(5))
        .await
        .unwrap());
    let timeout = Duration::from_millis(300);
    let error = requester
        .request("svc.slow", "late", timeout)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ClientError::Timeout { topic, timeout: t } if topic == "svc.slow" && *t == timeout),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "no answer to the request on svc.slow within 300ms"
    );
    // Its answer, after the timeout, is dropped and counted.
    let request = silent.next().await.unwrap();
    assert!(request.reply.is_some());
    clients[1].respond(&request, "too late").await.unwrap();
    eventually(
        Duration::from_secs(5),
        "the late answer counted",
        || async { requester.late_replies() == 1 },
    )
    .await;
    // A plain event is not a request.
    clients[0].publish("svc.slow", "plain").await.unwrap();
    let plain = silent.next().await.unwrap();
    assert!(matches!(
        clients[1].respond(&plain, "?").await,
        Err(ClientError::NotARequest(id)) if id == plain.id
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_cannot_be_delivered_are_counted_and_the_node_serves_on() {
    let (_cluster, nodes, clients, _dirs) = tree_of_nodes("rr-bad-answers", 1).await;
    let client = &clients[0];
    let mut requests = client.subscribe("svc.echo").await.unwrap();
    assert!(client
        .wait_for_interest("svc.echo", Duration::from_secs(5))
        .await
        .unwrap());
    let mut forged = {
        client.publish("svc.echo", "not a request").await.unwrap();
        requests.next().await.unwrap()
    };
    // An inbox the node never gave out, and a node not in the tree.
    for to in [
        ReplyTo {
            node: nodes[0].id(),
            inbox: 12345,
            request: 1,
        },
        ReplyTo {
            node: NodeId::from_bytes([9; 32]),
            inbox: 1,
            request: 1,
        },
    ] {
        forged.reply = Some(Box::new(to));
        client.respond(&forged, "to nobody").await.unwrap();
    }
    // An answer larger than an event may be is refused by the library.
    let huge = vec![0u8; treescale::client::MAX_PAYLOAD + 1];
    assert!(matches!(
        client.respond(&forged, huge).await,
        Err(ClientError::PayloadTooLarge(_))
    ));
    client.flush().await.unwrap();
    let counters = client.status().await.unwrap().counters;
    assert_eq!(counters.replies_undeliverable, 1);
    assert_eq!(counters.events_unroutable, 1);

    // The node still answers requests.
    let serving = async {
        let request = requests.next().await.unwrap();
        client.respond(&request, "pong").await.unwrap();
    };
    let (answer, ()) = tokio::join!(
        client.request("svc.echo", "ping", Duration::from_secs(5)),
        serving
    );
    assert_eq!(answer.unwrap().payload, "pong".as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_responder_is_killed_its_requests_time_out_and_later_ones_go_to_the_others() {
    let cluster = cluster_for("rr-kill");
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (_nodes, addrs, _logs) = spawn_nodes(&cluster, 2, &[], &dirs);
    let mut clients = Vec::new();
    for addr in &addrs {
        clients.push(connect_when_up(&cluster, addr).await);
    }
    wait_for_tree(&clients.iter().collect::<Vec<_>>(), Duration::from_secs(15)).await;
    // Two members of one service, one on each node, as processes.
    let mut responders = Processes(Vec::new());
    for (addr, answer) in addrs.iter().zip(["doomed", "survivor"]) {
        responders.0.push(
            treescale(
                &cluster,
                &["reply", "--node", addr, "--group", "svc", "svc.who", answer],
            )
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
        );
    }
    let requester = &clients[0];
    eventually(Duration::from_secs(5), "both members known", || async {
        requester.status().await.unwrap().group_members("svc") == 2
    })
    .await;
    let ask = || async {
        requester
            .request("svc.who", "?", Duration::from_millis(500))
            .await
            .map(|answer| String::from_utf8(answer.payload.to_vec()).unwrap())
    };
    let mut answered_by = HashMap::<String, u32>::new();
    for _ in 0..20 {
        *answered_by.entry(ask().await.unwrap()).or_default() += 1;
    }
    assert_eq!(answered_by.len(), 2, "both members answer: {answered_by:?}");

    // SIGKILL: the node notices only when the connection times out, so
    // requests meanwhile go to the dead member half of the time.
    responders.0[0].kill().unwrap();
    let killed = Instant::now();
    let (mut timeouts, mut in_a_row) = (0, 0);
    while in_a_row < 50 {
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "requests never all went to the survivor ({timeouts} timed out)"
        );
        match ask().await {
            Ok(answer) => {
                assert_eq!(answer, "survivor");
                in_a_row += 1;
            }
            Err(ClientError::Timeout { .. }) => {
                timeouts += 1;
                in_a_row = 0;
            }
            Err(e) => panic!("request failed: {e}"),
        }
    }
    eprintln!(
        "after the kill: {timeouts} request(s) timed out, all answered after {:?}",
        killed.elapsed()
    );
    assert!(timeouts > 0, "no request went to the killed member");
}

/// A client of the node at `addr`, started as a process moments ago.
async fn connect_when_up(cluster: &TestCluster, addr: &str) -> Client {
    let addr = addr.parse().unwrap();
    for _ in 0..50 {
        if let Ok(client) = Client::connect(cluster.client_options(addr)).await {
            return client;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("node at {addr} did not start");
}

#[test]
fn the_cli_serves_with_a_command_and_requests_fail_with_one_error_line() {
    let cluster = cluster_for("rr-cli");
    let dir = tempfile::tempdir().unwrap();
    let (_nodes, addrs, _logs) = spawn_nodes(&cluster, 1, &[], std::slice::from_ref(&dir));
    let addr = addrs[0].as_str();
    let mut responders = Processes(vec![
        treescale(
            &cluster,
            &["reply", "--node", addr, "svc.upper", "--exec", "tr a-z A-Z"],
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap(),
        treescale(
            &cluster,
            &["reply", "--node", addr, "svc.slow", "--exec", "sleep 5"],
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap(),
    ]);
    let request = |args: &[&str], stdin: &str| {
        use std::io::Write;
        let mut child = treescale(&cluster, &[&["request", "--node", addr], args].concat())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        wait_with_timeout(child, Duration::from_secs(20))
    };
    // The responders subscribe moments after they start: ask until the
    // service is there.
    let deadline = Instant::now() + Duration::from_secs(10);
    let answered = loop {
        let output = request(&["svc.upper", "hello"], "");
        if output.status.success() || Instant::now() > deadline {
            break output;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(answered.status.success(), "{answered:?}");
    assert_eq!(String::from_utf8_lossy(&answered.stdout), "HELLO\n");
    // One request per line of stdin, answers in order.
    let lines = request(&["svc.upper"], "one\ntwo\nthree\n");
    assert!(lines.status.success(), "{lines:?}");
    assert_eq!(String::from_utf8_lossy(&lines.stdout), "ONE\nTWO\nTHREE\n");

    let error_line = |output: &std::process::Output| {
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let errors: Vec<&str> = stderr.lines().filter(|l| !l.contains(" WARN ")).collect();
        assert_eq!(errors.len(), 1, "one error line: {stderr}");
        errors[0].to_string()
    };
    let nobody = request(&["svc.nobody", "x"], "");
    assert!(
        error_line(&nobody).starts_with("error: no responders for svc.nobody"),
        "{nobody:?}"
    );
    let slow = request(&["--timeout", "300ms", "svc.slow", "x"], "");
    assert_eq!(
        error_line(&slow),
        "error: no answer to the request on svc.slow within 300ms"
    );
    // Stopped with SIGTERM mid-command, reply exits cleanly and takes its
    // command with it (the cluster's check finds no process left).
    for responder in &mut responders.0 {
        let pid = responder.id().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = responder.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "reply {pid} ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "reply {pid}: {status}");
    }
}

#[test]
fn bench_measures_round_trips_and_counts_every_answer() {
    let cluster = cluster_for("rr-bench");
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (_nodes, addrs, _logs) = spawn_nodes(&cluster, 2, &[], &dirs);
    let bench = treescale(
        &cluster,
        &[
            "bench",
            "--node",
            &addrs[0],
            "--node",
            &addrs[1],
            "--request",
            "--in-flight",
            "20",
            "--msgs",
            "2000",
            "--json",
        ],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let output = wait_with_timeout(bench, Duration::from_secs(60));
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["requests"], 2000, "{report}");
    assert_eq!(report["replies"], 2000, "{report}");
    assert_eq!(report["timeouts"], 0, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    let p50 = report["rtt_p50_us"].as_u64().unwrap();
    let p99 = report["rtt_p99_us"].as_u64().unwrap();
    assert!(0 < p50 && p50 <= p99, "{report}");
    assert!(report["requests_per_sec"].as_f64().unwrap() > 0.0);
}

#[tokio::test]
async fn reply_parallel_runs_that_many_commands_at_once() {
    let cluster = cluster_for("rr-parallel");
    let dir = tempfile::tempdir().unwrap();
    let (_nodes, addrs, _logs) = spawn_nodes(&cluster, 1, &[], std::slice::from_ref(&dir));
    let addr = addrs[0].as_str();
    // Each command waits (up to 10 s) until four of them have started:
    // run one at a time, every answer would be "alone".
    let started = tempfile::tempdir().unwrap();
    let command = format!(
        "touch {d}/$$; for i in $(seq 200); do [ $(ls {d} | wc -l) -ge 4 ] && {{ echo together; exit; }}; sleep 0.05; done; echo alone",
        d = started.path().display()
    );
    let mut processes = Processes(vec![treescale(
        &cluster,
        &[
            "reply",
            "--node",
            addr,
            "--parallel",
            "4",
            "--count",
            "4",
            "svc.together",
            "--exec",
            &command,
        ],
    )
    .stdout(std::process::Stdio::null())
    .spawn()
    .unwrap()]);
    let client = connect_when_up(&cluster, addr).await;
    assert!(client
        .wait_for_interest("svc.together", Duration::from_secs(10))
        .await
        .unwrap());
    let requests: Vec<_> = (0..4)
        .map(|i| {
            treescale(
                &cluster,
                &[
                    "request",
                    "--node",
                    addr,
                    "--timeout",
                    "30s",
                    "svc.together",
                    &i.to_string(),
                ],
            )
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    for request in requests {
        let output = wait_with_timeout(request, Duration::from_secs(40));
        assert!(output.status.success(), "{output:?}");
        assert_eq!(String::from_utf8_lossy(&output.stdout), "together\n");
    }
    let reply = processes.0.pop().unwrap();
    let output = wait_with_timeout(reply, Duration::from_secs(10));
    assert!(output.status.success(), "reply exits after --count answers");
    client.close().await;
}
