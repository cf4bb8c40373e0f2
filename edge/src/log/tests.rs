//! Behaviour of the log through its appender, as the server drives it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tokio::sync::mpsc;

use super::appender::{self, AppendRequest, Committed, PendingRecord, ReplyTo, StateOp};
use super::record::{Compression, NewRecord};
use super::{Budget, Log};
use crate::config::{DiskFullPolicy, FsyncMode};
use crate::route::PlannedTopic;

fn topics(
    partitions: u32,
    retention: Option<Duration>,
    retention_bytes: Option<u64>,
) -> Vec<PlannedTopic> {
    vec![PlannedTopic {
        name: "t".into(),
        partitions,
        retention,
        retention_bytes,
    }]
}

fn request(records: &[(u32, &str, u64)], reply: Option<ReplyTo>) -> AppendRequest {
    let req = AppendRequest {
        reply,
        ..Default::default()
    };
    request_in(req, records)
}

/// Adds `records` to `req`.
fn request_in(mut req: AppendRequest, records: &[(u32, &str, u64)]) -> AppendRequest {
    for (partition, payload, ts) in records {
        let start = req.buf.len();
        NewRecord {
            timestamp_ms: *ts,
            key: b"k",
            mqtt_topic: b"a/b",
            qos: 1,
            retain: false,
            client_id: "c",
            content_type: None,
            payload_format: None,
            message_expiry: None,
            response_topic: None,
            correlation_data: None,
            user_properties: &[],
            payload: payload.as_bytes(),
        }
        .encode_into(&mut req.buf)
        .unwrap();
        req.records.push(PendingRecord {
            topic: 0,
            partition: *partition,
            start: start as u32,
            len: (req.buf.len() - start) as u32,
            timestamp_ms: *ts,
        });
    }
    req
}

/// Appends each request and waits for its commit, batches compressed with LZ4.
fn append_all(log: &Arc<Log>, max_batch: usize, reqs: Vec<AppendRequest>) -> Vec<Committed> {
    append_all_with(log, Compression::Lz4, max_batch, reqs)
}

/// Appends each request and waits for its commit.
fn append_all_with(
    log: &Arc<Log>,
    compression: Compression,
    max_batch: usize,
    reqs: Vec<AppendRequest>,
) -> Vec<Committed> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (tx, thread) = appender::spawn(
            log.clone(),
            FsyncMode::Always,
            compression,
            max_batch,
            16,
            1,
            |_| {},
        );
        let (reply_tx, mut reply_rx) = mpsc::unbounded_channel();
        let n = reqs.len();
        for (i, mut r) in reqs.into_iter().enumerate() {
            r.reply = Some(ReplyTo {
                tx: reply_tx.clone(),
                ticket: i as u64,
            });
            tx.append(r).await.unwrap();
        }
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(reply_rx.recv().await.unwrap());
        }
        tx.shutdown().await;
        drop(tx);
        thread.join().unwrap().unwrap();
        out
    })
}

/// `n` letters and digits LZ4 finds nothing to repeat in, so a batch of them is stored at
/// about its own size.
fn noise(n: usize, seed: u64) -> String {
    const DIGITS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            DIGITS[(x % DIGITS.len() as u64) as usize] as char
        })
        .collect()
}

/// `payloads` as records of partition 0, received at `ts`, for [`request`].
fn on_partition_0(payloads: &[String], ts: u64) -> Vec<(u32, &str, u64)> {
    payloads.iter().map(|p| (0, p.as_str(), ts)).collect()
}

fn payloads(log: &Log, partition: u32, from: u64) -> Vec<(u64, String)> {
    log.read(0, partition, from, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|r| (r.offset, String::from_utf8(r.payload.to_vec()).unwrap()))
        .collect()
}

