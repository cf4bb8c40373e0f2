//! kill -9 under load: clients publish QoS 1 and QoS 2 continuously and record every
//! acknowledgement; the edge is killed several times mid-stream and restarted. Afterwards
//! every acknowledged QoS 1 message is in the log at least once and every QoS 2 message at
//! most once (exactly once if its PUBREC arrived), with the QoS 2 clients resending over their
//! persistent sessions as the spec requires.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::collections::HashMap;
use std::time::Duration;

use tributary_tests::load::Fleet;
use tributary_tests::Edge;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_repeated_kill_9() {
    let mut edge = Edge::start("[[routes]]\nmatch = \"sensors/#\"\ntopic = \"telemetry\"\nkey = \"{client_id}\"\npartitions = 4\n");
    let addr = edge.addr;
    let fleet = Fleet::both_qos(addr, "crash", "sensors/crash");
    let (q1, q2) = (fleet.q1.clone(), fleet.q2.clone());

    let mut acked_before_kill = Vec::new();
    for _round in 0..4 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        acked_before_kill.push((
            q1.lock().unwrap().acked.len(),
            q2.lock().unwrap().acked.len(),
        ));
        edge.kill9();
        tokio::time::sleep(Duration::from_millis(300)).await;
        edge.restart();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    fleet.finish(Duration::from_secs(60)).await;
    assert!(edge.stop().success(), "{}", edge.stderr());

    // Publishing made progress between every two kills, so each kill hit a live stream.
    for w in acked_before_kill.windows(2) {
        assert!(
            w[1].0 > w[0].0 && w[1].1 > w[0].1,
            "no progress between kills: {acked_before_kill:?}"
        );
    }
    assert!(
        q2.lock().unwrap().resumed >= 2 * 4,
        "QoS 2 clients resumed their sessions after each kill"
    );

    let log = edge.read_log();
    let mut count: HashMap<String, usize> = HashMap::new();
    for r in &log {
        *count
            .entry(r["payload"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let q1 = q1.lock().unwrap();
    let missing: Vec<_> = q1
        .acked
        .iter()
        .filter(|p| !count.contains_key(*p))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged QoS 1 messages lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let q2 = q2.lock().unwrap();
    let missing: Vec<_> = q2
        .acked
        .iter()
        .filter(|p| !count.contains_key(*p))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged QoS 2 messages lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let dups: Vec<_> = q2
        .sent
        .iter()
        .filter(|p| count.get(*p).copied().unwrap_or(0) > 1)
        .collect();
    assert!(dups.is_empty(), "QoS 2 messages logged twice: {dups:?}");
    // With every in-flight QoS 2 message resent to completion, all of them arrived.
    assert_eq!(q2.acked.len(), q2.sent.len());
    eprintln!(
        "acknowledged: QoS 1 {} (of {} sent), QoS 2 {}; log holds {} records",
        q1.acked.len(),
        q1.sent.len(),
        q2.acked.len(),
        log.len()
    );
}
