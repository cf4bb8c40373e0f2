//! The mirror against a real 1-node Kafka (the tests' harness), fed from an
//! in-memory source: exactly once, in order, resumed from the checkpoint, losses counted,
//! a target topic with too few partitions refused.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloud_sync::{Header, MemorySource, Mirror, MirrorConfig, MirrorStatus};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tributary_tests::kafka::KafkaCluster;

struct Consumed {
    partition: i32,
    key: Vec<u8>,
    value: Vec<u8>,
    timestamp: Option<i64>,
    headers: Vec<(String, Vec<u8>)>,
}

/// Everything committed in `topic`, read with read_committed until every partition's end.
fn read_committed(bootstrap: &str, topic: &str) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "verifier")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions = md.topics()[0].partitions().len();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p as i32, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut eof = vec![false; partitions];
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while eof.iter().any(|e| !e) {
        assert!(Instant::now() < deadline, "no end of {topic} within 60 s");
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                eof[m.partition() as usize] = false;
                out.push(Consumed {
                    partition: m.partition(),
                    key: m.key().unwrap_or_default().to_vec(),
                    value: m.payload().unwrap_or_default().to_vec(),
                    timestamp: m.timestamp().to_millis(),
                    headers: m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                                .collect()
                        })
                        .unwrap_or_default(),
                });
            }
            Some(Err(KafkaError::PartitionEOF(p))) => eof[p as usize] = true,
            Some(Err(e)) => panic!("consuming {topic}: {e}"),
            None => {}
        }
    }
    out
}