#[test]
fn read_after_append_with_dense_offsets_across_batches() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), Some(&topics(2, None, None)), None).unwrap());
    let names: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    let recs = on_partition_0(&names, 1);
    // Batches of at most 3 records: 10 records make 4 batch values in one commit.
    let done = append_all(
        &log,
        3,
        vec![request(&recs[..7], None), request(&recs[7..], None)],
    );
    assert!(done.iter().all(|c| c.outcome.is_ok()));
    let got = payloads(&log, 0, 0);
    assert_eq!(got.len(), 10);
    for (i, (off, p)) in got.iter().enumerate() {
        assert_eq!(*off, i as u64);
        assert_eq!(p, &format!("m{i}"));
    }
    // A read from the middle of a batch starts exactly there.
    assert_eq!(payloads(&log, 0, 4)[0], (4, "m4".to_string()));
    assert_eq!(
        log.topics()[0].partitions[0].end.load(Ordering::Relaxed),
        10
    );
    assert!(payloads(&log, 1, 0).is_empty());
}

#[test]
fn a_committed_request_hands_its_buffers_back_empty_and_a_request_built_in_them_commits() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), Some(&topics(1, None, None)), None).unwrap());
    let first: Vec<String> = (0..5).map(|i| format!("first-{i}")).collect();
    let recs = on_partition_0(&first, 1);
    let sent = request(&recs, None);
    let (buf_len, records_len) = (sent.buf.len(), sent.records.len());
    let mut done = append_all(&log, 100, vec![sent]);
    assert!(done[0].outcome.is_ok());
    let spare = std::mem::take(&mut done[0].spare);
    // Empty, so that what a connection builds in them starts at offset 0, and with the
    // capacity they had, so that it allocates nothing.
    assert!(spare.buf.is_empty() && spare.records.is_empty());
    assert!(spare.buf.capacity() >= buf_len && spare.records.capacity() >= records_len);
    let second: Vec<String> = (0..5).map(|i| format!("second-{i}")).collect();
    let recs = on_partition_0(&second, 2);
    let again = AppendRequest {
        records: spare.records,
        buf: spare.buf,
        ..Default::default()
    };
    let done = append_all(&log, 100, vec![request_in(again, &recs)]);
    assert!(done[0].outcome.is_ok());
    let want: Vec<(u64, String)> = first
        .into_iter()
        .chain(second)
        .enumerate()
        .map(|(i, p)| (i as u64, p))
        .collect();
    assert_eq!(payloads(&log, 0, 0), want);
}

#[test]
fn reopen_recovers_end_offsets_and_records() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Arc::new(Log::open(dir.path(), Some(&topics(1, None, None)), None).unwrap());
        append_all(&log, 1000, vec![request(&[(0, "a", 1), (0, "b", 2)], None)]);
    }
    let log = Arc::new(Log::open(dir.path(), Some(&topics(1, None, None)), None).unwrap());
    assert_eq!(log.topics()[0].partitions[0].end.load(Ordering::Relaxed), 2);
    append_all(&log, 1000, vec![request(&[(0, "c", 3)], None)]);
    assert_eq!(
        payloads(&log, 0, 0),
        vec![(0, "a".into()), (1, "b".into()), (2, "c".into())]
    );
}

#[test]
fn partitions_can_grow_but_not_shrink() {
    let dir = tempfile::tempdir().unwrap();
    drop(Log::open(dir.path(), Some(&topics(2, None, None)), None).unwrap());
    let grown = Log::open(dir.path(), Some(&topics(4, None, None)), None).unwrap();
    assert_eq!(grown.topics()[0].partitions.len(), 4);
    drop(grown);
    let err = Log::open(dir.path(), Some(&topics(3, None, None)), None).unwrap_err();
    assert!(
        err.to_string()
            .contains("partitions can be added, never removed"),
        "{err}"
    );
}

#[test]
fn second_open_of_a_held_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _held = Log::open(dir.path(), Some(&topics(1, None, None)), None).unwrap();
    let err = Log::open(dir.path(), None, None).unwrap_err();
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
}

