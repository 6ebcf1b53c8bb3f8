//! `treescale request` and `treescale reply`: request/reply from the shell,
//! down to a service in one line (`treescale reply svc.date --exec date`).

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use treescale::Event;

use super::client_commands::parse_header;
use super::ConnectArgs;

/// The long help of `request`: on its variant in [`super::Command`], where
/// clap reads it.
pub const REQUEST_ABOUT: &str = "Send a request to TOPIC and print the first answer's payload \
as one line on stdout. With DATA, one request carries it; without, every line of stdin is one \
request, and the answers are printed in the same order:\n\n  \
treescale reply svc.upper --exec 'tr a-z A-Z' &\n  treescale request svc.upper hello      # HELLO\n\n\
Every subscriber of TOPIC receives a request (one member per queue group) and the first answer \
wins. The answer comes straight back to this client's node along the tree. When no subscription \
anywhere matches TOPIC, request fails at once (`error: no responders for TOPIC`); when no answer \
comes within --timeout, it fails then. Either way it exits with status 1.";

#[derive(Args, Debug)]
pub struct RequestArgs {
    #[command(flatten)]
    connect: ConnectArgs,

    /// Dot-separated topic, e.g. svc.echo (no wildcards).
    topic: String,

    /// Payload of a single request. Without it, stdin is read line by line.
    data: Option<String>,

    /// How long to wait for each answer.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "5s")]
    timeout: Duration,

    /// Header KEY=VALUE carried with every request (repeatable).
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_header)]
    headers: Vec<(String, String)>,
}

pub async fn request(args: RequestArgs) -> anyhow::Result<()> {
    treescale::topic::Topic::new(args.topic.as_str())
        .with_context(|| format!("cannot send a request to {:?}", args.topic))?;
    let client = args.connect.connect("treescale request").await?;
    let mut stdout = std::io::stdout().lock();
    let mut answer = async |payload: String| -> anyhow::Result<()> {
        let reply = client
            .request_with_headers(&args.topic, args.headers.clone(), payload, args.timeout)
            .await?;
        writeln!(stdout, "{}", String::from_utf8_lossy(&reply.payload))?;
        stdout.flush()?;
        Ok(())
    };
    let answered = match args.data.clone() {
        Some(data) => answer(data).await,
        None => {
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            let mut result = Ok(());
            while let Some(line) = lines.next_line().await.context("reading stdin")? {
                result = answer(line).await;
                if result.is_err() {
                    break;
                }
            }
            result
        }
    };
    client.close().await;
    answered
}

/// The long help of `reply`.
pub const REPLY_ABOUT: &str = "Answer the requests sent to TOPIC: with RESPONSE, every request \
gets it; with --exec CMD, CMD runs (under sh -c) with the request's payload on stdin and its \
standard output, less one trailing newline, is the answer; with neither, each request is \
answered with its own payload (an echo service). Each request's payload is printed as one line \
on stdout once it is answered.\n\n  treescale reply svc.date --exec date &\n  treescale request svc.date\n\n\
Several `reply` processes with the same --group share the requests, each answered once; without \
a group, each of them answers and the requester takes the first answer. --exec runs one command \
at a time, requests in order; --parallel N runs up to N at once, each answered as its command \
ends.";

#[derive(Args, Debug)]
pub struct ReplyArgs {
    #[command(flatten)]
    connect: ConnectArgs,

    /// Topic pattern to serve, e.g. svc.echo or 'svc.>' (quoted for the shell).
    topic: String,

    /// The answer to every request.
    #[arg(conflicts_with = "exec")]
    response: Option<String>,

    /// Answer with this shell command's output, given the request on stdin.
    #[arg(long, value_name = "CMD")]
    exec: Option<String>,

    /// With --exec: run the command for up to N requests at once.
    #[arg(long, value_name = "N", default_value_t = 1, requires = "exec", value_parser = clap::value_parser!(u32).range(1..))]
    parallel: u32,

    /// Join this queue group: each request goes to one member.
    #[arg(long, value_name = "NAME")]
    group: Option<String>,

    /// Exit after answering this many requests.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
}

