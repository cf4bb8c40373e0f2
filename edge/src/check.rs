//! `edge check`: every stored entry of a stopped node decoded, and those that do not decode
//! listed (and with `--repair` moved to the `quarantine` keyspace).
//!
//! The edge itself never stops for such an entry (readers skip a bad batch, start-up leaves
//! a bad meta entry out, both counted in `tributary_corrupt_entries_total`); this command is
//! how an operator sees all of them at once, and clears them out of the way for good.

use serde::Serialize;

use crate::log::{meta, CorruptBatch, Log, LogError};
use crate::mqtt::delivery::Message;

/// One entry that does not decode.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BadEntry {
    /// `records` or `meta`.
    pub keyspace: &'static str,
    /// What it holds: `batch`, `session`, `subscription`, `queue entry`, ...
    pub kind: &'static str,
    /// Where: `topic/partition@offset` for a batch, the key (escaped) for a meta entry.
    pub at: String,
    /// Why it does not decode.
    pub error: String,
    /// For `--repair`: the batch (topic, partition, base) or meta key.
    #[serde(skip)]
    target: Target,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Batch(String, u32, u64),
    Meta(Vec<u8>),
}

/// What `edge check` found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Record batches decoded.
    pub batches_checked: u64,
    /// Meta entries decoded.
    pub meta_checked: u64,
    /// Entries that do not decode.
    pub bad: Vec<BadEntry>,
    /// Entries moved to the `quarantine` keyspace (with `--repair`).
    pub moved: usize,
}

/// Decodes every entry of `log`; with `repair`, moves the bad ones to quarantine.
pub fn check(log: &Log, repair: bool) -> Result<Report, LogError> {
    let mut bad = Vec::new();
    let batches_checked = log.scan_batches(|topic, partition, base, why: CorruptBatch| {
        bad.push(BadEntry {
            keyspace: "records",
            kind: "batch",
            at: format!("{topic}/{partition}@{base}"),
            error: why.to_string(),
            target: Target::Batch(topic.to_string(), partition, base),
        });
    })?;
    let meta = log.meta_scan(&[])?;
    let meta_checked = meta.len() as u64;
    for (k, v) in meta {
        if let Err((kind, error)) = check_meta(&k, &v) {
            bad.push(BadEntry {
                keyspace: "meta",
                kind,
                at: String::from_utf8_lossy(&k).escape_debug().to_string(),
                error,
                target: Target::Meta(k),
            });
        }
    }
    let mut moved = 0;
    if repair && !bad.is_empty() {
        let batches: Vec<(String, u32, u64)> = bad
            .iter()
            .filter_map(|b| match &b.target {
                Target::Batch(t, p, o) => Some((t.clone(), *p, *o)),
                Target::Meta(_) => None,
            })
            .collect();
        let keys: Vec<Vec<u8>> = bad
            .iter()
            .filter_map(|b| match &b.target {
                Target::Meta(k) => Some(k.clone()),
                Target::Batch(..) => None,
            })
            .collect();
        moved = log.quarantine_entries(&batches, &keys)?;
    }
    Ok(Report {
        batches_checked,
        meta_checked,
        bad,
        moved,
    })
}

/// Decodes one meta entry by its tag: `Err((kind, why))` when it does not decode.
fn check_meta(k: &[u8], v: &[u8]) -> Result<(), (&'static str, String)> {
    meta::check_entry(k, v, |batch| {
        Message::decode_batch(batch)
            .map(drop)
            .map_err(|e| e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::PlannedTopic;

    #[test]
    fn bad_entries_are_listed_and_repair_moves_them_out_of_the_way() {
        let dir = tempfile::tempdir().unwrap();
        let topics = vec![PlannedTopic {
            name: "t".into(),
            partitions: 1,
            retention: None,
            retention_bytes: None,
        }];
        let log = Log::open(dir.path(), Some(&topics), None).unwrap();
        // A good session, a session value of the wrong size, a retained message that does
        // not decode, a record batch that does not decode.
        log.put_raw(false, b"sgood", &meta::session_value(60, 0, None));
        log.put_raw(false, b"sbad", b"123");
        log.put_raw(false, b"rsensors/x", b"\x01\xB7\x01garbage");
        let mut key = [0u8; 16];
        key[8..16].copy_from_slice(&0u64.to_be_bytes());
        log.put_raw(true, &key, b"not a batch");

        let report = check(&log, false).unwrap();
        let mut kinds: Vec<&str> = report.bad.iter().map(|b| b.kind).collect();
        kinds.sort_unstable();
        assert_eq!(
            kinds,
            vec!["batch", "retained message", "session"],
            "{report:?}"
        );
        assert_eq!(report.moved, 0);
        assert!(report.bad.iter().any(|b| b.at == "t/0@0"));

        let repaired = check(&log, true).unwrap();
        assert_eq!(repaired.moved, 3);
        let again = check(&log, false).unwrap();
        assert!(again.bad.is_empty(), "{again:?}");
        assert_eq!(
            log.meta_scan(b"sgood").unwrap().len(),
            1,
            "good entries stay"
        );
    }
}
