//! The mirror against a 3-node Kafka (replication factor 3, min.insync.replicas 2) under
//! faults: one broker killed and restarted while mirroring; then every broker down for 60 s
//! while devices keep publishing. The edge keeps accepting, the backlog drains when Kafka is
//! back, and every acknowledged message is in Kafka exactly once (read_committed).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::time::{Duration, Instant};

use tributary_tests::kafka::KafkaCluster;
use tributary_tests::mirror::{
    finish, fleet, mirror_status, partitions_sum, verify_kafka, wait_mirror_status,
};
use tributary_tests::Edge;

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
    let run = fleet(&edge, &manifest, 50, 20, 15);
    std::thread::sleep(Duration::from_secs(5));
    kafka.kill(2).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    kafka.restart(2).unwrap();
    finish(run);
    verify_kafka(&kafka, &manifest, "plant-3.telemetry", 5_000, "300s");

    // Every broker down for 60 s while devices publish: the edge keeps accepting.
    let manifest = work.path().join("outage");
    let run = fleet(&edge, &manifest, 50, 20, 40);
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
    verify_kafka(&kafka, &manifest, "plant-3.telemetry", 10_000, "300s");
    verify_kafka(
        &kafka,
        &work.path().join("broker-loss"),
        "plant-3.telemetry",
        5_000,
        "300s",
    );

    let status = wait_mirror_status(&edge, "backlog drained", Duration::from_secs(180), |s| {
        s["lag_records"] == 0
    });
    let logged = partitions_sum(&status, "telemetry", "edge_end_offset");
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
