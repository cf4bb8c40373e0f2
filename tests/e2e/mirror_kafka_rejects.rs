//! Records Kafka refuses for themselves never stall the mirror (#19 item 4): a 1,000,100-byte
//! payload too large for its Kafka topic, published while devices publish, and a record
//! stamped two hours ahead (an edge whose clock runs fast, through libfaketime: the machine's
//! clock is left alone) in the middle of a backlog of device records. Every acknowledged
//! device record reaches Kafka exactly once and in order (`firmware-sim verify --kafka` and
//! Kafka's console consumer, read_committed); the two refused records are in the dead-letter
//! topic with their origin in headers, counted per reason in /metrics; the same large payload
//! sent to a topic with Kafka's default limit is mirrored (the producer's `message.max.bytes`
//! follows the edge's `max_packet_size`). With `on_rejected = "skip"` a refused record is left
//! out and everything else mirrored; with `"stop"` its partition waits before it, saying why,
//! while the other partitions mirror everything.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tributary_tests::kafka::{ConsumedRecord, KafkaCluster, TimestampType};
use tributary_tests::mirror::{
    cloud_section as cloud, finish, fleet, partitions_sum, verify_kafka, wait_mirror_status,
};
use tributary_tests::{faketime, http_get, metric, now_ms, Edge};

const ROUTES: &str =
    "[[routes]]\nmatch = \"sensors/+/#\"\ntopic = \"telemetry\"\nkey = \"{1}\"\npartitions = 4\n";
const SITE: &str = "plant-4";
const BIG: usize = 1_000_100;

/// A QoS 1 publish of the file `payload` (mosquitto_pub -f) that the edge acknowledged.
fn publish_file(edge: &Edge, topic: &str, payload: &Path) {
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &edge.addr.port().to_string()])
        .args(["-q", "1", "-t", topic, "-f"])
        .arg(payload)
        .status()
        .unwrap();
    assert!(status.success(), "publish to {topic} was not acknowledged");
}

/// A QoS 1 publish of text `payload` that the edge acknowledged.
fn publish(edge: &Edge, topic: &str, payload: &str) {
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &edge.addr.port().to_string()])
        .args(["-q", "1", "-t", topic, "-m", payload])
        .status()
        .unwrap();
    assert!(status.success(), "publish to {topic} was not acknowledged");
}

/// Records of `reason` the status counts as rejected.
fn rejected(s: &serde_json::Value, reason: &str) -> u64 {
    s["records_rejected"][reason].as_u64().unwrap_or(0)
}

