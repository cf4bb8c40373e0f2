//! Group replication only while the edge is the Kafka group's one committer, under a
//! site-prefixed group id (`cloud.group_prefix = "{site}."`): a Kafka tool that commits an
//! offset without joining (as an `assign()` consumer does) and a consumer that subscribes,
//! commits and leaves each stop the edge's replication of that group, across a restart too,
//! and the offsets they committed stay in Kafka; deleting the group's offsets hands it back.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::time::{Duration, Instant};

use tributary_tests::kafka::KafkaCluster;
use tributary_tests::mirror::{cloud_section, partitions_sum, wait_mirror_status};
use tributary_tests::{ConnectOpts, Edge, Got, Proto, RawClient};

const SITE: &str = "plant-o";
const KAFKA_TOPIC: &str = "plant-o.telemetry";
const KAFKA_GROUP: &str = "plant-o.alarms";

/// Publishes `count` QoS 1 messages numbered from `from`, each acknowledged before the next.
async fn publish(edge: &Edge, from: usize, count: usize) {
    let (mut c, ack) = RawClient::connect(
        edge.addr,
        Proto::V5,
        &ConnectOpts::new(&format!("publisher-{from}")),
    )
    .await
    .unwrap();
    assert!(matches!(ack, Got::ConnAck { code: 0, .. }), "{ack:?}");
    for (i, n) in (from..from + count).enumerate() {
        let pkid = i as u16 + 1;
        c.publish("sensors/d1/alarm", 1, pkid, format!("m{n}").as_bytes())
            .await
            .unwrap();
        assert_eq!(c.recv().await.unwrap(), Got::PubAck(pkid, 0));
    }
}

/// A member of the edge group `alarms` that acknowledges every record it is given, until it
/// has acknowledged `total` since it joined.
async fn member_acks(edge: &Edge, id: &str, total: usize) {
    let (mut c, ack) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new(id))
        .await
        .unwrap();
    assert!(matches!(ack, Got::ConnAck { code: 0, .. }), "{ack:?}");
    let codes = c.subscribe(1, &[("$share/alarms/#", 1)]).await.unwrap();
    assert!(codes[0] < 0x80, "SUBACK {codes:?}");
    let mut acked = 0;
    while acked < total {
        match c.recv_within(Duration::from_secs(60)).await.unwrap() {
            Got::Publish { pkid, .. } => {
                c.ack(0x40, pkid).await.unwrap();
                acked += 1;
            }
            Got::Closed => panic!("the edge closed the member's connection"),
            _ => {}
        }
    }
}

/// Waits until the log's `records` are all in Kafka.
fn wait_mirrored(edge: &Edge, records: usize) {
    wait_mirror_status(edge, "records mirrored", Duration::from_secs(120), |s| {
        s["lag_records"] == 0 && partitions_sum(s, "telemetry", "edge_end_offset") == records as u64
    });
}

/// The group `alarms` of the mirror status, once `done` holds for it.
fn wait_group(
    edge: &Edge,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let s = wait_mirror_status(edge, what, Duration::from_secs(120), |s| {
        s["groups"]
            .as_array()
            .is_some_and(|g| g.iter().any(|g| g["group"] == "alarms" && done(g)))
    });
    s["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group"] == "alarms")
        .unwrap()
        .clone()
}

/// The offset Kafka holds for the edge group in partition 0 (`--describe`).
fn kafka_offset(kafka: &KafkaCluster) -> Option<u64> {
    kafka
        .describe_group(KAFKA_GROUP)
        .unwrap()
        .into_iter()
        .find(|g| g.topic == KAFKA_TOPIC && g.partition == 0)
        .and_then(|g| g.current_offset)
}

