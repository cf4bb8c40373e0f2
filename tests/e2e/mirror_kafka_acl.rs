//! The mirror under a locked-down Kafka: a SCRAM-SHA-512 principal that has only the ACLs
//! the README lists (no CREATE: the topics exist), on a cluster whose StandardAuthorizer
//! enforces them. Without the transactional id's ACL the edge says what Kafka refused and
//! keeps accepting; once it is granted, every record reaches Kafka exactly once (read back by
//! Kafka's console consumer and by kcat, `read_committed`), and the consumer group's
//! position is replicated to its site-prefixed Kafka group.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::collections::BTreeMap;
use std::time::Duration;

use tributary_tests::kafka::KafkaCluster;
use tributary_tests::mirror::{partitions_sum, wait_mirror_status};
use tributary_tests::{ConnectOpts, Edge, Got, Proto, RawClient};

const SITE: &str = "plant-acl";
const USER: &str = "edge-plant-acl";
const PASSWORD: &str = "edge-plant-acl-secret";
const TOPIC: &str = "plant-acl.telemetry";
const RECORDS: usize = 200;

/// Publishes `RECORDS` QoS 1 messages over 8 devices, each acknowledged before the next.
async fn publish(edge: &Edge, from: usize) {
    let (mut c, ack) = RawClient::connect(
        edge.addr,
        Proto::V5,
        &ConnectOpts::new(&format!("acl-pub-{from}")),
    )
    .await
    .unwrap();
    assert!(matches!(ack, Got::ConnAck { code: 0, .. }), "{ack:?}");
    for (i, n) in (from..from + RECORDS).enumerate() {
        let pkid = i as u16 + 1;
        c.publish(
            &format!("sensors/d{}/t", n % 8),
            1,
            pkid,
            format!("r{n}").as_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(c.recv().await.unwrap(), Got::PubAck(pkid, 0));
    }
}

/// Gives the principal `operations` on a resource (`--topic T`, `--group G`,
/// `--transactional-id X`, with `--resource-pattern-type prefixed` where asked).
fn grant(kafka: &KafkaCluster, operations: &[&str], resource: &[&str]) {
    let principal = format!("User:{USER}");
    let mut args = vec!["--add", "--allow-principal", &principal];
    for op in operations {
        args.extend_from_slice(&["--operation", op]);
    }
    args.extend_from_slice(resource);
    kafka.acl(&args).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_with_the_documented_acls_mirrors_exactly_once() {
    let kafka = KafkaCluster::start(1).unwrap();
    kafka.add_scram_user(USER, PASSWORD).unwrap();
    // The operator creates the topics; the principal may not.
    kafka.create_topic(TOPIC, 2).unwrap();
    kafka
        .create_topic_with(
            &format!("tributary.checkpoints.{SITE}"),
            1,
            &[("cleanup.policy", "compact")],
        )
        .unwrap();
    kafka
        .create_topic_with(
            &format!("tributary.dead-letter.{SITE}"),
            1,
            &[("message.timestamp.type", "LogAppendTime")],
        )
        .unwrap();
    // The README's list, but the transactional id's.
    let site_prefix = format!("{SITE}.");
    let prefixed = ["--resource-pattern-type", "prefixed"];
    grant(
        &kafka,
        &["Write", "Describe", "Read"],
        &[&["--topic", &site_prefix][..], &prefixed[..]].concat(),
    );
    grant(
        &kafka,
        &["Read", "Write", "Describe"],
        &["--topic", &format!("tributary.checkpoints.{SITE}")],
    );
    grant(
        &kafka,
        &["Write", "Describe"],
        &["--topic", &format!("tributary.dead-letter.{SITE}")],
    );
    grant(
        &kafka,
        &["Read", "Describe"],
        &[&["--group", &site_prefix][..], &prefixed[..]].concat(),
    );

    let sasl = kafka.sasl_bootstrap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("kafka-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let mut edge = Edge::start(&format!(
        "[[routes]]\nmatch = \"sensors/+/#\"\ntopic = \"telemetry\"\nkey = \"{{1}}\"\npartitions = 2\n\n\
         [[groups]]\nname = \"alarms\"\ntopics = [\"telemetry\"]\nstart = \"earliest\"\n\n\
         [cloud]\nbootstrap = \"{sasl}\"\nsite = \"{SITE}\"\ntopics = [\"telemetry\"]\nrequest_timeout = \"5s\"\n\
         max_backoff = \"2s\"\ngroup_sync_interval = \"500ms\"\ngroup_prefix = \"{{site}}.\"\n\
         security_protocol = \"sasl_plaintext\"\nsasl_mechanism = \"SCRAM-SHA-512\"\n\
         username = \"{USER}\"\npassword_file = \"{}\"\n",
        password_file.display()
    ));
    publish(&edge, 0).await;

    // Without its transactional id the mirror cannot start; the edge says why, keeps
    // accepting, and mirrors nothing.
    let s = wait_mirror_status(
        &edge,
        "an authorization error",
        Duration::from_secs(120),
        |s| {
            s["last_error"]
                .as_str()
                .is_some_and(|e| e.to_lowercase().contains("authoriz"))
        },
    );
    assert!(
        s["last_error"].as_str().unwrap().contains("ransactional"),
        "the error names what was refused: {s:#}"
    );
    assert_eq!(s["records_mirrored"], 0, "{s:#}");

    // Granted: everything is mirrored, once.
    grant(
        &kafka,
        &["Write", "Describe"],
        &["--transactional-id", &format!("tributary-mirror-{SITE}")],
    );
    publish(&edge, RECORDS).await;
    let total = 2 * RECORDS;
    wait_mirror_status(&edge, "all mirrored", Duration::from_secs(180), |s| {
        s["lag_records"] == 0 && partitions_sum(s, "telemetry", "edge_end_offset") == total as u64
    });
    let records = kafka
        .wait_for_committed(TOPIC, total, Duration::from_secs(60))
        .unwrap();
    let mut values: Vec<String> = records
        .iter()
        .map(|r| r.value_str().unwrap().to_string())
        .collect();
    values.sort();
    let mut expected: Vec<String> = (0..total).map(|n| format!("r{n}")).collect();
    expected.sort();
    assert_eq!(
        values, expected,
        "every acknowledged record once, nothing else"
    );
    // kcat, another client library's reader, sees the same, each device's records in order.
    let kcat = kafka.kcat_values(TOPIC).unwrap();
    assert_eq!(kcat.values().map(Vec::len).sum::<usize>(), total);
    for p in kcat.values() {
        let mut last_per_device: BTreeMap<usize, usize> = BTreeMap::new();
        for v in p {
            let n: usize = v[1..].parse().unwrap();
            let prev = last_per_device.insert(n % 8, n);
            assert!(prev.is_none_or(|prev| prev < n), "{v} after r{prev:?}");
        }
    }

    // The group's position reaches its prefixed Kafka group under the same principal.
    let (mut member, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("acl-m"))
        .await
        .unwrap();
    let codes = member
        .subscribe(1, &[("$share/alarms/#", 1)])
        .await
        .unwrap();
    assert!(codes[0] < 0x80, "SUBACK {codes:?}");
    let mut acked = 0;
    while acked < total {
        if let Got::Publish { pkid, .. } =
            member.recv_within(Duration::from_secs(60)).await.unwrap()
        {
            member.ack(0x40, pkid).await.unwrap();
            acked += 1;
        }
    }
    let s = wait_mirror_status(&edge, "group replicated", Duration::from_secs(120), |s| {
        s["groups"].as_array().is_some_and(|g| {
            g.iter().any(|g| {
                g["group"] == "alarms"
                    && g["state"] == "replicated"
                    && g["partitions"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .all(|p| p["kafka_offset"].is_u64())
            })
        })
    });
    assert_eq!(s["groups"][0]["kafka_group"], format!("{SITE}.alarms"));
    assert_eq!(
        kafka
            .describe_group(&format!("{SITE}.alarms"))
            .unwrap()
            .len(),
        2
    );
    drop(member);
    assert!(edge.stop().success());
}