#[test]
fn age_retention_deletes_whole_old_batches_only() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(
        Log::open(
            dir.path(),
            Some(&topics(1, Some(Duration::from_secs(60)), None)),
            None,
        )
        .unwrap(),
    );
    let now = appender::now_ms();
    append_all(
        &log,
        1000,
        vec![
            request(
                &[(0, "old1", now - 120_000), (0, "old2", now - 100_000)],
                None,
            ),
            request(&[(0, "new", now)], None),
        ],
    );
    // Both requests were one group commit, so one batch holds old and new: kept whole.
    log.enforce_retention(now).unwrap();
    assert_eq!(payloads(&log, 0, 0).len(), 3);

    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(
        Log::open(
            dir.path(),
            Some(&topics(1, Some(Duration::from_secs(60)), None)),
            None,
        )
        .unwrap(),
    );
    append_all(
        &log,
        2,
        vec![request(
            &[
                (0, "old1", now - 120_000),
                (0, "old2", now - 100_000),
                (0, "new", now),
            ],
            None,
        )],
    );
    log.enforce_retention(now).unwrap();
    assert_eq!(payloads(&log, 0, 0), vec![(2, "new".into())]);
    let p = &log.topics()[0].partitions[0];
    assert_eq!(p.start.load(Ordering::Relaxed), 2);
    assert_eq!(p.removed.load(Ordering::Relaxed), 2);
    assert_eq!(log.counters.retention_removed.load(Ordering::Relaxed), 2);
    // A read from a deleted offset starts at the first record still held.
    assert_eq!(payloads(&log, 0, 0)[0].0, 2);
}

#[test]
fn byte_retention_keeps_the_newest_within_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), Some(&topics(1, None, Some(400))), None).unwrap());
    let payload = "x".repeat(100);
    let recs: Vec<(u32, &str, u64)> = (0..10).map(|i| (0, payload.as_str(), i)).collect();
    append_all(&log, 1, vec![request(&recs, None)]);
    log.enforce_retention(appender::now_ms()).unwrap();
    let p = &log.topics()[0].partitions[0];
    assert!(p.bytes.load(Ordering::Relaxed) <= 400);
    let left = payloads(&log, 0, 0);
    assert!(!left.is_empty());
    assert_eq!(left.last().unwrap().0, 9, "the newest record is kept");
    assert_eq!(left.len() as u64 + p.removed.load(Ordering::Relaxed), 10);
}

#[test]
fn batches_stored_with_and_without_compression_read_back_alike_and_count_as_stored() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), Some(&topics(1, None, None)), None).unwrap());
    let json: Vec<String> = (0..40)
        .map(|i| format!(r#"{{"device":"d-1","seq":{i},"temp":21.5}}"#))
        .collect();
    let recs: Vec<(u32, &str, u64)> = json.iter().map(|j| (0, j.as_str(), 1)).collect();
    append_all_with(
        &log,
        Compression::None,
        1000,
        vec![request(&recs[..20], None)],
    );
    let plain = log.topics()[0].partitions[0].bytes();
    append_all_with(
        &log,
        Compression::Lz4,
        1000,
        vec![request(&recs[20..], None)],
    );
    let packed = log.topics()[0].partitions[0].bytes() - plain;
    assert!(packed < plain / 2, "lz4 batch {packed} B, plain {plain} B");
    // What the partition counts is what is stored.
    let stored: u64 = log
        .records
        .iter()
        .map(|kv| kv.into_inner().unwrap().1.len() as u64)
        .sum();
    assert_eq!(stored, plain + packed);
    let read: Vec<String> = payloads(&log, 0, 0).into_iter().map(|r| r.1).collect();
    assert_eq!(read, json);
    drop(log);
    let log = Log::open(dir.path(), Some(&topics(1, None, None)), None).unwrap();
    assert_eq!(log.topics()[0].partitions[0].bytes(), plain + packed);
    let checked = log.scan_batches(|_, _, _, why| panic!("{why}")).unwrap();
    assert_eq!(checked, 2);
    assert_eq!(
        payloads(&log, 0, 15).len(),
        25,
        "a read from inside a batch"
    );
}

#[test]
fn reject_budget_flags_the_log_full() {
    let dir = tempfile::tempdir().unwrap();
    let budget = Budget {
        bytes: 500,
        policy: DiskFullPolicy::Reject,
    };
    let log = Arc::new(Log::open(dir.path(), Some(&topics(1, None, None)), Some(budget)).unwrap());
    assert!(!log.rejects_publishes());
    let payload = noise(600, 1);
    append_all(&log, 1000, vec![request(&[(0, payload.as_str(), 1)], None)]);
    assert!(log.rejects_publishes());
    // Nothing accepted is deleted by the reject policy.
    assert_eq!(payloads(&log, 0, 0).len(), 1);
}

#[test]
fn drop_oldest_budget_deletes_the_oldest_batches_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let budget = Budget {
        bytes: 1000,
        policy: DiskFullPolicy::DropOldest,
    };
    let log = Arc::new(Log::open(dir.path(), Some(&topics(2, None, None)), Some(budget)).unwrap());
    let payload = noise(200, 2);
    let reqs = (0..10u64)
        .map(|i| request(&[((i % 2) as u32, payload.as_str(), 1000 + i)], None))
        .collect();
    append_all(&log, 1, reqs);
    assert!(log.total_bytes() <= 1000);
    assert!(!log.rejects_publishes());
    let dropped = log.counters.budget_dropped.load(Ordering::Relaxed);
    assert!(dropped > 0);
    let held = payloads(&log, 0, 0).len() + payloads(&log, 1, 0).len();
    assert_eq!(held as u64 + dropped, 10);
}

