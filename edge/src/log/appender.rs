//! The group-commit appender: the only writer of the log.
//!
//! Connections send [`AppendRequest`]s (records already encoded by the connection, plus small
//! state changes such as QoS 2 markers) into one bounded channel. One thread takes the first
//! request, then everything else already queued, writes it all as one fjall write batch with
//! one fsync, and only then tells each requester. While a commit is in its fsync the next
//! group gathers, so the fsync rate adapts to the load: one fsync per publish when traffic is
//! light, hundreds of publishes per fsync under load. The bounded channel is the backpressure:
//! a connection whose send waits stops reading its socket.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

use super::record::{
    encode_compressed_batch, finish_batch_in_place, BatchHeader, Compression, BATCH_HEADER_LEN,
};
use super::{meta, record_key, Log};
use crate::config::FsyncMode;
use crate::route::TopicId;

/// One encoded record inside an [`AppendRequest`]'s buffer.
#[derive(Debug, Clone, Copy)]
pub struct PendingRecord {
    /// Log topic.
    pub topic: TopicId,
    /// Partition.
    pub partition: u32,
    /// Start of the encoded record in the request buffer.
    pub start: u32,
    /// Its length.
    pub len: u32,
    /// Receive time.
    pub timestamp_ms: u64,
}

/// A change to the meta keyspace committed atomically with the records of the same group.
#[derive(Debug, Clone)]
pub enum StateOp {
    /// Set a key.
    Put {
        /// Full meta key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
    },
    /// Delete a key.
    Delete {
        /// Full meta key.
        key: Vec<u8>,
    },
    /// Delete every key that starts with `prefix`.
    DeletePrefix {
        /// Key prefix.
        prefix: Vec<u8>,
    },
    /// Queue a record of the same request for a session: puts `prefix | seq` (seq: u64
    /// big-endian, from a node-wide counter that grows in commit order) with the value
    /// `value | topic u32 | partition u32 | offset u64`, the record's position in the log.
    /// The seqs given out are reported back, in op order, in [`Committed::seqs`].
    Enqueue {
        /// Key prefix (the session's queue).
        prefix: Vec<u8>,
        /// Index of the record in the request's `records`.
        record: u32,
        /// Start of the value.
        value: Vec<u8>,
    },
}

/// Where the outcome of a request goes.
#[derive(Debug, Clone)]
pub struct ReplyTo {
    /// The requester's channel.
    pub tx: mpsc::UnboundedSender<Committed>,
    /// Echoed back so the requester can match the outcome to its request.
    pub ticket: u64,
}

/// The outcome of one request.
#[derive(Debug)]
pub struct Committed {
    /// The request's ticket.
    pub ticket: u64,
    /// `Err` when the log failed (now or earlier: it is then poisoned), or when the request
    /// holds a state key or value the log cannot store; nothing of the request is durable.
    pub outcome: Result<(), CommitError>,
    /// The seqs of the request's [`StateOp::Enqueue`] ops, in order.
    pub seqs: Vec<u64>,
}

