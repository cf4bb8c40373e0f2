//! Kafka's checkpoints belong to one log (issue #19 items 2 and 6), against a real 1-node
//! Kafka: a data directory replaced while Kafka is up, and while Kafka is down at the
//! restart, is refused (and stays refused however far its log grows, across restarts) until
//! `edge mirror-adopt`, which then mirrors the new log after the old one's records; a second
//! edge with the same site is refused without fencing the first; two edges that share a
//! transactional id stop with `duplicate_site`. Every scenario ends with a read_committed
//! read of the Kafka topic (the console consumer, cross-checked with kcat): every
//! acknowledged record exactly once, nothing else, and what the edge reports (refusal, lag,
//! lost) matches.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tributary_tests::kafka::KafkaCluster;
use tributary_tests::mirror::{cloud_section as cloud, mirror_status, wait_mirror_status};
use tributary_tests::{http_get, metric, now_ms, Edge};

const ROUTES: &str =
    "[[routes]]\nmatch = \"sensors/+/#\"\ntopic = \"telemetry\"\nkey = \"{1}\"\npartitions = 2\n";

/// Publishes `n` QoS 1 messages `{tag}-{i}` through `edge` (mosquitto_pub exits 0 only once
/// each is acknowledged); returns their payloads.
fn publish(edge: &Edge, tag: &str, n: usize) -> Vec<String> {
    let payloads: Vec<String> = (0..n).map(|i| format!("{tag}-{i}")).collect();
    for (i, p) in payloads.iter().enumerate() {
        let mut child = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &edge.addr.port().to_string()])
            .args(["-q", "1", "-t", &format!("sensors/dev-{}/t", i % 5), "-l"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(child.stdin.take().unwrap(), "{p}").unwrap();
        assert!(child.wait().unwrap().success(), "{p} was not acknowledged");
    }
    payloads
}

/// Every committed value of `topic` (read_committed), counted, as the console consumer
/// reads them; kcat must read the same.
fn kafka_values(kafka: &KafkaCluster, topic: &str) -> BTreeMap<String, usize> {
    let mut values = BTreeMap::new();
    for r in kafka
        .consume_committed(topic, Duration::from_secs(8))
        .unwrap()
    {
        *values
            .entry(r.value_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    let mut by_kcat = BTreeMap::new();
    for value in kafka.kcat_values(topic).unwrap().into_values().flatten() {
        *by_kcat.entry(value).or_insert(0) += 1;
    }
    assert_eq!(values, by_kcat, "the console consumer and kcat disagree");
    values
}

/// Kafka holds each of `acknowledged` exactly once and nothing else.
fn assert_exactly(kafka: &KafkaCluster, topic: &str, acknowledged: &[String]) {
    let values = kafka_values(kafka, topic);
    let expected: BTreeMap<String, usize> = acknowledged.iter().map(|p| (p.clone(), 1)).collect();
    let twice: Vec<_> = values.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "duplicated in {topic}: {twice:?}");
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !values.contains_key(*k))
        .collect();
    assert!(missing.is_empty(), "missing in {topic}: {missing:?}");
    let extra: Vec<_> = values
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    assert!(
        extra.is_empty(),
        "not acknowledged, yet in {topic}: {extra:?}"
    );
}

