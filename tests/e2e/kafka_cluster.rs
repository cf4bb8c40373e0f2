//! The Kafka test harness itself, against real clusters: records produced with the Java console
//! producer read back exactly (keys, values, headers, partitions, offsets) through the
//! `read_committed` witness; a 3-node cluster keeps serving through a node's kill -9 and
//! restart; committed data survives a kill -9 of every node and the cluster comes back on the
//! same ports.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tributary_tests::{now_ms, ConsumedRecord, KafkaCluster, ProducedRecord, TimestampType};

const IDLE: Duration = Duration::from_secs(5);

/// Partition the Java producer's default partitioner picks for a key:
/// `toPositive(murmur2(key)) % partitions` (Kafka's `Utils.murmur2`).
fn java_default_partition(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}

fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (i, b) in tail.iter().enumerate().rev() {
            h ^= (*b as u32) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

fn values(records: &[ConsumedRecord]) -> Vec<&str> {
    let mut v: Vec<&str> = records.iter().map(|r| r.value_str().unwrap()).collect();
    v.sort();
    v
}

/// Every partition's offsets are 0, 1, 2, ... (nothing lost, nothing duplicated).
fn assert_dense_offsets(records: &[ConsumedRecord]) {
    let mut by_partition: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for r in records {
        by_partition.entry(r.partition).or_default().push(r.offset);
    }
    for (p, offsets) in by_partition {
        let expected: Vec<u64> = (0..offsets.len() as u64).collect();
        assert_eq!(offsets, expected, "offsets of partition {p}");
    }
}

fn assert_cluster_whole(kafka: &KafkaCluster, topic: &str) {
    let partitions = kafka.describe_topic(topic).unwrap().expect("topic exists");
    for p in partitions {
        assert_eq!(p.replicas.len(), kafka.nodes(), "{p:?}");
        assert!(p.leader.is_some(), "{p:?}");
        let mut isr = p.isr.clone();
        let mut replicas = p.replicas.clone();
        isr.sort();
        replicas.sort();
        assert_eq!(isr, replicas, "ISR of partition {}", p.partition);
    }
}

#[test]
fn murmur2_matches_kafkas_test_vectors() {
    // From Kafka's UtilsTest.testMurmur2, as Java ints.
    let cases: [(&str, i32); 6] = [
        ("21", -973932308),
        ("foobar", -790332482),
        ("a-little-bit-long-string", -985981536),
        ("a-little-bit-longer-string", -1486304829),
        (
            "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58897971,
        ),
        ("abc", 479470107),
    ];
    for (input, expected) in cases {
        assert_eq!(murmur2(input.as_bytes()) as i32, expected, "{input}");
    }
}

#[test]
fn one_node_round_trips_keys_values_headers_and_partitions() {
    let kafka = KafkaCluster::start(1).unwrap();
    kafka.create_topic("smoke", 4).unwrap();
    assert_eq!(kafka.partitions_of("smoke").unwrap(), Some(4));

    let tricky = "{\"note\":\"caf\u{e9} \\\\ back\tslash ~ \u{2713}\"}";
    let sent = [
        ProducedRecord {
            key: Some("dev-1"),
            value: r#"{"temp":21.5}"#,
            headers: &[("mqtt.topic", "sensors/dev-1/temp"), ("qos", "1")],
        },
        ProducedRecord {
            key: Some("dev-2"),
            value: tricky,
            headers: &[("edge.offset", "41"), ("time", "12:00:01")],
        },
        ProducedRecord {
            key: Some("dev-3"),
            value: "",
            headers: &[("empty", "")],
        },
        ProducedRecord {
            key: Some("dev-1"),
            value: "second for dev-1",
            headers: &[],
        },
        ProducedRecord {
            key: None,
            value: "no key",
            headers: &[],
        },
    ];
    let before = now_ms() as i64;
    kafka.produce("smoke", &sent).unwrap();
    let after = now_ms() as i64;

    let got = kafka.consume_committed("smoke", IDLE).unwrap();
    assert_eq!(got.len(), sent.len(), "{got:#?}");
    for s in &sent {
        let r = got
            .iter()
            .find(|r| r.value.as_deref() == Some(s.value.as_bytes()))
            .unwrap_or_else(|| panic!("{:?} not consumed: {got:#?}", s.value));
        assert_eq!(r.key_str(), s.key, "{r:?}");
        let headers: Vec<(&str, &str)> = r
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(headers, s.headers, "{r:?}");
        match s.key {
            Some(k) => assert_eq!(
                r.partition,
                java_default_partition(k.as_bytes(), 4),
                "{r:?}"
            ),
            None => assert!(r.partition < 4, "{r:?}"),
        }
        assert_eq!(r.timestamp_type, TimestampType::CreateTime);
        assert!((before..=after).contains(&r.timestamp), "{r:?}");
    }
    assert_dense_offsets(&got);
    let dev1: Vec<&str> = got
        .iter()
        .filter(|r| r.key_str() == Some("dev-1"))
        .map(|r| r.value_str().unwrap())
        .collect();
    assert_eq!(
        dev1,
        [r#"{"temp":21.5}"#, "second for dev-1"],
        "one key keeps its order"
    );
    assert_eq!(
        got.iter().filter(|r| r.header("qos") == Some("1")).count(),
        1
    );

    // The witness never creates what it reads: a mirror that forgot a topic must not be
    // rescued by the test's own consumer.
    assert!(kafka
        .consume_committed("absent", Duration::from_secs(3))
        .unwrap()
        .is_empty());
    assert_eq!(kafka.partitions_of("absent").unwrap(), None);
    assert_eq!(kafka.list_topics().unwrap(), ["smoke"]);
}

#[test]
fn three_nodes_serve_through_a_node_kill_and_restart() {
    let kafka = KafkaCluster::start(3).unwrap();
    kafka.create_topic("replicated", 3).unwrap();
    assert_cluster_whole(&kafka, "replicated");
    let record = |value| ProducedRecord {
        key: Some(value),
        value,
        headers: &[("phase", "x")],
    };

    kafka
        .produce("replicated", &[record("before-1"), record("before-2")])
        .unwrap();
    kafka.kill(2).unwrap();
    // acks=all with min.insync.replicas 2: two of three nodes still take writes once the
    // controller has moved node 2's leaderships.
    kafka
        .produce("replicated", &[record("during-1"), record("during-2")])
        .unwrap();
    let while_down = kafka.describe_topic("replicated").unwrap().unwrap();
    assert!(
        while_down
            .iter()
            .all(|p| !p.isr.contains(&2) && p.leader != Some(2)),
        "{while_down:?}"
    );
    kafka.restart(2).unwrap();
    assert_cluster_whole(&kafka, "replicated");
    kafka.produce("replicated", &[record("after-1")]).unwrap();

    let got = kafka.consume_committed("replicated", IDLE).unwrap();
    assert_eq!(
        values(&got),
        ["after-1", "before-1", "before-2", "during-1", "during-2"]
    );
    assert_dense_offsets(&got);
}

#[test]
fn committed_data_survives_a_kill_of_every_node() {
    let kafka = KafkaCluster::start(3).unwrap();
    let bootstrap = kafka.bootstrap().to_string();
    kafka.create_topic("durable", 2).unwrap();
    let sent: Vec<String> = (0..6).map(|i| format!("{{\"reading\":{i}}}")).collect();
    let records: Vec<ProducedRecord> = sent
        .iter()
        .enumerate()
        .map(|(i, v)| ProducedRecord {
            key: Some(["a", "b", "c"][i % 3]),
            value: v,
            headers: &[],
        })
        .collect();
    kafka.produce("durable", &records).unwrap();

    kafka.kill_all().unwrap();
    for broker in bootstrap.split(',') {
        let addr: SocketAddr = broker.parse().unwrap();
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
            "{broker} still accepts connections after kill_all"
        );
    }
    kafka.restart_all().unwrap();
    for broker in bootstrap.split(',') {
        let addr: SocketAddr = broker.parse().unwrap();
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).is_ok(),
            "{broker} refuses connections after restart_all: the ports must not change"
        );
    }
    assert_cluster_whole(&kafka, "durable");

    kafka
        .produce(
            "durable",
            &[ProducedRecord {
                key: Some("a"),
                value: "after the outage",
                headers: &[],
            }],
        )
        .unwrap();
    let got = kafka.consume_committed("durable", IDLE).unwrap();
    let mut expected: Vec<&str> = sent.iter().map(String::as_str).collect();
    expected.push("after the outage");
    expected.sort();
    assert_eq!(values(&got), expected);
    assert_dense_offsets(&got);
}