pub async fn reply(args: ReplyArgs) -> anyhow::Result<()> {
    treescale::topic::Pattern::new(args.topic.as_str())
        .with_context(|| format!("cannot serve {:?}", args.topic))?;
    if args.count == Some(0) {
        return Ok(());
    }
    let stop = super::stop_requested();
    tokio::pin!(stop);
    let client = args.connect.connect_long_lived("treescale reply").await?;
    let mut requests = match &args.group {
        Some(group) => client.subscribe_group(&args.topic, group).await?,
        None => client.subscribe(&args.topic).await?,
    };
    // Commands running for --exec, each yielding its request and answer;
    // dropped, they are killed.
    let mut commands = tokio::task::JoinSet::new();
    let mut taken = 0u64;
    let mut answered = 0u64;
    let mut stdout = std::io::stdout().lock();
    loop {
        let room =
            commands.len() < args.parallel as usize && args.count.is_none_or(|count| taken < count);
        let (request, answer) = tokio::select! {
            _ = &mut stop => break,
            Some(done) = commands.join_next() => done.context("an --exec command's task failed")?,
            request = requests.next(), if room => {
                let Some(request) = request else {
                    let why = client
                        .close_reason()
                        .map(|why| format!(": {why}"))
                        .unwrap_or_default();
                    anyhow::bail!("connection lost after {answered} answer(s){why}");
                };
                // Plain events on the topic carry no address to answer.
                if request.reply.is_none() {
                    continue;
                }
                taken += 1;
                match (&args.response, &args.exec) {
                    (Some(response), _) => (request, Ok(Bytes::from(response.clone()))),
                    (None, Some(command)) => {
                        let command = command.clone();
                        commands.spawn(async move {
                            let answer = run(&command, &request).await;
                            (request, answer)
                        });
                        continue;
                    }
                    (None, None) => {
                        let echo = request.payload.clone();
                        (request, Ok(echo))
                    }
                }
            }
        };
        client.respond(&request, answer?).await?;
        answered += 1;
        if writeln!(stdout, "{}", String::from_utf8_lossy(&request.payload))
            .and_then(|()| stdout.flush())
            .is_err()
        {
            // stdout closed (e.g. `| head`): a normal way to stop.
            break;
        }
        if args.count.is_some_and(|n| answered >= n) {
            break;
        }
    }
    drop(stdout);
    // Commands still running are stopped, with what they started.
    commands.shutdown().await;
    client.close().await;
    Ok(())
}

/// Runs `command` under `sh -c` with the request's payload on stdin; its
/// output, less one trailing newline, answers it. A command that fails
/// still answers (with what it printed), so the requester does not wait
/// out its timeout; the failure is reported here. Dropped before the
/// command ends, it kills the command and everything the command started.
async fn run(command: &str, request: &Event) -> anyhow::Result<Bytes> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        // Its own process group, so that its children can be killed with it.
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot run {command:?}"))?;
    let mut group = ProcessGroup(child.id());
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let payload = request.payload.clone();
    // Written beside the wait, so a command that prints before reading
    // all its input cannot block on a full pipe.
    let feed = tokio::spawn(async move {
        let _ = stdin.write_all(&payload).await;
    });
    let output = child
        .wait_with_output()
        .await
        .with_context(|| format!("running {command:?}"))?;
    group.0 = None;
    let _ = feed.await;
    if !output.status.success() {
        eprintln!(
            "warning: {command:?} {} for a request on {}; answered with its output",
            output.status, request.topic
        );
    }
    let mut answer = output.stdout;
    if answer.last() == Some(&b'\n') {
        answer.pop();
    }
    Ok(Bytes::from(answer))
}

/// A running command's process group, killed when dropped unless the
/// command has ended.
struct ProcessGroup(Option<u32>);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Some(leader) = self.0.and_then(|pid| i32::try_from(pid).ok()) {
            // SAFETY: kill(2) takes plain integers and touches no memory.
            unsafe {
                libc::kill(-leader, libc::SIGKILL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_request() -> Event {
        Event {
            id: treescale::wire::EventId {
                publisher: 1,
                seq: 1,
            },
            origin: treescale::NodeId::from_bytes([1; 32]),
            topic: treescale::topic::Topic::new("svc.upper").unwrap(),
            headers: Vec::new(),
            payload: Bytes::from_static(b"hello"),
            reply: None,
        }
    }

    #[tokio::test]
    async fn a_command_answers_with_its_output_less_one_newline() {
        let request = sample_request();
        let answer = run("tr a-z A-Z; echo; echo", &request).await.unwrap();
        assert_eq!(answer, Bytes::from_static(b"HELLO\n"));
        let answer = run("cat; exit 3", &request).await.unwrap();
        assert_eq!(answer, Bytes::from_static(b"hello"));
    }

    #[tokio::test]
    async fn a_command_stopped_midway_is_killed_with_what_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let request = Event {
            payload: Bytes::new(),
            ..sample_request()
        };
        let command = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
        let stopped =
            tokio::time::timeout(Duration::from_millis(500), run(&command, &request)).await;
        assert!(stopped.is_err(), "the command was still running");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let stat = format!("/proc/{}/stat", pid.trim());
        // Gone, or a zombie waiting to be reaped by init.
        let alive = |stat: &str| {
            std::fs::read_to_string(stat)
                .map(|s| {
                    !s.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                })
                .unwrap_or(false)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while alive(&stat) {
            assert!(
                std::time::Instant::now() < deadline,
                "sleep {pid} outlived its command"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