fn sum(s: &serde_json::Value, field: &str) -> u64 {
    s["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[field].as_u64().unwrap_or(0))
        .sum()
}

/// The mirror has mirrored all of `n` records the edge logged.
fn wait_drained(edge: &Edge, n: u64) -> serde_json::Value {
    wait_mirror_status(edge, "mirror drained", Duration::from_secs(120), |s| {
        s["state"] == "mirroring" && sum(s, "edge_end_offset") == n && s["lag_records"] == 0
    })
}

/// The mirror refuses for `reason`, decided by this run after `since_ms`.
fn wait_refused(edge: &Edge, reason: &str, since_ms: u64) -> serde_json::Value {
    wait_mirror_status(edge, "mirror refused", Duration::from_secs(120), |s| {
        s["state"] == "refused"
            && s["refusal"]["reason"] == reason
            && s["refusal"]["at_ms"].as_u64().unwrap() >= since_ms
    })
}

fn refused_metric(edge: &Edge, reason: &str) -> f64 {
    let (_, text) = http_get(edge.admin, "/metrics", None).unwrap();
    metric(
        &text,
        &format!("tributary_mirror_refused{{reason=\"{reason}\"}}"),
    )
}

/// An edge of `site` mirrors `old`; its data directory is replaced (with Kafka down at the
/// restart when `kafka_down`); the new log is refused while it ingests past the old
/// checkpoints and across a restart; `mirror-adopt` lets it be mirrored after the old
/// records. Ends with Kafka holding every acknowledged record once.
fn replaced_data_directory(kafka: &KafkaCluster, site: &str, kafka_down: bool) {
    let topic = format!("{site}.telemetry");
    let mut edge = Edge::start(&format!("{ROUTES}{}", cloud(kafka.bootstrap(), site)));
    let mut acknowledged = publish(&edge, &format!("{site}-old"), 40);
    wait_drained(&edge, 40);
    assert!(edge.stop().success(), "{}", edge.stderr());

    // The data directory is lost; a new, empty one takes its place.
    std::fs::remove_dir_all(edge.data_dir()).unwrap();
    if kafka_down {
        kafka.stop_all().unwrap();
    }
    let restarted = now_ms();
    edge.restart();
    let mut new = publish(&edge, &format!("{site}-new"), 25);
    if kafka_down {
        let s = mirror_status(&edge);
        assert_ne!(s["state"], "mirroring", "{s:#}");
        assert_ne!(s["state"], "refused", "{s:#}");
        kafka.restart_all().unwrap();
    }
    let s = wait_refused(&edge, "foreign_log", restarted);
    let message = s["refusal"]["message"].as_str().unwrap();
    assert!(message.contains("mirror-adopt"), "{message}");
    assert!(
        message.contains(&format!("another edge uses site {site}")),
        "{message}"
    );
    assert_eq!(refused_metric(&edge, "foreign_log"), 1.0);
    assert_eq!(refused_metric(&edge, "duplicate_site"), 0.0);
    let (status, text, err) = edge.cli(&["mirror-status"]);
    assert!(status.success(), "{err}");
    assert!(text.contains("REFUSED (foreign_log)"), "{text}");
    assert!(text.contains("edge mirror-adopt"), "{text}");
    let (_, dashboard) = http_get(edge.admin, "/api/v1/overview", None).unwrap();
    assert!(dashboard.contains("\"foreign_log\""), "{dashboard}");

    // Ingest goes on, past the old log's checkpoints in every partition; a restart reads
    // the checkpoints again and refuses again: the refusal never lifts by itself.
    new.extend(publish(&edge, &format!("{site}-more"), 40));
    let old_checkpoints = s["refusal"]["checkpoints"].as_array().unwrap().clone();
    assert!(!old_checkpoints.is_empty(), "{s:#}");
    assert!(edge.stop().success(), "{}", edge.stderr());
    let restarted = now_ms();
    edge.restart();
    let s = wait_refused(&edge, "foreign_log", restarted);
    for cp in &old_checkpoints {
        let p = s["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["topic"] == cp[0] && p["partition"] == cp[1])
            .unwrap();
        assert!(
            p["edge_end_offset"].as_u64().unwrap() > cp[2].as_u64().unwrap(),
            "the new log grew past the old checkpoint: {s:#}"
        );
    }
    // The figures the edge reports match Kafka: nothing of the new log is in it, all of it
    // is lag, nothing is lost.
    assert_exactly(kafka, &topic, &acknowledged);
    assert_eq!(s["lag_records"], new.len() as u64, "{s:#}");
    assert_eq!(sum(&s, "lost_before_mirror"), 0, "{s:#}");

    // Adoption only on a stopped node.
    let (status, _, err) = edge.cli(&["mirror-adopt"]);
    assert!(!status.success());
    assert!(err.contains("stop it first"), "{err}");
    assert!(edge.stop().success(), "{}", edge.stderr());
    let (status, out, err) = edge.cli(&["mirror-adopt", "--json"]);
    assert!(status.success(), "mirror-adopt: {err}");
    let adopted: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(adopted["lost_before_mirror"], 0, "{adopted:#}");
    assert_eq!(
        adopted["adopted"], s["refusal"]["foreign_log"],
        "{adopted:#}"
    );
    // Adopting twice: nothing is refused any more.
    let (status, _, err) = edge.cli(&["mirror-adopt"]);
    assert!(
        !status.success() && err.contains("nothing to adopt"),
        "{err}"
    );

    edge.restart();
    let s = wait_drained(&edge, new.len() as u64);
    acknowledged.extend(new);
    assert!(s["refusal"].is_null(), "{s:#}");
    assert_eq!(sum(&s, "lost_before_mirror"), 0, "{s:#}");
    assert_eq!(refused_metric(&edge, "foreign_log"), 0.0);
    assert_exactly(kafka, &topic, &acknowledged);
    assert!(edge.stop().success(), "{}", edge.stderr());
}

#[test]
fn checkpoints_of_another_log_are_refused_until_adopted() {
    let kafka = KafkaCluster::start(1).unwrap();

    replaced_data_directory(&kafka, "reset-up", false);
    replaced_data_directory(&kafka, "reset-down", true);

    // Two edges with one site: the second is refused before it takes the transactional id,
    // so the first goes on mirroring, never fenced.
    let site = "twins";
    let topic = format!("{site}.telemetry");
    let section = format!("{ROUTES}{}", cloud(kafka.bootstrap(), site));
    let first = Edge::start(&section);
    let mut acknowledged = publish(&first, "first", 30);
    wait_drained(&first, 30);
    let started = now_ms();
    let second = Edge::start(&section);
    let second_records = publish(&second, "second", 20);
    let s = wait_refused(&second, "foreign_log", started);
    let message = s["refusal"]["message"].as_str().unwrap();
    assert!(
        message.contains("another edge uses site twins"),
        "{message}"
    );
    assert_eq!(refused_metric(&second, "foreign_log"), 1.0);
    acknowledged.extend(publish(&first, "first-later", 30));
    let s = wait_drained(&first, 60);
    assert_ne!(s["last_error_kind"], "fenced", "{s:#}");
    assert_exactly(&kafka, &topic, &acknowledged);
    let s = mirror_status(&second);
    assert_eq!(s["lag_records"], second_records.len() as u64, "{s:#}");
    assert_eq!(s["state"], "refused", "{s:#}");
    drop(second);
    drop(first);

    // Two edges that share a transactional id fence each other: each mirror fenced twice
    // within a minute stops with duplicate_site instead of looping.
    let shared = "\ntransactional_id = \"shared-mirror-id\"\n";
    let a = Edge::start(&format!(
        "{ROUTES}{}{shared}",
        cloud(kafka.bootstrap(), "loop-a")
    ));
    let b = Edge::start(&format!(
        "{ROUTES}{}{shared}",
        cloud(kafka.bootstrap(), "loop-b")
    ));
    let mut published = [Vec::new(), Vec::new()];
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut round = 0;
    let stopped = |e: &Edge| mirror_status(e)["refusal"]["reason"] == "duplicate_site";
    while !(stopped(&a) || stopped(&b)) {
        assert!(
            Instant::now() < deadline,
            "no mirror stopped: {:#} {:#}",
            mirror_status(&a),
            mirror_status(&b)
        );
        for (i, e) in [&a, &b].into_iter().enumerate() {
            published[i].extend(publish(e, &format!("loop-{i}-{round}"), 3));
        }
        round += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    let refused = if stopped(&a) { &a } else { &b };
    let s = wait_refused(refused, "duplicate_site", 0);
    assert!(
        s["refusal"]["message"]
            .as_str()
            .unwrap()
            .contains("another edge uses site"),
        "{s:#}"
    );
    assert_eq!(refused_metric(refused, "duplicate_site"), 1.0);
    // Whatever each mirrored is in Kafka once, exactly as its mirrored offsets say; the rest
    // waits at the edge.
    for (i, e) in [&a, &b].into_iter().enumerate() {
        let site = if i == 0 { "loop-a" } else { "loop-b" };
        let s = wait_mirror_status(e, "status settled", Duration::from_secs(60), |s| {
            s["state"] == "refused" || s["state"] == "mirroring"
        });
        let values = kafka_values(&kafka, &format!("{site}.telemetry"));
        assert!(values.values().all(|n| *n == 1), "{values:?}");
        assert!(
            values.keys().all(|v| published[i].contains(v)),
            "{values:?}"
        );
        if s["state"] == "refused" {
            let mirrored: u64 = s["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["mirrored_offset"].as_u64().unwrap_or(0))
                .sum();
            assert_eq!(values.len() as u64, mirrored, "{s:#}");
            assert_eq!(
                s["lag_records"].as_u64().unwrap(),
                published[i].len() as u64 - mirrored,
                "{s:#}"
            );
        }
    }
}
