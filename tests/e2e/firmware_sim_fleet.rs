//! A fleet of 1,000 simulated devices publishes QoS 1 to the edge for 10 s; `firmware-sim
//! verify` then reads the edge's log back and finds nothing lost and nothing duplicated. A
//! doctored copy of the log proves that the verifier would have noticed.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::process::Command;

use tributary_tests::{binary, last_line, summary_field as field, Edge};

#[test]
fn thousand_devices_at_qos1_lose_nothing() {
    // The whole fleet connects from 127.0.0.1: as devices behind one NAT gateway, it needs
    // more than the default per-address connection limit (1,000) while devices reconnect.
    let mut edge = Edge::start_with(
        "max_connections_per_address = 2000",
        "",
        "[[routes]]\nmatch = \"sensors/+/#\"\ntopic = \"telemetry\"\nkey = \"{1}\"\npartitions = 4\n",
    );
    let work = tempfile::tempdir().unwrap();
    let manifest = work.path().join("manifest");
    let run = Command::new(binary("firmware-sim"))
        .args(["run", "--broker", &format!("mqtt://{}", edge.addr)])
        .args([
            "--devices",
            "1000",
            "--rate",
            "10",
            "--qos",
            "1",
            "--duration",
            "10s",
        ])
        .arg("--manifest")
        .arg(&manifest)
        .arg("--report")
        .arg(work.path().join("run.json"))
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "firmware-sim run failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(edge.stop().success(), "{}", edge.stderr());

    let (status, log, stderr) = edge.cli(&["read", "--json"]);
    assert!(status.success(), "{stderr}");
    let log_path = work.path().join("edge.jsonl");
    std::fs::write(&log_path, &log).unwrap();
    let verify = |path: &std::path::Path| {
        Command::new(binary("firmware-sim"))
            .args(["verify", "--manifest"])
            .arg(&manifest)
            .arg("--edge-log")
            .arg(path)
            .output()
            .unwrap()
    };
    let out = verify(&log_path);
    let summary = last_line(&out);
    assert!(
        out.status.success(),
        "verify failed: {summary}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(field(&summary, "lost"), 0, "{summary}");
    assert_eq!(field(&summary, "duplicates"), 0, "{summary}");
    assert!(
        field(&summary, "expected") > 50_000,
        "most of 1,000 devices x 10/s x 10 s were acknowledged (the run was not vacuous): {summary}"
    );
    assert_eq!(
        field(&summary, "received"),
        field(&summary, "expected"),
        "{summary}"
    );

    // The same log with one record missing and another repeated must fail verification.
    let mut lines: Vec<&str> = log.lines().collect();
    let dropped = lines.remove(lines.len() / 2);
    assert!(!dropped.is_empty());
    lines.push(lines[10]);
    let doctored = work.path().join("doctored.jsonl");
    std::fs::write(&doctored, lines.join("\n") + "\n").unwrap();
    let out = verify(&doctored);
    let summary = last_line(&out);
    assert!(
        !out.status.success(),
        "verify must fail on a doctored log: {summary}"
    );
    assert_eq!(field(&summary, "lost"), 1, "{summary}");
    assert_eq!(field(&summary, "duplicates"), 1, "{summary}");
}

#[test]
fn paced_flood_sends_what_it_is_paced_to_and_the_edge_keeps_it_all() {
    let mut edge = Edge::start("");
    let work = tempfile::tempdir().unwrap();
    let manifest = work.path().join("manifest");
    // 2 connections x 500 messages each at 1,000 msg/s: paced, the run lasts about 0.5 s and
    // sends exactly its count.
    let run = Command::new(binary("firmware-sim"))
        .args([
            "run",
            "--flood",
            "--broker",
            &format!("mqtt://{}", edge.addr),
        ])
        .args([
            "--devices",
            "2",
            "--qos",
            "1",
            "--count",
            "500",
            "--flood-rate",
            "1000",
        ])
        .arg("--manifest")
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(edge.stop().success());
    let (status, log, _) = edge.cli(&["read", "--json"]);
    assert!(status.success());
    let log_path = work.path().join("edge.jsonl");
    std::fs::write(&log_path, &log).unwrap();
    let out = Command::new(binary("firmware-sim"))
        .args(["verify", "--manifest"])
        .arg(&manifest)
        .arg("--edge-log")
        .arg(&log_path)
        .output()
        .unwrap();
    let summary = last_line(&out);
    assert!(out.status.success(), "{summary}");
    assert_eq!(field(&summary, "expected"), 1000, "{summary}");
    assert_eq!(field(&summary, "received"), 1000, "{summary}");
}