#[test]
fn a_clock_corrected_forward_does_not_age_out_what_was_received_before_and_a_restart_remembers() {
    let dir = tempfile::tempdir().unwrap();
    let week = Some(Duration::from_secs(7 * 24 * 3600));
    let log = Arc::new(Log::open(dir.path(), Some(&topics(1, week, None)), None).unwrap());
    let mono = std::time::Instant::now();
    let boot = 1_577_836_800_000; // a gateway that booted thinking it is 2020
    append_all(
        &log,
        1,
        vec![request(
            &[(0, "before-1", boot), (0, "before-2", boot + 5_000)],
            None,
        )],
    );
    log.enforce_retention_at(boot + 10_000, mono + Duration::from_secs(10))
        .unwrap();
    // NTP: six years on, twenty seconds after boot.
    let corrected = boot + 20_000 + 6 * 365 * 24 * 3_600_000;
    log.enforce_retention_at(corrected, mono + Duration::from_secs(20))
        .unwrap();
    append_all(&log, 1, vec![request(&[(0, "after", corrected + 1)], None)]);
    log.enforce_retention_at(corrected + 10_000, mono + Duration::from_secs(30))
        .unwrap();
    assert_eq!(
        payloads(&log, 0, 0).len(),
        3,
        "nothing aged out by the jump"
    );
    drop(log);

    // After a restart the jump is remembered: still kept...
    let log = Log::open(dir.path(), Some(&topics(1, week, None)), None).unwrap();
    let mono = std::time::Instant::now();
    log.enforce_retention_at(corrected + 20_000, mono).unwrap();
    assert_eq!(payloads(&log, 0, 0).len(), 3);
    // ...until they are a week old by the time that really passed.
    let week_ms = 7 * 24 * 3_600_000;
    // A week minus 10 s on: the records from before the jump were received a week and 10 s
    // ago (20 s before the correction), the one after it less than a week ago.
    let later = mono + Duration::from_millis(week_ms - 30_000);
    log.enforce_retention_at(corrected + week_ms - 10_000, later)
        .unwrap();
    assert_eq!(payloads(&log, 0, 0), vec![(2, "after".into())]);
}

