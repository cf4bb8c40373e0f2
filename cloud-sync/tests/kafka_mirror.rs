//! The mirror against a real 1-node Kafka (the tests' harness), fed from an
//! in-memory source: exactly once, in order, resumed from the checkpoint, losses counted,
//! a target topic with too few partitions refused; the source's consumer group positions
//! replicated to Kafka as committed offsets of the same group.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloud_sync::{
    GroupStatus, GroupSyncState, Header, MemorySource, Mirror, MirrorConfig, MirrorStatus,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tributary_tests::kafka::KafkaCluster;

struct Consumed {
    partition: i32,
    offset: i64,
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
                    offset: m.offset(),
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
    fill_at(source, topic, partitions, from, to, 1_700_000_000_000);
}

/// [`fill`] with record `i` at timestamp `base_ms + i`.
fn fill_at(source: &MemorySource, topic: &str, partitions: u32, from: u32, to: u32, base_ms: u64) {
    for i in from..to {
        let p = i % partitions;
        source.append(
            topic,
            p,
            base_ms + i as u64,
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
    assert_eq!(
        s.last_error_kind,
        Some(cloud_sync::ErrorKind::Connect),
        "{:?}",
        s.last_error
    );
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

/// The status of group `group`, once `done` holds for it.
fn wait_for_group(
    mirror: &Mirror,
    group: &str,
    what: &str,
    done: impl Fn(&GroupStatus) -> bool,
) -> GroupStatus {
    let s = wait_for(mirror, what, |s| {
        s.groups.iter().any(|g| g.group == group && done(g))
    });
    s.groups.into_iter().find(|g| g.group == group).unwrap()
}

/// The committed offsets of `group` per partition of `topic`, as Kafka's own
/// `ConsumerGroupCommand --describe` shows them.
fn described(cluster: &KafkaCluster, group: &str, topic: &str) -> Vec<Option<u64>> {
    cluster
        .describe_group(group)
        .unwrap()
        .into_iter()
        .filter(|p| p.topic == topic)
        .map(|p| p.current_offset)
        .collect()
}

/// A member of Kafka group `group` subscribed to `topic`, once it has its partitions.
fn kafka_member(bootstrap: &str, group: &str, topic: &str) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while consumer.assignment().unwrap().count() == 0 {
        assert!(
            Instant::now() < deadline,
            "no partitions assigned within 60 s"
        );
        if let Some(Err(e)) = consumer.poll(Duration::from_millis(100)) {
            panic!("joining {group}: {e}");
        }
    }
    consumer
}

#[test]
fn group_positions_replicate_to_kafka() {
    let cluster = KafkaCluster::start(1).unwrap();
    let bootstrap = cluster.bootstrap().to_string();
    let topic = "plant-9.telemetry";
    let source = Arc::new(MemorySource::new());
    source.add_topic("telemetry", 2);
    let mut config = MirrorConfig::new(&bootstrap, "plant-9");
    config.group_sync_interval = Duration::from_millis(200);
    let mirror = Mirror::start(config, source.clone()).unwrap();
    // Three waves of 50 records per partition, each mirrored before the next, so that
    // checkpoints exist inside the log.
    for wave in 0..3 {
        // Current timestamps: Kafka's retention (7 days by timestamp) must keep them.
        let now = cloud_sync::status::now_ms();
        fill_at(&source, "telemetry", 2, wave * 100, (wave + 1) * 100, now);
        wait_for(&mirror, "wave mirrored", |s| {
            s.lag_records() == 0 && s.records_mirrored == u64::from((wave + 1) * 100)
        });
    }
    // Kafka offset of each edge offset, per partition (the mirror keeps the order).
    let got = read_committed(&bootstrap, topic);
    let kafka_of: Vec<Vec<i64>> = (0..2)
        .map(|p| {
            got.iter()
                .filter(|r| r.partition == p)
                .map(|r| r.offset)
                .collect()
        })
        .collect();
    assert_eq!(kafka_of[0].len(), 150);
    assert_eq!(kafka_of[1].len(), 150);

    // --- the positions appear in Kafka, exactly at the first record the group has not
    // processed (this mirror saw where each transaction's records landed): inside a
    // transaction, and at a transaction's start.
    source.set_group_position("alarms", "telemetry", 0, 70);
    source.set_group_position("alarms", "telemetry", 1, 100);
    let expected = [kafka_of[0][70], kafka_of[1][100]];
    let g = wait_for_group(&mirror, "alarms", "alarms replicated", |g| {
        g.state == GroupSyncState::Replicated
            && g.partitions
                .iter()
                .map(|p| p.kafka_offset)
                .collect::<Vec<_>>()
                == expected.map(Some)
    });
    assert!(g.error.is_none(), "{g:?}");
    assert_eq!(g.partitions[0].kafka_topic, topic);
    assert_eq!(g.partitions[0].edge_offset, 70);
    assert_eq!(g.partitions[0].translated_offset, Some(expected[0]));
    assert!(g.committed_at_ms.is_some());
    assert_eq!(
        described(&cluster, "alarms", topic),
        expected.map(|o| Some(o as u64)),
        "ConsumerGroupCommand --describe shows the replicated offsets"
    );

    // --- never backwards: a lower position leaves Kafka's offset as it was.
    source.set_group_position("alarms", "telemetry", 0, 20);
    let g = wait_for_group(&mirror, "alarms", "lower position seen", |g| {
        g.partitions[0].edge_offset == 20
    });
    assert_eq!(g.state, GroupSyncState::Replicated, "{g:?}");
    assert_eq!(g.partitions[0].translated_offset, Some(kafka_of[0][20]));
    assert_eq!(g.partitions[0].kafka_offset, Some(expected[0]));
    assert_eq!(
        described(&cluster, "alarms", topic),
        expected.map(|o| Some(o as u64))
    );

    // --- not while a Kafka consumer is an active member of the group.
    let member = kafka_member(&bootstrap, "alarms", topic);
    source.set_group_position("alarms", "telemetry", 0, 120);
    let g = wait_for_group(&mirror, "alarms", "active members seen", |g| {
        g.partitions[0].edge_offset == 120 && g.state == GroupSyncState::MembersActive
    });
    assert!(
        g.error
            .as_deref()
            .unwrap_or_default()
            .contains("active member"),
        "{g:?}"
    );
    assert_eq!(g.partitions[0].kafka_offset, Some(expected[0]), "{g:?}");
    let during = described(&cluster, "alarms", topic);
    assert_eq!(
        during,
        expected.map(|o| Some(o as u64)),
        "nothing committed"
    );
    drop(member); // leaves the group without committing

    // --- once the group is empty again the new position is replicated, and a consumer that
    // joins then starts right there.
    let expected = [kafka_of[0][120], expected[1]];
    wait_for_group(&mirror, "alarms", "replicated after the member left", |g| {
        g.state == GroupSyncState::Replicated
            && g.partitions
                .iter()
                .map(|p| p.kafka_offset)
                .collect::<Vec<_>>()
                == expected.map(Some)
    });
    let member = kafka_member(&bootstrap, "alarms", topic);
    let mut first: [Option<(i64, String)>; 2] = [None, None];
    let deadline = Instant::now() + Duration::from_secs(60);
    while first.iter().any(Option::is_none) {
        assert!(
            Instant::now() < deadline,
            "no record within 60 s: {first:?}"
        );
        match member.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let slot = &mut first[m.partition() as usize];
                if slot.is_none() {
                    let value = String::from_utf8(m.payload().unwrap().to_vec()).unwrap();
                    *slot = Some((m.offset(), value));
                }
            }
            Some(Err(e)) => panic!("consuming as alarms: {e}"),
            None => {}
        }
    }
    // Partition p holds values p, p+2, p+4...: edge offset o is value 2o+p.
    assert_eq!(first[0], Some((expected[0], "240".to_string())));
    assert_eq!(first[1], Some((expected[1], "201".to_string())));
    drop(member);
    mirror.stop(Duration::from_secs(30));

    // --- a new mirror knows only the checkpoints it reads from Kafka: a position between
    // two translates conservatively, to just past the lower one's last record (records from
    // there on are seen again on failover, none is skipped).
    let mut config = MirrorConfig::new(&bootstrap, "plant-9");
    config.group_sync_interval = Duration::from_millis(200);
    let mirror = Mirror::start(config, source.clone()).unwrap();
    source.set_group_position("audit", "telemetry", 0, 70);
    source.set_group_position("audit", "telemetry", 1, 150);
    let expected = [kafka_of[0][49] + 1, kafka_of[1][149] + 1];
    let g = wait_for_group(&mirror, "audit", "audit replicated", |g| {
        g.state == GroupSyncState::Replicated
            && g.partitions
                .iter()
                .map(|p| p.kafka_offset)
                .collect::<Vec<_>>()
                == expected.map(Some)
    });
    assert_eq!(g.partitions[0].edge_offset, 70);
    assert_eq!(
        described(&cluster, "audit", topic),
        expected.map(|o| Some(o as u64))
    );
    mirror.stop(Duration::from_secs(30));
    // Kafka's console consumer in the group reads partition 0 from edge offset 50 (20
    // records seen again) and nothing of partition 1, which the group had processed.
    let read = cluster
        .consume_as_group(topic, "audit", Duration::from_secs(10))
        .unwrap();
    let values: Vec<&str> = read.iter().map(|r| r.value_str().unwrap()).collect();
    let again: Vec<String> = (50..150).map(|o| (2 * o).to_string()).collect();
    assert_eq!(values, again, "{read:?}");
    // (The committed offset is the transaction marker just before that record.)
    assert_eq!(read[0].offset as i64, kafka_of[0][50]);
}
