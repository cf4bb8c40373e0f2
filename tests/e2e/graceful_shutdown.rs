//! SIGTERM under QoS 1 load: 5.0 clients get DISCONNECT 0x8B, the edge exits 0, and every
//! acknowledged message is in the log afterwards (firmware-sim verify). A second signal ends
//! the edge at once (exit status 130), still with every acknowledged message in the log.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::process::Command;
use std::time::{Duration, Instant};

use tributary_tests::mirror::fleet;
use tributary_tests::{
    binary, http_get, metric, summary_field, ConnectOpts, Edge, Got, Proto, RawClient,
};

fn signal(edge: &Edge, sig: i32) {
    assert!(tributary_tests::signal(edge.pid(), sig));
}

/// Waits for the edge to exit (at most `limit`, a guard against a hang); returns its status
/// and how long it took.
fn wait_exit(edge: &mut Edge, limit: Duration) -> (std::process::ExitStatus, Duration) {
    let start = Instant::now();
    loop {
        if let Some(status) = edge.try_wait() {
            return (status, start.elapsed());
        }
        assert!(
            start.elapsed() < limit,
            "edge still running {limit:?} after the signal:\n{}",
            edge.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Dumps the log of the stopped edge and verifies the fleet's manifest against it.
fn verify_log(edge: &Edge, manifest: &std::path::Path) -> String {
    let (status, out, err) = edge.cli(&["read", "--json"]);
    assert!(status.success(), "edge read: {err}");
    let dump = manifest.with_extension("jsonl");
    std::fs::write(&dump, out).unwrap();
    let v = Command::new(binary("firmware-sim"))
        .args(["verify", "--manifest"])
        .arg(manifest)
        .arg("--edge-log")
        .arg(&dump)
        .output()
        .unwrap();
    let summary = String::from_utf8_lossy(&v.stdout).into_owned();
    assert!(
        v.status.success(),
        "verify: {summary}\n{}",
        String::from_utf8_lossy(&v.stderr)
    );
    summary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_disconnects_with_0x8b_exits_0_and_loses_nothing_acknowledged() {
    let mut edge = Edge::start("");
    let work = tempfile::tempdir().unwrap();
    let manifest = work.path().join("run");
    let run = fleet(&edge, &manifest, 20, 50, 6);
    let (mut watcher, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("watcher"))
        .await
        .unwrap();
    // Under load: the signal comes once the edge has acknowledged publishes.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, text) = http_get(edge.admin, "/metrics", None).unwrap();
        if metric(&text, "tributary_mqtt_acks_sent_total") >= 100.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no publishes acknowledged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let signalled = Instant::now();
    signal(&edge, libc::SIGTERM);
    assert_eq!(watcher.recv().await.unwrap(), Got::Disconnect(0x8B));
    let (status, _) = wait_exit(&mut edge, Duration::from_secs(30));
    assert!(status.success(), "{status}:\n{}", edge.stderr());
    eprintln!("edge exited {:?} after SIGTERM", signalled.elapsed());
    let _ = run.wait_with_output().unwrap();

    let summary = verify_log(&edge, &manifest);
    eprintln!("{summary}");
    assert!(
        summary_field(&summary, "expected") >= 100,
        "the shutdown happened under load: {summary}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_without_losing_anything_acknowledged() {
    let mut edge = Edge::start("");
    let work = tempfile::tempdir().unwrap();
    let manifest = work.path().join("run");
    let run = fleet(&edge, &manifest, 20, 50, 6);
    // A subscriber that never reads, with more queued for it than the socket buffers hold,
    // so the first signal's graceful path has a last flush to wait for.
    let (mut slow, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("slow"))
        .await
        .unwrap();
    assert_eq!(slow.subscribe(1, &[("bulk/#", 0)]).await.unwrap(), vec![0]);
    let (mut bulk, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("bulk"))
        .await
        .unwrap();
    let chunk = vec![b'x'; 512 * 1024];
    for i in 1..=24u16 {
        bulk.publish("bulk/x", 1, i, &chunk).await.unwrap();
        assert_eq!(bulk.recv().await.unwrap(), Got::PubAck(i, 0));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    signal(&edge, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(50));
    signal(&edge, libc::SIGINT);
    let (status, took) = wait_exit(&mut edge, Duration::from_secs(30));
    assert_eq!(status.code(), Some(130), "{status}:\n{}", edge.stderr());
    eprintln!("edge exited {took:?} after the second signal");
    drop(slow);
    drop(bulk);
    let _ = run.wait_with_output().unwrap();

    let summary = verify_log(&edge, &manifest);
    eprintln!("{summary}");
}
