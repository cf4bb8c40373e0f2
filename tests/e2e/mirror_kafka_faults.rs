//! The mirror against a 3-node Kafka (replication factor 3, min.insync.replicas 2) under
//! faults: one broker killed and restarted while mirroring; the transaction coordinator's
//! node (found with Kafka's TransactionsCommand) killed with -9 under load and restarted;
//! then every broker down for 60 s while devices keep publishing. The edge keeps accepting,
//! the backlog drains when Kafka is back, and every acknowledged message is in Kafka exactly
//! once (read_committed: firmware-sim verify, Kafka's console consumer and kcat).
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

    // The node that coordinates the mirror's transactions killed under load, then restarted:
    // another takes over the transaction log, and the open transaction is aborted or
    // completed, never half applied.
    let manifest = work.path().join("coordinator-loss");
    let run = fleet(&edge, &manifest, 50, 20, 15);
    std::thread::sleep(Duration::from_secs(5));
    let coordinator = kafka
        .transaction_coordinator("tributary-mirror-plant-3")
        .unwrap();
    eprintln!("killing node {coordinator}, the transaction coordinator");
    kafka.kill(coordinator).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    kafka.restart(coordinator).unwrap();
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
    for earlier in ["broker-loss", "coordinator-loss"] {
        verify_kafka(
            &kafka,
            &work.path().join(earlier),
            "plant-3.telemetry",
            5_000,
            "300s",
        );
    }

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
    let kcat = kafka.kcat_count("plant-3.telemetry").unwrap();
    assert_eq!(
        kcat as u64, logged,
        "kcat reads each logged record once too"
    );
    eprintln!(
        "logged={logged} console_consumer={} kcat={kcat}",
        consumed.len()
    );
    assert!(edge.stop().success(), "{}", edge.stderr());
}

/// Power cuts (the edge's data on the fault-injecting file system, everything not fsynced
/// dropped) while the mirror runs, in `fsync` mode: afterwards Kafka holds every record of
/// the edge's final log exactly once and nothing else, so the mirror never sent a record a
/// cut took back (whose offset the edge would then have given to another record), and with
/// `"always"` every acknowledged message is among them.
async fn power_cuts_with_the_mirror_running(fsync: &str, site: &str) {
    use tributary_tests::load::{wait_for_acks, Fleet};
    const CUTS: usize = 3;
    let kafka = KafkaCluster::start(1).unwrap();
    let (_root, mut fs, data) = tributary_tests::fault_mount("tributary-mirror-cut-");
    let mut edge = Edge::start_on(
        &data,
        &format!("fsync = \"{fsync}\""),
        &format!(
            "[[routes]]\nmatch = \"sensors/#\"\ntopic = \"telemetry\"\nkey = \"{{client_id}}\"\npartitions = 3\n\n{}",
            tributary_tests::mirror::cloud_section(kafka.bootstrap(), site)
        ),
    );
    let fleet = Fleet::qos1(edge.addr, site, "sensors/cut", 4);
    let acked = fleet.q1.clone();
    for cut in 0..CUTS {
        wait_for_acks(&acked, 2_000).await;
        // The mirror has sent something since the last start before the power goes.
        tokio::task::block_in_place(|| {
            wait_mirror_status(&edge, "the mirror sends", Duration::from_secs(180), |s| {
                s["partitions"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().any(|p| p["mirrored_offset"].as_u64() > Some(0)))
            })
        });
        tokio::time::sleep(Duration::from_millis(100 * cut as u64)).await;
        edge.kill9();
        fs.power_cut().expect("power cut");
        edge.restart();
    }
    wait_for_acks(&acked, 2_000).await;
    fleet.finish(Duration::from_secs(120)).await;
    tokio::task::block_in_place(|| {
        wait_mirror_status(&edge, "backlog drained", Duration::from_secs(300), |s| {
            s["lag_records"] == 0
        })
    });
    assert!(edge.stop().success(), "{}", edge.stderr());
    let log = tributary_tests::payloads(&edge.read_log());
    fs.unmount()
        .expect("unmounting the fault-injecting file system");
    let consumed = kafka
        .consume_committed(&format!("{site}.telemetry"), Duration::from_secs(10))
        .unwrap();
    let in_kafka: Vec<String> = consumed
        .iter()
        .map(|r| String::from_utf8(r.value.clone().unwrap()).unwrap())
        .collect();
    let kafka_set: std::collections::HashSet<&String> = in_kafka.iter().collect();
    let log_set: std::collections::HashSet<&String> = log.iter().collect();
    assert_eq!(kafka_set.len(), in_kafka.len(), "no record twice in Kafka");
    let phantom: Vec<_> = kafka_set.difference(&log_set).take(5).collect();
    assert!(
        phantom.is_empty(),
        "Kafka holds records the edge's log no longer has (mirrored before a cut took them back): {phantom:?}"
    );
    let missing: Vec<_> = log_set.difference(&kafka_set).take(5).collect();
    assert!(
        missing.is_empty(),
        "log records never mirrored: {missing:?}"
    );
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let lost = acked.acked.iter().filter(|p| !log_set.contains(p)).count();
    if fsync == "always" {
        assert_eq!(lost, 0, "acknowledged messages lost with fsync always");
    }
    eprintln!(
        "fsync {fsync}, {CUTS} power cuts with the mirror running: {} acknowledged, {lost} of them lost, log {} records, Kafka {} records, 0 duplicates, 0 not in the log",
        acked.acked.len(),
        log.len(),
        in_kafka.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_with_the_mirror_running_leave_kafka_equal_to_the_log() {
    power_cuts_with_the_mirror_running("always", "cut-always").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fsync_never_the_mirror_sends_only_records_that_survive_a_power_cut() {
    power_cuts_with_the_mirror_running("never", "cut-never").await;
}
