//! The `netsim` command line: exit codes, clear errors, and the JSON and
//! SVG it writes.

use std::path::Path;
use std::process::{Command, Output};

fn netsim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_netsim"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn scenario_file(dir: &Path, text: &str) -> String {
    let path = dir.join("scenario.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

const TWO_NODES: &str = r#"
name = "two"
duration = "6s"
[[segment]]
name = "lan"
nodes = ["a", "b"]
[[publisher]]
node = "a"
topic = "t"
rate = 20
qos = "at-least-once"
from = "1s"
[[subscriber]]
node = "b"
pattern = "t"
durable = "d"
[[fault]]
at = "3s"
kind = "crash"
node = "b"
"#;

#[test]
fn a_run_writes_json_and_svg_and_exits_by_its_invariants() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let svg = dir.path().join("report.svg");
    // b, the durable subscription's home, never comes back: confirmed
    // events cannot be delivered, so an invariant fails.
    let file = scenario_file(dir.path(), TWO_NODES);
    let output = netsim(&[
        "run",
        &file,
        "--seed",
        "3",
        "--json",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("VIOLATION"), "{table}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["invariants_ok"], false);
    assert_eq!(report["seed"], 3);
    let fault = &report["faults"][0];
    assert_eq!(fault["kind"], "crash");
    assert_eq!(fault["at_ms"], 3000);
    assert!(fault["detected_ms"].as_u64().is_some(), "{fault}");
    // b alone was a tree at once: repaired as soon as it was noticed.
    assert_eq!(fault["repaired_ms"], fault["detected_ms"], "{fault}");
    let sub = &report["subscribers"][0];
    for key in ["published", "acked", "delivered", "lost", "duplicated"] {
        assert!(sub[key].as_u64().is_some(), "{key} missing: {sub}");
    }
    assert!(sub["lost"].as_u64().unwrap() > 0);
    let drawing = std::fs::read_to_string(&svg).unwrap();
    assert!(drawing.starts_with("<svg") && drawing.contains("crash"));
    // Said in the picture, not only in tooltips a PNG would lose.
    for words in [
        "fault in effect",
        "until one tree again",
        "first node noticed",
        "every part one tree again",
        "durable d on",
        "top of lane",
    ] {
        let outside_tooltips = drawing
            .split("<title>")
            .enumerate()
            .map(|(i, part)| {
                if i == 0 {
                    part
                } else {
                    part.split_once("</title>").map_or("", |(_, rest)| rest)
                }
            })
            .any(|part| part.contains(words));
        assert!(outside_tooltips, "the picture does not say {words:?}");
    }

    // Without the fault every invariant holds.
    let healthy = TWO_NODES.replace(
        "[[fault]]\nat = \"3s\"\nkind = \"crash\"\nnode = \"b\"\n",
        "",
    );
    let file = scenario_file(dir.path(), &healthy);
    let output = netsim(&["run", &file]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("invariants: all held"));
}

#[test]
fn bad_scenarios_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let output = netsim(&["run", "no-such-file.toml"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("cannot read scenario no-such-file.toml"));

    for (from, to, says) in [
        (
            "node = \"b\"\npattern",
            "node = \"z\"\npattern",
            "names node \"z\"",
        ),
        ("duration = \"6s\"", "duration = \"soon\"", "not a duration"),
        ("kind = \"crash\"", "kind = \"meteor\"", "meteor"),
        (
            "kind = \"crash\"\nnode = \"b\"",
            "kind = \"partition\"\nsets = [[\"a\", \"b\"], [\"b\"]]",
            "\"b\" is in two sets",
        ),
        ("rate = 20", "rate = 5000000", "rate must be 1 to 100000"),
        (
            "node = \"a\"\ntopic",
            "node = \"a\"\nfallback = \"b\"\ntopic",
            "fallback nodes are modelled in protocol mode only",
        ),
        (
            "node = \"b\"\npattern",
            "node = \"b\"\nfallback = \"b\"\npattern",
            "its fallback must be another node",
        ),
    ] {
        assert!(TWO_NODES.contains(from), "the base scenario lacks {from}");
        let file = scenario_file(dir.path(), &TWO_NODES.replace(from, to));
        let output = netsim(&["run", &file]);
        assert_eq!(output.status.code(), Some(2), "{to}");
        assert!(stderr(&output).contains(says), "{}", stderr(&output));
    }

    let protocol_only = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/churn-at-scale.toml");
    let output = netsim(&["run", protocol_only.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("--protocol"),
        "{}",
        stderr(&output)
    );
}