#[test]
fn without_fsync_readers_see_records_only_once_an_fsync_made_them_durable() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), Some(&topics(1, None, None)), None).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let p = || &log.topics()[0].partitions[0];
    rt.block_on(async {
        let (tx, thread) = appender::spawn(
            log.clone(),
            FsyncMode::Never,
            Compression::Lz4,
            100,
            16,
            1,
            |_| {},
        );
        let (reply_tx, mut reply_rx) = mpsc::unbounded_channel();
        let req = request(
            &[(0, "a", 1), (0, "b", 1)],
            Some(ReplyTo {
                tx: reply_tx,
                ticket: 0,
            }),
        );
        tx.append(req).await.unwrap();
        assert!(reply_rx.recv().await.unwrap().outcome.is_ok());
        assert_eq!(p().end.load(Ordering::Acquire), 2);
        assert_eq!(
            p().durable_end.load(Ordering::Acquire),
            0,
            "acknowledged without an fsync: not durable yet"
        );
        tx.persist().await.unwrap();
        tx.shutdown().await;
        drop(tx);
        thread.join().unwrap().unwrap();
    });
    assert_eq!(
        p().durable_end.load(Ordering::Acquire),
        2,
        "after the fsync"
    );
    drop(log);
    // Reopened: the open's own fsync makes what is there durable.
    let log = Log::open(dir.path(), Some(&topics(1, None, None)), None).unwrap();
    assert_eq!(
        log.topics()[0].partitions[0]
            .durable_end
            .load(Ordering::Acquire),
        2
    );
}

/// Replaces the stored batch at `base` of partition 0 with bytes that do not decode.
fn damage_batch(log: &Log, base: u64) {
    let key = super::record_key(0, 0, base);
    let mut value = log
        .records
        .get(key)
        .unwrap()
        .expect("batch exists")
        .to_vec();
    let last = value.len() - 1;
    value[last] ^= 0xFF;
    log.records.insert(key, value).unwrap();
}

#[test]
fn a_corrupt_batch_is_skipped_by_readers_and_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), Some(&topics(1, None, None)), None).unwrap());
    let recs: Vec<(u32, &str, u64)> = ["a", "b", "c", "d", "e", "f"]
        .iter()
        .map(|p| (0, *p, 1))
        .collect();
    // Batches of 2: offsets 0-1, 2-3, 4-5.
    append_all(&log, 2, vec![request(&recs, None)]);
    damage_batch(&log, 2);
    let got = payloads(&log, 0, 0);
    assert_eq!(
        got,
        vec![
            (0, "a".into()),
            (1, "b".into()),
            (4, "e".into()),
            (5, "f".into())
        ],
        "the records after the bad batch are read"
    );
    // A read that starts inside the bad batch goes on with the next one.
    assert_eq!(payloads(&log, 0, 3)[0], (4, "e".into()));
    assert_eq!(log.counters.corrupt_batches.load(Ordering::Relaxed), 1);
    // Retention and the budget pass it without failing the log.
    log.enforce_retention(appender::now_ms()).unwrap();
    assert!(log.poisoned().is_none());
}

#[test]
fn a_corrupt_front_batch_goes_with_age_retention_and_its_records_count_as_removed() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(
        Log::open(
            dir.path(),
            Some(&topics(1, Some(Duration::from_secs(60)), None)),
            None,
        )
        .unwrap(),
    );
    let now = appender::now_ms();
    let recs = [
        (0, "x", now - 120_000),
        (0, "y", now - 120_000),
        (0, "z", now),
    ];
    append_all(&log, 2, vec![request(&recs, None)]);
    damage_batch(&log, 0);
    log.enforce_retention(now).unwrap();
    assert_eq!(payloads(&log, 0, 0), vec![(2, "z".into())]);
    let p = &log.topics()[0].partitions[0];
    assert_eq!(p.start.load(Ordering::Relaxed), 2);
    assert_eq!(p.removed.load(Ordering::Relaxed), 2);
}

#[test]
fn a_state_key_fjall_cannot_hold_is_refused_alone_and_the_log_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), Some(&topics(1, None, None)), None).unwrap());
    let mut bad = request(&[(0, "with-bad-key", 1)], None);
    bad.state.push(StateOp::Put {
        key: vec![b'u'; 65_536],
        value: Vec::new(),
    });
    let mut fits = request(&[(0, "fine", 1)], None);
    fits.state.push(StateOp::Put {
        key: vec![b'u'; 65_535],
        value: b"v".to_vec(),
    });
    let mut done = append_all(&log, 100, vec![bad, fits]);
    done.sort_by_key(|c| c.ticket);
    assert!(done[0].outcome.is_err(), "the oversize key is refused");
    assert!(done[1].outcome.is_ok(), "{:?}", done[1].outcome);
    assert!(log.poisoned().is_none());
    assert_eq!(payloads(&log, 0, 0), vec![(0, "fine".into())]);
    assert_eq!(log.meta_scan(&[b'u'; 65_535]).unwrap().len(), 1);
}

