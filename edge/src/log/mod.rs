//! The edge's durable, partitioned topic log, stored in fjall.
//!
//! # On-disk format
//!
//! One fjall database in the data directory with two keyspaces (integers big-endian):
//!
//! - `records`: key `topic_id u32 | partition u32 | base_offset u64`, value a record batch
//!   (see [`record`]): many records in one value, so that a group commit writes few keys and a
//!   read from any offset is one seek. A batch is LZ4-compressed by the appender
//!   (`storage.compression`, format version 2) or stored as it is (version 1); both are read.
//!   fjall's own compression is off for the journal and for this keyspace's tables (when the
//!   keyspace was created by a release that compresses batches), so fjall writes the batches
//!   as the appender made them.
//! - `meta`: the topic table, each partition's end offset, bytes held and records removed,
//!   and the state of sessions, retained messages and consumer groups, written through the
//!   same group commits as records (see [`appender::StateOp`]). [`meta`] defines every key
//!   and value, with a table of all of them in its header.
//!
//! # Invariants
//!
//! - Offsets in a partition are dense: batch `k+1` starts where batch `k` ends.
//! - A partition's meta entry is written in the same fjall write batch as every batch value
//!   that changes it, so the two are always consistent.
//! - Only the appender thread writes; readers see whole fjall batches or nothing.
//! - Records are deleted only from the front of a partition (retention, disk budget), whole
//!   batches at a time, with tombstones: live data is never rewritten.
//!
//! # Recovery
//!
//! fjall replays its journal on open and discards a torn tail, so a group commit is present
//! whole or not at all: there is never a partial record to read, and every batch value carries
//! a CRC. Opening reads one meta entry and one key per partition (the first batch gives the
//! start offset) and never scans the log. A group commit whose fsync failed poisons the log:
//! nothing further is appended or acknowledged and the process exits non-zero.

/// `storage.max_clock_jump` unless set.
const DEFAULT_MAX_CLOCK_JUMP_MS: u64 = 5 * 60 * 1000;

/// Records held in memory before fjall flushes them to a table; bounds the log's memory.
const MEMTABLE_BYTES: u64 = 16 << 20;

pub mod appender;
pub(crate) mod clock;
pub mod meta;
pub mod record;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions};

use crate::config::DiskFullPolicy;
use crate::route::PlannedTopic;
use crate::route::TopicId;
pub use record::{CorruptBatch, Record, RecordHeaders};

/// Errors of the log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// Another process (a running edge) holds the data directory.
    #[error("data directory {0} is in use by another process (is an edge running on it?): stop it first")]
    Locked(PathBuf),
    /// fjall reported an error.
    #[error("storage error: {0}")]
    Storage(#[from] fjall::Error),
    /// A stored batch does not decode.
    #[error("corrupt batch in {topic}/{partition} at offset {base_offset}: {source}")]
    Corrupt {
        /// Topic name.
        topic: String,
        /// Partition.
        partition: u32,
        /// Base offset of the batch.
        base_offset: u64,
        /// What is wrong with it.
        source: CorruptBatch,
    },
    /// A meta entry does not decode.
    #[error("corrupt meta entry {0}")]
    CorruptMeta(String),
    /// The config asks for fewer partitions than the topic has on disk.
    #[error("topic \"{topic}\" has {on_disk} partitions on disk but the config gives {configured}: partitions can be added, never removed")]
    PartitionsShrunk {
        /// Topic name.
        topic: String,
        /// Partitions in the log.
        on_disk: u32,
        /// Partitions in the config.
        configured: u32,
    },
    /// No topic of that name in the log.
    #[error("no topic \"{0}\" in the log")]
    UnknownTopic(String),
    /// The topic has no such partition.
    #[error("topic \"{topic}\" has no partition {partition} (it has {count})")]
    UnknownPartition {
        /// Topic name.
        topic: String,
        /// Asked for.
        partition: u32,
        /// Partitions it has.
        count: u32,
    },
    /// A thread of the log's readers (a consumer group) could not be started.
    #[error("starting a thread: {0}")]
    Thread(std::io::Error),
    /// An earlier write or fsync failed; the log accepts nothing more.
    #[error("the log is poisoned by an earlier write failure: {0}")]
    Poisoned(appender::CommitError),
}

/// A key and value of the meta keyspace.
pub type MetaEntry = (Vec<u8>, Vec<u8>);

/// The oldest batch of the node, a candidate for `drop-oldest`.
struct OldestBatch<'a> {
    last_timestamp_ms: u64,
    topic: &'a TopicLog,
    partition: u32,
    key: Vec<u8>,
    len: usize,
    records: u64,
}

/// Live state of one partition, readable by anyone through its getters, changed only by the
/// log (the appender thread, retention and the fsyncs): the fields are private to `log`.
#[derive(Debug, Default)]
pub struct PartitionState {
    /// First offset still held.
    start: AtomicU64,
    /// Next offset to be assigned.
    end: AtomicU64,
    /// Records below this offset are on disk for good: it moves only after an fsync (each
    /// group commit with `fsync = "always"`; the timer's with `"interval:<ms>"`, and with
    /// `"never"` a background one while a mirror or consumer group reads; the fsync at
    /// open). Only durable records are mirrored or handed to consumer groups, so Kafka and
    /// a group never hold a record, or an offset, that a power cut could take back.
    durable_end: AtomicU64,
    /// Bytes of the batch values held.
    bytes: AtomicU64,
    /// Records deleted so far by retention or the disk budget.
    removed: AtomicU64,
}

impl PartitionState {
    /// First offset still held.
    pub fn start(&self) -> u64 {
        self.start.load(Ordering::Acquire)
    }

    /// Next offset to be assigned.
    pub fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    /// Records below this offset are on disk for good (see the field).
    pub fn durable_end(&self) -> u64 {
        self.durable_end.load(Ordering::Acquire)
    }

    /// Bytes of the batch values held.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Records deleted so far by retention or the disk budget.
    pub fn removed(&self) -> u64 {
        self.removed.load(Ordering::Relaxed)
    }
}