/// Records and state changes that must become durable together.
#[derive(Debug, Default)]
pub struct AppendRequest {
    /// Records, in order, as ranges of `buf`.
    pub records: Vec<PendingRecord>,
    /// Encoded records.
    pub buf: Vec<u8>,
    /// State changes.
    pub state: Vec<StateOp>,
    /// Who to tell; `None` for fire-and-forget (QoS 0 only).
    pub reply: Option<ReplyTo>,
    /// Share of the node's in-flight append bytes this request holds; released when the
    /// appender is done with it.
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Why a request was not committed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommitError {
    /// The disk (or the user's quota) is full: a write failed with ENOSPC or EDQUOT. The log
    /// is poisoned.
    #[error("the disk is full: {0}")]
    DiskFull(Arc<str>),
    /// A write or fsync failed with an I/O error (EIO, a removed device, ...). The log is
    /// poisoned.
    #[error("a write to the disk failed: {0}")]
    Io(Arc<str>),
    /// The storage engine failed for another reason (it found damage, or the appender
    /// panicked). The log is poisoned.
    #[error("the log failed: {0}")]
    Storage(Arc<str>),
    /// This request holds state the log cannot store; nothing of it was written, and the log
    /// goes on with the next request.
    #[error("refused: {0}")]
    Refused(Arc<str>),
    /// The log is closed: the node is shutting down, or the appender has ended.
    #[error("the log is closed")]
    Closed,
}

impl CommitError {
    /// Classifies a storage error, with what was being done.
    pub(crate) fn from_fjall(doing: &str, e: &fjall::Error) -> CommitError {
        if matches!(e, fjall::Error::Poisoned) {
            // fjall poisons itself when a background write (journal fsync, memtable flush,
            // compaction) fails; it has logged the I/O error, and refuses every write since.
            return CommitError::Io(Arc::from(format!(
                "{doing}: the storage engine's background write failed earlier (its I/O error is logged above) and it refuses every write since"
            )));
        }
        let message: Arc<str> = Arc::from(format!("{doing}: {e}"));
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = source {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                return match io.raw_os_error() {
                    Some(libc::ENOSPC | libc::EDQUOT) => CommitError::DiskFull(message),
                    _ if io.kind() == std::io::ErrorKind::StorageFull => {
                        CommitError::DiskFull(message)
                    }
                    _ => CommitError::Io(message),
                };
            }
            source = err.source();
        }
        CommitError::Storage(message)
    }

    /// Classifies an error of the log.
    pub(crate) fn from_log(doing: &str, e: &super::LogError) -> CommitError {
        match e {
            super::LogError::Storage(e) => CommitError::from_fjall(doing, e),
            super::LogError::Poisoned(earlier) => earlier.clone(),
            other => CommitError::Storage(Arc::from(format!("{doing}: {other}"))),
        }
    }

    /// Whether the log is poisoned by it (everything but a refusal of one request).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, CommitError::Refused(_))
    }
}

/// The way into the log for everyone but the appender thread: a handle to its queue,
/// cheap to clone. Requests go in order; their outcomes come back in the same order.
#[derive(Debug, Clone)]
pub struct Appender {
    tx: mpsc::Sender<AppenderMsg>,
}

/// Why [`Appender::try_append`] did not queue a request.
#[derive(Debug)]
pub enum TryAppendError {
    /// The queue is full; the request is handed back (wait with [`Appender::append`]).
    Full(AppendRequest),
    /// The log is closed.
    Closed,
}

impl Appender {
    /// Queues a request without waiting for room; its outcome goes to its `reply`.
    pub fn try_append(&self, req: AppendRequest) -> Result<(), TryAppendError> {
        match self.tx.try_send(AppenderMsg::Append(req)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(AppenderMsg::Append(req))) => {
                Err(TryAppendError::Full(req))
            }
            Err(_) => Err(TryAppendError::Closed),
        }
    }

    /// Queues a request, waiting for room (the backpressure of the whole node); its outcome
    /// goes to its `reply`.
    pub async fn append(&self, req: AppendRequest) -> Result<(), CommitError> {
        self.tx
            .send(AppenderMsg::Append(req))
            .await
            .map_err(|_| CommitError::Closed)
    }

    /// [`Appender::append`] from a thread outside the async runtime.
    pub fn blocking_append(&self, req: AppendRequest) -> Result<(), CommitError> {
        self.tx
            .blocking_send(AppenderMsg::Append(req))
            .map_err(|_| CommitError::Closed)
    }

    /// Commits a request and waits until it is durable (or failed).
    pub async fn commit(&self, mut req: AppendRequest) -> Result<Committed, CommitError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        req.reply = Some(ReplyTo { tx, ticket: 0 });
        self.append(req).await?;
        let done = rx.recv().await.ok_or(CommitError::Closed)?;
        done.outcome.clone()?;
        Ok(done)
    }

    /// Commits state changes alone and waits until they are durable.
    pub async fn commit_state(&self, state: Vec<StateOp>) -> Result<(), CommitError> {
        self.commit(AppendRequest {
            state,
            ..Default::default()
        })
        .await
        .map(drop)
    }

    /// [`Appender::commit`] from a thread outside the async runtime.
    pub fn blocking_commit(&self, mut req: AppendRequest) -> Result<Committed, CommitError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        req.reply = Some(ReplyTo { tx, ticket: 0 });
        self.tx
            .blocking_send(AppenderMsg::Append(req))
            .map_err(|_| CommitError::Closed)?;
        let done = rx.blocking_recv().ok_or(CommitError::Closed)?;
        done.outcome.clone()?;
        Ok(done)
    }

    /// Asks for retention and the disk budget to be applied now.
    pub async fn apply_retention(&self) -> Result<(), CommitError> {
        self.send(AppenderMsg::Retention).await
    }

    /// Asks for an fsync now (the `interval` fsync mode's timer).
    pub async fn persist(&self) -> Result<(), CommitError> {
        self.send(AppenderMsg::Persist).await
    }

    /// [`Appender::persist`] from a thread outside the async runtime.
    pub fn blocking_persist(&self) -> Result<(), CommitError> {
        self.tx
            .blocking_send(AppenderMsg::Persist)
            .map_err(|_| CommitError::Closed)
    }

    /// Commits everything already queued, refuses anything later, fsyncs and ends the
    /// appender thread (join its handle to know how it ended).
    pub async fn shutdown(&self) {
        let _ = self.send(AppenderMsg::Shutdown).await;
    }

    /// [`Appender::shutdown`] from a thread outside the async runtime.
    pub fn blocking_shutdown(&self) {
        let _ = self.tx.blocking_send(AppenderMsg::Shutdown);
    }

    async fn send(&self, msg: AppenderMsg) -> Result<(), CommitError> {
        self.tx.send(msg).await.map_err(|_| CommitError::Closed)
    }
}

