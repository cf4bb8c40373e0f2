//! The group-commit appender: the only writer of the log.
//!
//! Connections send [`AppendRequest`]s (records already encoded by the connection, plus small
//! state changes such as QoS 2 markers) into one bounded channel. The appender takes the first
//! request, then everything else already queued, writes it all as one fjall write batch with
//! one fsync, and only then tells each requester. While a commit is in its fsync the next
//! group gathers, so the fsync rate adapts to the load: one fsync per publish when traffic is
//! light, hundreds of publishes per fsync under load. The bounded channel is the backpressure:
//! a connection whose send waits stops reading its socket.
//!
//! The appender thread ("log-appender") groups the requests, gives their records offsets and
//! encodes (compresses) the record batches, and commits the group: it adds the group's state
//! changes, writes and fsyncs it, updates the partitions and answers. A group large enough
//! that compressing it costs about as much as an fsync is committed instead by a second
//! thread ("log-commit"), while the first batches the next group: at most two groups are in
//! the appender at once, and they commit in the order they were received.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
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
    /// The request's record buffers, emptied (empty when it was not committed).
    pub spare: Spare,
}

/// A committed request's record buffers, emptied and handed back, so that the connection
/// that sent it can build a later request in them. The appender then frees nothing a
/// connection allocated: a free into another thread's malloc arena takes that arena's lock,
/// which the connections' threads take too as they allocate, and a group commit that waits
/// for that lock holds up every acknowledgement of the group.
#[derive(Debug, Default)]
pub struct Spare {
    /// For [`AppendRequest::records`].
    pub records: Vec<PendingRecord>,
    /// For [`AppendRequest::buf`].
    pub buf: Vec<u8>,
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

/// Encoded record bytes of a group (before compression) from which the batcher prepares the
/// next group while it commits, instead of waiting for the commit to gather it.
const PIPELINE_BYTES: usize = 128 << 10;

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
                run(log, fsync, compression, max_batch_records, first_seq, rx)
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

/// Runs the appender: the batcher on this thread, the committer's thread beside it, until
/// the batcher ends; then the final fsync.
fn run(
    log: Arc<Log>,
    fsync: FsyncMode,
    compression: Compression,
    max_batch_records: usize,
    first_seq: u64,
    mut rx: mpsc::Receiver<AppenderMsg>,
) -> Result<(), CommitError> {
    let mut batcher = Batcher::new(&log, compression, max_batch_records);
    let writer = Mutex::new(Writer::new(log, fsync, first_seq));
    let failed = OnceLock::new();
    // No buffer: a group is batched while the one before it commits, not further ahead.
    let (stages_tx, stages_rx) = std::sync::mpsc::sync_channel(0);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let committer = std::thread::Builder::new()
            .name("log-commit".into())
            .spawn_scoped(scope, || serve(&writer, stages_rx, done_tx, &failed))
            .expect("spawning the log committer thread");
        batcher.run(&mut rx, &writer, stages_tx, done_rx, &failed);
        committer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    });
    if let Some(why) = failed.get() {
        return Err(why.clone());
    }
    let writer = writer
        .into_inner()
        .map_err(|_| CommitError::Storage(Arc::from("the log committer panicked")))?;
    writer
        .log
        .persist()
        .map_err(|e| CommitError::from_log("the final fsync", &e))
}