/// One topic of the log.
#[derive(Debug)]
pub struct TopicLog {
    /// Name.
    pub name: String,
    /// Id, the first part of its record keys.
    pub id: TopicId,
    /// Partitions by number.
    pub partitions: Vec<Arc<PartitionState>>,
    /// Age retention.
    pub retention: Option<Duration>,
    /// Per-partition byte retention.
    pub retention_bytes: Option<u64>,
}

impl TopicLog {
    /// Records appended to the topic since the log was created (its partitions' end offsets).
    pub fn records_appended(&self) -> u64 {
        self.partitions
            .iter()
            .map(|p| p.end.load(Ordering::Relaxed))
            .sum()
    }

    /// Bytes the topic holds now.
    pub fn bytes(&self) -> u64 {
        self.partitions
            .iter()
            .map(|p| p.bytes.load(Ordering::Relaxed))
            .sum()
    }
}

/// Node-wide counters of the log.
#[derive(Debug)]
pub struct LogCounters {
    /// Records deleted by age or per-partition byte retention.
    pub retention_removed: AtomicU64,
    /// Records deleted by the `drop-oldest` disk budget policy.
    pub budget_dropped: AtomicU64,
    /// Publishes refused by the `reject` disk budget policy.
    pub budget_rejected: AtomicU64,
    /// Records per group commit.
    pub commit_records: prometheus_client::metrics::histogram::Histogram,
    /// Seconds a group commit's write and fsync took.
    pub commit_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Record batches found undecodable (each counted once) and skipped by readers.
    pub corrupt_batches: AtomicU64,
    /// Meta entries found undecodable (each counted once) and left out at start.
    pub corrupt_meta: AtomicU64,
    /// Keys of the entries counted above, so that each is counted and logged once.
    corrupt_seen: std::sync::Mutex<std::collections::HashSet<Vec<u8>>>,
}

impl LogCounters {
    /// Counts and logs a corrupt entry the first time it is met; true that first time.
    fn corrupt(&self, counter: &AtomicU64, key: &[u8]) -> bool {
        let first = self
            .corrupt_seen
            .lock()
            .map(|mut seen| seen.insert(key.to_vec()))
            .unwrap_or(true);
        if first {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        first
    }
}

impl Default for LogCounters {
    fn default() -> Self {
        LogCounters {
            retention_removed: AtomicU64::new(0),
            budget_dropped: AtomicU64::new(0),
            budget_rejected: AtomicU64::new(0),
            commit_records: prometheus_client::metrics::histogram::Histogram::new([
                1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
                10000.0, 100000.0,
            ]),
            commit_seconds: prometheus_client::metrics::histogram::Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0,
            ]),
            corrupt_batches: AtomicU64::new(0),
            corrupt_meta: AtomicU64::new(0),
            corrupt_seen: Default::default(),
        }
    }
}

/// Disk budget settings.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Cap in bytes.
    pub bytes: u64,
    /// What to do at the cap.
    pub policy: DiskFullPolicy,
}

/// `storage.min_free`: free space the data directory's file system keeps. Below it the
/// node refuses new publishes (and goes on serving readers) until space is back, so fjall
/// never meets a full disk mid-write.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinFree {
    /// At least this many bytes free.
    Bytes(u64),
    /// At least this share (0 to 100) of the file system free.
    Percent(f64),
}

impl MinFree {
    /// The bytes to keep free on a file system of `total` bytes.
    pub fn bytes_of(self, total: u64) -> u64 {
        match self {
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => (total as f64 * p.clamp(0.0, 100.0) / 100.0) as u64,
        }
    }
}

/// Space on the data directory's file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSpace {
    /// Bytes an unprivileged writer can still use.
    pub available: u64,
    /// Size of the file system.
    pub total: u64,
}

/// How often the appender looks at the free space while it commits: every 100 ms, and
/// after every 1 MiB of batches, so a fast writer cannot run far past the floor between
/// two looks.
const FREE_SPACE_EVERY: Duration = Duration::from_millis(100);
const FREE_SPACE_EVERY_BYTES: u64 = 1 << 20;

/// How often the data directory's files are summed up ([`Log::data_dir_bytes`]): a walk of
/// every file, so rarer than the free-space look.
const FOOTPRINT_EVERY: Duration = Duration::from_secs(1);

/// Bytes the files under `dir` occupy on disk (allocated blocks, so a pre-allocated journal
/// counts in full and a sparse file only for what it holds). Files that vanish during the
/// walk (a compaction removing a table) are skipped.
fn footprint(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut bytes = 0u64;
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        bytes = bytes.saturating_add(if meta.is_dir() {
            footprint(&entry.path())
        } else {
            meta.blocks().saturating_mul(512)
        });
    }
    bytes
}

/// The log of one edge node.
pub struct Log {
    dir: PathBuf,
    db: Database,
    records: Keyspace,
    meta: Keyspace,
    topics: Vec<TopicLog>,
    by_name: HashMap<String, TopicId>,
    budget: Option<Budget>,
    total_bytes: AtomicU64,
    /// Bytes (keys and values) of the meta keyspace: sessions, subscriptions, queues,
    /// retained messages, group positions and the log's own entries.
    state_bytes: AtomicU64,
    over_budget: AtomicBool,
    /// `storage.min_free`, and whether the free space was below it at the last look.
    min_free: std::sync::Mutex<Option<MinFree>>,
    low_disk: AtomicBool,
    /// Free space at the last look (for metrics), and when that was.
    disk_space: std::sync::Mutex<Option<(DiskSpace, std::time::Instant)>>,
    /// Batch bytes written since that look.
    written_since_look: AtomicU64,
    /// What the data directory's files occupy on disk, and when it was last summed.
    footprint: std::sync::Mutex<Option<(u64, std::time::Instant)>>,
    poisoned: std::sync::Mutex<Option<appender::CommitError>>,
    /// The clock age retention uses (see [`clock`]).
    retention_clock: std::sync::Mutex<clock::RetentionClock>,
    /// The log identity, as stored.
    identity: std::sync::Mutex<meta::LogIdentity>,
    /// Node-wide counters.
    pub counters: LogCounters,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log").field("dir", &self.dir).finish()
    }
}