fn group_command(kafka: &KafkaCluster, args: &[&str]) {
    let mut all = vec!["--bootstrap-server", "@BOOTSTRAP@", "--group", KAFKA_GROUP];
    all.extend_from_slice(args);
    let out = kafka
        .tools(
            "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
            &all,
        )
        .unwrap();
    assert!(
        out.status.success(),
        "ConsumerGroupCommand {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kafka's committed offset for the group stays `held` while the edge, with a translated
/// offset beyond it, says another committer owns the group.
fn assert_other_committer(edge: &Edge, kafka: &KafkaCluster, held: u64, what: &str) {
    let g = wait_group(edge, what, |g| {
        g["state"] == "other_committer"
            && g["partitions"][0]["translated_offset"]
                .as_u64()
                .is_some_and(|t| t > held)
    });
    assert!(
        g["error"]
            .as_str()
            .unwrap()
            .contains("holds offsets the edge did not commit"),
        "{g}"
    );
    assert_eq!(g["partitions"][0]["kafka_offset"], held, "{g}");
    // Several rounds later, Kafka still holds the other committer's offset.
    let rounds_later = Instant::now() + Duration::from_secs(2);
    while Instant::now() < rounds_later {
        assert_eq!(
            kafka_offset(kafka),
            Some(held),
            "{what}: the edge overwrote it"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_committer_stops_group_replication_until_the_group_is_handed_back() {
    let kafka = KafkaCluster::start(1).unwrap();
    let mut edge = Edge::start(&format!(
        "[[routes]]\nmatch = \"sensors/+/#\"\ntopic = \"telemetry\"\nkey = \"{{1}}\"\npartitions = 1\n\n\
         [[groups]]\nname = \"alarms\"\ntopics = [\"telemetry\"]\nstart = \"earliest\"\n\n\
         {}group_sync_interval = \"200ms\"\ngroup_prefix = \"{{site}}.\"\n",
        cloud_section(kafka.bootstrap(), SITE)
    ));

    // The edge group's position reaches Kafka under the site's group id, not the bare name.
    publish(&edge, 0, 10).await;
    wait_mirrored(&edge, 10);
    member_acks(&edge, "member-1", 10).await;
    let g = wait_group(&edge, "position 10 replicated", |g| {
        g["state"] == "replicated"
            && g["partitions"][0]["edge_offset"] == 10
            && g["partitions"][0]["kafka_offset"].is_u64()
    });
    assert_eq!(g["kafka_group"], KAFKA_GROUP, "{g}");
    let first = g["partitions"][0]["kafka_offset"].as_u64().unwrap();
    assert_eq!(kafka_offset(&kafka), Some(first));
    assert!(kafka.describe_group("alarms").unwrap().is_empty());

    // A commit without joining the group (what an assign() consumer does): Kafka's own tool
    // sets the offset back to 2. The edge moves on, but leaves the group alone.
    group_command(
        &kafka,
        &[
            "--reset-offsets",
            "--topic",
            &format!("{KAFKA_TOPIC}:0"),
            "--to-offset",
            "2",
            "--execute",
        ],
    );
    publish(&edge, 10, 10).await;
    wait_mirrored(&edge, 20);
    member_acks(&edge, "member-2", 10).await;
    assert_other_committer(&edge, &kafka, 2, "after an assign-style commit");

    // Deleting the group's offsets hands it back: the edge replicates again.
    group_command(&kafka, &["--delete"]);
    let g = wait_group(&edge, "replicated again", |g| {
        g["state"] == "replicated"
            && g["partitions"][0]["edge_offset"] == 20
            && g["partitions"][0]["kafka_offset"].as_u64() > Some(first)
    });
    let handed_back = g["partitions"][0]["kafka_offset"].as_u64().unwrap();
    assert_eq!(kafka_offset(&kafka), Some(handed_back));

    // A Kafka consumer subscribes to the group, reads what the edge group has not, commits
    // and leaves.
    publish(&edge, 20, 10).await;
    wait_mirrored(&edge, 30);
    let read = kafka
        .consume_as_group(KAFKA_TOPIC, KAFKA_GROUP, Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        read.len(),
        10,
        "the Kafka consumer reads from the edge's position"
    );
    let consumer_commit = kafka_offset(&kafka).unwrap();
    assert!(consumer_commit > handed_back);
    // The edge group then goes further than the Kafka consumer did; the edge does not
    // overwrite the consumer's commit, not even after a restart.
    publish(&edge, 30, 10).await;
    wait_mirrored(&edge, 40);
    member_acks(&edge, "member-3", 20).await;
    assert_other_committer(
        &edge,
        &kafka,
        consumer_commit,
        "after a consumer subscribed, committed and left",
    );
    assert!(edge.stop().success());
    edge.restart();
    assert_other_committer(&edge, &kafka, consumer_commit, "after a restart");
}
