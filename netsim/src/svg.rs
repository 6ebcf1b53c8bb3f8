//! The report as an SVG timeline: faults as shaded spans from the fault
//! to the repair, with marks where a node first noticed and where the tree
//! was whole again; below them, each node's delivery rate.

use std::fmt::Write;

use crate::report::Report;

const WIDTH: f64 = 1000.0;
const LEFT: f64 = 110.0;
const FAULT_ROW: f64 = 18.0;
const LANE: f64 = 60.0;

pub fn render(report: &Report) -> String {
    let span = report.duration_ms.max(1) as f64;
    let x = |ms: u64| LEFT + (WIDTH - LEFT - 10.0) * ms as f64 / span;
    let faults_height = FAULT_ROW * report.faults.len() as f64;
    let lanes = &report.timeline.delivered;
    let top = 40.0;
    let lanes_top = top + faults_height + 30.0;
    let height = lanes_top + LANE * lanes.len() as f64 + 40.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let verdict = if report.invariants_ok {
        "invariants held"
    } else {
        "INVARIANTS VIOLATED"
    };
    let _ = writeln!(
        svg,
        r#"<text x="10" y="20" font-size="14">{} — seed {}, {} nodes, {}</text>"#,
        escape(&report.scenario),
        report.seed,
        report.nodes,
        verdict
    );
    for (row, fault) in report.faults.iter().enumerate() {
        let y = top + FAULT_ROW * row as f64;
        let start = x(fault.at_ms);
        let end = fault
            .repaired_ms
            .map_or(x(report.duration_ms), |r| x(fault.at_ms + r));
        let _ = writeln!(
            svg,
            r##"<text x="10" y="{:.1}">{}</text><rect x="{start:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#f4b183"><title>{} {}: at {} ms</title></rect>"##,
            y + 12.0,
            escape(&fault.kind),
            y + 2.0,
            (end - start).max(1.0),
            FAULT_ROW - 4.0,
            escape(&fault.kind),
            escape(&fault.target),
            fault.at_ms
        );
        if let Some(d) = fault.detected_ms {
            let _ = writeln!(
                svg,
                r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="#c00000"><title>noticed by {} after {d} ms</title></circle>"##,
                x(fault.at_ms + d),
                y + FAULT_ROW / 2.0,
                escape(fault.detected_by.as_deref().unwrap_or("?"))
            );
        }
        if let Some(r) = fault.repaired_ms {
            let _ = writeln!(
                svg,
                r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="#00a050"><title>one tree per component after {r} ms</title></circle>"##,
                x(fault.at_ms + r),
                y + FAULT_ROW / 2.0
            );
        }
    }
    let bucket = report.timeline.bucket_ms.max(1);
    let per_second = 1000.0 / bucket as f64;
    // Each lane to its own scale: a backlog delivered at once after a heal
    // would flatten every other lane.
    for (lane, (node, counts)) in lanes.iter().enumerate() {
        let peak = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
        let base = lanes_top + LANE * (lane as f64 + 1.0) - 8.0;
        let _ = writeln!(
            svg,
            r##"<text x="10" y="{:.1}">{}</text><text x="10" y="{:.1}" fill="#666">peak {:.0}/s</text><line x1="{LEFT}" y1="{base:.1}" x2="{:.1}" y2="{base:.1}" stroke="#bbb"/>"##,
            base - 26.0,
            escape(node),
            base - 12.0,
            peak * per_second,
            WIDTH - 10.0
        );
        let points: Vec<String> = counts
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let px = x(i as u64 * bucket);
                let py = base - (LANE - 14.0) * c as f64 / peak;
                format!("{px:.1},{py:.1}")
            })
            .collect();
        let _ = writeln!(
            svg,
            r##"<polyline fill="none" stroke="#2060c0" stroke-width="1.5" points="{}"/>"##,
            points.join(" ")
        );
    }
    let axis = height - 20.0;
    let seconds = report.duration_ms / 1000;
    let step = (seconds / 10).max(1);
    for s in (0..=seconds).step_by(step as usize) {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{axis:.1}" text-anchor="middle">{s}s</text>"#,
            x(s * 1000)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="10" y="{:.1}">events delivered per node, per {bucket} ms</text>"#,
        height - 5.0
    );
    svg.push_str("</svg>\n");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
