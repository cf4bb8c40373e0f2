//! Bad input fails fast with a message that names the option or file.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_firmware-sim");

fn run(args: &[&str]) -> (i32, String) {
    let output = Command::new(BIN).args(args).output().unwrap();
    (
        output.status.code().unwrap(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn zero_rate_names_the_option() {
    let (code, stderr) = run(&["run", "--rate", "0", "--duration", "1s"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--rate"), "{stderr}");
}

#[test]
fn unknown_scenario_key_names_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.toml");
    std::fs::write(&path, "[[class]]\nname = \"t\"\ndevices = 2\nrate_hz = 1\n").unwrap();
    let (code, stderr) = run(&[
        "run",
        "--scenario",
        path.to_str().unwrap(),
        "--duration",
        "1s",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("fleet.toml"), "{stderr}");
    assert!(stderr.contains("rate_hz"), "{stderr}");
}

#[test]
fn unreachable_broker_counts_connect_failures_and_exits_non_zero() {
    // Port 1 on loopback: nothing listens there, so every attempt is refused at once.
    let output = Command::new(BIN)
        .args(["run", "--broker", "mqtt://127.0.0.1:1", "--devices", "3"])
        .args(["--duration", "1500ms", "--qos", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    let failures: u64 = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("connect failures"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(failures >= 3, "{stdout}");
    assert!(stdout.contains("mqtt://127.0.0.1:1"), "{stdout}");
    assert!(stderr.contains("nothing was sent"), "{stderr}");
}

#[test]
fn verify_without_manifest_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.jsonl");
    std::fs::write(&log, "").unwrap();
    let (code, stderr) = run(&[
        "verify",
        "--manifest",
        dir.path().to_str().unwrap(),
        "--edge-log",
        log.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("manifest.json"), "{stderr}");
}

#[test]
fn flood_rate_must_be_positive() {
    let (code, stderr) = run(&["run", "--flood", "--flood-rate", "0", "--duration", "1s"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--flood-rate"), "{stderr}");
}

#[test]
fn flood_rate_needs_flood() {
    let (code, stderr) = run(&["run", "--flood-rate", "100", "--duration", "1s"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--flood"), "{stderr}");
}

#[test]
fn verify_kafka_needs_a_topic() {
    let (code, stderr) = run(&[
        "verify",
        "--manifest",
        "/nonexistent",
        "--kafka",
        "127.0.0.1:1",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--kafka-topic"), "{stderr}");
}

#[test]
fn verify_kafka_unreachable_cluster_names_it() {
    // A manifest is read before Kafka is, so write an empty one.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("devices.jsonl"), "").unwrap();
    std::fs::write(
        dir.path().join("manifest.json"),
        r#"{"format":"tributary-firmware-sim-manifest","version":1,"run":"00000001",
            "mode":"normal","broker":"mqtt://x","protocol":"5","started_at_us":0,
            "finished_at_us":0,"classes":[],"devices":0,
            "totals":{"sent":0,"acked":0,"refused":0}}"#,
    )
    .unwrap();
    // Port 1 on loopback: nothing listens there.
    let (code, stderr) = run(&[
        "verify",
        "--manifest",
        dir.path().to_str().unwrap(),
        "--kafka",
        "127.0.0.1:1",
        "--kafka-topic",
        "plant-7.telemetry",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr
            .contains("Kafka 127.0.0.1:1: cannot read the metadata of topic \"plant-7.telemetry\""),
        "{stderr}"
    );
}
