//! A full disk poisons the log: the edge gets a small private tmpfs (in its own user and
//! mount namespace, so no privileges are needed), with `storage.min_free` off (it would
//! refuse publishes before the disk fills: see disk_full.rs), and is filled until a write
//! fails with ENOSPC. It then acknowledges nothing more, says why and exits non-zero; once space is
//! freed, every message it did acknowledge is in the log.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tributary_tests::{binary, free_port, ConnectOpts, Got, Proto, RawClient};

/// Payload bytes that do not compress, so the tmpfs fills at the rate messages arrive.
fn noise(seed: u32, len: usize) -> String {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_stops_acks_and_keeps_what_was_acked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("data")).unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let edge = binary("edge");
    std::fs::write(d.join("edge.toml"), "[storage]\nmin_free = 0\n").unwrap();
    let script = format!(
        r#"set -u
mount -t tmpfs -o size=40m tmpfs {d}/data
{edge} --config {d}/edge.toml --mqtt-listen {addr} --data-dir {d}/data/log 2>{d}/edge.err
echo $? > {d}/edge.rc
mount -o remount,size=512m {d}/data
{edge} read --json --data-dir {d}/data/log >{d}/log.jsonl 2>{d}/read.err
echo $? > {d}/read.rc
"#,
        d = d.display(),
        edge = edge.display()
    );
    let mut ns = Command::new("unshare")
        .args(["-Urm", "bash", "-c", &script])
        .stdin(Stdio::null())
        .spawn()
        .expect("unshare (util-linux)");
    let (mut c, _) = loop {
        if let Ok(pair @ (_, Got::ConnAck { code: 0, .. })) =
            RawClient::connect(addr, Proto::V5, &ConnectOpts::new("filler")).await
        {
            break pair;
        }
        assert!(
            ns.try_wait().unwrap().is_none(),
            "the edge did not start: {}",
            std::fs::read_to_string(d.join("edge.err")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut acked = HashSet::new();
    let mut instead = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut i: u32 = 0;
    loop {
        assert!(Instant::now() < deadline, "the disk never filled");
        let pkid = (i % 60_000 + 1) as u16;
        let payload = format!("m{i}-{}", noise(i, 4000));
        if c.publish("sensors/fill/t", 1, pkid, payload.as_bytes())
            .await
            .is_err()
        {
            break;
        }
        match c.recv_within(Duration::from_secs(30)).await {
            Ok(Got::PubAck(p, 0)) if p == pkid => {
                acked.insert(format!("m{i}"));
            }
            Ok(Got::Closed) | Err(_) => break,
            Ok(other) => {
                instead.push(other);
                break;
            }
        }
        i += 1;
    }
    assert!(
        acked.len() > 1000,
        "acknowledged before the disk filled: {}",
        acked.len()
    );
    assert!(
        instead.iter().all(|g| !matches!(g, Got::PubAck(_, 0))),
        "{instead:?}"
    );

    let status = tokio::task::spawn_blocking(move || ns.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let read = |f: &str| std::fs::read_to_string(d.join(f)).unwrap_or_default();
    let stderr = read("edge.err");
    assert_eq!(
        read("edge.rc").trim(),
        "2",
        "the edge exits with 2 after a failed write:\n{stderr}"
    );
    assert!(
        stderr.contains("poisoned") || stderr.contains("log write failed"),
        "{stderr}"
    );
    // The cause is told apart from other write failures (a typed CommitError::DiskFull).
    assert!(stderr.contains("the disk is full"), "{stderr}");
    assert_eq!(
        read("read.rc").trim(),
        "0",
        "the log reads back once space is freed: {}",
        read("read.err")
    );
    let held: HashSet<String> = read("log.jsonl")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["payload"]
                .as_str()
                .unwrap()
                .split('-')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    let lost: Vec<_> = acked.difference(&held).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    eprintln!(
        "acknowledged {} before the disk filled; {} records read back",
        acked.len(),
        held.len()
    );
}
