//! End to end through the binary: `run` against the built-in recording sink (a stand-in for the
//! edge that writes `edge read --json` lines), then `verify --edge-log` on the recording as is
//! and on doctored copies with a lost, a duplicated and a reordered record.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_firmware-sim");

/// The sink child process, killed when dropped.
struct Sink {
    child: Child,
    address: String,
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_sink(record: &Path) -> Sink {
    let mut child = Command::new(BIN)
        .args(["sink", "--listen", "127.0.0.1:0", "--record"])
        .arg(record)
        .stdout(Stdio::piped())
        .spawn()
        .expect("sink starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let address = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected sink banner {line:?}"))
        .to_string();
    Sink { child, address }
}

fn run_fleet(sink: &Sink, manifest: &Path, extra: &[&str]) -> Output {
    let output = Command::new(BIN)
        .args(["run", "--broker", &format!("mqtt://{}", sink.address)])
        .args([
            "--devices",
            "4",
            "--rate",
            "200",
            "--count",
            "25",
            "--drain",
            "5s",
        ])
        .arg("--manifest")
        .arg(manifest)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "run failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn verify(manifest: &Path, log: &Path) -> (i32, String) {
    let output = Command::new(BIN)
        .args(["verify", "--manifest"])
        .arg(manifest)
        .arg("--edge-log")
        .arg(log)
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let last = stdout.lines().last().unwrap_or_default().to_string();
    (output.status.code().unwrap(), last)
}

fn field(summary: &str, name: &str) -> String {
    summary
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("{name} missing from {summary:?}"))
        .to_string()
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn seq_of(line: &str) -> (String, u64) {
    let record: serde_json::Value = serde_json::from_str(line).unwrap();
    let payload: serde_json::Value =
        serde_json::from_str(record["payload"].as_str().unwrap()).unwrap();
    (
        payload["device"].as_str().unwrap().to_string(),
        payload["seq"].as_u64().unwrap(),
    )
}

#[test]
fn verify_passes_on_a_complete_log_and_detects_loss_duplicates_and_reordering() {
    let dir = tempfile::tempdir().unwrap();
    let recording = dir.path().join("edge.jsonl");
    let manifest = dir.path().join("manifest");
    let sink = start_sink(&recording);
    run_fleet(&sink, &manifest, &["--qos", "1", "--protocol", "5"]);

    let (code, summary) = verify(&manifest, &recording);
    assert_eq!(code, 0, "{summary}");
    assert!(
        summary.starts_with("expected=100 received=100 lost=0 duplicates=0 reordered=0 p99_ms="),
        "{summary}"
    );

    let mut original = lines(&recording);
    // Records of other producers share the log; the verifier must skip them.
    original.push(r#"{"topic":"telemetry","partition":1,"offset":0,"timestamp_ms":1,"key":"x","headers":{},"payload":"21.5","payload_encoding":"utf8"}"#.into());
    original.push("not json at all".into());
    let (code, summary) = verify(
        &manifest,
        &write_lines(dir.path(), "noise.jsonl", &original),
    );
    assert_eq!(code, 0, "{summary}");

    // Loss: drop one record.
    let mut lossy = original.clone();
    lossy.remove(10);
    let (code, summary) = verify(&manifest, &write_lines(dir.path(), "lossy.jsonl", &lossy));
    assert_eq!(code, 1, "{summary}");
    assert_eq!(field(&summary, "lost"), "1");
    assert_eq!(field(&summary, "duplicates"), "0");

    // Duplicate: repeat one record at the end.
    let mut duplicated = original.clone();
    duplicated.push(original[3].clone());
    let (code, summary) = verify(
        &manifest,
        &write_lines(dir.path(), "dup.jsonl", &duplicated),
    );
    assert_eq!(code, 1, "{summary}");
    assert_eq!(field(&summary, "duplicates"), "1");
    assert_eq!(field(&summary, "lost"), "0");

    // Reordering: swap two records of the same device; reported, but not a failure.
    let mut reordered = original.clone();
    let first = seq_of(&reordered[0]).0;
    let later = (1..100)
        .find(|&i| seq_of(&reordered[i]).0 == first)
        .unwrap();
    reordered.swap(0, later);
    let (code, summary) = verify(
        &manifest,
        &write_lines(dir.path(), "reorder.jsonl", &reordered),
    );
    assert_eq!(code, 0, "{summary}");
    assert_eq!(field(&summary, "reordered"), "1");
}

#[test]
fn binary_payloads_over_mqtt_3_1_1_with_qos2_are_verified_from_base64_records() {
    let dir = tempfile::tempdir().unwrap();
    let recording = dir.path().join("edge.jsonl");
    let manifest = dir.path().join("manifest");
    let sink = start_sink(&recording);
    run_fleet(
        &sink,
        &manifest,
        &[
            "--qos",
            "2",
            "--protocol",
            "3.1.1",
            "--payload",
            "binary",
            "--payload-size",
            "48",
        ],
    );
    let recorded = lines(&recording);
    assert!(recorded
        .iter()
        .all(|l| l.contains(r#""payload_encoding":"base64""#)));
    let (code, summary) = verify(&manifest, &recording);
    assert_eq!(code, 0, "{summary}");
    assert_eq!(field(&summary, "expected"), "100");
    assert_eq!(field(&summary, "received"), "100");
}

#[test]
fn qos0_loss_is_reported_without_failing() {
    let dir = tempfile::tempdir().unwrap();
    let recording = dir.path().join("edge.jsonl");
    let manifest = dir.path().join("manifest");
    let sink = start_sink(&recording);
    run_fleet(&sink, &manifest, &["--qos", "0"]);
    let mut recorded = lines(&recording);
    recorded.truncate(90);
    let (code, summary) = verify(&manifest, &write_lines(dir.path(), "cut.jsonl", &recorded));
    assert_eq!(code, 0, "{summary}");
    assert_eq!(field(&summary, "expected"), "0");
    assert_eq!(field(&summary, "lost"), "0");
}
