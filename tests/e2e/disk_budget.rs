//! The node-wide disk budget, both policies, and bounded memory under a flood.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::time::Duration;

use tributary_tests::{incompressible_text, payloads, ConnectOpts, Edge, Got, Proto, RawClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_policy_refuses_with_quota_exceeded_and_keeps_what_was_accepted() {
    let mut edge = Edge::start_with(
        "",
        "disk_budget = \"16KiB\"\ndisk_full_policy = \"reject\"",
        "",
    );
    let (mut c, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("filler"))
        .await
        .unwrap();
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..100u16 {
        let payload = format!("fill-{i}-{}", incompressible_text(1000, u64::from(i))).into_bytes();
        c.publish("sensors/fill/t", 1, i + 1, &payload)
            .await
            .unwrap();
        match c.recv().await.unwrap() {
            Got::PubAck(p, 0) if p == i + 1 => {
                assert_eq!(refused, 0, "once full, the log stays full");
                accepted.push(format!("fill-{i}-"));
            }
            Got::PubAck(p, 0x97) if p == i + 1 => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(
        !accepted.is_empty() && refused > 0,
        "accepted {} refused {refused}",
        accepted.len()
    );
    // QoS 2 gets its refusal in PUBREC.
    c.publish("sensors/fill/t", 2, 500, b"q2-refused")
        .await
        .unwrap();
    assert_eq!(c.recv().await.unwrap(), Got::PubRec(500, 0x97));
    // 3.1.1 has no reason codes: the connection is closed without an ack.
    let (mut old, _) = RawClient::connect(edge.addr, Proto::V311, &ConnectOpts::new("old-filler"))
        .await
        .unwrap();
    old.publish("sensors/fill/t", 1, 1, b"v311-refused")
        .await
        .unwrap();
    assert_eq!(old.until_closed().await.unwrap(), vec![]);
    drop(c);
    assert!(edge.stop().success());
    let log = edge.read_log();
    let held: Vec<String> = payloads(&log)
        .iter()
        .map(|p| {
            p[..p.find('-').unwrap()
                + 1
                + p[p.find('-').unwrap() + 1..]
                    .find('-')
                    .map(|x| x + 1)
                    .unwrap_or(0)]
                .to_string()
        })
        .collect();
    assert_eq!(held.len(), accepted.len());
    for a in &accepted {
        assert!(held.iter().any(|h| h == a), "accepted {a} is in the log");
    }
    assert!(edge.stderr().is_empty() || !edge.stderr().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_policy_keeps_the_newest_within_the_budget() {
    let mut edge = Edge::start_with(
        "",
        "disk_budget = \"16KiB\"\ndisk_full_policy = \"drop-oldest\"",
        "",
    );
    let (mut c, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("rolling"))
        .await
        .unwrap();
    for i in 0..100u16 {
        let payload = format!("{i:04}-{}", incompressible_text(1000, u64::from(i)));
        c.publish("sensors/rolling/t", 1, i + 1, payload.as_bytes())
            .await
            .unwrap();
        assert_eq!(
            c.recv().await.unwrap(),
            Got::PubAck(i + 1, 0),
            "drop-oldest never refuses"
        );
    }
    drop(c);
    assert!(edge.stop().success());
    assert!(
        edge.stderr().contains("dropped the oldest records"),
        "the drop is logged:\n{}",
        edge.stderr()
    );
    let topics = edge.topics();
    let p = &topics[0]["partitions"][0];
    let (start, end) = (
        p["start_offset"].as_u64().unwrap(),
        p["end_offset"].as_u64().unwrap(),
    );
    assert_eq!(end, 100);
    assert!(start > 0, "oldest records were dropped");
    assert_eq!(p["removed_records"].as_u64().unwrap(), start);
    assert!(p["bytes"].as_u64().unwrap() <= 16 * 1024);
    let held = payloads(&edge.read_log());
    assert_eq!(held.len() as u64, end - start);
    assert!(
        held.last().unwrap().starts_with("0099-"),
        "the newest record is kept"
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_when_publishers_outrun_the_disk() {
    let mut edge = Edge::start_with(
        "max_packet_size = \"1MiB\"",
        "retention_check_interval = \"1s\"",
        "[topics.mqtt]\nretention_bytes = \"256MiB\"\n",
    );
    let pid = edge.pid();
    let baseline = rss_kib(pid);
    // A fixed volume, four times the bound asserted below: 6 publishers x 512 MiB of QoS 0,
    // as fast as the edge lets them (the test takes longer on a slower disk, nothing else).
    let payload = vec![b'f'; 256 * 1024];
    const PER_PUBLISHER: u64 = 2048;
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..6 {
        let addr = edge.addr;
        let payload = payload.clone();
        tasks.spawn(async move {
            let (mut c, _) =
                RawClient::connect(addr, Proto::V311, &ConnectOpts::new(&format!("flood-{n}")))
                    .await
                    .unwrap();
            for _ in 0..PER_PUBLISHER {
                c.publish("flood/t", 0, 0, &payload).await.unwrap();
            }
            // A PINGRESP comes after everything before it was read.
            c.ping().await.unwrap();
            assert_eq!(
                c.recv_within(Duration::from_secs(120)).await.unwrap(),
                Got::PingResp
            );
        });
    }
    let mut peak = 0;
    while !tasks.is_empty() {
        tokio::select! {
            done = tasks.join_next() => { done.unwrap().unwrap(); }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        peak = peak.max(rss_kib(pid));
    }
    let total = 6 * PER_PUBLISHER * payload.len() as u64;
    assert!(edge.stop().success(), "{}", edge.stderr());
    eprintln!(
        "flooded {} MiB; edge RSS {} MiB at start, {} MiB at peak",
        total >> 20,
        baseline >> 10,
        peak >> 10
    );
    // Without a bound the edge held about half of everything written (1.1 GiB after 2 GiB);
    // bounded it stays at a few hundred MiB however much is written.
    assert!(peak < 768 * 1024, "edge RSS peaked at {} MiB", peak >> 10);
}
