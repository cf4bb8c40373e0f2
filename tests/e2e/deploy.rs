//! What ships for deployment (edge/deploy/) against the edge it ships with: the Grafana
//! dashboard only queries metrics the edge exposes, and the operations families
//! (`tributary_build_info`, the standard `process_*` ones) say true things.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::collections::BTreeSet;

use tributary_tests::{
    assert_readme_names_metrics, free_port, http_get, metric, workspace_root, Edge,
};

/// An edge with every optional family present: a disk budget, a consumer group and a
/// mirror (to a Kafka that is not there: its families exist all the same).
fn full_edge() -> Edge {
    Edge::start_with(
        "",
        "disk_budget = \"1GiB\"",
        &format!(
            "[[routes]]\nmatch = \"sensors/#\"\ntopic = \"telemetry\"\n\n\
             [[groups]]\nname = \"alarms\"\ntopics = [\"telemetry\"]\n\n\
             [cloud]\nbootstrap = \"127.0.0.1:{}\"\nsite = \"deploy-test\"\n",
            free_port()
        ),
    )
}

/// Metric names a PromQL expression uses: identifiers of the edge's two prefixes.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut current = String::new();
    for c in expr.chars().chain([' ']) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            current.push(c);
        } else {
            if current.starts_with("tributary_") || current.starts_with("process_") {
                names.push(current.clone());
            }
            current.clear();
        }
    }
    names
}

/// Every PromQL query of the dashboard: panel targets and template variable queries.
fn queries(node: &serde_json::Value, out: &mut Vec<String>) {
    match node {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(q)) => out.push(q.clone()),
                    _ => queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

#[test]
fn the_grafana_dashboard_queries_only_metrics_the_edge_exposes() {
    let mut edge = full_edge();
    let (status, text) = http_get(edge.admin, "/metrics", None).unwrap();
    assert_eq!(status, 200);
    // Families with the series names they give: a histogram's _bucket, _sum and _count.
    let mut exposed = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            exposed.insert(name.to_string());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    exposed.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    let path = workspace_root().join("edge/deploy/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut all = Vec::new();
    queries(&dashboard, &mut all);
    assert!(all.len() >= 20, "the dashboard has its queries: {all:?}");
    let mut used = BTreeSet::new();
    for q in &all {
        let names = metric_names(q);
        assert!(!names.is_empty(), "a query that names no edge metric: {q}");
        for name in names {
            assert!(
                exposed.contains(&name),
                "the dashboard queries {name} ({q}), which the edge does not expose; it has {exposed:?}"
            );
            used.insert(name);
        }
    }
    // It shows each area an operator watches.
    for wanted in [
        "tributary_messages_received_total",
        "tributary_disk_free_bytes",
        "tributary_mirror_lag_records",
        "tributary_group_lag_records",
        "process_resident_memory_bytes",
    ] {
        assert!(used.contains(wanted), "the dashboard shows {wanted}");
    }
    assert!(edge.stop().success(), "{}", edge.stderr());
}

#[test]
fn build_info_and_process_metrics_describe_the_running_edge() {
    let mut edge = full_edge();
    let (status, text) = http_get(edge.admin, "/metrics", None).unwrap();
    assert_eq!(status, 200);
    assert_readme_names_metrics(&text);

    let version = env!("CARGO_PKG_VERSION");
    let info = text
        .lines()
        .find(|l| l.starts_with("tributary_build_info{"))
        .unwrap_or_else(|| panic!("no tributary_build_info in\n{text}"));
    assert!(info.ends_with(" 1"), "{info}");
    assert!(info.contains(&format!("version=\"{version}\"")), "{info}");
    // Built from this checkout: the commit label is its HEAD.
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(workspace_root())
        .output()
        .unwrap();
    if head.status.success() {
        let head = String::from_utf8(head.stdout).unwrap();
        assert!(
            info.contains(&format!("commit=\"{}\"", head.trim())),
            "{info} is not built from HEAD {head}"
        );
    }

    let rss = metric(&text, "process_resident_memory_bytes");
    assert!(rss > 1e6 && rss < 4e9, "resident memory {rss}");
    let fds = metric(&text, "process_open_fds");
    let max_fds = metric(&text, "process_max_fds");
    // Listeners, the log's files, stdio at least.
    assert!(fds >= 5.0 && fds <= max_fds, "open fds {fds} of {max_fds}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = metric(&text, "process_start_time_seconds");
    assert!(
        started <= now + 1.0 && started > now - 3600.0,
        "started at {started}, now {now}"
    );
    let cpu = metric(&text, "process_cpu_seconds_total");
    assert!(cpu > 0.0, "cpu seconds {cpu}");
    assert!(edge.stop().success(), "{}", edge.stderr());
}
