//! Failing disks (#18 item 3): the edge's data directory is on the fault-injecting file
//! system, which returns EIO from fsync or from write on command. A failure in the group
//! commit or in fjall's background flush poisons the log: nothing further is acknowledged,
//! the edge says why (the typed cause) and exits 2 promptly, never hanging with
//! acknowledgements stopped; restarted on a healthy disk, it holds everything it acknowledged.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tributary_tests::{
    fault_mount, incompressible_text, payloads, ConnectOpts, Edge, Got, Proto, RawClient,
};

fn start_edge(data: &Path, fsync: &str) -> Edge {
    Edge::start_on(data, &format!("fsync = \"{fsync}\""), "")
}

/// Publishes QoS 1 with `body` until one is not acknowledged (the connection closes or
/// refuses); returns the acknowledged payloads.
async fn publish_until_unacknowledged(edge: &Edge, prefix: &str, body: usize) -> Vec<String> {
    let acked = Arc::new(Mutex::new(Vec::new()));
    publish_into(edge.addr, prefix.to_string(), body, 0, acked.clone()).await;
    let acked = acked.lock().unwrap().clone();
    acked
}

/// On one connection, publishes QoS 1 with `body` (random text seeded by the publish number
/// and `seed`), one at a time, until one is not acknowledged (the connection closes or
/// refuses); adds each acknowledged payload to `acked` as it comes.
async fn publish_into(
    addr: SocketAddr,
    prefix: String,
    body: usize,
    seed: u64,
    acked: Arc<Mutex<Vec<String>>>,
) {
    let (mut c, _) = RawClient::connect(addr, Proto::V5, &ConnectOpts::new(&prefix))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    for i in 1u32.. {
        assert!(
            Instant::now() < deadline,
            "publishes were still acknowledged on a failing disk"
        );
        let text = incompressible_text(body, u64::from(i) << 8 | seed);
        let payload = format!("{prefix}-{i}-{text}");
        let pkid = (i % 60_000 + 1) as u16;
        if c.publish("sensors/eio/t", 1, pkid, payload.as_bytes())
            .await
            .is_err()
        {
            return;
        }
        match c.recv_within(Duration::from_secs(60)).await {
            Ok(Got::PubAck(p, 0)) if p == pkid => acked.lock().unwrap().push(payload),
            Ok(Got::PubAck(..)) | Ok(Got::Disconnect(_)) | Ok(Got::Closed) | Err(_) => return,
            Ok(other) => panic!("{other:?}"),
        }
    }
}

/// Waits for the edge to exit; returns its stderr after asserting status 2.
fn exits_2(edge: &mut Edge) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = edge.try_wait() {
            let stderr = edge.stderr();
            assert_eq!(status.code(), Some(2), "{stderr}");
            return stderr;
        }
        assert!(
            Instant::now() < deadline,
            "the edge hangs on a failed disk instead of exiting:\n{}",
            edge.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// After the failure: a healthy disk again, a restart, every acknowledged payload there.
fn restart_holds(mut edge: Edge, fs: &tributary_faultfs::FaultFs, acked: &[String]) {
    fs.fail_fsync(false);
    fs.fail_writes(false);
    edge.restart();
    assert!(edge.stop().success(), "{}", edge.stderr());
    let stored = payloads(&edge.read_log());
    let lost: Vec<_> = acked.iter().filter(|p| !stored.contains(p)).collect();
    assert!(lost.is_empty(), "{} acknowledged lost", lost.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eio_from_fsync_in_the_group_commit_poisons_the_log_and_exits_2() {
    let (_root, fs, data) = fault_mount("tributary-eio-");
    let mut edge = start_edge(&data, "always");
    let mut acked = publish_healthy(&edge, 20, "healthy").await;
    fs.fail_fsync(true);
    acked.extend(publish_until_unacknowledged(&edge, "failing", 10).await);
    let stderr = exits_2(&mut edge);
    assert!(stderr.contains("a write to the disk failed"), "{stderr}");
    restart_holds(edge, &fs, &acked);
}

/// Publishes of 200 KiB make groups the appender's second thread commits (while the first
/// batches the next): its failure poisons the log and fails what the first holds alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eio_from_fsync_in_a_large_group_commit_poisons_the_log_and_exits_2() {
    let (_root, fs, data) = fault_mount("tributary-eio-");
    let mut edge = start_edge(&data, "always");
    let mut acked = publish_healthy(&edge, 20, "healthy").await;
    acked.extend(publish_until_failing(&edge, &fs, "large", 200 << 10).await);
    let stderr = exits_2(&mut edge);
    assert!(stderr.contains("a write to the disk failed"), "{stderr}");
    restart_holds(edge, &fs, &acked);
}

/// Four connections publish `body` QoS 1 each, one at a time; once 40 are acknowledged, fsync
/// starts failing; returns every payload acknowledged, before and after.
async fn publish_until_failing(
    edge: &Edge,
    fs: &tributary_faultfs::FaultFs,
    prefix: &str,
    body: usize,
) -> Vec<String> {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..4u64)
        .map(|c| {
            tokio::spawn(publish_into(
                edge.addr,
                format!("{prefix}{c}"),
                body,
                c,
                acked.clone(),
            ))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.lock().unwrap().len() < 40 {
        assert!(
            Instant::now() < deadline,
            "40 large publishes were not acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fs.fail_fsync(true);
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eio_from_write_poisons_the_log_and_exits_2() {
    let (_root, fs, data) = fault_mount("tributary-eio-");
    let mut edge = start_edge(&data, "always");
    let mut acked = publish_healthy(&edge, 20, "healthy").await;
    fs.fail_writes(true);
    acked.extend(publish_until_unacknowledged(&edge, "failing", 10).await);
    let stderr = exits_2(&mut edge);
    assert!(stderr.contains("a write to the disk failed"), "{stderr}");
    restart_holds(edge, &fs, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eio_in_the_background_flush_stops_the_edge_instead_of_stalling_it() {
    let (_root, fs, data) = fault_mount("tributary-eio-");
    // With "never" no group commit fsyncs: the first fsync to fail is fjall's own, when it
    // flushes a full memtable (16 MiB) to a table in the background.
    let mut edge = start_edge(&data, "never");
    fs.fail_fsync(true);
    let acked = publish_until_unacknowledged(&edge, "flush", 16 << 10).await;
    // Megabytes were acknowledged (no group commit fsyncs) before the flush failed.
    assert!(
        acked.len() > 500,
        "acknowledged before the failure: {}",
        acked.len()
    );
    let stderr = exits_2(&mut edge);
    assert!(stderr.contains("a write to the disk failed"), "{stderr}");
    assert!(stderr.contains("background write failed"), "{stderr}");
    // With "never" a power cut may lose what the OS held; without one, nothing is lost.
    restart_holds(edge, &fs, &acked);
}

/// `n` acknowledged publishes on a healthy disk.
async fn publish_healthy(edge: &Edge, n: u32, prefix: &str) -> Vec<String> {
    let (mut c, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new(prefix))
        .await
        .unwrap();
    let mut acked = Vec::new();
    for i in 1..=n {
        let payload = format!("{prefix}-{i}");
        c.publish("sensors/eio/t", 1, i as u16, payload.as_bytes())
            .await
            .unwrap();
        assert_eq!(c.recv().await.unwrap(), Got::PubAck(i as u16, 0));
        acked.push(payload);
    }
    acked
}
