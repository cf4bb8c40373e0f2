//! The edge mirrors its log to a real 1-node Kafka, exactly once: devices publish QoS 1
//! through the edge, and both `firmware-sim verify --kafka` and Kafka's own console consumer
//! (read_committed) find every acknowledged message once, in per-device order, with its MQTT
//! headers; kill -9 of the edge while it mirrors changes nothing; bad targets are reported
//! while the edge keeps ingesting.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::process::Command;
use std::time::{Duration, Instant};

use tributary_tests::kafka::KafkaCluster;
use tributary_tests::mirror::{
    cloud_section as cloud, finish, fleet, mirror_status, partitions_sum, verify_kafka,
    wait_mirror_status,
};
use tributary_tests::{binary, http_get, metric, Edge};

const ROUTES: &str =
    "[[routes]]\nmatch = \"sensors/+/#\"\ntopic = \"telemetry\"\nkey = \"{1}\"\npartitions = 4\n";

/// The mirror has no lag and the edge has logged something.
fn drained(s: &serde_json::Value) -> bool {
    let logged = partitions_sum(s, "telemetry", "edge_end_offset");
    s["lag_records"] == 0 && logged > 0
}

#[test]
fn fleet_through_edge_reaches_kafka_exactly_once_and_survives_edge_kill9() {
    let kafka = KafkaCluster::start(1).unwrap();
    let mut edge = Edge::start(&format!("{ROUTES}{}", cloud(kafka.bootstrap(), "plant-7")));
    let work = tempfile::tempdir().unwrap();

    // A clean run: everything acknowledged is in Kafka once.
    let manifest = work.path().join("clean");
    finish(fleet(&edge, &manifest, 100, 20, 8));
    let expected = verify_kafka(&kafka, &manifest, "plant-7.telemetry", 8_000, "180s");

    // Kafka's own consumer agrees: as many committed records as the edge logged, each with
    // the MQTT headers, each key on the partition the edge gave it.
    let status = wait_mirror_status(&edge, "mirror drained", Duration::from_secs(120), drained);
    let consumed = kafka
        .consume_committed("plant-7.telemetry", Duration::from_secs(10))
        .unwrap();
    assert_eq!(consumed.len() as u64, expected, "{status:#}");
    for r in &consumed {
        let topic = r.header("mqtt.topic").expect("mqtt.topic header");
        let device = topic.split('/').nth(1).unwrap();
        assert_eq!(r.key_str(), Some(device), "key is the routed {{1}} level");
        assert!(r.header("mqtt.client_id").is_some());
        assert_eq!(r.header("mqtt.qos"), Some("1"));
    }
    for p in status["partitions"].as_array().unwrap() {
        assert_eq!(p["mirrored_offset"], p["edge_end_offset"], "{p}");
        assert_eq!(p["lost_before_mirror"], 0);
        assert!(p["error"].is_null());
    }
    assert!(status["last_healthy_at_ms"].as_u64().is_some());
    // /metrics agrees: this process mirrored every record, and timed each commit.
    let (_, text) = http_get(edge.admin, "/metrics", None).unwrap();
    assert_eq!(metric(&text, "tributary_mirror_link_up"), 1.0);
    assert_eq!(
        metric(&text, "tributary_mirror_records_total"),
        expected as f64
    );
    let transactions = metric(&text, "tributary_mirror_transactions_total");
    assert!(transactions >= 1.0, "{text}");
    assert_eq!(
        metric(&text, "tributary_mirror_transaction_commit_seconds_count"),
        transactions,
        "one commit timed per transaction (none failed in a clean run)"
    );
    for p in 0..4 {
        assert_eq!(
            metric(
                &text,
                &format!("tributary_mirror_lag_records{{topic=\"telemetry\",partition=\"{p}\"}}")
            ),
            0.0
        );
    }

    // kill -9 the edge three times while devices publish and the mirror runs.
    let manifest = work.path().join("crashes");
    let run = fleet(&edge, &manifest, 100, 20, 20);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(4));
        edge.kill9();
        edge.restart();
    }
    finish(run);
    verify_kafka(&kafka, &manifest, "plant-7.telemetry", 4_000, "180s");
    // The first run's records are still there exactly once too.
    verify_kafka(
        &kafka,
        &work.path().join("clean"),
        "plant-7.telemetry",
        8_000,
        "180s",
    );
    let status = wait_mirror_status(&edge, "mirror drained", Duration::from_secs(120), drained);
    let end_total = partitions_sum(&status, "telemetry", "edge_end_offset");
    let consumed = kafka
        .consume_committed("plant-7.telemetry", Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        consumed.len() as u64,
        end_total,
        "Kafka holds each record of the edge log exactly once"
    );
    let kcat: usize = kafka.kcat_count("plant-7.telemetry").unwrap();
    assert_eq!(kcat as u64, end_total, "kcat reads each record once too");
    eprintln!(
        "logged={end_total} console_consumer={} kcat={kcat}",
        consumed.len()
    );

    // Stopped, the edge still tells where the mirror stood.
    assert!(edge.stop().success(), "{}", edge.stderr());
    let stopped = mirror_status(&edge);
    assert_eq!(stopped["edge_running"], false);
    assert_eq!(stopped["state"], "stopped");
    assert_eq!(stopped["lag_records"], 0, "{stopped:#}");
}

