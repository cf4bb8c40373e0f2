//! A backlog drains through a slow uplink (#19 item 3): 30 MB logged while the edge has no
//! uplink, then mirrored with `bandwidth = "1MiB"` and `request_timeout = "10s"`. A
//! transaction sized by bytes alone (the old 64 MiB) would take 30 s at that rate, longer than
//! the 20 s Kafka gives it, and be aborted and retried forever; transactions sized by time
//! carry what the cap sends in 5 s, and the cap waits between them. Every acknowledged record
//! is in Kafka exactly once, in order (`firmware-sim verify --kafka` and Kafka's console
//! consumer, read_committed).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::process::Command;
use std::time::Duration;

use tributary_tests::kafka::KafkaCluster;
use tributary_tests::mirror::{
    cloud_section as cloud, partitions_sum, verify_kafka, wait_mirror_status,
};
use tributary_tests::{binary, Edge};

const ROUTES: &str =
    "[[routes]]\nmatch = \"sensors/+/#\"\ntopic = \"telemetry\"\nkey = \"{1}\"\npartitions = 4\n";

#[test]
fn a_30_mb_backlog_drains_at_1_mib_per_second_exactly_once() {
    let kafka = KafkaCluster::start(1).unwrap();
    // The backlog: logged with no uplink configured.
    let mut edge = Edge::start(ROUTES);
    let work = tempfile::tempdir().unwrap();
    let manifest = work.path().join("backlog");
    let out = Command::new(binary("firmware-sim"))
        .args([
            "run",
            "--flood",
            "--broker",
            &format!("mqtt://{}", edge.addr),
        ])
        .args(["--devices", "20", "--count", "1500", "--qos", "1"])
        .args(["--payload-size", "1000"])
        .arg("--manifest")
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(edge.stop().success());

    // The uplink: 1 MiB/s.
    let path = edge.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!(
            "{text}{}bandwidth = \"1MiB\"\nrequest_timeout = \"10s\"\nmax_backoff = \"2s\"\n",
            cloud(kafka.bootstrap(), "plant-2")
        ),
    )
    .unwrap();
    edge.restart();
    let s = wait_mirror_status(
        &edge,
        "the backlog drained",
        Duration::from_secs(600),
        |s| s["lag_records"] == 0 && s["records_mirrored"].as_u64() > Some(0),
    );
    let logged = partitions_sum(&s, "telemetry", "edge_end_offset");
    assert_eq!(logged, 30_000, "{s:#}");
    assert!(
        s["bytes_mirrored"].as_u64().unwrap() > 30_000_000,
        "the backlog is 30 MB: {s:#}"
    );
    let transactions = s["transactions"].as_u64().unwrap();
    assert!(
        transactions >= 5,
        "at most 5 MiB (and one read of the log) per transaction at 1 MiB/s: {transactions}"
    );

    let expected = verify_kafka(&kafka, &manifest, "plant-2.telemetry", 30_000, "300s");
    let consumed = kafka
        .consume_committed("plant-2.telemetry", Duration::from_secs(10))
        .unwrap();
    assert_eq!(consumed.len() as u64, logged, "each logged record once");
    let kcat: usize = kafka.kcat_count("plant-2.telemetry").unwrap();
    assert_eq!(
        kcat as u64, logged,
        "kcat reads each logged record once too"
    );
    eprintln!(
        "acknowledged={expected} in_kafka={} kcat={kcat} transactions={transactions}",
        consumed.len()
    );
    assert!(edge.stop().success(), "{}", edge.stderr());
}
