//! The mirror against a 3-node Kafka (replication factor 3, min.insync.replicas 2) under
//! faults: one broker killed and restarted while mirroring; then every broker down for 60 s
//! while devices keep publishing. The edge keeps accepting, the backlog drains when Kafka is
//! back, and every acknowledged message is in Kafka exactly once (read_committed).

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tributary_tests::kafka::KafkaCluster;
use tributary_tests::{binary, Edge};

fn last_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

fn field(summary: &str, name: &str) -> u64 {
    summary
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("{name} in {summary:?}"))
        .parse()
        .unwrap()
}

fn fleet(edge: &Edge, manifest: &std::path::Path, secs: u32) -> Child {
    Command::new(binary("firmware-sim"))
        .args(["run", "--broker", &format!("mqtt://{}", edge.addr)])
        .args(["--devices", "50", "--rate", "20", "--qos", "1"])
        .args(["--duration", &format!("{secs}s")])
        .arg("--manifest")
        .arg(manifest)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "firmware-sim run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn verify_kafka(kafka: &KafkaCluster, manifest: &std::path::Path, at_least: u64) {
    let out = Command::new(binary("firmware-sim"))
        .args(["verify", "--manifest"])
        .arg(manifest)
        .args([
            "--kafka",
            kafka.bootstrap(),
            "--kafka-topic",
            "plant-3.telemetry",
        ])
        .args(["--kafka-wait", "300s"])
        .output()
        .unwrap();
    let summary = last_line(&out);
    assert!(
        out.status.success(),
        "verify --kafka failed: {summary}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(field(&summary, "lost"), 0, "{summary}");
    assert_eq!(field(&summary, "duplicates"), 0, "{summary}");
    assert!(
        field(&summary, "expected") >= at_least,
        "not vacuous: {summary}"
    );
}

fn mirror_status(edge: &Edge) -> serde_json::Value {
    let (status, out, err) = edge.cli(&["mirror-status", "--json"]);
    assert!(status.success(), "mirror-status: {err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn broker_loss_and_full_outage_lose_and_duplicate_nothing() {
    let kafka = KafkaCluster::start(3).unwrap();
    let mut edge = Edge::start(&format!(
        "[[routes]]\nmatch = \"sensors/+/#\"\ntopic = \"telemetry\"\nkey = \"{{1}}\"\npartitions = 4\n\
         [cloud]\nbootstrap = \"{}\"\nsite = \"plant-3\"\nmax_backoff = \"5s\"\nrequest_timeout = \"10s\"\n",
        kafka.bootstrap()
    ));
    let work = tempfile::tempdir().unwrap();

    // One broker killed while mirroring, then restarted.
    let manifest = work.path().join("broker-loss");
    let run = fleet(&edge, &manifest, 15);
    std::thread::sleep(Duration::from_secs(5));
    kafka.kill(2).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    kafka.restart(2).unwrap();
    finish(run);
    verify_kafka(&kafka, &manifest, 5_000);

    // Every broker down for 60 s while devices publish: the edge keeps accepting.
    let manifest = work.path().join("outage");
    let run = fleet(&edge, &manifest, 40);
    std::thread::sleep(Duration::from_secs(5));
    kafka.kill_all().unwrap();
    let down = Instant::now();
    std::thread::sleep(Duration::from_secs(30));
    let during = mirror_status(&edge);
    assert!(
        during["lag_records"].as_u64().unwrap() > 0,
        "a backlog builds: {during:#}"
    );
    assert!(
        !during["last_error"].is_null(),
        "the outage is reported: {during:#}"
    );
    std::thread::sleep(Duration::from_secs(60).saturating_sub(down.elapsed()));
    kafka.restart_all().unwrap();
    finish(run);
    verify_kafka(&kafka, &manifest, 10_000);
    verify_kafka(&kafka, &work.path().join("broker-loss"), 5_000);

    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        let s = mirror_status(&edge);
        if s["lag_records"] == 0 {
            break s;
        }
        assert!(Instant::now() < deadline, "backlog not drained: {s:#}");
        std::thread::sleep(Duration::from_secs(1));
    };
    let logged: u64 = status["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["topic"] == "telemetry")
        .map(|p| p["edge_end_offset"].as_u64().unwrap())
        .sum();
    let consumed = kafka
        .consume_committed("plant-3.telemetry", Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        consumed.len() as u64,
        logged,
        "each logged record once in Kafka"
    );
    assert!(edge.stop().success(), "{}", edge.stderr());
}