#[test]
fn state_ops_commit_with_records_and_last_write_wins() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), Some(&topics(1, None, None)), None).unwrap());
    let mut a = request(&[(0, "r", 1)], None);
    a.state.push(StateOp::Put {
        key: b"qx1".to_vec(),
        value: vec![],
    });
    a.state.push(StateOp::Put {
        key: b"qx2".to_vec(),
        value: vec![],
    });
    let mut b = request(&[], None);
    b.state.push(StateOp::Delete {
        key: b"qx1".to_vec(),
    });
    let mut c = request(&[], None);
    c.state.push(StateOp::Put {
        key: b"qy".to_vec(),
        value: vec![1],
    });
    c.state.push(StateOp::DeletePrefix {
        prefix: b"qx".to_vec(),
    });
    append_all(&log, 1000, vec![a, b]);
    assert_eq!(log.meta_scan(b"qx").unwrap().len(), 1);
    append_all(&log, 1000, vec![c]);
    assert!(log.meta_scan(b"qx").unwrap().is_empty());
    assert_eq!(
        log.meta_scan(b"qy").unwrap(),
        vec![(b"qy".to_vec(), vec![1])]
    );
}

#[test]
fn torn_journal_tail_leaves_only_whole_commits() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Arc::new(Log::open(dir.path(), Some(&topics(1, None, None)), None).unwrap());
        append_all(&log, 1000, vec![request(&[(0, "first", 1)], None)]);
        append_all(
            &log,
            1000,
            vec![request(&[(0, "second", 2), (0, "third", 3)], None)],
        );
    }
    // Cut the newest journal a few bytes into what the last commit wrote, as a power cut
    // mid-write would. The journal is pre-allocated: its written part ends at the last
    // byte that is not zero padding, and the cut goes there, not into the padding.
    let mut journals: Vec<_> = walk(dir.path())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "jnl"))
        .filter(|p| p.metadata().map(|m| m.len() > 0).unwrap_or(false))
        .collect();
    journals.sort();
    let newest = journals.last().expect("a journal file exists").clone();
    let bytes = std::fs::read(&newest).unwrap();
    let written = bytes
        .iter()
        .rposition(|&b| b != 0)
        .expect("the journal holds data")
        + 1;
    assert!(written > 64, "the journal holds the commits");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap();
    f.set_len((written - 7) as u64).unwrap();
    drop(f);

    let log = Log::open(dir.path(), Some(&topics(1, None, None)), None).unwrap();
    let got = payloads(&log, 0, 0);
    let end = log.topics()[0].partitions[0].end.load(Ordering::Relaxed);
    // The torn commit is gone whole (never half of it: not "second" without "third"), and
    // the one before it is there whole.
    assert_eq!(got, vec![(0, "first".into())]);
    assert_eq!(end, 1);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn offsets_are_dense_and_monotonic(
        groups in proptest::collection::vec(proptest::collection::vec(0u32..3, 1..20), 1..8),
        max_batch in 1usize..6,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(Log::open(dir.path(), Some(&topics(3, None, None)), None).unwrap());
        let mut expected: Vec<Vec<String>> = vec![Vec::new(); 3];
        let mut names = Vec::new();
        for (g, parts) in groups.iter().enumerate() {
            for (i, p) in parts.iter().enumerate() {
                names.push((*p, format!("{g}-{i}")));
            }
        }
        let mut reqs = Vec::new();
        let mut at = 0;
        for parts in &groups {
            let slice: Vec<(u32, &str, u64)> = names[at..at + parts.len()].iter().map(|(p, n)| (*p, n.as_str(), 1)).collect();
            for (p, n, _) in &slice { expected[*p as usize].push(n.to_string()); }
            reqs.push(request(&slice, None));
            at += parts.len();
        }
        append_all(&log, max_batch, reqs);
        for p in 0..3u32 {
            let got = payloads(&log, p, 0);
            prop_assert_eq!(got.len(), expected[p as usize].len());
            for (i, (off, name)) in got.iter().enumerate() {
                prop_assert_eq!(*off, i as u64);
                prop_assert_eq!(name, &expected[p as usize][i]);
            }
        }
    }
}