/// A QoS 1 publish through mosquitto_pub is acknowledged (exit status 0).
fn publish_acked(edge: &Edge, topic: &str, payload: &str) {
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &edge.addr.port().to_string()])
        .args(["-q", "1", "-t", topic, "-m", payload])
        .status()
        .unwrap();
    assert!(status.success(), "publish to {topic} was not acknowledged");
}

#[test]
fn bad_targets_are_reported_and_ingest_goes_on() {
    let kafka = KafkaCluster::start(1).unwrap();

    // A Kafka topic with fewer partitions than the edge topic: that topic is refused with a
    // clear error, the default topic is still mirrored, ingest goes on.
    kafka.create_topic("plant-9.telemetry", 2).unwrap();
    let mut edge = Edge::start(&format!("{ROUTES}{}", cloud(kafka.bootstrap(), "plant-9")));
    publish_acked(&edge, "sensors/dev-1/t", "refused-topic");
    publish_acked(&edge, "other/thing", "mirrored");
    let s = wait_mirror_status(
        &edge,
        "the default topic mirrored",
        Duration::from_secs(120),
        |s| {
            s["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["topic"] == "mqtt" && p["mirrored_offset"] == 1)
        },
    );
    for p in s["partitions"].as_array().unwrap() {
        if p["topic"] == "telemetry" {
            let e = p["error"].as_str().unwrap_or_default();
            assert!(
                e.contains("plant-9.telemetry has 2 partitions but the edge topic has 4"),
                "{e}"
            );
        }
    }
    let consumed = kafka
        .consume_committed("plant-9.mqtt", Duration::from_secs(5))
        .unwrap();
    assert_eq!(consumed.len(), 1);
    assert_eq!(consumed[0].value_str(), Some("mirrored"));
    assert_eq!(kafka.partitions_of("plant-9.telemetry").unwrap(), Some(2));
    assert!(edge.stop().success());
    let (_, log, _) = edge.cli(&["read", "--json", "--topic", "telemetry"]);
    assert!(
        log.contains("refused-topic"),
        "the edge kept the record: {log}"
    );

    // An unknown bootstrap host: the error is reported, ingest goes on, nothing is lost.
    let mut edge = Edge::start(&format!(
        "{ROUTES}[cloud]\nbootstrap = \"kafka.invalid:9092\"\nsite = \"nowhere\"\nrequest_timeout = \"3s\"\n"
    ));
    publish_acked(&edge, "sensors/dev-2/t", "kept-locally");
    let s = wait_mirror_status(&edge, "an error reported", Duration::from_secs(120), |s| {
        !s["last_error"].is_null()
    });
    assert!(s["last_healthy_at_ms"].is_null(), "{s:#}");
    assert_eq!(s["lag_records"], 1, "{s:#}");
    let err = s["last_error"].as_str().unwrap();
    assert!(
        err.contains("kafka.invalid") || err.contains("resolve") || err.contains("Timed out"),
        "the error says what failed: {err}"
    );
    let (_, text) = http_get(edge.admin, "/metrics", None).unwrap();
    assert_eq!(metric(&text, "tributary_mirror_link_up"), 0.0);
    // The label is the step that failed, from a closed set; the message stays in the JSON.
    assert!(
        text.contains("tributary_mirror_last_error_timestamp_seconds{kind=\"connect\"}"),
        "{text}"
    );
    assert_eq!(s["last_error_kind"], "connect", "{s:#}");
    assert_eq!(metric(&text, "tributary_mirror_records_total"), 0.0);
    tributary_tests::assert_readme_names_metrics(&text);
    publish_acked(&edge, "sensors/dev-2/t", "still-accepted");
    assert!(edge.stop().success());
    let (_, log, _) = edge.cli(&["read", "--json"]);
    assert!(log.contains("kept-locally") && log.contains("still-accepted"));
}

#[test]
fn sasl_credentials_right_mirror_and_wrong_are_reported() {
    let kafka = KafkaCluster::start(1).unwrap();
    let sasl = kafka.sasl_bootstrap().unwrap();
    let secured = |site: &str, password: &str| {
        format!(
            "{ROUTES}[cloud]\nbootstrap = \"{sasl}\"\nsite = \"{site}\"\nrequest_timeout = \"5s\"\n\
             security_protocol = \"sasl_plaintext\"\nsasl_mechanism = \"PLAIN\"\n\
             username = \"{}\"\npassword = \"{password}\"\n",
            tributary_tests::kafka::SASL_USER
        )
    };

    // Wrong password: a clear error, and the edge keeps accepting.
    let mut edge = Edge::start(&secured("wrong-pw", "not-the-password"));
    publish_acked(&edge, "sensors/dev-1/t", "kept");
    let s = wait_mirror_status(
        &edge,
        "an authentication error",
        Duration::from_secs(120),
        |s| {
            s["last_error"]
                .as_str()
                .is_some_and(|e| e.to_lowercase().contains("authentication"))
        },
    );
    assert!(s["last_healthy_at_ms"].is_null(), "{s:#}");
    publish_acked(&edge, "sensors/dev-1/t", "still-accepted");
    assert!(edge.stop().success());
    let (_, log, _) = edge.cli(&["read", "--json"]);
    assert!(log.contains("kept") && log.contains("still-accepted"));
    assert_eq!(kafka.partitions_of("wrong-pw.telemetry").unwrap(), None);

    // The right password: mirrored.
    let mut edge = Edge::start(&secured("right-pw", tributary_tests::kafka::SASL_PASSWORD));
    publish_acked(&edge, "sensors/dev-1/t", "over-sasl");
    let records = kafka
        .wait_for_committed("right-pw.telemetry", 1, Duration::from_secs(120))
        .unwrap();
    assert_eq!(records[0].value_str(), Some("over-sasl"));
    assert!(edge.stop().success());
}

#[test]
fn bad_cloud_config_is_refused_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        "[cloud]\nbootstrap = \"127.0.0.1:9092\"\nsite = \"plant 7\"\n",
    )
    .unwrap();
    let out = Command::new(binary("edge"))
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("edge.toml:3: cloud.site"), "{err}");
}

