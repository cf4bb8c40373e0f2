//! `--plot FILE.svg`: throughput and publish-to-ack latency over time, as a hand-written SVG
//! (two stacked charts sharing the time axis; no plotting dependency for two polylines).

use std::fmt::Write as _;
use std::path::Path;

use crate::error::SimError;
use crate::progress::TimelinePoint;
use crate::report::RunReport;

const WIDTH: f64 = 900.0;
const CHART_HEIGHT: f64 = 220.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const GAP: f64 = 60.0;

struct Series<'a> {
    label: &'a str,
    color: &'a str,
    value: fn(&TimelinePoint) -> f64,
}

fn nice_ceiling(value: f64) -> f64 {
    if value <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(value.log10().floor());
    for step in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if value <= step * magnitude {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

fn chart(
    svg: &mut String,
    top: f64,
    title: &str,
    unit: &str,
    points: &[TimelinePoint],
    series: &[Series<'_>],
) {
    let plot_width = WIDTH - LEFT - RIGHT;
    let t_max = points.last().map_or(1.0, |p| p.t_s).max(1.0);
    let y_max = nice_ceiling(
        points
            .iter()
            .flat_map(|p| series.iter().map(move |s| (s.value)(p)))
            .fold(0.0, f64::max),
    );
    let x = |t: f64| LEFT + t / t_max * plot_width;
    let y = |v: f64| top + CHART_HEIGHT - v / y_max * CHART_HEIGHT;
    let _ = writeln!(
        svg,
        r##"<text x="{LEFT}" y="{}" font-size="14" font-weight="bold">{title}</text>"##,
        top - 10.0
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{top}" width="{plot_width}" height="{CHART_HEIGHT}" fill="none" stroke="#999"/>"##
    );
    for i in 0..=4 {
        let v = y_max * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#eee"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end">{} {unit}</text>"##,
            WIDTH - RIGHT,
            y(v),
            y(v),
            LEFT - 6.0,
            y(v) + 4.0,
            format_value(v)
        );
    }
    for i in 0..=5 {
        let t = t_max * f64::from(i) / 5.0;
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{t:.0} s</text>"##,
            x(t),
            top + CHART_HEIGHT + 16.0
        );
    }
    for (i, s) in series.iter().enumerate() {
        let path: Vec<String> = points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.t_s), y((s.value)(p))))
            .collect();
        let _ = writeln!(
            svg,
            r##"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"##,
            s.color,
            path.join(" ")
        );
        let legend_x = LEFT + 10.0 + 150.0 * i as f64;
        let _ = writeln!(
            svg,
            r##"<rect x="{legend_x}" y="{}" width="12" height="3" fill="{}"/><text x="{}" y="{}" font-size="11">{}</text>"##,
            top + 12.0,
            s.color,
            legend_x + 16.0,
            top + 16.0,
            s.label
        );
    }
}

fn format_value(v: f64) -> String {
    if v >= 1_000_000.0 {
        format!("{:.1}M", v / 1_000_000.0)
    } else if v >= 1_000.0 {
        format!("{:.1}k", v / 1_000.0)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// The SVG document for a report.
pub fn render(report: &RunReport) -> String {
    let height = TOP + 2.0 * CHART_HEIGHT + GAP + 40.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif">"##
    );
    let _ = writeln!(svg, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(
        svg,
        r##"<text x="{LEFT}" y="18" font-size="12" fill="#555">run {} - {} mode, MQTT {}, {} devices, {}</text>"##,
        report.run, report.mode, report.protocol, report.devices, report.broker
    );
    chart(
        &mut svg,
        TOP + 10.0,
        "Throughput",
        "msg/s",
        &report.timeline,
        &[
            Series {
                label: "sent/s",
                color: "#1f77b4",
                value: |p| p.sent_per_s,
            },
            Series {
                label: "acked/s",
                color: "#2ca02c",
                value: |p| p.acked_per_s,
            },
        ],
    );
    chart(
        &mut svg,
        TOP + 10.0 + CHART_HEIGHT + GAP,
        "Publish-to-ack latency",
        "ms",
        &report.timeline,
        &[
            Series {
                label: "p50",
                color: "#ff7f0e",
                value: |p| p.p50_ms,
            },
            Series {
                label: "p99",
                color: "#d62728",
                value: |p| p.p99_ms,
            },
        ],
    );
    svg.push_str("</svg>\n");
    svg
}

/// Writes the plot of `report` to `path`.
pub fn write_svg(path: &Path, report: &RunReport) -> Result<(), SimError> {
    std::fs::write(path, render(report)).map_err(|e| SimError::io("writing", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_ceilings_are_round_numbers() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(7.3), 10.0);
        assert_eq!(nice_ceiling(1800.0), 2000.0);
        assert_eq!(nice_ceiling(230.0), 250.0);
    }
}