fn wait_for(mirror: &Mirror, what: &str, done: impl Fn(&MirrorStatus) -> bool) -> MirrorStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = mirror.status();
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached; status {s:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn fill(source: &MemorySource, topic: &str, partitions: u32, from: u32, to: u32) {
    for i in from..to {
        let p = i % partitions;
        source.append(
            topic,
            p,
            1_700_000_000_000 + i as u64,
            format!("dev-{p}").as_bytes(),
            format!("{i}").as_bytes(),
            vec![
                Header {
                    name: Cow::Borrowed("mqtt.topic"),
                    value: Cow::Owned(format!("sensors/dev-{p}/t").into_bytes()),
                },
                Header {
                    name: Cow::Borrowed("mqtt.qos"),
                    value: Cow::Borrowed(b"1"),
                },
            ],
        );
    }
}

/// Each value 0..n exactly once, in increasing order within each partition.
fn assert_exactly_once(records: &[Consumed], n: u32, partitions: u32) {
    let mut seen: HashMap<u32, usize> = HashMap::new();
    let mut last: HashMap<i32, u32> = HashMap::new();
    for r in records {
        let v: u32 = std::str::from_utf8(&r.value).unwrap().parse().unwrap();
        *seen.entry(v).or_default() += 1;
        assert_eq!(
            r.partition as u32,
            v % partitions,
            "record {v} on the wrong partition"
        );
        if let Some(prev) = last.insert(r.partition, v) {
            assert!(prev < v, "partition {}: {v} after {prev}", r.partition);
        }
    }
    let dups: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(dups.is_empty(), "duplicates: {dups:?}");
    let missing: Vec<u32> = (0..n).filter(|v| !seen.contains_key(v)).collect();
    assert!(
        missing.is_empty(),
        "missing {} records: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert_eq!(records.len(), n as usize);
}

#[test]
fn mirror_to_real_kafka() {
    let cluster = KafkaCluster::start(1).unwrap();
    let bootstrap = cluster.bootstrap().to_string();

    // --- exactly once, in order, with key, timestamp and headers
    let source = Arc::new(MemorySource::new());
    source.add_topic("telemetry", 4);
    fill(&source, "telemetry", 4, 0, 5000);
    let mut config = MirrorConfig::new(&bootstrap, "plant-7");
    config.transaction_bytes = 16 * 1024; // many transactions
    let mirror = Mirror::start(config.clone(), source.clone()).unwrap();
    wait_for(&mirror, "first backlog mirrored", |s| {
        s.partitions
            .iter()
            .all(|p| p.mirrored_offset == Some(p.edge_end_offset))
            && s.records_mirrored == 5000
    });
    let got = read_committed(&bootstrap, "plant-7.telemetry");
    assert_exactly_once(&got, 5000, 4);
    let r = got.iter().find(|r| r.value == b"7").unwrap();
    assert_eq!(r.key, b"dev-3");
    assert_eq!(r.timestamp, Some(1_700_000_000_007));
    assert_eq!(
        r.headers,
        vec![
            ("mqtt.topic".to_string(), b"sensors/dev-3/t".to_vec()),
            ("mqtt.qos".to_string(), b"1".to_vec()),
        ]
    );

    // --- live records while running
    fill(&source, "telemetry", 4, 5000, 6000);
    wait_for(&mirror, "live records mirrored", |s| {
        s.lag_records() == 0 && s.records_mirrored == 6000
    });
    mirror.stop(Duration::from_secs(30));

    // --- a new mirror resumes from the checkpoint in Kafka: no duplicate
    fill(&source, "telemetry", 4, 6000, 7000);
    let mirror = Mirror::start(config.clone(), source.clone()).unwrap();
    let s = wait_for(&mirror, "resumed", |s| {
        s.lag_records() == 0 && s.records_mirrored > 0
    });
    assert_eq!(
        s.records_mirrored, 1000,
        "the new mirror sent only what was new"
    );
    mirror.stop(Duration::from_secs(30));
    assert_exactly_once(&read_committed(&bootstrap, "plant-7.telemetry"), 7000, 4);

    // --- records deleted before they were mirrored are counted, the rest goes on
    fill(&source, "telemetry", 4, 7000, 8000);
    source.delete_before("telemetry", 0, 1900); // partition 0 held 1750..2000
    let mirror = Mirror::start(config.clone(), source.clone()).unwrap();
    let s = wait_for(&mirror, "after loss", |s| {
        s.lag_records() == 0 && s.records_mirrored > 0
    });
    assert_eq!(s.partitions[0].lost_before_mirror, 150);
    assert!(s.partitions[1..].iter().all(|p| p.lost_before_mirror == 0));
    mirror.stop(Duration::from_secs(30));

    // --- a target topic with fewer partitions is refused; other topics still mirror
    cluster.create_topic("plant-8.narrow", 2).unwrap();
    let source = Arc::new(MemorySource::new());
    source.add_topic("narrow", 4);
    source.add_topic("wide", 2);
    fill(&source, "narrow", 4, 0, 100);
    fill(&source, "wide", 2, 0, 100);
    let mirror = Mirror::start(MirrorConfig::new(&bootstrap, "plant-8"), source.clone()).unwrap();
    let s = wait_for(&mirror, "wide mirrored", |s| s.records_mirrored == 100);
    for p in s.partitions.iter().filter(|p| p.topic == "narrow") {
        let e = p.error.as_deref().unwrap_or_default();
        assert!(
            e.contains("has 2 partitions but the edge topic has 4"),
            "{e}"
        );
    }
    assert!(s
        .partitions
        .iter()
        .filter(|p| p.topic == "wide")
        .all(|p| p.error.is_none()));
    mirror.stop(Duration::from_secs(30));
    assert_exactly_once(&read_committed(&bootstrap, "plant-8.wide"), 100, 2);
}

#[test]
fn unreachable_kafka_is_reported_and_retried() {
    // Nothing listens on this port: the mirror reports the failure and keeps retrying.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let source = Arc::new(MemorySource::new());
    source.add_topic("t", 1);
    fill(&source, "t", 1, 0, 10);
    let mut config = MirrorConfig::new(&format!("127.0.0.1:{port}"), "nowhere");
    config.request_timeout = Duration::from_secs(2);
    let mirror = Mirror::start(config.clone(), source.clone()).unwrap();
    let s = wait_for(&mirror, "an error reported", |s| s.last_error.is_some());
    assert_eq!(s.records_mirrored, 0);
    assert_eq!(s.lag_records(), 10);
    assert!(s.last_healthy_at_ms.is_none());
    let mut previous = mirror.stop(Duration::from_secs(10));

    // Started after a run that had mirrored 6 records and lost 2, the status shows that
    // until Kafka answers.
    previous.partitions[0].mirrored_offset = Some(6);
    previous.partitions[0].lost_before_mirror = 2;
    let mirror = Mirror::start_after(config, source, Some(previous)).unwrap();
    let s = mirror.status();
    assert_eq!(s.partitions[0].mirrored_offset, Some(6));
    assert_eq!(s.partitions[0].lost_before_mirror, 2);
    assert_eq!(s.lag_records(), 4);
    mirror.stop(Duration::from_secs(10));
}