#[test]
fn durable_state_counts_toward_the_disk_budget_and_is_given_back_when_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let budget = Budget {
        bytes: 64 << 10,
        policy: DiskFullPolicy::Reject,
    };
    let log = Arc::new(Log::open(dir.path(), Some(&topics(1, None, None)), Some(budget)).unwrap());
    let before = log.state_bytes();
    assert!(!log.rejects_publishes());
    // 100 retained-message-sized values of 1 KiB: over the 64 KiB budget with no record.
    let mut fill = request(&[], None);
    for i in 0..100u32 {
        fill.state.push(StateOp::Put {
            key: format!("rstate/{i:03}").into_bytes(),
            value: vec![7; 1024],
        });
    }
    append_all(&log, 1000, vec![fill]);
    assert!(log.state_bytes() >= before + 100 * 1024);
    assert_eq!(log.total_bytes(), 0, "no record was written");
    assert!(log.rejects_publishes(), "state alone fills the budget");
    // Overwriting a key counts its new size only once.
    let mut again = request(&[], None);
    again.state.push(StateOp::Put {
        key: b"rstate/000".to_vec(),
        value: vec![7; 1024],
    });
    let full = log.state_bytes();
    append_all(&log, 1000, vec![again]);
    assert_eq!(log.state_bytes(), full);
    // Deleting the state gives its bytes back.
    let mut clear = request(&[], None);
    clear.state.push(StateOp::DeletePrefix {
        prefix: b"rstate/".to_vec(),
    });
    append_all(&log, 1000, vec![clear]);
    assert_eq!(log.state_bytes(), before);
    assert!(!log.rejects_publishes());
    // A restart sums the same.
    let stored = log.state_bytes();
    drop(log);
    let log = Log::open(dir.path(), Some(&topics(1, None, None)), Some(budget)).unwrap();
    assert_eq!(log.state_bytes(), stored);
}

#[test]
fn a_data_directory_from_before_the_format_byte_opens_with_its_state() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Arc::new(Log::open(dir.path(), Some(&topics(1, None, None)), None).unwrap());
        let mut req = request(&[(0, "kept", 1)], None);
        req.state.extend(crate::mqtt::session::purge_ops("none"));
        req.state
            .push(crate::mqtt::session::qos2_marker_op("dev", 9));
        append_all(&log, 1000, vec![req]);
    }
    // Rewrite the meta keyspace as the previous version stored it: no format byte, no layout
    // marker.
    {
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let meta = db
            .keyspace("meta", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        let entries: Vec<_> = meta
            .iter()
            .map(|i| {
                let (k, v) = i.into_inner().unwrap();
                (k.to_vec(), v.to_vec())
            })
            .collect();
        for (k, v) in entries {
            if k == b"V" {
                meta.remove(k).unwrap();
            } else {
                meta.insert(k, v[1..].to_vec()).unwrap();
            }
        }
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let log = Log::open(dir.path(), Some(&topics(1, None, None)), None).unwrap();
    assert_eq!(payloads(&log, 0, 0), vec![(0, "kept".into())]);
    assert_eq!(log.topics()[0].partitions[0].end.load(Ordering::Relaxed), 1);
    let markers = log.meta_scan(&super::meta::Tag::Qos2.prefix()).unwrap();
    assert_eq!(markers.len(), 1);
    assert_eq!(super::meta::parse_qos2_key(&markers[0].0), Some(("dev", 9)));
    assert!(super::meta::is_marker_value(&markers[0].1));
    let report = crate::check::check(&log, false).unwrap();
    assert!(report.bad.is_empty(), "{report:?}");
}

#[test]
fn publishes_are_refused_below_min_free_and_accepted_again_when_space_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), Some(&topics(1, None, None)), None).unwrap();
    assert!(!log.rejects_publishes(), "no floor set");
    let space = log.disk_space();
    assert!(space.is_none(), "not looked at before a floor is set");
    // A floor of the whole file system can never be met.
    log.set_min_free(Some(super::MinFree::Percent(100.0)));
    let space = log.disk_space().expect("statvfs of the data directory");
    assert!(space.total > 0 && space.available <= space.total);
    assert!(log.low_disk() && log.rejects_publishes());
    // Space "comes back": a floor below what is free.
    log.set_min_free(Some(super::MinFree::Bytes(space.available / 2)));
    assert!(!log.low_disk() && !log.rejects_publishes());
    log.set_min_free(Some(super::MinFree::Bytes(u64::MAX)));
    assert!(log.rejects_publishes());
    log.set_min_free(None);
    assert!(!log.rejects_publishes());
}

