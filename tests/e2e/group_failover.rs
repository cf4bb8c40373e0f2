//! A consumer group fails over from the edge to Kafka: an MQTT 5 member of the edge group
//! `alarms` (`$share/alarms/#`) consumes part of a mirrored topic and acknowledges it; the
//! edge replicates the group's committed positions to Kafka, where Kafka's own
//! `ConsumerGroupCommand --describe` shows them; once the edge is stopped, Kafka's console
//! consumer in group `alarms` reads from there: every record the edge group had not
//! acknowledged is there, and the records it sees again are at most those after the last
//! mirror checkpoint at or below the group's position (the records are published in waves,
//! each mirrored before the next, so that checkpoints exist below the position).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tributary_tests::kafka::KafkaCluster;
use tributary_tests::mirror::{cloud_section, partitions_sum, wait_mirror_status};
use tributary_tests::{ConnectOpts, Edge, Got, Proto, RawClient};

const ROUTES: &str =
    "[[routes]]\nmatch = \"sensors/+/#\"\ntopic = \"telemetry\"\nkey = \"{1}\"\npartitions = 2\n";
const GROUPS: &str =
    "[[groups]]\nname = \"alarms\"\ntopics = [\"telemetry\"]\nstart = \"earliest\"\n";
const KAFKA_TOPIC: &str = "plant-g.telemetry";
const DEVICES: usize = 8;
const WAVES: usize = 3;
/// Messages per device per wave.
const PER_WAVE: usize = 5;

/// Where one published message is: partition, edge offset, Kafka offset, wave.
#[derive(Debug, Clone, Copy)]
struct Placed {
    partition: u32,
    edge_offset: usize,
    kafka_offset: u64,
    wave: usize,
}

fn payload(wave: usize, device: usize, seq: usize) -> String {
    format!("w{wave}-d{device}-{seq}")
}

fn wave_of(payload: &str) -> usize {
    payload[1..payload.find('-').unwrap()].parse().unwrap()
}

/// Publishes one wave at QoS 1, each message acknowledged before the next.
async fn publish_wave(edge: &Edge, wave: usize) {
    let (mut c, ack) = RawClient::connect(
        edge.addr,
        Proto::V5,
        &ConnectOpts::new(&format!("publisher-{wave}")),
    )
    .await
    .unwrap();
    assert!(matches!(ack, Got::ConnAck { code: 0, .. }), "{ack:?}");
    let mut pkid = 1u16;
    for seq in 0..PER_WAVE {
        for device in 0..DEVICES {
            let topic = format!("sensors/d{device}/alarm");
            c.publish(&topic, 1, pkid, payload(wave, device, seq).as_bytes())
                .await
                .unwrap();
            match c.recv().await.unwrap() {
                Got::PubAck(p, code) if p == pkid && code < 0x80 => {}
                other => panic!("expected PUBACK {pkid}, got {other:?}"),
            }
            pkid += 1;
        }
    }
}

