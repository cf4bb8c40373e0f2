//! Three sites mirror into one 3-node cluster at once (#19 item 1): each keeps its checkpoints in a
//! topic of its own, `tributary.checkpoints.{site}`, so no site's open transaction (one left
//! by an edge killed with -9 in the middle of it) holds back another site's checkpoint read.
//! One site starts on the shared topic of earlier versions and is upgraded: its checkpoints
//! there are read once and copied. One edge is killed with -9 again and again while another
//! starts new sessions; every acknowledged record of every site is in Kafka exactly once, in
//! order (`firmware-sim verify --kafka`, Kafka's console consumer and kcat, read_committed).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::time::Duration;

use tributary_tests::kafka::KafkaCluster;
use tributary_tests::mirror::{
    cloud_section as cloud, finish, fleet, partitions_sum, verify_kafka, wait_mirror_status,
};
use tributary_tests::Edge;

const ROUTES: &str =
    "[[routes]]\nmatch = \"sensors/+/#\"\ntopic = \"telemetry\"\nkey = \"{1}\"\npartitions = 4\n";

fn drained(s: &serde_json::Value) -> bool {
    s["lag_records"] == 0 && partitions_sum(s, "telemetry", "edge_end_offset") > 0
}

#[test]
fn sites_killed_mid_transaction_and_restarted_duplicate_nothing() {
    let kafka = KafkaCluster::start(3).unwrap();
    let work = tempfile::tempdir().unwrap();

    // plant-a as an earlier version ran it: checkpoints in the shared topic.
    let cloud_a = cloud(kafka.bootstrap(), "plant-a");
    let mut a = Edge::start(&format!(
        "{ROUTES}{cloud_a}checkpoint_topic = \"tributary.checkpoints\"\n"
    ));
    let before = work.path().join("a-before-upgrade");
    finish(fleet(&a, &before, 10, 10, 5));
    wait_mirror_status(&a, "drained", Duration::from_secs(120), drained);
    assert!(a.stop().success());
    // The upgrade: the default, a topic of its own.
    let path = a.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("checkpoint_topic = \"tributary.checkpoints\"\n", ""),
    )
    .unwrap();
    a.restart();

    let mut b = Edge::start(&format!("{ROUTES}{}", cloud(kafka.bootstrap(), "plant-b")));
    let c = Edge::start(&format!("{ROUTES}{}", cloud(kafka.bootstrap(), "plant-c")));
    let (ma, mb, mc) = (
        work.path().join("a"),
        work.path().join("b"),
        work.path().join("c"),
    );
    let runs = [
        fleet(&a, &ma, 10, 20, 25),
        fleet(&b, &mb, 10, 20, 25),
        fleet(&c, &mc, 10, 20, 25),
    ];
    // plant-a dies with -9 (mid-transaction, as it mirrors live traffic) while plant-b
    // starts a new session, again and again.
    for _ in 0..4 {
        std::thread::sleep(Duration::from_secs(4));
        a.kill9();
        b.kill9();
        b.restart();
        a.restart();
    }
    for run in runs {
        finish(run);
    }

    let mut figures = Vec::new();
    for (edge, site, manifests) in [
        (&a, "plant-a", vec![&before, &ma]),
        (&b, "plant-b", vec![&mb]),
        (&c, "plant-c", vec![&mc]),
    ] {
        let topic = format!("{site}.telemetry");
        let mut acknowledged = 0;
        for m in manifests {
            acknowledged += verify_kafka(&kafka, m, &topic, 400, "180s");
        }
        let s = wait_mirror_status(edge, "drained", Duration::from_secs(180), drained);
        let logged = partitions_sum(&s, "telemetry", "edge_end_offset");
        let consumed = kafka
            .consume_committed(&topic, Duration::from_secs(10))
            .unwrap();
        assert_eq!(
            consumed.len() as u64,
            logged,
            "{site}: each logged record once"
        );
        let kcat: usize = kafka.kcat_count(&topic).unwrap();
        assert_eq!(
            kcat as u64, logged,
            "{site}: kcat reads each logged record once"
        );
        figures.push(format!(
            "{site}: acknowledged={acknowledged} logged={logged} in_kafka={} kcat={kcat}",
            consumed.len()
        ));
    }
    eprintln!("{}", figures.join("\n"));

    // Each site's checkpoints in a topic of its own; plant-a's copied from the shared one.
    let topics = kafka.list_topics().unwrap();
    for site in ["plant-a", "plant-b", "plant-c"] {
        let own = format!("tributary.checkpoints.{site}");
        assert!(topics.contains(&own), "{topics:?}");
        assert!(!kafka
            .consume_committed(&own, Duration::from_secs(5))
            .unwrap()
            .is_empty());
    }
    let shared = kafka
        .consume_committed("tributary.checkpoints", Duration::from_secs(5))
        .unwrap();
    assert!(
        shared
            .iter()
            .all(|r| r.key_str().unwrap().starts_with("plant-a/")),
        "only plant-a ever wrote to the shared topic, before its upgrade"
    );
}