/// Key of a batch value.
pub(crate) fn record_key(topic: TopicId, partition: u32, offset: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[0..4].copy_from_slice(&topic.to_be_bytes());
    k[4..8].copy_from_slice(&partition.to_be_bytes());
    k[8..16].copy_from_slice(&offset.to_be_bytes());
    k
}

/// (topic, partition, base offset) of a record key.
fn split_record_key(key: &[u8]) -> (TopicId, u32, u64) {
    let part = |r: std::ops::Range<usize>| key.get(r).unwrap_or(&[0; 4][..]);
    (
        u32::from_be_bytes(part(0..4).try_into().unwrap_or([0; 4])),
        u32::from_be_bytes(part(4..8).try_into().unwrap_or([0; 4])),
        offset_of_key(key),
    )
}

fn offset_of_key(key: &[u8]) -> u64 {
    u64::from_be_bytes(key[8..16].try_into().expect("record keys are 16 bytes"))
}

/// The stored log identity; a log without one gets one now, in one fsynced write, before
/// anything can use it. A `fresh` log (made by this open) refuses Kafka checkpoints without
/// an identity; a log that existed before identities did takes them as its own.
fn ensure_identity(
    db: &Database,
    meta_ks: &fjall::Keyspace,
    fresh: bool,
) -> Result<meta::LogIdentity, LogError> {
    if let Some(v) = meta_ks.get(meta::IDENTITY_KEY)? {
        return meta::parse_identity_value(&v)
            .ok_or_else(|| LogError::CorruptMeta("the log identity does not decode".into()));
    }
    let identity = meta::LogIdentity {
        id: random_id()?,
        unmarked: if fresh {
            meta::UnmarkedCheckpoints::Refused
        } else {
            meta::UnmarkedCheckpoints::Own
        },
        predecessors: Vec::new(),
    };
    let mut batch = db.batch();
    batch.insert(meta_ks, meta::IDENTITY_KEY, meta::identity_value(&identity));
    batch
        .durability(Some(fjall::PersistMode::SyncAll))
        .commit()?;
    tracing::info!(
        log_id = %meta::id_hex(&identity.id),
        "log identity created{}",
        if fresh { "" } else { " for a log made before identities (its unmarked Kafka checkpoints are its own)" }
    );
    Ok(identity)
}

/// 16 bytes from the kernel's random source.
fn random_id() -> Result<[u8; 16], LogError> {
    use std::io::Read as _;
    let mut id = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .map_err(|e| LogError::Storage(fjall::Error::Io(e)))?;
    Ok(id)
}

impl Log {
    /// The log identity: its id, and whose Kafka checkpoints it accepts besides its own.
    pub fn identity(&self) -> meta::LogIdentity {
        self.identity.lock().expect("identity lock").clone()
    }

    /// Adopts the Kafka checkpoints of another log (`predecessor`; `None`: checkpoints that
    /// carry no identity) as a predecessor's: durably (fsynced) before this returns.
    pub fn adopt_predecessor(&self, predecessor: Option<[u8; 16]>) -> Result<(), LogError> {
        let mut identity = self.identity.lock().expect("identity lock");
        let mut next = identity.clone();
        match predecessor {
            None => next.unmarked = meta::UnmarkedCheckpoints::Predecessor,
            Some(id) if next.predecessors.contains(&id) || id == next.id => {}
            Some(id) => {
                if next.predecessors.len() >= meta::MAX_PREDECESSORS {
                    return Err(LogError::CorruptMeta(format!(
                        "this log has adopted {} predecessors already, the most it keeps",
                        meta::MAX_PREDECESSORS
                    )));
                }
                next.predecessors.push(id);
            }
        }
        let mut batch = self.db.batch();
        batch.insert(&self.meta, meta::IDENTITY_KEY, meta::identity_value(&next));
        batch
            .durability(Some(fjall::PersistMode::SyncAll))
            .commit()?;
        *identity = next;
        Ok(())
    }

    /// Opens (creating if needed) the log in `dir`. With `topics`, makes sure each configured
    /// topic exists with at least its configured partitions; topics on disk that the config no
    /// longer names stay readable.
    pub fn open(
        dir: &Path,
        topics: Option<&[PlannedTopic]>,
        budget: Option<Budget>,
    ) -> Result<Log, LogError> {
        std::fs::create_dir_all(dir).map_err(|e| LogError::Storage(fjall::Error::Io(e)))?;
        // fjall compresses journal entries of 4 KiB and more with LZ4 by default; the batches
        // come compressed from the appender (`storage.compression`), and with "none" they are
        // meant to be stored as they are.
        let db = Database::builder(dir)
            .journal_compression(fjall::CompressionType::None)
            .open()
            .map_err(|e| match e {
                fjall::Error::Locked => LogError::Locked(dir.to_path_buf()),
                other => LogError::Storage(other),
            })?;
        // The batches are compressed by the appender (`storage.compression`): fjall's own LZ4
        // (by default on the tables of level 2 and below) would spend CPU on every compaction
        // and read to gain next to nothing. Fixed when the keyspace is created: a log created
        // by an older release keeps fjall's default.
        let records = db.keyspace("records", || {
            KeyspaceCreateOptions::default()
                .max_memtable_size(MEMTABLE_BYTES)
                .data_block_compression_policy(fjall::config::CompressionPolicy::disabled())
        })?;
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default)?;
        // Nothing stored yet: the data directory is new (or was emptied) now.
        let fresh = meta.is_empty()?;
        meta::migrate(&db, &meta)?;
        let identity = ensure_identity(&db, &meta, fresh)?;
        if meta.get(meta::LAST_COMMIT_KEY)?.is_none() {
            // Present from the start (0: no commit yet), so the appender only ever
            // overwrites it with a value of the same size.
            meta.insert(meta::LAST_COMMIT_KEY, meta::last_commit_value(0))?;
        }