/// The committer's thread: commits the groups the batcher hands it, in order, answering on
/// `done` after each; ends when the batcher is gone or a commit failed.
fn serve(
    writer: &Mutex<Writer>,
    groups: std::sync::mpsc::Receiver<Prepared>,
    done: std::sync::mpsc::Sender<()>,
    failed: &OnceLock<CommitError>,
) {
    while let Ok(prepared) = groups.recv() {
        let Ok(mut writer) = writer.lock() else {
            // The batcher panicked in a commit: it ends too.
            fail_requests(
                prepared.group,
                &CommitError::Storage(Arc::from("the log appender panicked")),
            );
            return;
        };
        if writer.commit_or_fail(prepared, failed).is_err() {
            // A group offered now fails here; once `groups` is dropped, the batcher's next
            // offer comes back to it and it fails the rest.
            drop(writer);
            let why = failed.get().cloned().unwrap_or(CommitError::Closed);
            while let Ok(p) = groups.try_recv() {
                fail_requests(p.group, &why);
            }
            return;
        }
        // The batcher may have ended (after a shutdown) without waiting.
        let _ = done.send(());
    }
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
            spare: Spare::default(),
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

/// A group the batcher has made ready for the committer: its record batches encoded, their
/// offsets given.
struct Prepared {
    group: Vec<AppendRequest>,
    /// (flat partition index, base offset, stored value), in offset order per partition.
    batches: Vec<(usize, u64, Vec<u8>)>,
    /// The partitions the group appends to, each with its end offset after the group and
    /// the bytes its batches add.
    ends: Vec<(usize, u64, u64)>,
    /// Per request: the offsets of its records when it has [`StateOp::Enqueue`] ops.
    offsets: Vec<Vec<u64>>,
}

/// The batcher: groups requests, gives their records offsets and encodes (compresses) the
/// batches. It alone gives out offsets, so its ends run ahead of the committed ones while a
/// large group commits on the committer's thread.
struct Batcher {
    compression: Compression,
    /// The compressed value of the batch being finished, reused from one batch to the next.
    compressed: Vec<u8>,
    max_batch_records: u32,
    /// First flat index of each topic.
    topic_base: Vec<usize>,
    builders: Vec<Option<Builder>>,
    touched: Vec<usize>,
    /// End offset of each partition after the groups handed on so far.
    ends: Vec<u64>,
    /// Offsets of the records of the request being batched that has Enqueue ops.
    offsets: Vec<u64>,
    /// Bytes the group's batches add to each partition.
    added: Vec<u64>,
}

impl Batcher {
    fn new(log: &Log, compression: Compression, max_batch_records: usize) -> Batcher {
        let mut topic_base = Vec::new();
        let mut ends = Vec::new();
        for t in log.topics() {
            topic_base.push(ends.len());
            ends.extend(t.partitions.iter().map(|p| p.end.load(Ordering::Acquire)));
        }
        Batcher {
            compression,
            compressed: Vec::new(),
            max_batch_records: max_batch_records as u32,
            topic_base,
            builders: (0..ends.len()).map(|_| None).collect(),
            touched: Vec::new(),
            added: vec![0; ends.len()],
            ends,
            offsets: Vec::new(),
        }
    }

    /// Takes requests as they come, a group at a time (the first, then everything already
    /// queued), batches each group and commits it: a small one on this thread once the
    /// committer is idle, exactly as one thread would; a large one on the committer's thread,
    /// so that this one batches the next meanwhile. Other messages run here, in order, once
    /// the groups before them are committed. Ends when every sender is gone or after a
    /// shutdown; after a failed commit, fails what it holds and everything queued.
    fn run(
        &mut self,
        rx: &mut mpsc::Receiver<AppenderMsg>,
        writer: &Mutex<Writer>,
        committer: std::sync::mpsc::SyncSender<Prepared>,
        done: std::sync::mpsc::Receiver<()>,
        failed: &OnceLock<CommitError>,
    ) {
        let mut group: Vec<AppendRequest> = Vec::new();
        let mut deferred: Vec<AppenderMsg> = Vec::new();
        // Groups handed to the committer, each answered on `done` once committed.
        let mut handed = 0usize;
        // Waits until the committer has committed every group handed to it.
        let committer_idle = |handed: &mut usize| -> bool {
            while *handed > 0 {
                if done.recv().is_err() {
                    return false;
                }
                *handed -= 1;
            }
            true
        };
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
                let prepared = self.batch(std::mem::take(&mut group));
                while done.try_recv().is_ok() {
                    handed -= 1;
                }
                let large = bytes >= PIPELINE_BYTES && self.compression != Compression::None;
                if large || handed > 0 {
                    // Compressing the next group takes about as long as this one's fsync:
                    // the committer's thread commits it while this one batches the next (and
                    // keeps doing so while it is busy, whatever the size of the groups).
                    if let Err(std::sync::mpsc::SendError(p)) = committer.send(prepared) {
                        return fail_rest(Some(p), deferred, rx, failed);
                    }
                    handed += 1;
                } else {
                    // A small group: the next one gathers while this one commits, and so holds
                    // everything that arrives meanwhile (no thread hand-over either).
                    if !committer_idle(&mut handed) {
                        return fail_rest(Some(prepared), deferred, rx, failed);
                    }
                    match writer.lock() {
                        Ok(mut w) => {
                            if w.commit_or_fail(prepared, failed).is_err() {
                                return fail_rest(None, deferred, rx, failed);
                            }
                        }
                        Err(_) => return fail_rest(Some(prepared), deferred, rx, failed),
                    }
                }
            }
            if deferred.is_empty() {
                continue;
            }
            if !committer_idle(&mut handed) {
                return fail_rest(None, deferred, rx, failed);
            }
            for msg in std::mem::take(&mut deferred) {
                let result = match writer.lock() {
                    Ok(mut w) => w.run_message(msg, rx, failed),
                    Err(_) => Err(()),
                };
                if result.is_err() {
                    return fail_rest(None, Vec::new(), rx, failed);
                }
            }
        }
    }

    /// Appends the group's records to per-partition batches (a new one every
    /// `max_batch_records`), giving each record its offset, and encodes the batches.
    fn batch(&mut self, group: Vec<AppendRequest>) -> Prepared {
        let mut batches = Vec::new();
        let mut offsets: Vec<Vec<u64>> = Vec::with_capacity(group.len());
        for req in &group {
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
                    batches.push(self.finish(flat));
                }
                let builder = match &mut self.builders[flat] {
                    Some(b) => b,
                    slot @ None => {
                        if !self.touched.contains(&flat) {
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
                        .push(self.ends[flat] + u64::from(builder.count));
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
                batches.push(self.finish(flat));
            }
        }
        let ends = self
            .touched
            .drain(..)
            .map(|f| (f, self.ends[f], std::mem::take(&mut self.added[f])))
            .collect();
        Prepared {
            group,
            batches,
            ends,
            offsets,
        }
    }

    /// Ends a partition's open batch: its records take the next offsets, and it is encoded.
    fn finish(&mut self, flat: usize) -> (usize, u64, Vec<u8>) {
        let b = self.builders[flat].take().expect("builder present");
        let base = self.ends[flat];
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
        self.ends[flat] = base + u64::from(b.count);
        self.added[flat] += value.len() as u64;
        (flat, base, value)
    }
}

