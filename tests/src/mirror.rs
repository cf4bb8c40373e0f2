//! Helpers of the mirror's end-to-end tests: a firmware-sim fleet through an edge,
//! `firmware-sim verify --kafka`, and the edge's `mirror-status`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::kafka::KafkaCluster;
use crate::{binary, last_line, summary_field, Edge};

/// A `[cloud]` section mirroring to `bootstrap` as `site`.
pub fn cloud_section(bootstrap: &str, site: &str) -> String {
    format!("[cloud]\nbootstrap = \"{bootstrap}\"\nsite = \"{site}\"\n")
}

/// Starts a firmware-sim fleet of `devices` publishing QoS 1 to `edge` at `rate` messages per
/// second each for `secs` seconds, writing its manifest to `manifest`.
pub fn fleet(edge: &Edge, manifest: &Path, devices: u32, rate: u32, secs: u32) -> Child {
    Command::new(binary("firmware-sim"))
        .args(["run", "--broker", &format!("mqtt://{}", edge.addr)])
        .args(["--devices", &devices.to_string()])
        .args(["--rate", &rate.to_string()])
        .args(["--qos", "1", "--duration", &format!("{secs}s")])
        .arg("--manifest")
        .arg(manifest)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a [`fleet`] and asserts it succeeded.
pub fn finish(child: Child) {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "firmware-sim run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `firmware-sim verify --kafka` of `manifest` against `topic`, waiting up to `wait` for the
/// mirror: passes, nothing lost or duplicated, at least `at_least` messages expected (the run
/// was not vacuous). Returns the number expected.
pub fn verify_kafka(
    kafka: &KafkaCluster,
    manifest: &Path,
    topic: &str,
    at_least: u64,
    wait: &str,
) -> u64 {
    let out = Command::new(binary("firmware-sim"))
        .args(["verify", "--manifest"])
        .arg(manifest)
        .args(["--kafka", kafka.bootstrap(), "--kafka-topic", topic])
        .args(["--kafka-wait", wait])
        .output()
        .unwrap();
    let summary = last_line(&out);
    assert!(
        out.status.success(),
        "verify --kafka failed: {summary}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(summary_field(&summary, "lost"), 0, "{summary}");
    assert_eq!(summary_field(&summary, "duplicates"), 0, "{summary}");
    let expected = summary_field(&summary, "expected");
    assert!(expected >= at_least, "the run was not vacuous: {summary}");
    expected
}

/// `edge mirror-status --json`, which must succeed.
pub fn mirror_status(edge: &Edge) -> serde_json::Value {
    let (status, out, err) = edge.cli(&["mirror-status", "--json"]);
    assert!(status.success(), "mirror-status: {err}");
    serde_json::from_str(&out).unwrap()
}

/// Polls `edge mirror-status --json` (which fails until the first status is written) until
/// `done` holds; fails after `within`, naming `what`. Only a status written after this call
/// began counts: the edge writes it once a second, and one written before the caller's last
/// publishes were acknowledged can show the mirror caught up with a log that was shorter
/// (a caller comparing its counts with the status's end offsets then sees records missing
/// that are not).
pub fn wait_mirror_status(
    edge: &Edge,
    what: &str,
    within: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    let since_ms = crate::now_ms();
    loop {
        let (ok, out, _) = edge.cli(&["mirror-status", "--json"]);
        if ok.success() {
            let s: serde_json::Value = serde_json::from_str(&out).unwrap();
            if s["updated_at_ms"].as_u64() > Some(since_ms) && done(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}: {s:#}");
        } else {
            assert!(Instant::now() < deadline, "{what}: no mirror status");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The sum of a numeric field over the status' partitions of log topic `topic`.
pub fn partitions_sum(status: &serde_json::Value, topic: &str, field: &str) -> u64 {
    status["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["topic"] == topic)
        .map(|p| p[field].as_u64().unwrap())
        .sum()
}