/// The mirror has every record of the first `waves` waves in Kafka.
fn mirrored(s: &serde_json::Value, waves: usize) -> bool {
    let logged = partitions_sum(s, "telemetry", "edge_end_offset");
    s["lag_records"] == 0 && logged == (waves * DEVICES * PER_WAVE) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_group_fails_over_to_a_kafka_consumer() {
    let kafka = KafkaCluster::start(1).unwrap();
    let mut edge = Edge::start(&format!(
        "{ROUTES}{GROUPS}{}group_sync_interval = \"500ms\"\n",
        cloud_section(kafka.bootstrap(), "plant-g")
    ));

    // Waves, each mirrored before the next: every wave ends at a checkpoint.
    for wave in 0..WAVES {
        publish_wave(&edge, wave).await;
        wait_mirror_status(&edge, "wave mirrored", Duration::from_secs(120), |s| {
            mirrored(s, wave + 1)
        });
    }

    // Where each message is, from Kafka's own consumer: the mirror keeps each partition's
    // order, so a record's rank in its Kafka partition is its edge offset.
    let total = WAVES * DEVICES * PER_WAVE;
    let consumed = kafka
        .wait_for_committed(KAFKA_TOPIC, total, Duration::from_secs(60))
        .unwrap();
    assert_eq!(consumed.len(), total, "each message once in Kafka");
    let mut placed: HashMap<String, Placed> = HashMap::new();
    let mut per_partition: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for r in &consumed {
        let value = r.value_str().unwrap().to_string();
        let p = r.partition as usize;
        placed.insert(
            value.clone(),
            Placed {
                partition: r.partition,
                edge_offset: per_partition[p].len(),
                kafka_offset: r.offset,
                wave: wave_of(&value),
            },
        );
        per_partition[p].push(value);
    }
    assert!(
        per_partition.iter().all(|p| !p.is_empty()),
        "the devices' keys should spread over both partitions"
    );
    // Per partition, the edge offset where each wave ends (a checkpoint).
    let wave_ends: Vec<Vec<usize>> = per_partition
        .iter()
        .map(|values| {
            (0..WAVES)
                .map(|w| values.iter().filter(|v| wave_of(v) <= w).count())
                .collect()
        })
        .collect();

    // The group acknowledges, in partition 0, the first wave and half the second (a position
    // inside a transaction); in partition 1, the first two waves (a position at a checkpoint).
    let in_wave =
        |p: usize, w: usize| wave_ends[p][w] - if w == 0 { 0 } else { wave_ends[p][w - 1] };
    let position = [wave_ends[0][0] + in_wave(0, 1) / 2, wave_ends[1][1]];
    let mut member = {
        let (mut c, ack) =
            RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("alarm-member-1"))
                .await
                .unwrap();
        assert!(matches!(ack, Got::ConnAck { code: 0, .. }), "{ack:?}");
        let codes = c.subscribe(1, &[("$share/alarms/#", 1)]).await.unwrap();
        assert!(codes[0] < 0x80, "SUBACK {codes:?}");
        c
    };
    let to_ack = position[0] + position[1];
    let mut acked = 0;
    let mut last_delivered: [Option<usize>; 2] = [None, None];
    while acked < to_ack {
        match member.recv_within(Duration::from_secs(60)).await.unwrap() {
            Got::Publish {
                payload, qos, pkid, ..
            } => {
                assert_eq!(qos, 1, "group records are delivered at QoS 1");
                let value = String::from_utf8(payload).unwrap();
                let at = placed[&value];
                let p = at.partition as usize;
                assert!(
                    last_delivered[p].is_none_or(|last| last < at.edge_offset),
                    "partition {p}: {value} delivered out of order"
                );
                last_delivered[p] = Some(at.edge_offset);
                if at.edge_offset < position[p] {
                    member.ack(0x40, pkid).await.unwrap();
                    acked += 1;
                }
            }
            Got::Closed => panic!("the edge closed the member's connection"),
            _ => {}
        }
    }

    // The positions reach Kafka: the edge's status says so, and Kafka's own tool agrees.
    // This mirror saw where each of its transactions' records landed, so the offsets are
    // exactly those of the first records the group has not acknowledged.
    let expected: Vec<u64> = (0..2)
        .map(|p| placed[&per_partition[p][position[p]]].kafka_offset)
        .collect();
    let status = wait_mirror_status(
        &edge,
        "group positions replicated",
        Duration::from_secs(120),
        |s| {
            s["groups"].as_array().is_some_and(|groups| {
                groups.iter().any(|g| {
                    g["group"] == "alarms"
                        && g["state"] == "replicated"
                        && g["partitions"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|p| p["kafka_offset"].as_u64())
                            .collect::<Vec<_>>()
                            == expected.iter().map(|&o| Some(o)).collect::<Vec<_>>()
                })
            })
        },
    );
    let group = status["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group"] == "alarms")
        .unwrap();
    for (p, part) in group["partitions"].as_array().unwrap().iter().enumerate() {
        assert_eq!(part["kafka_topic"], KAFKA_TOPIC, "{group}");
        assert_eq!(part["edge_offset"], position[p] as u64, "{group}");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let described = loop {
        let d: Vec<Option<u64>> = kafka
            .describe_group("alarms")
            .unwrap()
            .into_iter()
            .filter(|g| g.topic == KAFKA_TOPIC)
            .map(|g| g.current_offset)
            .collect();
        if d.len() == 2 || Instant::now() >= deadline {
            break d;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert_eq!(
        described,
        expected.iter().map(|&o| Some(o)).collect::<Vec<_>>(),
        "ConsumerGroupCommand --describe --group alarms"
    );

    // The edge reports the replicated offsets too: admin API, metrics, `edge groups`.
    let (code, body) = tributary_tests::http_get(edge.admin, "/api/v1/groups", None).unwrap();
    assert_eq!(code, 200, "{body}");
    let api: serde_json::Value = serde_json::from_str(&body).unwrap();
    let g = &api["groups"][0];
    assert_eq!(g["kafka_state"], "replicated", "{g}");
    let offsets: Vec<Option<u64>> = g["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kafka_offset"].as_u64())
        .collect();
    assert_eq!(
        offsets,
        expected.iter().map(|&o| Some(o)).collect::<Vec<_>>()
    );
    let (_, metrics) = tributary_tests::http_get(edge.admin, "/metrics", None).unwrap();
    for (p, o) in expected.iter().enumerate() {
        let series = format!(
            "tributary_group_kafka_offset{{group=\"alarms\",topic=\"telemetry\",partition=\"{p}\"}}"
        );
        assert_eq!(tributary_tests::metric(&metrics, &series), *o as f64);
    }
    tributary_tests::assert_readme_names_metrics(&metrics);

    // The edge is lost; a Kafka consumer of the group takes over from the replicated offsets.
    edge.stop();
    drop(member);
    let taken_over = kafka
        .consume_as_group(KAFKA_TOPIC, "alarms", Duration::from_secs(15))
        .unwrap();
    let seen: HashMap<&str, u64> = taken_over
        .iter()
        .map(|r| (r.value_str().unwrap(), r.offset))
        .collect();
    assert_eq!(seen.len(), taken_over.len(), "no record twice");
    for (value, at) in &placed {
        let p = at.partition as usize;
        if at.edge_offset >= position[p] {
            assert!(
                seen.contains_key(value.as_str()),
                "{value} (partition {p}, edge offset {}) was not acknowledged at the edge \
                 but the Kafka consumer never got it",
                at.edge_offset
            );
        } else if seen.contains_key(value.as_str()) {
            // Seen again: only records after the last checkpoint at or below the position.
            let checkpoint = wave_ends[p]
                .iter()
                .copied()
                .filter(|&e| e <= position[p])
                .max()
                .unwrap_or(0);
            assert!(
                at.edge_offset >= checkpoint,
                "{value} (partition {p}, edge offset {}, wave {}) was acknowledged before the \
                 checkpoint at {checkpoint}, yet the Kafka consumer got it again",
                at.edge_offset,
                at.wave
            );
        }
    }
    let unacknowledged = placed
        .values()
        .filter(|at| at.edge_offset >= position[at.partition as usize])
        .count();
    assert!(
        taken_over.len() >= unacknowledged && unacknowledged > 0,
        "{} records read, {unacknowledged} unacknowledged",
        taken_over.len()
    );
}