/// What the appender thread is asked to do.
#[derive(Debug)]
enum AppenderMsg {
    /// Append and, per the fsync mode, make durable.
    Append(AppendRequest),
    /// Apply retention and the disk budget now.
    Retention,
    /// fsync now (the `interval` fsync mode's timer).
    Persist,
    /// Commit everything already queued, refuse anything later, fsync and end.
    Shutdown,
}

/// Memtable bytes (active and sealed, all keyspaces) above which the appender waits for
/// fjall to flush before committing more; above the 16 MiB memtable plus fjall's own stall at
/// four sealed ones.
const WRITE_BUFFER_LIMIT: u64 = 96 << 20;

/// Limits of one group commit.
const MAX_GROUP_REQUESTS: usize = 4096;
const MAX_GROUP_BYTES: usize = 8 << 20;

/// Starts the appender thread. It runs until every sender is dropped, then fsyncs and ends.
/// When a write fails it poisons the log, fails the pending requests, fails every later one
/// and ends with the error; `on_fatal` is called once with the reason. `first_seq` is the
/// first [`StateOp::Enqueue`] seq it gives out: above every queue entry still stored.
pub fn spawn(
    log: Arc<Log>,
    fsync: FsyncMode,
    compression: Compression,
    max_batch_records: usize,
    capacity: usize,
    first_seq: u64,
    on_fatal: impl FnOnce(CommitError) + Send + 'static,
) -> (Appender, std::thread::JoinHandle<Result<(), CommitError>>) {
    let (tx, rx) = mpsc::channel(capacity);
    let handle = std::thread::Builder::new()
        .name("log-appender".into())
        .spawn(move || {
            // A panic here would otherwise leave the edge accepting publishes it can never
            // write; it is reported like any other fatal log error.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut writer = Writer::new(log, fsync, compression, max_batch_records, first_seq);
                writer.run(rx)
            }))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_string());
                Err(CommitError::Storage(Arc::from(format!(
                    "the log appender panicked: {what}"
                ))))
            });
            if let Err(why) = &result {
                on_fatal(why.clone());
            }
            result
        })
        .expect("spawning the appender thread");
    (Appender { tx }, handle)
}

/// The longest key fjall stores.
const MAX_META_KEY: usize = u16::MAX as usize;
/// The longest value fjall stores.
const MAX_META_VALUE: usize = u32::MAX as usize;

