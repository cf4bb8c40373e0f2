//! An uplink that drops packets instead of refusing connections: the edge reaches Kafka only
//! through a proxy of the test, which stalls (no byte moves either way, nothing is closed,
//! no new connection is accepted) for longer than `request_timeout` while devices publish.
//! The edge keeps accepting, reports the link down, and once the link is back every
//! acknowledged record is in Kafka exactly once (firmware-sim verify, Kafka's console
//! consumer and kcat, read_committed).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::time::{Duration, Instant};

use tributary_tests::kafka::KafkaCluster;
use tributary_tests::mirror::{finish, fleet, partitions_sum, verify_kafka, wait_mirror_status};
use tributary_tests::proxy::StallingProxy;
use tributary_tests::{http_get, metric, Edge};

const TOPIC: &str = "plant-s.telemetry";

#[test]
fn a_stalled_link_longer_than_the_request_timeout_loses_and_duplicates_nothing() {
    let kafka = KafkaCluster::start(1).unwrap();
    let proxy = StallingProxy::start(&kafka.proxied().unwrap()).unwrap();
    let mut edge = Edge::start(&format!(
        "[[routes]]\nmatch = \"sensors/+/#\"\ntopic = \"telemetry\"\nkey = \"{{1}}\"\npartitions = 4\n\
         [cloud]\nbootstrap = \"{}\"\nsite = \"plant-s\"\ntopics = [\"telemetry\"]\n\
         request_timeout = \"5s\"\nmax_backoff = \"2s\"\nstall_timeout = \"20s\"\n",
        proxy.bootstrap()
    ));
    let work = tempfile::tempdir().unwrap();
    let link_up = |edge: &Edge| {
        let (_, text) = http_get(edge.admin, "/metrics", None).unwrap();
        metric(&text, "tributary_mirror_link_up")
    };

    // Mirroring through the proxy first.
    let manifest = work.path().join("stall");
    let run = fleet(&edge, &manifest, 20, 20, 50);
    wait_mirror_status(&edge, "mirroring", Duration::from_secs(120), |s| {
        s["records_mirrored"].as_u64() > Some(0)
    });

    // 30 s of silence, six request time-outs long, under load.
    proxy.stall();
    let stalled_at = Instant::now();
    let mut seen_down = false;
    while stalled_at.elapsed() < Duration::from_secs(30) {
        seen_down |= link_up(&edge) == 0.0;
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        seen_down,
        "the link was never reported down during the stall"
    );
    let during = wait_mirror_status(&edge, "status", Duration::from_secs(10), |_| true);
    assert!(
        during["lag_records"].as_u64().unwrap() > 0,
        "a backlog builds while the link is silent: {during:#}"
    );
    proxy.resume();

    finish(run);
    let expected = verify_kafka(&kafka, &manifest, TOPIC, 10_000, "300s");
    let status = wait_mirror_status(&edge, "backlog drained", Duration::from_secs(180), |s| {
        s["lag_records"] == 0
    });
    let logged = partitions_sum(&status, "telemetry", "edge_end_offset");
    let consumed = kafka
        .consume_committed(TOPIC, Duration::from_secs(10))
        .unwrap();
    let kcat: usize = kafka.kcat_count(TOPIC).unwrap();
    eprintln!(
        "acknowledged={expected} logged={logged} console_consumer={} kcat={kcat}",
        consumed.len()
    );
    assert_eq!(consumed.len() as u64, logged, "each logged record once");
    assert_eq!(kcat as u64, logged, "kcat reads each logged record once");
    let deadline = Instant::now() + Duration::from_secs(60);
    while link_up(&edge) != 1.0 {
        assert!(
            Instant::now() < deadline,
            "the link is never reported up again"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(edge.stop().success(), "{}", edge.stderr());
    drop(proxy);
}
