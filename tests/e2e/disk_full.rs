//! Full disks without a person (#18 item 4): with `storage.min_free`, an edge whose disk
//! fills up refuses new publishes before fjall ever meets ENOSPC, keeps what it accepted,
//! and accepts again by itself once space is back. Tested on a small tmpfs filled by another
//! writer, and on the fault-injecting file system's byte budget.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tributary_tests::{
    fault_mount, http_get, incompressible_text, metric, payloads, ConnectOpts, Edge, Got, Proto,
    RawClient,
};

/// A tmpfs of `size` mounted on `dir` for the test's life.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs (the test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn start_edge(data: &Path, min_free: &str) -> Edge {
    Edge::start_on(
        data,
        &format!("min_free = \"{min_free}\"\nretention_check_interval = \"1s\""),
        "",
    )
}

/// Publishes QoS 1 (5.0) until the edge answers 0x97; returns the payloads it acknowledged.
async fn publish_until_refused(edge: &Edge, prefix: &str) -> Vec<String> {
    let (mut c, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new(prefix))
        .await
        .unwrap();
    let mut accepted = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    for i in 1.. {
        assert!(
            Instant::now() < deadline,
            "the edge never refused a publish"
        );
        let payload = format!("{prefix}-{i}");
        let pkid = (i % 60_000 + 1) as u16;
        c.publish("sensors/disk/t", 1, pkid, payload.as_bytes())
            .await
            .unwrap();
        match c.recv().await.unwrap() {
            Got::PubAck(p, 0) if p == pkid => accepted.push(payload),
            Got::PubAck(p, 0x97) if p == pkid => return accepted,
            other => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    unreachable!()
}

/// Publishes QoS 1 (5.0) until one is acknowledged again.
async fn publish_until_accepted(edge: &Edge, prefix: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut c, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new(prefix))
        .await
        .unwrap();
    for i in 1u16.. {
        assert!(
            Instant::now() < deadline,
            "the edge did not accept publishes again once space was back"
        );
        let payload = format!("{prefix}-{i}");
        c.publish("sensors/disk/t", 1, i, payload.as_bytes())
            .await
            .unwrap();
        match c.recv().await.unwrap() {
            Got::PubAck(p, 0) if p == i => return payload,
            Got::PubAck(p, 0x97) if p == i => tokio::time::sleep(Duration::from_millis(200)).await,
            other => panic!("{other:?}"),
        }
    }
    unreachable!()
}

/// A 3.1.1 QoS 1 publish while the disk is low: the connection is closed without a PUBACK.
async fn v311_publish_is_closed(edge: &Edge) {
    let (mut c, _) = RawClient::connect(edge.addr, Proto::V311, &ConnectOpts::new("legacy"))
        .await
        .unwrap();
    c.publish("sensors/disk/t", 1, 1, b"legacy").await.unwrap();
    let got = c.until_closed().await.unwrap();
    assert!(!got.iter().any(|g| matches!(g, Got::PubAck(..))), "{got:?}");
}

fn disk_low(edge: &Edge) -> f64 {
    let (status, text) = http_get(edge.admin, "/metrics", None).unwrap();
    assert_eq!(status, 200);
    metric(&text, "tributary_disk_low")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filling_tmpfs_refuses_publishes_before_enospc_and_recovers_by_itself() {
    let root = tempfile::Builder::new()
        .prefix("tributary-tmpfs-")
        .tempdir()
        .unwrap();
    let data = root.path().join("data");
    let _tmpfs = Tmpfs::mount(&data, "96m");
    let mut edge = start_edge(&data, "32MiB");
    let first = publish_until_accepted(&edge, "before").await;
    assert_eq!(disk_low(&edge), 0.0);
    // The tmpfs holds nothing but the data directory: what the edge says its files occupy
    // is what the file system has in use (both move while the edge writes: a tolerance).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, text) = http_get(edge.admin, "/metrics", None).unwrap();
        assert_eq!(status, 200);
        let reported = metric(&text, "tributary_data_dir_bytes");
        let used = df_bytes(&data, "used") as f64;
        if (reported - used).abs() <= (1 << 20) as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tributary_data_dir_bytes {reported} is not what the tmpfs has in use ({used})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Another writer fills the disk to 8 MiB free: below the floor, not yet full.
    let space = available_bytes(&data);
    let filler = data.join("filler");
    std::fs::write(&filler, vec![0u8; (space - (8 << 20)) as usize]).unwrap();
    let accepted = publish_until_refused(&edge, "filling").await;
    assert_eq!(disk_low(&edge), 1.0);
    v311_publish_is_closed(&edge).await;
    assert!(
        edge.try_wait().is_none(),
        "the edge keeps running on a low disk"
    );

    // A restart on the low disk comes up, serves, and refuses publishes from the start.
    assert!(edge.stop().success(), "{}", edge.stderr());
    edge.restart();
    assert!(
        edge.stderr().contains("starting below storage.min_free"),
        "{}",
        edge.stderr()
    );
    assert_eq!(disk_low(&edge), 1.0);
    assert!(publish_until_refused(&edge, "restarted").await.is_empty());

    // Space comes back: the edge accepts again without a restart.
    std::fs::remove_file(&filler).unwrap();
    let after = publish_until_accepted(&edge, "after").await;
    assert_eq!(disk_low(&edge), 0.0);
    assert!(edge.stop().success(), "{}", edge.stderr());
    let stored = payloads(&edge.read_log());
    for p in std::iter::once(&first)
        .chain(&accepted)
        .chain(std::iter::once(&after))
    {
        assert!(stored.contains(p), "acknowledged {p} is in the log");
    }
    assert!(!stored.iter().any(|p| p == "legacy"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_budget_on_the_fault_file_system_is_met_with_refusals_not_enospc() {
    let (_root, fs, data) = fault_mount("tributary-enospc-");
    let mut edge = start_edge(&data, "40MiB");
    publish_until_accepted(&edge, "before").await;
    // The file system ends 64 MiB past what is used now: its statfs says so, and a write
    // past it would fail with ENOSPC. The floor leaves room for a memtable flush (16 MiB).
    fs.set_space_budget(Some(fs.space_used() + (64 << 20)));
    // Fill with large payloads, random so that the log's compression cannot shrink them.
    let (mut c, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("big"))
        .await
        .unwrap();
    let mut refused = false;
    for i in 1..=2000u16 {
        let body = incompressible_text(64 << 10, u64::from(i));
        c.publish("sensors/disk/big", 1, i, body.as_bytes())
            .await
            .unwrap();
        match c.recv().await.unwrap() {
            Got::PubAck(p, 0) if p == i => {}
            Got::PubAck(p, 0x97) if p == i => {
                refused = true;
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(refused, "the edge refused before the budget ran out");
    assert!(
        edge.try_wait().is_none(),
        "the edge never met ENOSPC: {}",
        edge.stderr()
    );
    assert!(!edge.stderr().contains("disk is full"), "{}", edge.stderr());
    // Room again: accepted again.
    fs.set_space_budget(None);
    publish_until_accepted(&edge, "after").await;
    assert!(edge.stop().success(), "{}", edge.stderr());
    drop(edge);
    fs.unmount().unwrap();
}

/// Bytes available on the file system holding `dir`.
fn available_bytes(dir: &Path) -> u64 {
    df_bytes(dir, "avail")
}

/// One of `df`'s byte columns (`avail`, `used`) for the file system of `dir`.
fn df_bytes(dir: &Path, column: &str) -> u64 {
    let out = Command::new("df")
        .args([&format!("--output={column}"), "-B1"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}