/// Why a request's state changes cannot be stored, if they cannot: a key or value beyond
/// what fjall holds. Callers check their inputs' limits first; this is the last line.
fn oversize_state(req: &AppendRequest) -> Option<CommitError> {
    req.state.iter().find_map(|op| {
        let (key_len, value_len) = match op {
            StateOp::Put { key, value } => (key.len(), value.len()),
            StateOp::Delete { key } => (key.len(), 0),
            StateOp::DeletePrefix { prefix } => (prefix.len(), 0),
            StateOp::Enqueue { prefix, value, .. } => (prefix.len() + 8, value.len() + 16),
        };
        (key_len > MAX_META_KEY || value_len > MAX_META_VALUE).then(|| {
            CommitError::Refused(Arc::from(format!(
                "a state key of {key_len} bytes or value of {value_len} bytes is more than the log stores ({MAX_META_KEY} / {MAX_META_VALUE})"
            )))
        })
    })
}

/// Answers a request that is not committed, without touching the log.
fn refuse(req: AppendRequest, why: CommitError) {
    tracing::warn!(error = %why, "append refused");
    if let Some(reply) = req.reply {
        let _ = reply.tx.send(Committed {
            ticket: reply.ticket,
            outcome: Err(why),
            seqs: Vec::new(),
        });
    }
}

struct Builder {
    /// Header placeholder, then the records: becomes the batch value in place.
    value: Vec<u8>,
    count: u32,
    first_ts: u64,
    last_ts: u64,
}

/// The appender thread's state.
struct Writer {
    log: Arc<Log>,
    fsync: FsyncMode,
    compression: Compression,
    /// The compressed value of the batch being finished, reused from one batch to the next.
    compressed: Vec<u8>,
    max_batch_records: u32,
    /// Flat partition index -> (topic, partition).
    flat: Vec<(TopicId, u32)>,
    /// First flat index of each topic.
    topic_base: Vec<usize>,
    builders: Vec<Option<Builder>>,
    touched: Vec<usize>,
    /// End offset and bytes of touched partitions during a commit.
    next_end: Vec<u64>,
    next_bytes: Vec<u64>,
    /// Next [`StateOp::Enqueue`] seq.
    next_seq: u64,
    /// Offsets of the records of the request being committed that has Enqueue ops.
    offsets: Vec<u64>,
}

impl Writer {
    fn new(
        log: Arc<Log>,
        fsync: FsyncMode,
        compression: Compression,
        max_batch_records: usize,
        first_seq: u64,
    ) -> Writer {
        let mut flat = Vec::new();
        let mut topic_base = Vec::new();
        for t in log.topics() {
            topic_base.push(flat.len());
            for p in 0..t.partitions.len() as u32 {
                flat.push((t.id, p));
            }
        }
        let n = flat.len();
        Writer {
            log,
            fsync,
            compression,
            compressed: Vec::new(),
            max_batch_records: max_batch_records as u32,
            flat,
            topic_base,
            builders: (0..n).map(|_| None).collect(),
            touched: Vec::new(),
            next_end: vec![0; n],
            next_bytes: vec![0; n],
            next_seq: first_seq,
            offsets: Vec::new(),
        }
    }

