//! The report as an SVG timeline, readable on paper or as a PNG (nothing is
//! said only in tooltips): a legend; each fault as a bar spanning the time
//! it was in effect, with the stretch until the tree was whole again drawn
//! over it, a red mark where a node first noticed and a green one where the
//! tree was whole; below them, each subscriber's delivery rate.

use std::fmt::Write;

use crate::report::{clip, FaultReport, Report};

const WIDTH: f64 = 1000.0;
const LEFT: f64 = 190.0;
const FAULT_ROW: f64 = 18.0;
const LANE: f64 = 60.0;
const LEGEND: f64 = 22.0;
/// A fault that lasts no time (a heal, a restart) is drawn this wide.
const TICK: f64 = 3.0;

/// Colours of the fault bars and marks, named for the legend.
const IN_EFFECT: &str = "#fbe2d0";
const UNTIL_WHOLE: &str = "#e0803c";
const NOTICED: &str = "#c00000";
const WHOLE: &str = "#00a050";

pub fn render(report: &Report) -> String {
    let span = report.duration_ms.max(1) as f64;
    let x = |ms: u64| LEFT + (WIDTH - LEFT - 10.0) * ms.min(report.duration_ms) as f64 / span;
    let lanes = &report.timeline.delivered;
    let top = 34.0 + LEGEND;
    let faults_height = FAULT_ROW * report.faults.len() as f64;
    let lanes_top = top + faults_height + 24.0;
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
    legend(&mut svg, 36.0);

    for (row, fault) in report.faults.iter().enumerate() {
        let y = top + FAULT_ROW * row as f64;
        let start = x(fault.at_ms);
        let end = fault_end(&report.faults, row).map_or(start + TICK, |end| {
            x(end.unwrap_or(report.duration_ms)).max(start + TICK)
        });
        let _ = writeln!(
            svg,
            r##"<text x="10" y="{:.1}">{} {}</text><rect x="{start:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{IN_EFFECT}"><title>{} {}: from {} ms</title></rect>"##,
            y + 12.0,
            escape(&fault.kind),
            escape(&clip(&fault.target, 22)),
            y + 2.0,
            end - start,
            FAULT_ROW - 4.0,
            escape(&fault.kind),
            escape(&fault.target),
            fault.at_ms
        );
        if let Some(r) = fault.repaired_ms {
            let _ = writeln!(
                svg,
                r##"<rect x="{start:.1}" y="{:.1}" width="{:.1}" height="6" fill="{UNTIL_WHOLE}"/>"##,
                y + FAULT_ROW / 2.0 - 3.0,
                (x(fault.at_ms + r) - start).max(1.0),
            );
        }
        if let Some(d) = fault.detected_ms {
            let _ = writeln!(
                svg,
                r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{NOTICED}"><title>noticed by {} after {d} ms</title></circle>"##,
                x(fault.at_ms + d),
                y + FAULT_ROW / 2.0,
                escape(fault.detected_by.as_deref().unwrap_or("?"))
            );
        }
        if let Some(r) = fault.repaired_ms {
            let _ = writeln!(
                svg,
                r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{WHOLE}"><title>one tree per component after {r} ms</title></circle>"##,
                x(fault.at_ms + r),
                y + FAULT_ROW / 2.0
            );
        }
    }

    let bucket = report.timeline.bucket_ms.max(1);
    let per_second = 1000.0 / bucket as f64;
    for (lane, (label, counts)) in lanes.iter().enumerate() {
        let base = lanes_top + LANE * (lane as f64 + 1.0) - 8.0;
        let (scale, peak) = lane_scale(counts);
        let clipped = if peak > scale {
            format!(", peaks of {:.0}/s clipped (▲)", peak as f64 * per_second)
        } else {
            String::new()
        };
        let _ = writeln!(
            svg,
            r##"<text x="10" y="{:.1}">{}</text><text x="10" y="{:.1}" fill="#666">top of lane {:.0}/s{}</text><line x1="{LEFT}" y1="{base:.1}" x2="{:.1}" y2="{base:.1}" stroke="#bbb"/>"##,
            base - 30.0,
            escape(&clip(label, 30)),
            base - 16.0,
            scale as f64 * per_second,
            clipped,
            WIDTH - 10.0
        );
        let height_of = |c: u64| (LANE - 14.0) * c.min(scale) as f64 / scale as f64;
        let points: Vec<String> = counts
            .iter()
            .enumerate()
            .map(|(i, &c)| format!("{:.1},{:.1}", x(i as u64 * bucket), base - height_of(c)))
            .collect();
        let _ = writeln!(
            svg,
            r##"<polyline fill="none" stroke="#2060c0" stroke-width="1.5" points="{}"/>"##,
            points.join(" ")
        );
        for (i, &c) in counts.iter().enumerate().filter(|(_, &c)| c > scale) {
            let _ = writeln!(
                svg,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#2060c0" font-size="9">▲<title>{:.0}/s</title></text>"##,
                x(i as u64 * bucket),
                base - (LANE - 14.0) - 2.0,
                c as f64 * per_second
            );
        }
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
        r#"<text x="10" y="{:.1}">events delivered to each subscriber, per {bucket} ms (virtual time)</text>"#,
        height - 5.0
    );
    svg.push_str("</svg>\n");
    svg
}