/// Fails `requests`, each with `why`.
fn fail_requests(requests: impl IntoIterator<Item = AppendRequest>, why: &CommitError) {
    for req in requests {
        if let Some(reply) = req.reply {
            let _ = reply.tx.send(Committed {
                ticket: reply.ticket,
                outcome: Err(why.clone()),
                seqs: Vec::new(),
                spare: Spare::default(),
            });
        }
    }
}

/// The batcher's end after a failed commit: what it still holds and everything queued fails
/// with the commit's reason, and nothing more is taken.
fn fail_rest(
    unsent: Option<Prepared>,
    deferred: Vec<AppenderMsg>,
    rx: &mut mpsc::Receiver<AppenderMsg>,
    failed: &OnceLock<CommitError>,
) {
    let why = failed
        .get()
        .cloned()
        .unwrap_or_else(|| CommitError::Storage(Arc::from("the log appender panicked")));
    let appends = |msg: AppenderMsg| match msg {
        AppenderMsg::Append(req) => Some(req),
        _ => None,
    };
    if let Some(p) = unsent {
        fail_requests(p.group, &why);
    }
    fail_requests(deferred.into_iter().filter_map(appends), &why);
    rx.close();
    while let Ok(msg) = rx.try_recv() {
        fail_requests(appends(msg), &why);
    }
}