#[test]
fn records_dropped_by_the_disk_budget_before_mirroring_are_counted() {
    let kafka = KafkaCluster::start(1).unwrap();
    let mut edge = Edge::start_with(
        "",
        "disk_budget = \"2MiB\"\ndisk_full_policy = \"drop-oldest\"\n",
        &format!(
            "{ROUTES}{}max_backoff = \"2s\"\nrequest_timeout = \"5s\"\n",
            cloud(kafka.bootstrap(), "plant-5")
        ),
    );
    // One record mirrored: the partition has a checkpoint in Kafka.
    publish_acked(&edge, "sensors/dev-1/t", "first");
    wait_mirror_status(
        &edge,
        "the first record mirrored",
        Duration::from_secs(120),
        |s| s["records_mirrored"].as_u64() == Some(1),
    );

    // Kafka down; devices publish far more than the budget, so the oldest records go. Not
    // in flood mode: its payloads repeat and the log's compression would shrink them below
    // the budget; each of these has its own random filler.
    kafka.kill_all().unwrap();
    let out = Command::new(binary("firmware-sim"))
        .args(["run", "--broker", &format!("mqtt://{}", edge.addr)])
        .args(["--devices", "10", "--count", "2000", "--qos", "1"])
        .args([
            "--payload",
            "binary",
            "--payload-size",
            "512",
            "--rate",
            "1000",
        ])
        .args(["--topic", "sensors/{device}/t"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    kafka.restart_all().unwrap();

    // Back: what is left drains; what was dropped unmirrored is counted, not hidden.
    let s = wait_mirror_status(&edge, "drained", Duration::from_secs(120), |s| {
        s["lag_records"] == 0
            && s["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["lost_before_mirror"].as_u64() > Some(0))
    });
    let end = partitions_sum(&s, "telemetry", "edge_end_offset");
    let lost = partitions_sum(&s, "telemetry", "lost_before_mirror");
    assert_eq!(end, 20_001, "every publish was logged");
    assert!(
        lost > 10_000,
        "most of 10 MB went over a 2 MiB budget: {s:#}"
    );
    // One console-consumer pass ends after 10 s without a record; on a loaded machine that
    // can come before the whole topic was fetched, so read again until the count is whole
    // (or the deadline shows that it never will be).
    let deadline = Instant::now() + Duration::from_secs(180);
    let (consumed, lost) = loop {
        let consumed = kafka
            .consume_committed("plant-5.telemetry", Duration::from_secs(10))
            .unwrap();
        let s = wait_mirror_status(&edge, "status", Duration::from_secs(30), |_| true);
        let lost = partitions_sum(&s, "telemetry", "lost_before_mirror");
        if consumed.len() as u64 + lost >= end || Instant::now() > deadline {
            break (consumed, lost);
        }
    };
    let distinct: std::collections::HashSet<_> = consumed.iter().map(|r| &r.value).collect();
    assert_eq!(distinct.len(), consumed.len(), "no record twice in Kafka");
    assert_eq!(
        consumed.len() as u64 + lost,
        end,
        "each logged record is either in Kafka once or counted as lost before mirroring"
    );
    assert!(edge.stop().success());
    assert!(
        edge.stderr().contains("before they were mirrored"),
        "the loss is logged"
    );
}