/// Bytes no compression shrinks (xorshift), so the broker sees the payload's full size.
fn incompressible(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The edge config with its `[cloud]` section, or without it (no uplink).
fn write_config(edge: &Edge, with_cloud: &str) {
    let path = edge.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    let base = text.split("[cloud]").next().unwrap().to_string();
    std::fs::write(&path, format!("{base}{with_cloud}")).unwrap();
}

#[test]
fn refused_records_go_to_the_dead_letter_topic_and_the_rest_exactly_once() {
    let kafka = KafkaCluster::start(1).unwrap();
    // The mirrored topic takes records of up to 1,000,000 bytes, as many clusters are set.
    let topic = format!("{SITE}.telemetry");
    kafka
        .create_topic_with(&topic, 4, &[("max.message.bytes", "1000000")])
        .unwrap();
    let cloud_section = format!(
        "{}max_backoff = \"2s\"\nrequest_timeout = \"10s\"\n",
        cloud(kafka.bootstrap(), SITE)
    );
    let mut edge = Edge::start(&format!("{ROUTES}{cloud_section}"));
    let work = tempfile::tempdir().unwrap();
    let big_file = work.path().join("big");
    let big = incompressible(BIG);
    std::fs::write(&big_file, &big).unwrap();

    // 1. Devices publish; meanwhile a payload too large for the Kafka topic, and the same
    //    payload to a topic with Kafka's default limit.
    let manifest_a = work.path().join("a");
    let run = fleet(&edge, &manifest_a, 20, 10, 15);
    wait_mirror_status(&edge, "mirroring", Duration::from_secs(120), |s| {
        s["records_mirrored"].as_u64() > Some(100)
    });
    publish_file(&edge, "sensors/poison-big/blob", &big_file);
    publish_file(&edge, "blobs/fits", &big_file);
    finish(run);
    let s = wait_mirror_status(
        &edge,
        "the large record dead-lettered and the rest mirrored",
        Duration::from_secs(180),
        |s| rejected(s, "too_large") == 1 && s["lag_records"] == 0,
    );
    assert_eq!(s["stalled"], false, "{s:#}");
    let (_, text) = http_get(edge.admin, "/metrics", None).unwrap();
    assert_eq!(
        metric(
            &text,
            "tributary_mirror_records_rejected_total{reason=\"too_large\"}"
        ),
        1.0
    );
    assert_eq!(metric(&text, "tributary_mirror_link_up"), 1.0);
    tributary_tests::assert_readme_names_metrics(&text);

    // 2. A backlog with a record two hours ahead in its middle: without the uplink, devices
    //    publish; an edge whose clock is two hours fast takes one record; devices publish
    //    again with the uplink back, while the backlog drains.
    assert!(edge.stop().success(), "{}", edge.stderr());
    write_config(&edge, "");
    edge.restart();
    let manifest_b = work.path().join("b");
    finish(fleet(&edge, &manifest_b, 20, 10, 5));
    assert!(edge.stop().success());
    edge.set_env(&faketime("+2h"));
    edge.restart();
    publish(&edge, "sensors/poison-future/t", "from-the-future");
    assert!(edge.stop().success());
    edge.set_env(&[]);
    write_config(&edge, &cloud_section);
    edge.restart();
    let manifest_c = work.path().join("c");
    finish(fleet(&edge, &manifest_c, 20, 10, 10));
    let s = wait_mirror_status(
        &edge,
        "the future record dead-lettered and the rest mirrored",
        Duration::from_secs(180),
        |s| rejected(s, "invalid_timestamp") == 1 && s["lag_records"] == 0,
    );
    let (_, text) = http_get(edge.admin, "/metrics", None).unwrap();
    assert_eq!(
        metric(
            &text,
            "tributary_mirror_records_rejected_total{reason=\"invalid_timestamp\"}"
        ),
        1.0
    );
    assert_eq!(metric(&text, "tributary_mirror_link_up"), 1.0);

    // Every acknowledged device record once, in order, with its headers.
    let a = verify_kafka(&kafka, &manifest_a, &topic, 2_000, "180s");
    let b = verify_kafka(&kafka, &manifest_b, &topic, 500, "180s");
    let c = verify_kafka(&kafka, &manifest_c, &topic, 1_000, "180s");
    eprintln!("acknowledged device records: {a} + {b} + {c}");

    // Kafka's console consumer: the topic holds every logged record but the two refused ones,
    // and neither of those.
    let logged = partitions_sum(&s, "telemetry", "edge_end_offset");
    let consumed = kafka
        .consume_committed(&topic, Duration::from_secs(10))
        .unwrap();
    assert_eq!(consumed.len() as u64, logged - 2, "{s:#}");
    assert!(consumed
        .iter()
        .all(|r| !r.key_str().unwrap_or_default().starts_with("poison")));
    let fits = kafka
        .consume_committed(&format!("{SITE}.mqtt"), Duration::from_secs(10))
        .unwrap();
    assert_eq!(fits.len(), 1);
    assert_eq!(fits[0].value.as_deref(), Some(&big[..]));

    // The dead-letter topic: both, with their origin.
    assert!(edge.stop().success());
    let log = edge.read_log();
    let origin = |key: &str| {
        let r = log
            .iter()
            .find(|r| r["key"] == key)
            .unwrap_or_else(|| panic!("{key} in the edge log"));
        (
            r["partition"].as_u64().unwrap(),
            r["offset"].as_u64().unwrap(),
        )
    };
    let dead = kafka
        .consume_committed(
            &format!("tributary.dead-letter.{SITE}"),
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    let find = |key: &str| -> &ConsumedRecord {
        dead.iter()
            .find(|r| r.key_str() == Some(key))
            .unwrap_or_else(|| panic!("{key} dead-lettered"))
    };
    for (key, reason) in [
        ("poison-big", "too_large"),
        ("poison-future", "invalid_timestamp"),
    ] {
        let r = find(key);
        let (partition, offset) = origin(key);
        assert_eq!(r.header("tributary.edge.topic"), Some("telemetry"));
        assert_eq!(
            r.header("tributary.edge.partition"),
            Some(partition.to_string().as_str())
        );
        assert_eq!(
            r.header("tributary.edge.offset"),
            Some(offset.to_string().as_str())
        );
        assert_eq!(r.header("tributary.kafka.topic"), Some(topic.as_str()));
        assert_eq!(r.header("tributary.reason"), Some(reason));
        assert!(r.header("tributary.error").is_some_and(|e| !e.is_empty()));
        assert!(r.header("mqtt.topic").is_some(), "the MQTT headers stay");
        assert_eq!(r.timestamp_type, TimestampType::LogAppendTime);
    }
    assert_eq!(find("poison-big").value.as_deref(), Some(&big[..]));
    let future = find("poison-future");
    assert_eq!(future.value_str(), Some("from-the-future"));
    let stamped: i64 = future
        .header("tributary.edge.timestamp")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        stamped > now_ms() as i64 + 3_600_000,
        "the edge's own time, two hours ahead"
    );
    assert!(
        edge.stderr().contains("went to the dead-letter topic"),
        "the rejection is logged"
    );
}

/// Publishes, for device `d1` of an edge with `on_rejected`: five small records, one too
/// large for its Kafka topic (4,000 incompressible bytes, the topic takes 1,000), five small
/// ones; then five small ones for each of `d2`..`d8`. Returns the running edge.
fn poison_in_the_middle(kafka: &KafkaCluster, site: &str, on_rejected: &str) -> Edge {
    let topic = format!("{site}.telemetry");
    kafka
        .create_topic_with(&topic, 4, &[("max.message.bytes", "1000")])
        .unwrap();
    let edge = Edge::start(&format!(
        "{ROUTES}{}max_backoff = \"2s\"\nrequest_timeout = \"10s\"\non_rejected = \"{on_rejected}\"\n",
        cloud(kafka.bootstrap(), site)
    ));
    let work = tempfile::tempdir().unwrap();
    let big_file = work.path().join("big");
    std::fs::write(&big_file, incompressible(4_000)).unwrap();
    for i in 0..5 {
        publish(&edge, "sensors/d1/t", &format!("d1-{i}"));
    }
    publish_file(&edge, "sensors/d1/t", &big_file);
    for i in 5..10 {
        publish(&edge, "sensors/d1/t", &format!("d1-{i}"));
    }
    for d in 2..=8 {
        for i in 0..5 {
            publish(&edge, &format!("sensors/d{d}/t"), &format!("d{d}-{i}"));
        }
    }
    edge
}

/// The values Kafka holds in `topic`, read_committed, per partition in offset order.
fn values_by_partition(kafka: &KafkaCluster, topic: &str) -> Vec<Vec<String>> {
    let mut by = vec![Vec::new(); 4];
    for r in kafka
        .consume_committed(topic, Duration::from_secs(10))
        .unwrap()
    {
        by[r.partition as usize].push(r.value_str().unwrap().to_string());
    }
    by
}

#[test]
fn on_rejected_skip_leaves_the_record_out_and_stop_holds_its_partition() {
    let kafka = KafkaCluster::start(1).unwrap();
    let small = |d: u32| (0..if d == 1 { 10 } else { 5 }).map(move |i| format!("d{d}-{i}"));

    // skip: the refused record is left out (no dead-letter topic), the others all mirrored.
    let mut edge = poison_in_the_middle(&kafka, "plant-skip", "skip");
    let s = wait_mirror_status(&edge, "drained", Duration::from_secs(180), |s| {
        rejected(s, "too_large") == 1 && s["lag_records"] == 0
    });
    assert_eq!(s["stalled"], false, "{s:#}");
    let mut got: Vec<String> = values_by_partition(&kafka, "plant-skip.telemetry").concat();
    got.sort();
    let mut want: Vec<String> = (1..=8).flat_map(small).collect();
    want.sort();
    assert_eq!(got, want, "every small record once, the large one left out");
    assert!(!kafka
        .list_topics()
        .unwrap()
        .contains(&"tributary.dead-letter.plant-skip".to_string()));
    assert!(edge.stop().success());
    assert!(edge.stderr().contains("was skipped"), "the skip is logged");

    // stop: the refused record's partition waits before it, with the reason in its status;
    // the other partitions mirror everything.
    let mut edge = poison_in_the_middle(&kafka, "plant-stop", "stop");
    let s = wait_mirror_status(&edge, "the others drained", Duration::from_secs(180), |s| {
        let parts = s["partitions"].as_array().unwrap();
        parts.iter().filter(|p| p["error"].is_string()).count() == 1
            && parts
                .iter()
                .filter(|p| p["error"].is_null())
                .all(|p| p["lag_records"] == 0)
    });
    let held = s["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["error"].is_string())
        .unwrap();
    assert!(
        held["error"]
            .as_str()
            .unwrap()
            .contains("on_rejected = \"stop\""),
        "{held}"
    );
    let held_partition = held["partition"].as_u64().unwrap() as usize;
    assert!(edge.stop().success());
    let log = edge.read_log();
    let partition_of = |d: u32| {
        log.iter().find(|r| r["key"] == format!("d{d}")).unwrap()["partition"]
            .as_u64()
            .unwrap() as usize
    };
    assert_eq!(partition_of(1), held_partition);
    let got = values_by_partition(&kafka, "plant-stop.telemetry");
    // The held partition: d1's five records before the refused one, nothing after it.
    assert_eq!(
        got[held_partition],
        (0..5).map(|i| format!("d1-{i}")).collect::<Vec<_>>()
    );
    for d in 2..=8 {
        let p = partition_of(d);
        if p != held_partition {
            let of_d: Vec<&String> = got[p]
                .iter()
                .filter(|v| v.starts_with(&format!("d{d}-")))
                .collect();
            assert_eq!(of_d.len(), 5, "d{d} on partition {p}: {:?}", got[p]);
        }
    }
}