/// The committer, on the batcher's thread or the committer's (one at a time, behind a
/// mutex): writes each prepared group with its state changes as one fjall batch, makes it
/// durable, and only then tells the requesters.
struct Writer {
    log: Arc<Log>,
    fsync: FsyncMode,
    /// Flat partition index -> (topic, partition).
    flat: Vec<(TopicId, u32)>,
    /// Next [`StateOp::Enqueue`] seq.
    next_seq: u64,
}

impl Writer {
    fn new(log: Arc<Log>, fsync: FsyncMode, first_seq: u64) -> Writer {
        let mut flat = Vec::new();
        for t in log.topics() {
            for p in 0..t.partitions.len() as u32 {
                flat.push((t.id, p));
            }
        }
        Writer {
            log,
            fsync,
            flat,
            next_seq: first_seq,
        }
    }

    /// Commits a group; when that fails, poisons the log, fails the group's requests and
    /// records why in `failed` for everything after it.
    fn commit_or_fail(
        &mut self,
        mut prepared: Prepared,
        failed: &OnceLock<CommitError>,
    ) -> Result<(), ()> {
        match self.commit(&mut prepared) {
            Ok(()) => Ok(()),
            Err(why) => {
                self.fail(why, failed);
                fail_requests(prepared.group, failed.get().expect("just set"));
                Err(())
            }
        }
    }

    /// Runs a message other than an append (retention, an fsync, the shutdown).
    fn run_message(
        &mut self,
        msg: AppenderMsg,
        rx: &mut mpsc::Receiver<AppenderMsg>,
        failed: &OnceLock<CommitError>,
    ) -> Result<(), ()> {
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
        result.map_err(|why| self.fail(why, failed))
    }

    /// Poisons the log and records why, once.
    fn fail(&self, why: CommitError, failed: &OnceLock<CommitError>) {
        self.log.poison(why.clone());
        tracing::error!(error = %why, "log write failed: the log is poisoned, no further publishes are acknowledged");
        let _ = failed.set(why);
    }

    fn commit(&mut self, prepared: &mut Prepared) -> Result<(), CommitError> {
        let log = Arc::clone(&self.log);
        let group = &mut prepared.group;
        let mut batch = log.db.batch();
        for (flat, base, value) in prepared.batches.drain(..) {
            let (t, p) = self.flat[flat];
            batch.insert(&log.records, record_key(t, p, base).to_vec(), value);
        }
        // The partitions' sizes as retention and the budget left them, plus this group.
        let mut new_bytes = Vec::with_capacity(prepared.ends.len());
        let mut added_bytes = 0u64;
        for &(flat, end, added) in &prepared.ends {
            let (t, p) = self.flat[flat];
            let state = &log.topics[t as usize].partitions[p as usize];
            let bytes = state.bytes.load(Ordering::Relaxed) + added;
            added_bytes += added;
            new_bytes.push(bytes);
            batch.insert(
                &log.meta,
                meta::partition_key(t, p).to_vec(),
                meta::partition_value(end, bytes, state.removed.load(Ordering::Relaxed)).to_vec(),
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
                        value
                            .extend_from_slice(&prepared.offsets[i][record as usize].to_be_bytes());
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

        for (&(flat, end, _), bytes) in prepared.ends.iter().zip(new_bytes) {
            let (t, p) = self.flat[flat];
            let state = &log.topics[t as usize].partitions[p as usize];
            state.bytes.store(bytes, Ordering::Relaxed);
            state.end.store(end, Ordering::Release);
            if self.fsync == FsyncMode::Always {
                state.durable_end.store(end, Ordering::Release);
            }
        }
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
            let AppendRequest {
                mut records,
                mut buf,
                reply,
                ..
            } = req;
            if let Some(reply) = reply {
                records.clear();
                buf.clear();
                // A connection that went away no longer needs its acks.
                let _ = reply.tx.send(Committed {
                    ticket: reply.ticket,
                    outcome: Ok(()),
                    seqs,
                    spare: Spare { records, buf },
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