        // The topic table as stored.
        let mut stored: Vec<(String, TopicId, u32)> = Vec::new();
        for item in meta.prefix(meta::Tag::Topic.prefix()) {
            let (k, v) = item.into_inner()?;
            let name = meta::parse_topic_key(&k)
                .ok_or_else(|| LogError::CorruptMeta("topic name is not UTF-8".into()))?
                .to_string();
            let (id, parts) = meta::parse_topic_value(&v)
                .ok_or_else(|| LogError::CorruptMeta(format!("topic {name}")))?;
            stored.push((name, id, parts));
        }
        let mut next_id = stored.iter().map(|t| t.1 + 1).max().unwrap_or(0);
        let mut batch = db.batch();
        let mut changed = false;
        let mut settings: HashMap<String, &PlannedTopic> = HashMap::new();
        for planned in topics.unwrap_or(&[]) {
            settings.insert(planned.name.clone(), planned);
            match stored.iter_mut().find(|t| t.0 == planned.name) {
                Some(t) if t.2 > planned.partitions => {
                    return Err(LogError::PartitionsShrunk {
                        topic: planned.name.clone(),
                        on_disk: t.2,
                        configured: planned.partitions,
                    })
                }
                Some(t) if t.2 < planned.partitions => {
                    tracing::info!(topic = %t.0, from = t.2, to = planned.partitions, "adding partitions");
                    t.2 = planned.partitions;
                    batch.insert(&meta, meta::topic_key(&t.0), meta::topic_value(t.1, t.2));
                    changed = true;
                }
                Some(_) => {}
                None => {
                    stored.push((planned.name.clone(), next_id, planned.partitions));
                    batch.insert(
                        &meta,
                        meta::topic_key(&planned.name),
                        meta::topic_value(next_id, planned.partitions),
                    );
                    next_id += 1;
                    changed = true;
                }
            }
        }
        if changed {
            batch
                .durability(Some(fjall::PersistMode::SyncAll))
                .commit()?;
        }

        // What client state holds counts toward the disk budget like records do: summed once
        // here, then kept up to date by the appender.
        let mut state_bytes = 0u64;
        for item in meta.iter() {
            let (k, v) = item.into_inner()?;
            state_bytes += (k.len() + v.len()) as u64;
        }