/// How the legend draws a colour: as a bar of some height, or a dot.
enum Mark {
    Bar(f64, &'static str),
    Dot(&'static str),
}

/// One line that says what every colour means.
fn legend(svg: &mut String, y: f64) {
    let items = [
        ("fault in effect", Mark::Bar(11.0, IN_EFFECT)),
        ("until one tree again", Mark::Bar(6.0, UNTIL_WHOLE)),
        ("first node noticed", Mark::Dot(NOTICED)),
        ("every part one tree again", Mark::Dot(WHOLE)),
    ];
    let mut at = 10.0;
    for (text, mark) in items {
        let _ = match mark {
            Mark::Bar(height, colour) => writeln!(
                svg,
                r#"<rect x="{at:.1}" y="{:.1}" width="14" height="{height}" fill="{colour}"/>"#,
                y + (11.0 - height) / 2.0
            ),
            Mark::Dot(colour) => writeln!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{colour}"/>"#,
                at + 7.0,
                y + 5.5
            ),
        };
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}">{text}</text>"#,
            at + 18.0,
            y + 9.0
        );
        at += 18.0 + 6.2 * text.len() as f64 + 16.0;
    }
}

/// When fault `i` stopped being in effect: `None` for one that takes no
/// time (a heal, a restart); `Some(None)` for one still in effect at the
/// end of the run.
fn fault_end(faults: &[FaultReport], i: usize) -> Option<Option<u64>> {
    let fault = &faults[i];
    let link = |f: &FaultReport| f.target.split(' ').next().unwrap_or_default().to_string();
    let ends: &dyn Fn(&FaultReport) -> bool = match fault.kind.as_str() {
        "partition" | "one-way" | "flap-down" => &|f| f.kind == "heal" || f.kind == "flap-up",
        "crash" => &|f| f.kind == "restart" && f.target == fault.target,
        "churn" => &|f| f.kind == "churn",
        "loss" | "latency" => &|f| f.kind == fault.kind && link(f) == link(fault),
        _ => return None,
    };
    Some(
        faults[i + 1..]
            .iter()
            .find(|f| f.at_ms >= fault.at_ms && ends(f))
            .map(|f| f.at_ms),
    )
}

/// The count a lane's full height stands for, and its real peak. The scale
/// follows the steady rate, not a backlog delivered at once after a heal,
/// which would flatten everything else; buckets above it are clipped and
/// marked.
fn lane_scale(counts: &[u64]) -> (u64, u64) {
    let peak = counts.iter().copied().max().unwrap_or(0).max(1);
    let mut busy: Vec<u64> = counts.iter().copied().filter(|&c| c > 0).collect();
    if busy.is_empty() {
        return (1, peak);
    }
    busy.sort_unstable();
    let steady = busy[busy.len() / 2];
    let scale = (steady * 2).max(1);
    (scale.min(peak), peak)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(kind: &str, target: &str, at_ms: u64) -> FaultReport {
        FaultReport {
            kind: kind.into(),
            target: target.into(),
            at_ms,
            detected_ms: None,
            detected_by: None,
            repaired_ms: None,
            held_peak: 0,
        }
    }

    #[test]
    fn a_fault_lasts_until_what_undoes_it() {
        let faults = vec![
            fault("partition", "a | b", 10_000),
            fault("crash", "c", 12_000),
            fault("loss", "a-c 10%", 13_000),
            fault("heal", "all", 25_000),
            fault("loss", "a-c 0%", 26_000),
            fault("crash", "d", 27_000),
            fault("restart", "c", 30_000),
        ];
        assert_eq!(fault_end(&faults, 0), Some(Some(25_000)));
        assert_eq!(fault_end(&faults, 1), Some(Some(30_000)));
        assert_eq!(fault_end(&faults, 2), Some(Some(26_000)));
        assert_eq!(fault_end(&faults, 3), None, "a heal takes no time");
        assert_eq!(fault_end(&faults, 5), Some(None), "d never restarts");
    }

    #[test]
    fn a_backlog_spike_does_not_set_a_lane_s_scale() {
        let mut counts = vec![10u64; 50];
        counts[30] = 1500;
        let (scale, peak) = lane_scale(&counts);
        assert_eq!(peak, 1500);
        assert_eq!(scale, 20);
        assert_eq!(lane_scale(&[0, 0]), (1, 1));
    }
}