    fn run(&mut self, mut rx: mpsc::Receiver<AppenderMsg>) -> Result<(), CommitError> {
        let mut group: Vec<AppendRequest> = Vec::new();
        let mut deferred: Vec<AppenderMsg> = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut bytes = 0usize;
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    AppenderMsg::Append(req) => match oversize_state(&req) {
                        None => {
                            bytes += req.buf.len();
                            group.push(req);
                        }
                        // Refused alone, before it joins a group: fjall asserts on such a key,
                        // and the panic would poison the log for everyone.
                        Some(why) => refuse(req, why),
                    },
                    other => deferred.push(other),
                }
                if group.len() < MAX_GROUP_REQUESTS && bytes < MAX_GROUP_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            if !group.is_empty() {
                if let Err(why) = self.commit(&mut group) {
                    return Err(self.fail_all(why, &mut group, &mut rx));
                }
            }
            for msg in deferred.drain(..) {
                let result = match msg {
                    AppenderMsg::Retention => self
                        .log
                        .enforce_retention(now_ms())
                        .map_err(|e| CommitError::from_log("applying retention", &e)),
                    AppenderMsg::Persist => self
                        .log
                        .persist()
                        .map_err(|e| CommitError::from_log("fsync", &e)),
                    AppenderMsg::Shutdown => {
                        // Messages already queued are still received after close().
                        rx.close();
                        Ok(())
                    }
                    AppenderMsg::Append(_) => unreachable!("appends are grouped"),
                };
                if let Err(why) = result {
                    return Err(self.fail_all(why, &mut group, &mut rx));
                }
            }
        }
        self.log
            .persist()
            .map_err(|e| CommitError::from_log("the final fsync", &e))
    }

    /// Poisons the log and fails this group and everything that arrives later.
    fn fail_all(
        &mut self,
        why: CommitError,
        group: &mut Vec<AppendRequest>,
        rx: &mut mpsc::Receiver<AppenderMsg>,
    ) -> CommitError {
        self.log.poison(why.clone());
        tracing::error!(error = %why, "log write failed: the log is poisoned, no further publishes are acknowledged");
        let fail = |req: AppendRequest| {
            if let Some(reply) = req.reply {
                let _ = reply.tx.send(Committed {
                    ticket: reply.ticket,
                    outcome: Err(why.clone()),
                    seqs: Vec::new(),
                });
            }
        };
        group.drain(..).for_each(fail);
        rx.close();
        while let Ok(msg) = rx.try_recv() {
            if let AppenderMsg::Append(req) = msg {
                fail(req);
            }
        }
        why
    }

    fn commit(&mut self, group: &mut Vec<AppendRequest>) -> Result<(), CommitError> {
        let log = Arc::clone(&self.log);
        let mut batch = log.db.batch();
        let mut offsets: Vec<Vec<u64>> = Vec::new();
        for req in group.iter() {
            let wants_offsets = req
                .state
                .iter()
                .any(|op| matches!(op, StateOp::Enqueue { .. }));
            self.offsets.clear();
            for rec in &req.records {
                let flat = self.topic_base[rec.topic as usize] + rec.partition as usize;
                let full = self.builders[flat]
                    .as_ref()
                    .is_some_and(|b| b.count >= self.max_batch_records);
                if full {
                    self.flush_builder(flat, &mut batch);
                }
                let builder = match &mut self.builders[flat] {
                    Some(b) => b,
                    slot @ None => {
                        if !self.touched.contains(&flat) {
                            let (t, p) = self.flat[flat];
                            let state = &log.topics[t as usize].partitions[p as usize];
                            self.next_end[flat] = state.end.load(Ordering::Relaxed);
                            self.next_bytes[flat] = state.bytes.load(Ordering::Relaxed);
                            self.touched.push(flat);
                        }
                        let mut value = Vec::with_capacity(16 * 1024);
                        value.resize(BATCH_HEADER_LEN, 0);
                        slot.insert(Builder {
                            value,
                            count: 0,
                            first_ts: rec.timestamp_ms,
                            last_ts: rec.timestamp_ms,
                        })
                    }
                };
                let bytes = &req.buf[rec.start as usize..(rec.start + rec.len) as usize];
                builder.value.extend_from_slice(bytes);
                if wants_offsets {
                    self.offsets
                        .push(self.next_end[flat] + u64::from(builder.count));
                }
                builder.count += 1;
                builder.last_ts = builder.last_ts.max(rec.timestamp_ms);
            }
            offsets.push(if wants_offsets {
                std::mem::take(&mut self.offsets)
            } else {
                Vec::new()
            });
        }
        for i in 0..self.touched.len() {
            let flat = self.touched[i];
            if self.builders[flat].is_some() {
                self.flush_builder(flat, &mut batch);
            }
        }
        let mut added_bytes = 0u64;
        for &flat in &self.touched {
            let (t, p) = self.flat[flat];
            let state = &log.topics[t as usize].partitions[p as usize];
            added_bytes += self.next_bytes[flat] - state.bytes.load(Ordering::Relaxed);
            batch.insert(
                &log.meta,
                meta::partition_key(t, p).to_vec(),
                meta::partition_value(
                    self.next_end[flat],
                    self.next_bytes[flat],
                    state.removed.load(Ordering::Relaxed),
                )
                .to_vec(),
            );
        }

        // When this commit was made: after a power cut, the newest one that survived says
        // how far back the log went (logged at open).
        batch.insert(
            &log.meta,
            meta::LAST_COMMIT_KEY.to_vec(),
            meta::last_commit_value(now_ms()).to_vec(),
        );

        // A key written twice in one fjall batch would get one sequence number for both
        // versions, so the group's state changes are folded to one final value per key.
        let mut state: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        // Keys given out by `Enqueue` are new (their seq is), so their old size is not looked up.
        let mut fresh: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
        let mut seqs: Vec<Vec<u64>> = Vec::with_capacity(group.len());
        for (i, req) in group.iter_mut().enumerate() {
            let mut req_seqs = Vec::new();
            for op in req.state.drain(..) {
                match op {
                    StateOp::Enqueue {
                        mut prefix,
                        record,
                        mut value,
                    } => {
                        let rec = req.records[record as usize];
                        let seq = self.next_seq;
                        self.next_seq += 1;
                        req_seqs.push(seq);
                        prefix.extend_from_slice(&seq.to_be_bytes());
                        value.extend_from_slice(&rec.topic.to_be_bytes());
                        value.extend_from_slice(&rec.partition.to_be_bytes());
                        value.extend_from_slice(&offsets[i][record as usize].to_be_bytes());
                        fresh.insert(prefix.clone());
                        state.insert(prefix, Some(value));
                    }
                    StateOp::Put { key, value } => {
                        state.insert(key, Some(value));
                    }
                    StateOp::Delete { key } => {
                        state.insert(key, None);
                    }
                    StateOp::DeletePrefix { prefix } => {
                        for (k, v) in state.iter_mut() {
                            if k.starts_with(&prefix) {
                                *v = None;
                            }
                        }
                        let stored = log
                            .meta_scan(&prefix)
                            .map_err(|e| CommitError::from_log("reading state", &e))?;
                        for (k, _) in stored {
                            state.insert(k, None);
                        }
                    }
                }
            }
            seqs.push(req_seqs);
        }
        // The state's bytes after this commit (for the disk budget): each key's new size
        // against its stored one.
        let (mut state_added, mut state_freed) = (0u64, 0u64);
        for (k, v) in state {
            let stored = if fresh.contains(&k) {
                None
            } else {
                log.meta
                    .size_of(&k)
                    .map_err(|e| CommitError::from_fjall("reading state", &e))?
            };
            if let Some(old) = stored {
                state_freed += (k.len() + old as usize) as u64;
            }
            match v {
                Some(v) => {
                    state_added += (k.len() + v.len()) as u64;
                    batch.insert(&log.meta, k, v)
                }
                None => batch.remove(&log.meta, k),
            }
        }

        let mode = match self.fsync {
            FsyncMode::Always => fjall::PersistMode::SyncData,
            FsyncMode::Interval(_) | FsyncMode::Never => fjall::PersistMode::Buffer,
        };
        let started = std::time::Instant::now();
        batch
            .durability(Some(mode))
            .commit()
            .map_err(|e| CommitError::from_fjall("group commit", &e))?;
        let records: usize = group.iter().map(|r| r.records.len()).sum();
        log.counters
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        log.counters.commit_records.observe(records as f64);

        for &flat in &self.touched {
            let (t, p) = self.flat[flat];
            let state = &log.topics[t as usize].partitions[p as usize];
            state.bytes.store(self.next_bytes[flat], Ordering::Relaxed);
            state.end.store(self.next_end[flat], Ordering::Release);
            if self.fsync == FsyncMode::Always {
                state
                    .durable_end
                    .store(self.next_end[flat], Ordering::Release);
            }
        }
        self.touched.clear();
        log.total_bytes.fetch_add(added_bytes, Ordering::Relaxed);
        if state_added != state_freed {
            // One writer: a load and a store cannot race another change.
            let now = log.state_bytes.load(Ordering::Relaxed) + state_added;
            log.state_bytes
                .store(now.saturating_sub(state_freed), Ordering::Relaxed);
        }
        log.check_free_space_every(added_bytes, false);
        if log.budget.is_some() {
            log.enforce_budget()
                .map_err(|e| CommitError::from_log("applying the disk budget", &e))?;
            log.refresh_budget_flag();
        }
        self.bound_write_buffer()?;
        for (req, seqs) in group.drain(..).zip(seqs) {
            if let Some(reply) = req.reply {
                // A connection that went away no longer needs its acks.
                let _ = reply.tx.send(Committed {
                    ticket: reply.ticket,
                    outcome: Ok(()),
                    seqs,
                });
            }
        }
        Ok(())
    }

    /// fjall stalls writers when sealed memtables pile up, but not while the active memtable
    /// outgrows its size because the flush workers are behind, so a writer faster than the
    /// disk would hold an ever larger memtable in memory (measured here: 1.1 GiB after 2 GiB
    /// written). Waiting here before the next group commit makes the appender as slow as the
    /// flushes, the append budget fills, and connections stop reading their sockets.
    fn bound_write_buffer(&self) -> Result<(), CommitError> {
        let db = &self.log.db;
        if db.write_buffer_size() <= WRITE_BUFFER_LIMIT {
            return Ok(());
        }
        let _ = self.log.records.rotate_memtable();
        let started = std::time::Instant::now();
        let mut warned = false;
        let mut waits = 0u32;
        while db.write_buffer_size() > WRITE_BUFFER_LIMIT {
            std::thread::sleep(std::time::Duration::from_millis(2));
            waits += 1;
            // A background flush or compaction that failed (EIO, ENOSPC) poisons fjall and
            // the buffer never shrinks: fjall says so on the next persist, and the log is
            // failed instead of waiting forever with acknowledgements stopped.
            if waits.is_multiple_of(50) {
                db.persist(fjall::PersistMode::Buffer).map_err(|e| {
                    CommitError::from_fjall("the log's background flush or compaction", &e)
                })?;
            }
            if !warned && started.elapsed() > std::time::Duration::from_secs(30) {
                tracing::warn!(
                    bytes = db.write_buffer_size(),
                    "the log's memtables have waited 30 s for flushing; is the disk stalled?"
                );
                warned = true;
            }
        }
        Ok(())
    }

    fn flush_builder(&mut self, flat: usize, batch: &mut fjall::OwnedWriteBatch) {
        let b = self.builders[flat].take().expect("builder present");
        let (t, p) = self.flat[flat];
        let base = self.next_end[flat];
        let mut value = b.value;
        let header = BatchHeader {
            record_count: b.count,
            first_timestamp_ms: b.first_ts,
            last_timestamp_ms: b.last_ts,
        };
        // A batch that does not shrink is stored as it is: no decompression on every read.
        if encode_compressed_batch(
            header,
            &value[BATCH_HEADER_LEN..],
            self.compression,
            &mut self.compressed,
        ) {
            std::mem::swap(&mut value, &mut self.compressed);
        } else {
            finish_batch_in_place(header, &mut value);
        }
        self.next_end[flat] = base + b.count as u64;
        self.next_bytes[flat] += value.len() as u64;
        batch.insert(&self.log.records, record_key(t, p, base).to_vec(), value);
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(code: i32) -> fjall::Error {
        fjall::Error::Io(std::io::Error::from_raw_os_error(code))
    }

    #[test]
    fn storage_errors_are_told_apart_by_their_cause() {
        assert!(matches!(
            CommitError::from_fjall("group commit", &io(libc::ENOSPC)),
            CommitError::DiskFull(m) if m.starts_with("group commit")
        ));
        assert!(matches!(
            CommitError::from_fjall("fsync", &io(libc::EDQUOT)),
            CommitError::DiskFull(_)
        ));
        assert!(matches!(
            CommitError::from_fjall("fsync", &io(libc::EIO)),
            CommitError::Io(_)
        ));
        // Wrapped by the LSM tree: found through the source chain.
        let nested = fjall::Error::Storage(lsm_tree_io(libc::ENOSPC));
        assert!(matches!(
            CommitError::from_fjall("flush", &nested),
            CommitError::DiskFull(_)
        ));
        assert!(matches!(
            CommitError::from_fjall("group commit", &fjall::Error::Poisoned),
            CommitError::Io(m) if m.contains("background write failed")
        ));
        assert!(matches!(
            CommitError::from_fjall("open", &fjall::Error::Unrecoverable),
            CommitError::Storage(_)
        ));
        assert!(CommitError::from_fjall("x", &io(libc::EIO)).is_fatal());
        assert!(!CommitError::Refused("too long".into()).is_fatal());
    }

    fn lsm_tree_io(code: i32) -> fjall::LsmError {
        fjall::LsmError::Io(std::io::Error::from_raw_os_error(code))
    }
}