/// Groups of more than `PIPELINE_BYTES` are committed by the committer's thread while the
/// next is batched: offsets stay dense and in request order in every partition, and the
/// offsets an `Enqueue` records (given out by the batcher, ahead of the commits) point at the
/// records they were queued for.
#[test]
fn large_groups_committed_beside_the_batching_keep_offsets_and_queued_positions_exact() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), Some(&topics(3, None, None)), None).unwrap());
    let body = r#"{"device":"d-7","temperature":21.5,"humidity":40.25,"ok":true},"#.repeat(1000);
    let names: Vec<Vec<(u32, String)>> = (0..24u32)
        .map(|i| {
            (0..3u32)
                .map(|j| ((i + j) % 3, format!("{i}-{j}-{body}")))
                .collect()
        })
        .collect();
    let mut reqs = Vec::new();
    for (i, recs) in names.iter().enumerate() {
        let slice: Vec<(u32, &str, u64)> = recs.iter().map(|(p, n)| (*p, n.as_str(), 1)).collect();
        let mut req = request(&slice, None);
        req.state.push(StateOp::Enqueue {
            prefix: format!("qe{i:02}/").into_bytes(),
            record: 1,
            value: b"v".to_vec(),
        });
        reqs.push(req);
    }
    let committed = append_all(&log, 1000, reqs);
    let mut expected: Vec<Vec<&str>> = vec![Vec::new(); 3];
    for recs in &names {
        for (p, n) in recs {
            expected[*p as usize].push(n);
        }
    }
    for p in 0..3u32 {
        let got = payloads(&log, p, 0);
        assert_eq!(got.len(), expected[p as usize].len());
        for (i, (off, name)) in got.iter().enumerate() {
            assert_eq!(*off, i as u64);
            assert_eq!(name, expected[p as usize][i], "partition {p} offset {i}");
        }
    }
    let mut last_seq = 0;
    for (i, done) in committed.iter().enumerate() {
        assert!(done.outcome.is_ok());
        assert_eq!(done.seqs.len(), 1);
        assert!(done.seqs[0] > last_seq, "seqs grow in request order");
        last_seq = done.seqs[0];
        let entries = log.meta_scan(format!("qe{i:02}/").as_bytes()).unwrap();
        assert_eq!(entries.len(), 1);
        let v = &entries[0].1;
        assert_eq!(&v[..1], b"v");
        let partition = u32::from_be_bytes(v[5..9].try_into().unwrap());
        let offset = u64::from_be_bytes(v[9..17].try_into().unwrap());
        let (want_p, want) = &names[i][1];
        assert_eq!(partition, *want_p);
        let read = log.read(0, partition, offset, 1).unwrap();
        assert_eq!(read[0].offset, offset);
        assert_eq!(&read[0].payload[..], want.as_bytes(), "request {i}");
    }
}