        stored.sort_by_key(|t| t.1);
        let mut topic_logs = Vec::with_capacity(stored.len());
        let mut by_name = HashMap::new();
        let mut total = 0u64;
        for (name, id, parts) in stored {
            // Ids are dense from 0 because they are assigned in order and never freed.
            if id as usize != topic_logs.len() {
                return Err(LogError::CorruptMeta(format!(
                    "topic ids are not dense at {name} (id {id})"
                )));
            }
            let mut partitions = Vec::with_capacity(parts as usize);
            for p in 0..parts {
                let state = recover_partition(&records, &meta, id, p)?;
                total += state.bytes.load(Ordering::Relaxed);
                partitions.push(Arc::new(state));
            }
            let s = settings.get(&name);
            by_name.insert(name.clone(), id);
            topic_logs.push(TopicLog {
                name,
                id,
                partitions,
                retention: s.and_then(|s| s.retention),
                retention_bytes: s.and_then(|s| s.retention_bytes),
            });
        }
        let mut log = Log {
            dir: dir.to_path_buf(),
            db,
            records,
            meta,
            topics: topic_logs,
            by_name,
            budget,
            total_bytes: AtomicU64::new(total),
            state_bytes: AtomicU64::new(state_bytes),
            over_budget: AtomicBool::new(false),
            min_free: std::sync::Mutex::new(None),
            low_disk: AtomicBool::new(false),
            disk_space: std::sync::Mutex::new(None),
            written_since_look: AtomicU64::new(0),
            footprint: std::sync::Mutex::new(None),
            poisoned: std::sync::Mutex::new(None),
            counters: LogCounters::default(),
            retention_clock: std::sync::Mutex::new(clock::RetentionClock::new(
                DEFAULT_MAX_CLOCK_JUMP_MS,
                None,
            )),
            identity: std::sync::Mutex::new(identity),
        };
        let stored_clock = log
            .meta
            .get(meta::RETENTION_CLOCK_KEY)?
            .and_then(|v| meta::parse_retention_clock_value(&v));
        log.retention_clock = std::sync::Mutex::new(clock::RetentionClock::new(
            DEFAULT_MAX_CLOCK_JUMP_MS,
            stored_clock,
        ));
        // What a previous run wrote may still be only in the page cache (it was killed, or
        // ran with fsync "never"): one fsync now makes it durable before any reader is told
        // it is (`durable_end`), so no offset handed out can come back with another record.
        log.db.persist(fjall::PersistMode::SyncAll)?;
        log.refresh_budget_flag();
        log.report_recovery();
        Ok(log)
    }

    /// Logs what the log holds after opening: each partition's offsets and when the newest
    /// commit that survived was made (after a power cut, how far back the log went).
    fn report_recovery(&self) {
        let last_commit = self.last_commit_ms();
        let mut ranges = String::new();
        let mut records = 0u64;
        let mut partitions = 0usize;
        for t in &self.topics {
            for (p, state) in t.partitions.iter().enumerate() {
                let (start, end) = (
                    state.start.load(Ordering::Relaxed),
                    state.end.load(Ordering::Relaxed),
                );
                records += end - start;
                partitions += 1;
                // Enough to read; the full list is in `edge topics`.
                if partitions <= 32 {
                    use std::fmt::Write as _;
                    let _ = write!(
                        ranges,
                        "{}{}/{p}: {start}..{end}",
                        if ranges.is_empty() { "" } else { ", " },
                        t.name
                    );
                }
            }
        }
        if partitions > 32 {
            ranges.push_str(", ...");
        }
        match last_commit {
            Some(at) => tracing::info!(
                partitions,
                records,
                last_commit_unix_ms = at,
                last_commit_age_s = appender::now_ms().saturating_sub(at) / 1000,
                offsets = %ranges,
                "log recovered to its last durable commit"
            ),
            None => tracing::info!(partitions, records, offsets = %ranges, "log opened"),
        }
    }

    /// When the newest group commit stored was made (ms since the Unix epoch), if any was.
    /// Read before the appender starts, it is the last moment the previous run is known to
    /// have been up.
    pub fn last_commit_ms(&self) -> Option<u64> {
        self.meta
            .get(meta::LAST_COMMIT_KEY)
            .ok()
            .flatten()
            .and_then(|v| meta::parse_last_commit_value(&v))
            .filter(|&at| at > 0)
    }

    /// Every topic, by id.
    pub fn topics(&self) -> &[TopicLog] {
        &self.topics
    }

    /// A topic by name.
    pub fn topic(&self, name: &str) -> Option<&TopicLog> {
        self.by_name.get(name).map(|&id| &self.topics[id as usize])
    }

    /// Bytes held by all partitions.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes.load(Ordering::Relaxed)
    }

    /// Bytes of the node's other durable state (sessions, subscriptions, queued deliveries,
    /// retained messages, group positions): keys and values of the meta keyspace.
    pub fn state_bytes(&self) -> u64 {
        self.state_bytes.load(Ordering::Relaxed)
    }

    /// What the disk budget counts: record batches and all other durable state.
    pub fn budget_bytes(&self) -> u64 {
        self.total_bytes() + self.state_bytes()
    }

    /// Whether new publishes must be refused: the disk budget is reached with the `reject`
    /// policy, or the file system is below `storage.min_free`.
    pub fn rejects_publishes(&self) -> bool {
        self.over_budget.load(Ordering::Relaxed) || self.low_disk.load(Ordering::Relaxed)
    }

    /// Whether the file system was below `storage.min_free` at the last look.
    pub fn low_disk(&self) -> bool {
        self.low_disk.load(Ordering::Relaxed)
    }

    /// Sets `storage.min_free` and looks at the free space at once.
    pub fn set_min_free(&self, min_free: Option<MinFree>) {
        *self.min_free.lock().expect("min_free lock") = min_free;
        self.check_free_space();
    }

    /// The free space at the last look, if the file system told.
    pub fn disk_space(&self) -> Option<DiskSpace> {
        self.disk_space
            .lock()
            .expect("disk space lock")
            .map(|(space, _)| space)
    }

    /// What the data directory's files occupy on disk at the last look (at most a second
    /// old while the edge writes): fjall's journals and tables, including deleted records
    /// whose space compaction has not yet reclaimed, and the edge's own files. The disk
    /// budget counts the bytes the log and its state hold ([`Log::budget_bytes`]); this is
    /// what the disk really gives them.
    pub fn data_dir_bytes(&self) -> Option<u64> {
        self.footprint
            .lock()
            .expect("footprint lock")
            .map(|(bytes, _)| bytes)
    }

    fn refresh_footprint(&self, force: bool) {
        let due = force
            || self
                .footprint
                .lock()
                .expect("footprint lock")
                .is_none_or(|(_, at)| at.elapsed() >= FOOTPRINT_EVERY);
        if due {
            let bytes = footprint(&self.dir);
            *self.footprint.lock().expect("footprint lock") =
                Some((bytes, std::time::Instant::now()));
        }
    }

    /// The data directory's file system's free space now.
    fn measure_disk_space(&self) -> Option<DiskSpace> {
        let st = rustix::fs::statvfs(&self.dir).ok()?;
        let unit = st.f_frsize.max(1);
        Some(DiskSpace {
            available: st.f_bavail.saturating_mul(unit),
            total: st.f_blocks.saturating_mul(unit),
        })
    }

    /// Looks at the free space (after `written` more bytes, at most every 100 ms or 1 MiB
    /// unless `force`) and refuses or accepts publishes by `storage.min_free`.
    pub(crate) fn check_free_space_every(&self, written: u64, force: bool) {
        let since = self
            .written_since_look
            .fetch_add(written, Ordering::Relaxed)
            + written;
        let due = force
            || since >= FREE_SPACE_EVERY_BYTES
            || self
                .disk_space
                .lock()
                .expect("disk space lock")
                .is_none_or(|(_, at)| at.elapsed() >= FREE_SPACE_EVERY);
        if due {
            self.check_free_space();
        }
    }

    fn check_free_space(&self) {
        self.written_since_look.store(0, Ordering::Relaxed);
        self.refresh_footprint(false);
        let Some(space) = self.measure_disk_space() else {
            return;
        };
        *self.disk_space.lock().expect("disk space lock") =
            Some((space, std::time::Instant::now()));
        let min_free = *self.min_free.lock().expect("min_free lock");
        let low = min_free.is_some_and(|m| space.available < m.bytes_of(space.total));
        let was = self.low_disk.swap(low, Ordering::Relaxed);
        if low && !was {
            tracing::warn!(
                available = space.available,
                min_free = min_free.map(|m| m.bytes_of(space.total)),
                dir = %self.dir.display(),
                "the data directory's disk is below storage.min_free: new publishes are refused until space is back (readers, the mirror and consumer groups go on)"
            );
        } else if was && !low {
            tracing::info!(
                available = space.available,
                "the data directory's disk has space again: publishes are accepted"
            );
        }
    }

    /// Why the log is poisoned, if it is.
    pub fn poisoned(&self) -> Option<appender::CommitError> {
        self.poisoned.lock().expect("poison lock").clone()
    }

    pub(crate) fn poison(&self, why: appender::CommitError) {
        let mut p = self.poisoned.lock().expect("poison lock");
        if p.is_none() {
            *p = Some(why);
        }
    }

    fn refresh_budget_flag(&self) {
        let over = match self.budget {
            Some(Budget {
                bytes,
                policy: DiskFullPolicy::Reject,
            }) => self.budget_bytes() >= bytes,
            _ => false,
        };
        self.over_budget.store(over, Ordering::Relaxed);
    }

    /// [`Log::read`] of durable records only (below `durable_end`): what outside readers get,
    /// so that no offset they were shown can come back after a power cut with another record.
    pub fn read_durable(
        &self,
        topic: TopicId,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Record>, LogError> {
        let durable = self
            .topics
            .get(topic as usize)
            .and_then(|t| t.partitions.get(partition as usize))
            .map(|p| p.durable_end());
        // Nothing durable to read at `from`: no read at all.
        if durable.is_some_and(|d| from >= d) {
            return Ok(Vec::new());
        }
        let mut records = self.read(topic, partition, from, max)?;
        if let Some(durable) = durable {
            records.retain(|r| r.offset < durable);
        }
        Ok(records)
    }

    /// Reads up to `max` records of one partition starting at offset `from` (or at the first
    /// record still held, if `from` was deleted).
    pub fn read(
        &self,
        topic: TopicId,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Record>, LogError> {
        let t = &self.topics[topic as usize];
        if partition as usize >= t.partitions.len() {
            return Err(LogError::UnknownPartition {
                topic: t.name.clone(),
                partition,
                count: t.partitions.len() as u32,
            });
        }
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        // The batch holding `from` is the last one whose base offset is <= from.
        let seek = self
            .records
            .range(record_key(topic, partition, 0)..=record_key(topic, partition, from))
            .next_back()
            .map(|g| g.key().map(|k| offset_of_key(&k)))
            .transpose()?
            .unwrap_or(0);
        let range = record_key(topic, partition, seek)..=record_key(topic, partition, u64::MAX);
        for item in self.records.range(range) {
            let (k, v) = item.into_inner()?;
            let base = offset_of_key(&k);
            let batch = match record::decode_batch(base, Bytes::from(v.to_vec())) {
                Ok(batch) => batch,
                Err(source) => {
                    // Quarantined: readers go on with the next batch, and see its records
                    // as a gap, as they see records retention deleted.
                    self.quarantine_batch(&t.name, partition, &k, &source);
                    continue;
                }
            };
            for r in batch {
                if r.offset >= from {
                    out.push(r);
                    if out.len() == max {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Counts and logs (once per batch) a record batch that does not decode.
    pub(crate) fn quarantine_batch(
        &self,
        topic: &str,
        partition: u32,
        key: &[u8],
        why: &CorruptBatch,
    ) {
        if self.counters.corrupt(&self.counters.corrupt_batches, key) {
            tracing::error!(
                topic,
                partition,
                base_offset = offset_of_key(key),
                error = %why,
                "corrupt record batch: skipped by every reader (quarantined)"
            );
        }
    }

    /// Counts and logs (once per key) a meta entry that does not decode; what it held is
    /// left out, and the node goes on without it.
    pub fn quarantine_meta(&self, key: &[u8], what: &str) {
        if self.counters.corrupt(&self.counters.corrupt_meta, key) {
            tracing::error!(
                key = %String::from_utf8_lossy(key).escape_debug(),
                what,
                "corrupt meta entry: left out (quarantined)"
            );
        }
    }

    /// The offset after the batch at `key` when its header does not say: the next batch's
    /// base offset, or the partition's end.
    fn next_base(&self, topic: TopicId, partition: u32, key: &[u8], end: u64) -> u64 {
        let base = offset_of_key(key);
        self.records
            .range(
                record_key(topic, partition, base.saturating_add(1))
                    ..=record_key(topic, partition, u64::MAX),
            )
            .next()
            .and_then(|g| g.key().ok().map(|k| offset_of_key(&k)))
            .unwrap_or(end)
    }

    /// Decodes every stored record batch, in key order, and calls `found` for each one that
    /// does not decode: (topic name, partition, base offset, why). Returns the batches
    /// checked. For `edge check` on a stopped node.
    pub fn scan_batches(
        &self,
        mut found: impl FnMut(&str, u32, u64, CorruptBatch),
    ) -> Result<u64, LogError> {
        let mut checked = 0;
        for item in self.records.iter() {
            let (k, v) = item.into_inner()?;
            checked += 1;
            let (topic, partition, base) = split_record_key(&k);
            let name = self
                .topics
                .get(topic as usize)
                .map_or_else(|| format!("#{topic}"), |t| t.name.clone());
            if let Err(why) = record::decode_batch(base, Bytes::from(v.to_vec())) {
                found(&name, partition, base, why);
            }
        }
        Ok(checked)
    }

    /// Moves entries that do not decode into the `quarantine` keyspace (key: `b'R'` or
    /// `b'M'` for the keyspace they came from, then their key; value unchanged), fsynced.
    /// A record batch moved out leaves a gap that readers treat as deleted records: its
    /// partition's bytes and removed count are adjusted to match. For `edge check --repair`
    /// on a stopped node.
    pub fn quarantine_entries(
        &self,
        batches: &[(String, u32, u64)],
        meta_keys: &[Vec<u8>],
    ) -> Result<usize, LogError> {
        let quarantine = self
            .db
            .keyspace("quarantine", KeyspaceCreateOptions::default)?;
        let mut batch = self.db.batch();
        let mut moved = 0;
        for (topic, partition, base) in batches {
            let Some(t) = self.topic(topic) else { continue };
            let Some(state) = t.partitions.get(*partition as usize) else {
                continue;
            };
            let key = record_key(t.id, *partition, *base);
            let Some(value) = self.records.get(key)? else {
                continue;
            };
            let end = state.end.load(Ordering::Relaxed);
            let count = self
                .next_base(t.id, *partition, &key, end)
                .saturating_sub(*base);
            let bytes = state.bytes.load(Ordering::Relaxed)
                - (value.len() as u64).min(state.bytes.load(Ordering::Relaxed));
            let removed = state.removed.load(Ordering::Relaxed) + count;
            let mut qkey = vec![b'R'];
            qkey.extend_from_slice(&key);
            batch.insert(&quarantine, qkey, value.to_vec());
            batch.remove(&self.records, key.to_vec());
            batch.insert(
                &self.meta,
                meta::partition_key(t.id, *partition).to_vec(),
                meta::partition_value(end, bytes, removed).to_vec(),
            );
            self.pending_front(state, state.start.load(Ordering::Relaxed), bytes, removed);
            moved += 1;
        }
        for key in meta_keys {
            let Some(value) = self.meta.get(key)? else {
                continue;
            };
            let mut qkey = vec![b'M'];
            qkey.extend_from_slice(key);
            batch.insert(&quarantine, qkey, value.to_vec());
            batch.remove(&self.meta, key.clone());
            moved += 1;
        }
        batch
            .durability(Some(fjall::PersistMode::SyncAll))
            .commit()?;
        Ok(moved)
    }

    /// Writes a raw value into the records or meta keyspace (tests that need a damaged
    /// entry).
    #[cfg(test)]
    pub(crate) fn put_raw(&self, records: bool, key: &[u8], value: &[u8]) {
        let space = if records { &self.records } else { &self.meta };
        space.insert(key, value).expect("test write");
    }

    /// Up to `max` entries of the meta keyspace under `prefix` whose keys are > `after`
    /// (all from the start of the prefix when `after` is `None`), in key order.
    pub fn meta_page(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        max: usize,
    ) -> Result<Vec<MetaEntry>, LogError> {
        let mut out = Vec::new();
        let start = match after {
            Some(a) => std::ops::Bound::Excluded(a.to_vec()),
            None => std::ops::Bound::Included(prefix.to_vec()),
        };
        for item in self
            .meta
            .range::<Vec<u8>, _>((start, std::ops::Bound::Unbounded))
        {
            let (k, v) = item.into_inner()?;
            if !k.starts_with(prefix) || out.len() == max {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// The disk budget, if one is configured.
    pub fn budget(&self) -> Option<Budget> {
        self.budget
    }

    /// Entries of the meta keyspace under `prefix` (for the MQTT layer's durable state).
    pub fn meta_scan(&self, prefix: &[u8]) -> Result<Vec<MetaEntry>, LogError> {
        let mut out = Vec::new();
        for item in self.meta.prefix(prefix) {
            let (k, v) = item.into_inner()?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Deletes whole batches from the front of partitions: those older than their topic's
    /// retention and those beyond its byte retention; then, with the `drop-oldest` policy,
    /// the node's oldest batches until the disk budget holds. Called by the appender only.
    pub(crate) fn enforce_retention(&self, now_ms: u64) -> Result<(), LogError> {
        self.enforce_retention_at(now_ms, std::time::Instant::now())
    }

    /// Sets `storage.max_clock_jump`: a forward step of the wall clock larger than this
    /// between two retention runs is a correction, not time passing (see [`clock`]).
    pub fn set_max_clock_jump(&self, jump: Duration) {
        let mut c = self.retention_clock.lock().expect("clock lock");
        let stored = Some((c.jump_point_ms, c.skew_ms));
        *c =
            clock::RetentionClock::new(u64::try_from(jump.as_millis()).unwrap_or(u64::MAX), stored);
    }

    /// [`Log::enforce_retention`] with the monotonic clock given (tests jump the wall clock).
    pub(crate) fn enforce_retention_at(
        &self,
        now_ms: u64,
        mono: std::time::Instant,
    ) -> Result<(), LogError> {
        let mut batch = self.db.batch();
        let clock = {
            let mut c = self.retention_clock.lock().expect("clock lock");
            if c.observe(now_ms, mono) {
                // Stored at once, so a restart keeps the skew even if nothing is deleted.
                self.meta.insert(meta::RETENTION_CLOCK_KEY, c.value())?;
            }
            clock::RetentionClock::new(0, Some((c.jump_point_ms, c.skew_ms)))
        };
        let mut removed_records = 0u64;
        let mut freed = 0u64;
        let mut fronts = Vec::new();
        for t in &self.topics {
            if t.retention.is_none() && t.retention_bytes.is_none() {
                continue;
            }
            let max_age = t.retention.map(|r| r.as_millis() as u64);
            for (p, state) in t.partitions.iter().enumerate() {
                let p = p as u32;
                let mut bytes = state.bytes.load(Ordering::Relaxed);
                let mut removed = 0u64;
                let mut start = state.start.load(Ordering::Relaxed);
                let end = state.end.load(Ordering::Relaxed);
                let range = record_key(t.id, p, 0)..=record_key(t.id, p, u64::MAX);
                for item in self.records.range(range) {
                    let (k, v) = item.into_inner()?;
                    let base = offset_of_key(&k);
                    let (count, too_old) = match record::decode_header(&v) {
                        Ok(h) => (
                            h.record_count as u64,
                            max_age.is_some_and(|a| clock.age(now_ms, h.last_timestamp_ms) > a),
                        ),
                        // Its age is unknown and no reader can use it: at the front of a
                        // partition with an age limit it goes as the oldest would.
                        Err(why) => {
                            self.quarantine_batch(&t.name, p, &k, &why);
                            (
                                self.next_base(t.id, p, &k, end).saturating_sub(base),
                                max_age.is_some(),
                            )
                        }
                    };
                    let too_big = t.retention_bytes.is_some_and(|cap| bytes > cap);
                    if !too_old && !too_big {
                        break;
                    }
                    batch.remove(&self.records, k.to_vec());
                    bytes -= v.len() as u64;
                    removed += count;
                    start = base + count;
                }
                if removed > 0 {
                    let total_removed = state.removed.load(Ordering::Relaxed) + removed;
                    batch.insert(
                        &self.meta,
                        meta::partition_key(t.id, p).to_vec(),
                        meta::partition_value(end, bytes, total_removed).to_vec(),
                    );
                    freed += state.bytes.load(Ordering::Relaxed) - bytes;
                    removed_records += removed;
                    fronts.push((state, start, bytes, total_removed));
                }
            }
        }
        if removed_records > 0 {
            self.commit_deletions(batch)?;
            for (state, start, bytes, removed) in fronts {
                self.pending_front(state, start, bytes, removed);
            }
            self.total_bytes.fetch_sub(freed, Ordering::Relaxed);
            self.counters
                .retention_removed
                .fetch_add(removed_records, Ordering::Relaxed);
            tracing::info!(
                records = removed_records,
                bytes = freed,
                "retention deleted old records"
            );
        }
        self.enforce_budget()?;
        self.refresh_budget_flag();
        self.check_free_space_every(0, true);
        Ok(())
    }

    fn pending_front(&self, state: &PartitionState, start: u64, bytes: u64, removed: u64) {
        state.start.store(start, Ordering::Relaxed);
        state.bytes.store(bytes, Ordering::Relaxed);
        state.removed.store(removed, Ordering::Relaxed);
    }

    fn commit_deletions(&self, batch: fjall::OwnedWriteBatch) -> Result<(), LogError> {
        batch
            .durability(Some(fjall::PersistMode::Buffer))
            .commit()
            .map_err(|e| {
                self.poison(appender::CommitError::from_fjall(
                    "deleting old records",
                    &e,
                ));
                LogError::Storage(e)
            })
    }

    /// With the `drop-oldest` policy, deletes the node's oldest batches until the log and
    /// the other durable state fit. State is never dropped: when it alone is over the
    /// budget, every record goes and a warning says so (the state limits in `[mqtt]` are
    /// meant to keep it well below the budget).
    pub(crate) fn enforce_budget(&self) -> Result<(), LogError> {
        let Some(Budget {
            bytes: cap,
            policy: DiskFullPolicy::DropOldest,
        }) = self.budget
        else {
            return Ok(());
        };
        let mut dropped_records = 0u64;
        let mut dropped_bytes = 0u64;
        while self.budget_bytes() > cap {
            // The partition whose first batch is oldest.
            let mut oldest: Option<OldestBatch> = None;
            for t in &self.topics {
                for p in 0..t.partitions.len() as u32 {
                    let range = record_key(t.id, p, 0)..=record_key(t.id, p, u64::MAX);
                    if let Some(item) = self.records.range(range).next() {
                        let (k, v) = item.into_inner()?;
                        // A batch whose header does not decode counts as the oldest: no
                        // reader can use it, and its records are gone either way.
                        let (last_timestamp_ms, records) = match record::decode_header(&v) {
                            Ok(h) => (h.last_timestamp_ms, h.record_count as u64),
                            Err(why) => {
                                self.quarantine_batch(&t.name, p, &k, &why);
                                let end = t.partitions[p as usize].end.load(Ordering::Relaxed);
                                let next = self.next_base(t.id, p, &k, end);
                                (0, next.saturating_sub(offset_of_key(&k)))
                            }
                        };
                        if oldest
                            .as_ref()
                            .is_none_or(|o| last_timestamp_ms < o.last_timestamp_ms)
                        {
                            oldest = Some(OldestBatch {
                                last_timestamp_ms,
                                topic: t,
                                partition: p,
                                key: k.to_vec(),
                                len: v.len(),
                                records,
                            });
                        }
                    }
                }
            }
            let Some(OldestBatch {
                topic: t,
                partition: p,
                key,
                len,
                records: count,
                ..
            }) = oldest
            else {
                break;
            };
            let state = &t.partitions[p as usize];
            let bytes = state.bytes.load(Ordering::Relaxed) - len as u64;
            let removed = state.removed.load(Ordering::Relaxed) + count;
            let end = state.end.load(Ordering::Relaxed);
            let mut batch = self.db.batch();
            batch.remove(&self.records, key.clone());
            batch.insert(
                &self.meta,
                meta::partition_key(t.id, p).to_vec(),
                meta::partition_value(end, bytes, removed).to_vec(),
            );
            self.commit_deletions(batch)?;
            self.pending_front(state, offset_of_key(&key) + count, bytes, removed);
            self.total_bytes.fetch_sub(len as u64, Ordering::Relaxed);
            dropped_records += count;
            dropped_bytes += len as u64;
        }
        if self.budget_bytes() > cap && self.total_bytes() == 0 && dropped_records > 0 {
            tracing::warn!(
                state_bytes = self.state_bytes(),
                budget = cap,
                "sessions, queues and retained messages alone are over the disk budget: no record can be kept (lower the [mqtt] state limits or raise storage.disk_budget)"
            );
        }
        if dropped_records > 0 {
            self.counters
                .budget_dropped
                .fetch_add(dropped_records, Ordering::Relaxed);
            tracing::warn!(
                records = dropped_records,
                bytes = dropped_bytes,
                budget = cap,
                "disk budget reached: dropped the oldest records (policy drop-oldest)"
            );
        }
        Ok(())
    }

    /// Makes everything written so far durable.
    pub fn persist(&self) -> Result<(), LogError> {
        let ends: Vec<u64> = self
            .topics
            .iter()
            .flat_map(|t| t.partitions.iter().map(|p| p.end.load(Ordering::Acquire)))
            .collect();
        self.db.persist(fjall::PersistMode::SyncAll).map_err(|e| {
            self.poison(appender::CommitError::from_fjall("fsync", &e));
            LogError::Storage(e)
        })?;
        let partitions = self.topics.iter().flat_map(|t| t.partitions.iter());
        for (p, end) in partitions.zip(ends) {
            p.durable_end.fetch_max(end, Ordering::Release);
        }
        Ok(())
    }
}

fn recover_partition(
    records: &Keyspace,
    meta: &Keyspace,
    topic: TopicId,
    partition: u32,
) -> Result<PartitionState, LogError> {
    let (mut end, bytes, removed) = match meta.get(meta::partition_key(topic, partition))? {
        Some(v) => meta::parse_partition_value(&v)
            .ok_or_else(|| LogError::CorruptMeta(format!("partition {topic}/{partition}")))?,
        None => (0, 0, 0),
    };
    let range = record_key(topic, partition, 0)..=record_key(topic, partition, u64::MAX);
    let first = records.range(range.clone()).next();
    let start = match first {
        Some(item) => offset_of_key(&item.key()?),
        None => end,
    };
    if let Some(item) = records.range(range).next_back() {
        let (k, v) = item.into_inner()?;
        // A last batch whose header does not decode leaves the meta's end as the truth;
        // readers skip and count the batch (see `Log::quarantine_batch`).
        let last_end = match record::decode_header(&v) {
            Ok(h) => offset_of_key(&k) + h.record_count as u64,
            Err(why) => {
                tracing::error!(topic, partition, base_offset = offset_of_key(&k), error = %why, "the last batch of a partition does not decode; keeping the stored end offset");
                end.max(offset_of_key(&k))
            }
        };
        if last_end != end {
            // Cannot happen while batches and meta share a write batch; if it ever does, the
            // batches are the truth so that no offset is ever assigned twice.
            tracing::warn!(
                topic,
                partition,
                meta_end = end,
                batch_end = last_end,
                "partition meta disagrees with the log; using the log"
            );
            end = end.max(last_end);
        }
    }
    Ok(PartitionState {
        start: AtomicU64::new(start),
        end: AtomicU64::new(end),
        durable_end: AtomicU64::new(end),
        bytes: AtomicU64::new(bytes),
        removed: AtomicU64::new(removed),
    })
}

#[cfg(test)]
mod tests;
