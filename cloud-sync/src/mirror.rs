//! The mirror engine: one thread that copies every source partition to Kafka, in order,
//! inside Kafka transactions that also carry the partitions' checkpoints.
//!
//! # Protocol
//!
//! A *session* starts from nothing but the configuration and the cluster:
//! 1. create the checkpoint topic (compacted) and each mirrored topic with the source's
//!    partition count when missing; a topic with fewer partitions than the source is refused
//!    (its partitions are reported with the error, the others are mirrored);
//! 2. read the site's checkpoints `read_committed`: when the latest checkpoint of any
//!    partition was written by another log than the source (its identity, see
//!    [`crate::checkpoint::whose`]) and not adopted, the mirror refuses the whole site and
//!    stops here, before it could fence the edge that wrote them;
//! 3. `init_transactions` with the site's transactional id, which fences any earlier
//!    producer of the site and aborts its open transaction; then read the checkpoints again
//!    (now final) and judge them the same way: the last checkpoint of each source partition
//!    says where to resume (after an adopted predecessor's: at the source's offset 0);
//! 4. repeat: read up to the pacer's budget of records (what the link carries in
//!    `transaction_duration`, see [`crate::pacing`]) round-robin over the partitions (oldest
//!    first within each), produce them to the same partition numbers, wait for their acks,
//!    produce one checkpoint per partition touched (next source offset, Kafka offset of the
//!    last record), commit; then wait as long as the `bandwidth` cap asks.
//!
//! Records and checkpoints commit together or not at all, so the checkpoint read in step 3
//! always names exactly what Kafka holds: nothing is lost or duplicated however the edge, the
//! mirror or a broker fails. A transaction that fails is aborted and its records are read
//! again; an error the producer cannot recover from ends the session, and a new one starts
//! after a backoff that doubles up to `max_backoff`. While Kafka is unreachable the source
//! keeps its records; the backlog drains, oldest first, when the link returns.
//!
//! A record Kafka refuses for itself (too large, a timestamp out of bounds) is found and
//! taken out of the stream (dead-lettered, skipped, or its partition stopped, per
//! `on_rejected`; see [`crate::rejection`]), so it never holds the other records back.
//!
//! Records the source deleted (retention, disk budget) before they were mirrored are
//! counted per partition as `lost_before_mirror` and logged.
//!
//! A refusal (checkpoints of another log, or this mirror fenced twice within a minute: another
//! edge uses the site) ends the mirror thread's work until the mirror is stopped; it is in
//! the status (`refusal`, state `refused`) and decided again, from Kafka's checkpoints and
//! the source's identity, whenever a later run reads them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header as KafkaHeader, Message, OwnedHeaders};
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig,
};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use crate::checkpoint::{checkpoint_key, checkpoint_partition, whose, Checkpoint, Whose};
use crate::config::{MirrorConfig, OnRejected};
pub use crate::error::MirrorError;
use crate::groups;
use crate::kafka::{
    client_config, kind_of, lower_priority, report_client_error, with_extra, ReportingContext,
};
use crate::pacing::Pacer;
use crate::rejection::{self, Reason, Verdict};
use crate::shared::Shared;
use crate::source::{PartitionedSource, SourceIdentity, SourceRecord};
use crate::status::{
    now_ms, ErrorKind, LinkState, MirrorStatus, PartitionStatus, Refusal, RefusalReason,
};
use crate::translation::Run;

/// Records asked of the source per read.
const READ_CHUNK: usize = 1024;
/// How long an idle mirror waits between link checks.
const IDLE_HEALTH_CHECK: Duration = Duration::from_secs(10);
/// First backoff after a failure.
const MIN_BACKOFF: Duration = Duration::from_millis(500);
/// How often a session with refused partitions starts over to check them again.
const REFUSAL_RECHECK: Duration = Duration::from_secs(60);
/// A session that ran this long without failing resets the backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);
/// Fenced twice within this time, a mirror takes it that another edge uses its site.
const FENCE_LOOP: Duration = Duration::from_secs(60);

/// Why a session ended; the next one starts after a backoff.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    /// Not a failure: some partitions were refused, and the session starts over to see whether
    /// their Kafka topics were fixed.
    #[error("checking refused topics again")]
    Recheck,
    /// Kafka's checkpoints are not this log's: mirroring stops until an operator acts.
    #[error("{}", .0.message)]
    Refused(Refusal),
    /// Kafka or the mirror's dealings with it failed in step `kind`.
    #[error("{message}")]
    Kafka { kind: ErrorKind, message: String },
    /// Reading the edge's log failed.
    #[error("{0}")]
    Source(#[from] crate::source::SourceError),
}

impl SessionError {
    fn kind(&self) -> ErrorKind {
        match self {
            SessionError::Recheck => ErrorKind::Other,
            SessionError::Refused(_) => ErrorKind::Checkpoint,
            SessionError::Kafka { kind, .. } => *kind,
            SessionError::Source(_) => ErrorKind::Source,
        }
    }
}

/// A failure of `step`, as the mirror was `context`.
fn kafka(step: ErrorKind, context: &str, e: KafkaError) -> SessionError {
    SessionError::Kafka {
        kind: kind_of(step, &e),
        message: format!("{context}: {e}"),
    }
}

/// A failure in `step` that is not Kafka's own error.
fn failed(kind: ErrorKind, message: String) -> SessionError {
    SessionError::Kafka { kind, message }
}

/// A running mirror. Dropping it stops it.
pub struct Mirror {
    shared: Arc<Shared>,
    /// The mirror thread and, when groups are replicated, the group replicator.
    threads: Vec<JoinHandle<()>>,
    /// How many of them are still running.
    running: Arc<(Mutex<usize>, Condvar)>,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("site", &self.shared.config.site)
            .finish()
    }
}

impl Mirror {
    /// Checks `config` and starts mirroring `source`. Failures to reach Kafka do not fail
    /// this call: the mirror retries and reports them in [`Mirror::status`].
    pub fn start(
        config: MirrorConfig,
        source: Arc<dyn PartitionedSource>,
    ) -> Result<Mirror, MirrorError> {
        Mirror::start_after(config, source, None)
    }

    /// [`Mirror::start`], with the status the previous run left (as the edge keeps it on
    /// disk): until Kafka answers, the status shows the last known mirrored offsets instead of
    /// none, and the `lost_before_mirror` counts carry on. Where to resume is still decided by
    /// the checkpoints in Kafka alone.
    pub fn start_after(
        config: MirrorConfig,
        source: Arc<dyn PartitionedSource>,
        previous: Option<MirrorStatus>,
    ) -> Result<Mirror, MirrorError> {
        config
            .validate()
            .map_err(|(key, message)| MirrorError::Config { key, message })?;
        let topics = mirrored_topics(&config, source.as_ref());
        if let Some(wanted) = &config.topics {
            let missing: Vec<&String> = wanted
                .iter()
                .filter(|w| !topics.iter().any(|t| &t.name == *w))
                .collect();
            if !missing.is_empty() {
                return Err(MirrorError::Config {
                    key: "topics",
                    message: format!("{missing:?} are not topics of the edge log"),
                });
            }
        }
        let partitions = topics
            .iter()
            .flat_map(|t| {
                let kafka_topic = config.kafka_topic(&t.name);
                (0..t.partitions).map(move |p| PartitionStatus {
                    topic: t.name.clone(),
                    kafka_topic: kafka_topic.clone(),
                    partition: p,
                    edge_start_offset: 0,
                    edge_end_offset: 0,
                    mirrored_offset: None,
                    last_kafka_offset: None,
                    lag_records: 0,
                    lag_bytes: 0,
                    lost_before_mirror: 0,
                    loss_counted_until: 0,
                    error: None,
                })
            })
            .collect::<Vec<PartitionStatus>>();
        let mut partitions = partitions;
        let mut groups = Vec::new();
        let log_id = source.identity().map(|i| i.id);
        let mut refusal = None;
        if let Some(previous) = previous.filter(|p| p.site == config.site) {
            // Until Kafka answers, a refusal the last run decided stays on show (the next
            // read of the checkpoints decides again).
            refusal = previous.refusal.filter(|_| previous.log_id == log_id);
            // What was last replicated stays on show until the first round.
            groups = previous.groups;
            for p in &mut partitions {
                if let Some(old) = previous.partitions.iter().find(|o| {
                    o.topic == p.topic
                        && o.partition == p.partition
                        && o.kafka_topic == p.kafka_topic
                }) {
                    p.mirrored_offset = old.mirrored_offset;
                    p.last_kafka_offset = old.last_kafka_offset;
                    p.lost_before_mirror = old.lost_before_mirror;
                    p.loss_counted_until = old.loss_counted_until;
                }
            }
        }
        let status = MirrorStatus {
            site: config.site.clone(),
            bootstrap: config.bootstrap.clone(),
            state: LinkState::Starting,
            last_error: None,
            last_error_kind: None,
            last_error_at_ms: None,
            last_healthy_at_ms: None,
            updated_at_ms: now_ms(),
            transactions: 0,
            records_mirrored: 0,
            bytes_mirrored: 0,
            records_rejected: Default::default(),
            progress_at_ms: None,
            stalled: false,
            partitions,
            groups,
            log_id,
            refusal,
        };
        let shared = Arc::new(Shared::new(config, source, status));
        let running = Arc::new((Mutex::new(0usize), Condvar::new()));
        let spawn = |name: &str, body: fn(&Arc<Shared>)| {
            let shared = shared.clone();
            let ended = running.clone();
            *running.0.lock().expect("running lock") += 1;
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    body(&shared);
                    *ended.0.lock().expect("running lock") -= 1;
                    ended.1.notify_all();
                })
                .map_err(|e| {
                    *running.0.lock().expect("running lock") -= 1;
                    MirrorError::Thread(e)
                })
        };
        let mut threads = vec![spawn("mirror", |shared| {
            run(shared);
            shared.set_state(LinkState::Stopped);
        })?];
        if !shared.config.group_sync_interval.is_zero() {
            match spawn("group-sync", groups::replicate) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    shared.request_stop();
                    return Err(e);
                }
            }
        }
        Ok(Mirror {
            shared,
            threads,
            running,
        })
    }

    /// Durations of the transaction commits (Kafka's `EndTxn`), in seconds.
    pub fn commit_latency(&self) -> &Histogram {
        &self.shared.commit_seconds
    }

    /// A snapshot of where every partition stands, with the source's current ends.
    pub fn status(&self) -> MirrorStatus {
        let mut s = self.shared.status.lock().expect("status lock").clone();
        s.refresh_from(self.shared.source.as_ref());
        s.updated_at_ms = now_ms();
        let stall_ms = self.shared.config.stall_timeout.as_millis() as u64;
        s.stalled = s.state == LinkState::Mirroring && s.is_stalled(s.updated_at_ms, stall_ms);
        s
    }

    /// Stops the mirror: an open transaction is finished or aborted, and no new one starts.
    /// Waits up to `grace` for its threads; a thread still blocked on Kafka after that is left
    /// to end with the process (the checkpoint in Kafka keeps the mirror exact either way).
    /// Returns the last status.
    pub fn stop(mut self, grace: Duration) -> MirrorStatus {
        self.request_stop();
        let (lock, cv) = &*self.running;
        let finished = cv
            .wait_timeout_while(lock.lock().expect("running lock"), grace, |n| *n > 0)
            .map(|(n, _)| *n == 0)
            .unwrap_or(false);
        if finished {
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        } else {
            warn!(
                "mirror: still waiting on Kafka after {:?}; leaving it to stop with the process",
                grace
            );
            self.threads.clear();
        }
        self.status()
    }

    fn request_stop(&self) {
        self.shared.request_stop();
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.request_stop();
        // A mirror dropped without `stop` does not wait: the checkpoint keeps it exact.
    }
}

fn mirrored_topics(
    config: &MirrorConfig,
    source: &dyn PartitionedSource,
) -> Vec<crate::source::SourceTopic> {
    source
        .topics()
        .into_iter()
        .filter(|t| config.topics.as_ref().is_none_or(|w| w.contains(&t.name)))
        .collect()
}

fn run(shared: &Arc<Shared>) {
    lower_priority();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            shared.record_error(
                ErrorKind::Other,
                format!("starting the mirror's runtime: {e}"),
            );
            return;
        }
    };
    let mut backoff = MIN_BACKOFF;
    let config = &shared.config;
    let mut pacer = Pacer::new(
        config.transaction_duration(),
        config.transaction_bytes,
        config.bandwidth,
    );
    let mut after_failure = true;
    let mut last_fenced: Option<Instant> = None;
    while !shared.stopping() {
        shared.set_state(LinkState::Starting);
        let started = Instant::now();
        shared.clear_client_errors();
        match Session::run(shared, &runtime, &mut pacer, after_failure) {
            Ok(()) => break,
            Err(SessionError::Recheck) => after_failure = false,
            Err(SessionError::Refused(refusal)) => {
                refuse(shared, refusal);
                return;
            }
            Err(e)
                if e.kind() == ErrorKind::Fenced
                    && last_fenced.is_some_and(|at| at.elapsed() < FENCE_LOOP) =>
            {
                let config = &shared.config;
                let message = format!(
                    "another edge uses site {site} (or its transactional id \"{tid}\"): this \
                     mirror was fenced twice within {FENCE_LOOP:?} by another producer with that \
                     transactional id ({e}); mirroring stops until this edge restarts, ingest goes \
                     on. Give one of the edges another cloud.site. On restart this mirror \
                     resumes only from checkpoints its own log wrote (see edge mirror-status)",
                    site = config.site,
                    tid = config.transactional_id,
                );
                refuse(
                    shared,
                    Refusal {
                        reason: RefusalReason::DuplicateSite,
                        message,
                        foreign_log: None,
                        checkpoints: Vec::new(),
                        at_ms: now_ms(),
                    },
                );
                return;
            }
            Err(e) => {
                if e.kind() == ErrorKind::Fenced {
                    last_fenced = Some(Instant::now());
                }
                after_failure = true;
                if started.elapsed() >= HEALTHY_SESSION {
                    backoff = MIN_BACKOFF;
                }
                let client = shared.take_client_errors();
                let message = if client.is_empty() {
                    e.to_string()
                } else {
                    format!("{e} (Kafka client: {})", client.join("; "))
                };
                warn!(
                    site = %shared.config.site,
                    "mirror to {} failed: {message}; retrying in {:?}",
                    shared.config.bootstrap, backoff
                );
                shared.record_error(e.kind(), message);
                shared.set_state(LinkState::Retrying);
                shared.sleep(backoff);
                backoff = (backoff * 2).min(shared.config.max_backoff.max(MIN_BACKOFF));
            }
        }
    }
}

/// Stops mirroring for `refusal` until the mirror is stopped: the status says why (every
/// partition's error too), and nothing more is sent to Kafka.
fn refuse(shared: &Arc<Shared>, refusal: Refusal) {
    warn!(site = %shared.config.site, "mirror refused: {}", refusal.message);
    shared.record_error(
        match refusal.reason {
            RefusalReason::ForeignLog => ErrorKind::Checkpoint,
            RefusalReason::DuplicateSite => ErrorKind::Fenced,
        },
        refusal.message.clone(),
    );
    {
        let mut status = shared.status.lock().expect("status lock");
        for p in &mut status.partitions {
            p.error = Some(refusal.message.clone());
        }
        status.refusal = Some(refusal);
        status.state = LinkState::Refused;
    }
    while !shared.stopping() {
        shared.sleep(Duration::from_secs(3600));
    }
}

/// Delivery reports of the transaction in flight, and errors librdkafka reports globally.
struct MirrorContext {
    shared: Arc<Shared>,
    /// Per slot, the highest Kafka offset acknowledged in this transaction (-1: none).
    delivered: Vec<AtomicI64>,
    /// Per slot, the lowest Kafka offset acknowledged in this transaction (`i64::MAX`: none)
    /// and how many records were: together with the highest, whether the transaction's
    /// records of the slot landed at consecutive offsets (see [`Run::verified`]).
    delivered_min: Vec<AtomicI64>,
    delivered_count: Vec<AtomicU64>,
    /// The first delivery failure of this transaction.
    failure: Mutex<Option<KafkaError>>,
    /// The records of this transaction Kafka refused for themselves.
    refused: Mutex<Vec<RecordRefusal>>,
}

/// What a produced record was, as its delivery report tells.
#[derive(Debug, Clone, Copy)]
enum Sent {
    /// Source record `offset` of slot `slot`, to its mirrored topic.
    Record { slot: usize, offset: u64 },
    /// The same, to the dead-letter topic.
    DeadLetter { slot: usize, offset: u64 },
    /// A checkpoint.
    Checkpoint,
}

/// A record Kafka refused for itself.
#[derive(Debug, Clone)]
struct RecordRefusal {
    slot: usize,
    offset: u64,
    reason: Reason,
    error: String,
    /// The dead-letter topic refused it (not its own topic).
    dead_letter: bool,
}

impl ClientContext for MirrorContext {
    fn error(&self, error: KafkaError, reason: &str) {
        report_client_error(&self.shared, &error, reason);
    }
}

impl ProducerContext for MirrorContext {
    type DeliveryOpaque = Box<Sent>;

    fn delivery(&self, result: &DeliveryResult<'_>, sent: Box<Sent>) {
        match result {
            Ok(m) => {
                if let Sent::Record { slot, .. } = *sent {
                    self.delivered[slot].fetch_max(m.offset(), Ordering::Relaxed);
                    self.delivered_min[slot].fetch_min(m.offset(), Ordering::Relaxed);
                    self.delivered_count[slot].fetch_add(1, Ordering::Relaxed);
                }
            }
            Err((e, _)) => {
                let reason = e.rdkafka_error_code().and_then(Reason::of);
                let origin = match *sent {
                    Sent::Record { slot, offset } => Some((slot, offset, false)),
                    Sent::DeadLetter { slot, offset } => Some((slot, offset, true)),
                    Sent::Checkpoint => None,
                };
                if let (Some(reason), Some((slot, offset, dead_letter))) = (reason, origin) {
                    self.refused
                        .lock()
                        .expect("refused lock")
                        .push(RecordRefusal {
                            slot,
                            offset,
                            reason,
                            error: e.to_string(),
                            dead_letter,
                        });
                }
                let mut f = self.failure.lock().expect("failure lock");
                if f.is_none() {
                    *f = Some(e.clone());
                }
            }
        }
    }
}

/// One source partition of a session.
struct Slot {
    topic: String,
    kafka_topic: String,
    partition: u32,
    /// Index in the status' partition list.
    status_index: usize,
    /// Next source offset to read.
    next: u64,
    /// Next source offset not committed to Kafka.
    committed: u64,
    /// Kafka offset of the last record committed (-1: none yet).
    last_kafka_offset: i64,
    /// Why the partition is not mirrored in this session.
    refused: Option<String>,
    /// Whether Kafka held a checkpoint for this partition at session start.
    checkpointed: bool,
    /// The latest checkpoint Kafka held for it at session start, as read.
    latest: Option<Checkpoint>,
    /// First source offset sent in the open transaction.
    txn_first: u64,
    /// Records sent to the mirrored topic in the open transaction.
    txn_records: u64,
}

/// A refused record the open transaction takes out of the stream.
struct Diverted {
    slot: usize,
    offset: u64,
    reason: Reason,
    error: String,
    /// What became of it, for the log.
    fate: &'static str,
}

/// What a committed transaction carried.
struct Committed {
    bytes: usize,
    elapsed: Duration,
    /// It carried its whole budget.
    full: bool,
}

struct Session<'a> {
    shared: &'a Arc<Shared>,
    producer: BaseProducer<MirrorContext>,
    slots: Vec<Slot>,
    checkpoint_partition: i32,
    pacer: &'a mut Pacer,
    /// What this session learnt of records Kafka refused, by (slot, source offset).
    verdicts: HashMap<(usize, u64), Verdict>,
    /// The dead-letter topic (with `on_rejected = "dead-letter"`).
    dead_letter_topic: String,
    /// Refused records the open transaction diverts.
    diverted: Vec<Diverted>,
}

impl<'a> Session<'a> {
    fn run(
        shared: &'a Arc<Shared>,
        runtime: &tokio::runtime::Runtime,
        pacer: &'a mut Pacer,
        after_failure: bool,
    ) -> Result<(), SessionError> {
        let config = &shared.config;
        let source = shared.source.as_ref();
        let mut slots = Vec::new();
        for (status_index, p) in shared
            .status
            .lock()
            .expect("status lock")
            .partitions
            .iter()
            .enumerate()
        {
            slots.push(Slot {
                topic: p.topic.clone(),
                kafka_topic: p.kafka_topic.clone(),
                partition: p.partition,
                status_index,
                next: 0,
                committed: 0,
                last_kafka_offset: -1,
                refused: None,
                checkpointed: false,
                latest: None,
                txn_first: 0,
                txn_records: 0,
            });
        }

        let context = MirrorContext {
            shared: shared.clone(),
            delivered: (0..slots.len()).map(|_| AtomicI64::new(-1)).collect(),
            delivered_min: (0..slots.len()).map(|_| AtomicI64::new(i64::MAX)).collect(),
            delivered_count: (0..slots.len()).map(|_| AtomicU64::new(0)).collect(),
            failure: Mutex::new(None),
            refused: Mutex::new(Vec::new()),
        };
        let timeout_ms = config.request_timeout.as_millis().max(1000);
        let mut pc = client_config(config);
        pc.set("transactional.id", &config.transactional_id)
            .set("enable.idempotence", "true")
            .set("compression.type", &config.compression)
            .set("batch.size", config.batch_bytes.to_string())
            .set("linger.ms", config.linger.as_millis().to_string())
            .set("transaction.timeout.ms", (timeout_ms * 2).to_string())
            .set("message.timeout.ms", (timeout_ms * 2).to_string())
            .set("queue.buffering.max.kbytes", "262144")
            .set(
                "message.max.bytes",
                config.max_message_bytes.max(config.batch_bytes).to_string(),
            );
        let producer: BaseProducer<MirrorContext> = with_extra(pc, config)
            .create_with_context(context)
            .map_err(|e| kafka(ErrorKind::Other, "creating the Kafka producer", e))?;
        // Reach the cluster first: a failure here is served as error events (authentication,
        // name resolution), which say more than the admin client's time-out would.
        if let Err(e) = producer
            .client()
            .fetch_metadata(None, config.request_timeout)
        {
            producer.poll(Duration::from_millis(100));
            return Err(kafka(
                ErrorKind::Connect,
                &format!("connecting to {}", config.bootstrap),
                e,
            ));
        }
        let topics = ensure_topics(shared, runtime, &mut slots)?;
        let checkpoint_partition = checkpoint_partition(&config.site, topics.checkpoint_partitions);
        // Before fencing anyone: a mirror whose site's checkpoints are another log's stops
        // here, without taking the transactional id from the edge that wrote them.
        let read = read_checkpoints(
            shared,
            &slots,
            &config.checkpoint_topic,
            checkpoint_partition,
        )?;
        judge(shared, &slots, &read).map_err(SessionError::Refused)?;
        producer
            .init_transactions(config.request_timeout)
            .map_err(|e| {
                kafka(
                    ErrorKind::Transaction,
                    &format!(
                        "starting transactions at {} (transactional id \"{}\")",
                        config.bootstrap, config.transactional_id
                    ),
                    e,
                )
            })?;

        let mut session = Session {
            shared,
            producer,
            slots,
            checkpoint_partition,
            pacer,
            verdicts: HashMap::new(),
            dead_letter_topic: config.dead_letter_topic(),
            diverted: Vec::new(),
        };
        session.load_checkpoints(topics.legacy_partitions)?;
        session.position(source)?;
        shared.healthy();
        if after_failure {
            shared.status.lock().expect("status lock").progress_at_ms = Some(now_ms());
        }
        info!(
            site = %config.site,
            "mirroring {} partitions to {}",
            session.slots.iter().filter(|s| s.refused.is_none()).count(),
            config.bootstrap
        );
        session.mirror_loop()
    }

    /// Reads the site's checkpoints (read_committed) to find where each partition resumes.
    /// While its own topic holds none, the checkpoints of the site in the shared topic of
    /// earlier versions (with `legacy_partitions` partitions, if it exists) are read instead
    /// and copied to its own topic in a transaction of their own, so the next start reads
    /// its own topic only. Checkpoints of another log (see [`judge`]) refuse the session.
    fn load_checkpoints(&mut self, legacy_partitions: Option<i32>) -> Result<(), SessionError> {
        let config = &self.shared.config;
        let own = (config.checkpoint_topic.clone(), self.checkpoint_partition);
        let mut read = read_checkpoints(self.shared, &self.slots, &own.0, own.1)?;
        let mut copy = false;
        if read.per_slot.iter().all(Vec::is_empty) {
            if let (Some(legacy), Some(partitions)) =
                (&config.legacy_checkpoint_topic, legacy_partitions)
            {
                let partition = checkpoint_partition(&config.site, partitions);
                read = read_checkpoints(self.shared, &self.slots, legacy, partition)?;
                let found: usize = read.per_slot.iter().map(Vec::len).sum();
                if found > 0 {
                    info!(
                        site = %config.site,
                        "mirror: read {found} checkpoints of this site from {legacy} (the topic \
                         all sites shared before); copying them to {}",
                        config.checkpoint_topic
                    );
                    copy = true;
                }
            }
        }
        let verdicts = judge(self.shared, &self.slots, &read).map_err(SessionError::Refused)?;
        let mut translations = self.shared.translations.lock().expect("translations lock");
        let mut status = self.shared.status.lock().expect("status lock");
        for ((slot, checkpoints), verdict) in
            self.slots.iter_mut().zip(&read.per_slot).zip(verdicts)
        {
            let Some(latest) = checkpoints.last() else {
                translations[slot.status_index].resume(&[]);
                continue;
            };
            slot.checkpointed = true;
            slot.latest = Some(latest.clone());
            slot.last_kafka_offset = latest.last_kafka_offset;
            let ps = &mut status.partitions[slot.status_index];
            if verdict == Whose::Predecessor {
                // The predecessor's offsets are not this log's: all of this log follows its
                // records, from this log's first offset (records it deleted before they
                // were mirrored are counted as lost when reading).
                slot.committed = 0;
                slot.next = 0;
                translations[slot.status_index].resume(&[]);
            } else {
                slot.committed = latest.next_edge_offset;
                slot.next = latest.next_edge_offset;
                let own: Vec<(u64, i64)> = checkpoints
                    .iter()
                    .filter(|c| whose(c, read.identity.as_ref()) == Whose::Own)
                    .map(|c| (c.next_edge_offset, c.last_kafka_offset))
                    .collect();
                translations[slot.status_index].resume(&own);
            }
            ps.mirrored_offset = Some(slot.committed);
            ps.last_kafka_offset = (slot.last_kafka_offset >= 0).then_some(slot.last_kafka_offset);
        }
        status.refusal = None;
        drop(status);
        drop(translations);
        if copy {
            self.copy_checkpoints().map_err(|e| match e {
                TxnFailure::Aborted(kind, message) => SessionError::Kafka { kind, message },
                TxnFailure::Fatal(e) => e,
            })?;
        }
        Ok(())
    }

    /// Writes the latest checkpoint of every partition that has one, as read, in a
    /// transaction of its own.
    fn copy_checkpoints(&mut self) -> Result<(), TxnFailure> {
        self.producer
            .begin_transaction()
            .map_err(TxnFailure::from)?;
        let config = &self.shared.config;
        for checkpoint in self.slots.iter().filter_map(|s| s.latest.as_ref()) {
            let key = checkpoint.key();
            let value = checkpoint.value();
            let record =
                BaseRecord::with_opaque_to(&config.checkpoint_topic, Box::new(Sent::Checkpoint))
                    .partition(self.checkpoint_partition)
                    .key(&key)
                    .payload(&value);
            if let Some((reason, e)) = self.send(record)? {
                return Err(TxnFailure::Aborted(
                    ErrorKind::Checkpoint,
                    format!("Kafka refused a checkpoint ({}): {e}", reason.label()),
                ));
            }
        }
        self.wait_acks(true)?;
        self.commit()
    }

    /// Settles each partition's start against what the source holds.
    fn position(&mut self, source: &dyn PartitionedSource) -> Result<(), SessionError> {
        for slot in &mut self.slots {
            let bounds = source.bounds(&slot.topic, slot.partition)?;
            let mut status = self.shared.status.lock().expect("status lock");
            let ps = &mut status.partitions[slot.status_index];
            if !slot.checkpointed {
                // Nothing of this partition in Kafka yet: start where the mirror first found
                // it (an earlier session's or run's status), or with the oldest record held.
                // Records deleted since that first look are counted as lost when reading.
                let base = ps
                    .mirrored_offset
                    .filter(|&b| b <= bounds.end)
                    .unwrap_or(bounds.start);
                slot.committed = base;
                slot.next = base;
                ps.mirrored_offset = Some(base);
            }
            if slot.committed > bounds.end {
                let message = format!(
                    "Kafka's checkpoint says edge offsets up to {} of {}/{} are mirrored, but the \
                     edge log ends at {}: the edge log was reset or lost records after they \
                     were mirrored; mirror this log under a new site name",
                    slot.committed, slot.topic, slot.partition, bounds.end
                );
                warn!("mirror: {message}");
                slot.refused = Some(message.clone());
                ps.error = Some(message);
            } else if slot.refused.is_none() {
                ps.error = None;
            }
        }
        Ok(())
    }

    fn mirror_loop(&mut self) -> Result<(), SessionError> {
        let started = Instant::now();
        let mut round = 0usize;
        let mut last_health = Instant::now();
        let mut abort_backoff = MIN_BACKOFF;
        loop {
            if self.shared.stopping() {
                return Ok(());
            }
            if started.elapsed() >= REFUSAL_RECHECK
                && self.slots.iter().any(|s| s.refused.is_some())
            {
                return Err(SessionError::Recheck);
            }
            if !self.has_work()? {
                if last_health.elapsed() >= IDLE_HEALTH_CHECK {
                    self.check_link()?;
                    last_health = Instant::now();
                }
                self.producer.poll(Duration::ZERO);
                self.shared.sleep(self.shared.config.linger);
                continue;
            }
            round = round.wrapping_add(1);
            self.diverted.clear();
            match self.transact(round) {
                Ok(done) => {
                    abort_backoff = MIN_BACKOFF;
                    last_health = Instant::now();
                    let wait = self.pacer.committed(done.bytes, done.elapsed, done.full);
                    self.wait_between_transactions(wait);
                }
                Err(TxnFailure::Aborted(kind, message)) => {
                    self.abort().map_err(|e| {
                        kafka(ErrorKind::Transaction, "aborting a failed transaction", e)
                    })?;
                    for slot in &mut self.slots {
                        slot.next = slot.committed;
                    }
                    if self.learn_refusals() {
                        // Some records were refused for themselves: the next attempt treats
                        // them apart, at once.
                        debug!("mirror: transaction aborted on refused records: {message}");
                        continue;
                    }
                    warn!("mirror: transaction aborted: {message}; retrying");
                    self.shared.record_error(kind, message);
                    self.shared.set_state(LinkState::Retrying);
                    self.pacer.failed();
                    self.shared.sleep(abort_backoff);
                    abort_backoff = (abort_backoff * 2).min(self.shared.config.max_backoff);
                }
                Err(TxnFailure::Fatal(e)) => {
                    self.pacer.failed();
                    return Err(e);
                }
            }
        }
    }

    /// Waits `wait` (the bandwidth cap's) between two transactions, serving the producer's
    /// events meanwhile.
    fn wait_between_transactions(&self, wait: Duration) {
        let until = Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || self.shared.stopping() {
                return;
            }
            self.producer.poll(Duration::ZERO);
            self.shared.sleep(left.min(Duration::from_millis(100)));
        }
    }

    /// Takes the records the aborted transaction's deliveries refused for themselves into the
    /// session's verdicts (see [`crate::rejection`]); whether it learnt anything new.
    fn learn_refusals(&mut self) -> bool {
        let refused = std::mem::take(
            &mut *self
                .producer
                .context()
                .refused
                .lock()
                .expect("refused lock"),
        );
        let mut learnt = false;
        for r in &refused {
            let key = (r.slot, r.offset);
            let slot = &self.slots[r.slot];
            let verdict = if r.dead_letter {
                Verdict::Unwritable(r.reason, r.error.clone())
            } else {
                let together = refused
                    .iter()
                    .filter(|o| o.slot == r.slot && !o.dead_letter)
                    .count();
                match self.verdicts.get(&key) {
                    Some(Verdict::Rejected(..) | Verdict::Unwritable(..)) => continue,
                    Some(Verdict::Suspect) => Verdict::Rejected(r.reason, r.error.clone()),
                    None if together == 1 => Verdict::Rejected(r.reason, r.error.clone()),
                    None => Verdict::Suspect,
                }
            };
            if self.verdicts.get(&key) == Some(&verdict) {
                continue;
            }
            match &verdict {
                Verdict::Suspect => debug!(
                    "mirror: {}/{} offset {} refused with others ({}); sending it alone",
                    slot.topic,
                    slot.partition,
                    r.offset,
                    r.reason.label()
                ),
                Verdict::Rejected(..) | Verdict::Unwritable(..) => warn!(
                    "mirror: Kafka refuses record {}/{} offset {} for itself ({}: {}){}",
                    slot.topic,
                    slot.partition,
                    r.offset,
                    r.reason.label(),
                    r.error,
                    if r.dead_letter {
                        format!(
                            ", and so does the dead-letter topic {}",
                            self.dead_letter_topic
                        )
                    } else {
                        String::new()
                    }
                ),
            }
            self.verdicts.insert(key, verdict);
            learnt = true;
        }
        learnt
    }

    /// Aborts the open transaction. Its records still queued or in flight are purged and
    /// their reports served first: librdkafka aborts only once none is outstanding, and none
    /// may count against the next transaction.
    fn abort(&self) -> Result<(), KafkaError> {
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
        let drained = Instant::now();
        while self.producer.in_flight_count() > 0
            && drained.elapsed() < self.shared.config.request_timeout
        {
            self.producer.poll(Duration::from_millis(1));
        }
        *self
            .producer
            .context()
            .failure
            .lock()
            .expect("failure lock") = None;
        self.producer
            .abort_transaction(self.shared.config.request_timeout)
    }

    /// Whether some partition has records to mirror (or lost ones to count).
    fn has_work(&self) -> Result<bool, SessionError> {
        for slot in self.slots.iter().filter(|s| s.refused.is_none()) {
            if slot.next < self.shared.source.bounds(&slot.topic, slot.partition)?.end {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Counts the records of slot `i` from its read position up to `upto` as deleted before
    /// they were mirrored, once: the status remembers how far loss is counted, across
    /// aborted transactions, sessions and (through the status file) restarts.
    fn count_loss(&mut self, i: usize, upto: u64) {
        let slot = &mut self.slots[i];
        let mut status = self.shared.status.lock().expect("status lock");
        let ps = &mut status.partitions[slot.status_index];
        let from = slot.next.max(ps.loss_counted_until);
        if upto > from {
            let lost = upto - from;
            warn!(
                "mirror: {lost} records of {}/{} (offsets {from}..{upto}) were deleted at the \
                 edge (retention or disk budget) before they were mirrored",
                slot.topic, slot.partition
            );
            ps.lost_before_mirror += lost;
            ps.loss_counted_until = upto;
        }
        slot.next = slot.next.max(upto);
    }

    /// Confirms an idle link still works.
    fn check_link(&self) -> Result<(), SessionError> {
        self.producer
            .client()
            .fetch_metadata(
                Some(&self.shared.config.checkpoint_topic),
                self.shared.config.request_timeout,
            )
            .map_err(|e| kafka(ErrorKind::Connect, "checking the idle link", e))?;
        self.shared.healthy();
        Ok(())
    }

    /// One transaction: up to the pacer's budget of records, read round-robin over the
    /// partitions from a rotating first one and sent as they are read (so reading the source
    /// overlaps librdkafka's sending), then one checkpoint per partition touched, then commit.
    fn transact(&mut self, round: usize) -> Result<Committed, TxnFailure> {
        let t_begin = Instant::now();
        let budget = self.pacer.budget();
        self.producer
            .begin_transaction()
            .map_err(TxnFailure::from)?;
        *self
            .producer
            .context()
            .failure
            .lock()
            .expect("failure lock") = None;
        self.producer
            .context()
            .refused
            .lock()
            .expect("refused lock")
            .clear();
        let mut chunk: Vec<SourceRecord> = Vec::with_capacity(READ_CHUNK);
        let mut touched: Vec<usize> = Vec::new();
        let mut bytes = 0usize;
        let mut count = 0u64;
        // Each partition's end as the transaction starts; later records go to the next one.
        let n = self.slots.len();
        let mut ends: Vec<Option<u64>> = Vec::with_capacity(n);
        for slot in &self.slots {
            ends.push(match slot.refused {
                Some(_) => None,
                None => Some(
                    self.shared
                        .source
                        .bounds(&slot.topic, slot.partition)
                        .map_err(|e| TxnFailure::Fatal(e.into()))?
                        .end,
                ),
            });
        }
        // Turns of at most READ_CHUNK records per partition, so that every partition with
        // records gets its share of the transaction (live partitions are not starved by a
        // backlog) and librdkafka fills batches for all of them at once.
        let mut touched_flag = vec![false; n];
        'turns: loop {
            let mut progressed = false;
            for k in 0..n {
                let i = (round + k) % n;
                let Some(end) = ends[i] else { continue };
                let next = self.slots[i].next;
                if next >= end {
                    continue;
                }
                let (topic, partition) = (self.slots[i].topic.clone(), self.slots[i].partition);
                let want = ((end - next) as usize).min(READ_CHUNK);
                chunk.clear();
                self.shared
                    .source
                    .read(&topic, partition, next, want, &mut chunk)
                    .map_err(|e| TxnFailure::Fatal(e.into()))?;
                let Some(first) = chunk.first() else {
                    // Everything left below `end` was deleted before it was mirrored.
                    let start = self
                        .shared
                        .source
                        .bounds(&topic, partition)
                        .map_err(|e| TxnFailure::Fatal(e.into()))?
                        .start;
                    self.count_loss(i, start.min(end));
                    ends[i] = None;
                    continue;
                };
                if first.offset > next {
                    self.count_loss(i, first.offset);
                }
                if !touched_flag[i] {
                    let ctx = self.producer.context();
                    ctx.delivered[i].store(-1, Ordering::Relaxed);
                    ctx.delivered_min[i].store(i64::MAX, Ordering::Relaxed);
                    ctx.delivered_count[i].store(0, Ordering::Relaxed);
                    self.slots[i].txn_first = first.offset;
                    self.slots[i].txn_records = 0;
                    touched_flag[i] = true;
                    touched.push(i);
                }
                for r in &chunk {
                    bytes += r.wire_bytes();
                    match self.send_source_record(i, r)? {
                        Outcome::Mirrored => {
                            count += 1;
                            self.slots[i].txn_records += 1;
                        }
                        Outcome::Diverted => {}
                        Outcome::Stopped => {
                            ends[i] = None;
                            break;
                        }
                    }
                    self.slots[i].next = r.offset + 1;
                }
                progressed = true;
                if bytes >= budget {
                    break 'turns;
                }
            }
            if !progressed {
                break;
            }
        }
        let t_sent = Instant::now();
        // The records: let librdkafka's batching run its course.
        self.wait_acks(false)?;
        let t_acked = Instant::now();

        let ctx = self.producer.context();
        let config = &self.shared.config;
        let log_id = self.shared.source.identity().map(|i| i.id);
        for &i in &touched {
            let slot = &self.slots[i];
            let delivered = ctx.delivered[i].load(Ordering::Relaxed);
            let checkpoint = Checkpoint {
                site: config.site.clone(),
                topic: slot.topic.clone(),
                partition: slot.partition,
                kafka_topic: slot.kafka_topic.clone(),
                next_edge_offset: slot.next,
                last_kafka_offset: delivered.max(slot.last_kafka_offset),
                log_id: log_id.clone(),
            };
            let key = checkpoint.key();
            let value = checkpoint.value();
            let record =
                BaseRecord::with_opaque_to(&config.checkpoint_topic, Box::new(Sent::Checkpoint))
                    .partition(self.checkpoint_partition)
                    .key(&key)
                    .payload(&value);
            if let Some((reason, e)) = self.send(record)? {
                return Err(TxnFailure::Aborted(
                    ErrorKind::Checkpoint,
                    format!("Kafka refused a checkpoint ({}): {e}", reason.label()),
                ));
            }
        }
        // The checkpoints: a handful of small records, sent at once without lingering.
        self.wait_acks(true)?;
        let t_cp = Instant::now();
        let committed = self.commit();
        self.shared
            .commit_seconds
            .observe(t_cp.elapsed().as_secs_f64());
        committed?;
        debug!(
            records = count,
            send = ?(t_sent - t_begin),
            acks = ?(t_acked - t_sent),
            checkpoints = ?(t_cp - t_acked),
            commit = ?t_cp.elapsed(),
            "transaction committed"
        );

        let mut translations = self.shared.translations.lock().expect("translations lock");
        let mut status = self.shared.status.lock().expect("status lock");
        for &i in &touched {
            let slot = &mut self.slots[i];
            slot.committed = slot.next;
            let delivered = ctx.delivered_count[i].load(Ordering::Relaxed);
            let last_kafka_offset = ctx.delivered[i]
                .load(Ordering::Relaxed)
                .max(slot.last_kafka_offset);
            slot.last_kafka_offset = last_kafka_offset;
            if delivered > 0 {
                let run = Run::verified(
                    slot.txn_first,
                    slot.next,
                    slot.txn_records,
                    ctx.delivered_min[i].load(Ordering::Relaxed),
                    last_kafka_offset,
                    delivered,
                );
                translations[slot.status_index].committed(slot.next, last_kafka_offset, run);
            }
            let ps = &mut status.partitions[slot.status_index];
            ps.mirrored_offset = Some(slot.next);
            ps.last_kafka_offset = (last_kafka_offset >= 0).then_some(last_kafka_offset);
            let committed = slot.committed;
            self.verdicts
                .retain(|&(s, offset), _| s != i || offset >= committed);
        }
        drop(translations);
        for d in self.diverted.drain(..) {
            let slot = &self.slots[d.slot];
            warn!(
                "mirror: record {}/{} offset {}, which Kafka refuses ({}: {}), {}",
                slot.topic,
                slot.partition,
                d.offset,
                d.reason.label(),
                d.error,
                d.fate
            );
            *status
                .records_rejected
                .entry(d.reason.label().to_string())
                .or_default() += 1;
        }
        status.transactions += 1;
        status.records_mirrored += count;
        status.bytes_mirrored += bytes as u64;
        status.state = LinkState::Mirroring;
        let now = now_ms();
        status.last_healthy_at_ms = Some(now);
        status.progress_at_ms = Some(now);
        Ok(Committed {
            bytes,
            elapsed: t_begin.elapsed(),
            full: bytes >= budget,
        })
    }

    /// Sends source record `r` of slot `i` to its topic, unless the session knows Kafka
    /// refuses it: then it is diverted per `on_rejected`. A suspect goes alone.
    fn send_source_record(&mut self, i: usize, r: &SourceRecord) -> Result<Outcome, TxnFailure> {
        let verdict = self.verdicts.get(&(i, r.offset)).cloned();
        let (reason, error) = match verdict {
            None => match self.send_record(i, r)? {
                None => return Ok(Outcome::Mirrored),
                // The producer refused it before sending: certain at once.
                Some(refusal) => refusal,
            },
            Some(Verdict::Suspect) => {
                self.wait_acks(true)?;
                match self.send_record(i, r)? {
                    None => {
                        self.wait_acks(true)?;
                        return Ok(Outcome::Mirrored);
                    }
                    Some(refusal) => refusal,
                }
            }
            Some(Verdict::Rejected(reason, error)) => (reason, error),
            Some(Verdict::Unwritable(reason, error)) => {
                self.diverted.push(Diverted {
                    slot: i,
                    offset: r.offset,
                    reason,
                    error,
                    fate: "was left out: the dead-letter topic refuses it too",
                });
                return Ok(Outcome::Diverted);
            }
        };
        self.verdicts
            .insert((i, r.offset), Verdict::Rejected(reason, error.clone()));
        match self.shared.config.on_rejected {
            OnRejected::DeadLetter => {
                self.send_dead_letter(i, r, reason, &error)?;
                let fate = "went to the dead-letter topic";
                self.diverted.push(Diverted {
                    slot: i,
                    offset: r.offset,
                    reason,
                    error,
                    fate,
                });
                Ok(Outcome::Diverted)
            }
            OnRejected::Skip => {
                self.diverted.push(Diverted {
                    slot: i,
                    offset: r.offset,
                    reason,
                    error,
                    fate: "was skipped (on_rejected = \"skip\")",
                });
                Ok(Outcome::Diverted)
            }
            OnRejected::Stop => {
                let slot = &mut self.slots[i];
                let message = format!(
                    "Kafka refuses record {}/{} offset {} ({}: {error}); on_rejected = \"stop\": \
                     the partition waits before it (make Kafka take it, or choose \
                     \"dead-letter\" or \"skip\")",
                    slot.topic,
                    slot.partition,
                    r.offset,
                    reason.label()
                );
                warn!("mirror: {message}");
                slot.refused = Some(message.clone());
                let mut status = self.shared.status.lock().expect("status lock");
                status.partitions[slot.status_index].error = Some(message);
                Ok(Outcome::Stopped)
            }
        }
    }

    /// Sends refused record `r` of slot `i` to the dead-letter topic, with its origin in
    /// headers and the broker's time as its timestamp; without its payload when the producer
    /// refuses it whole.
    fn send_dead_letter(
        &self,
        i: usize,
        r: &SourceRecord,
        reason: Reason,
        error: &str,
    ) -> Result<(), TxnFailure> {
        let slot = &self.slots[i];
        let partition = slot.partition.to_string();
        let offset = r.offset.to_string();
        let timestamp = r.timestamp_ms.to_string();
        let payload_bytes = r.payload.len().to_string();
        for whole in [true, false] {
            let mut headers = OwnedHeaders::new_with_capacity(r.headers.len() + 8);
            for h in &r.headers {
                headers = headers.insert(KafkaHeader {
                    key: &h.name,
                    value: Some(&*h.value),
                });
            }
            let origin = [
                (rejection::HEADER_TOPIC, slot.topic.as_str()),
                (rejection::HEADER_PARTITION, &partition),
                (rejection::HEADER_OFFSET, &offset),
                (rejection::HEADER_TIMESTAMP, &timestamp),
                (rejection::HEADER_KAFKA_TOPIC, &slot.kafka_topic),
                (rejection::HEADER_REASON, reason.label()),
                (rejection::HEADER_ERROR, error),
            ];
            for (key, value) in origin {
                headers = headers.insert(KafkaHeader {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
            if !whole {
                headers = headers.insert(KafkaHeader {
                    key: rejection::HEADER_PAYLOAD_OMITTED,
                    value: Some(payload_bytes.as_bytes()),
                });
            }
            let sent = Box::new(Sent::DeadLetter {
                slot: i,
                offset: r.offset,
            });
            let record = BaseRecord::with_opaque_to(&self.dead_letter_topic, sent)
                .key(&r.key[..])
                .headers(headers);
            let record = if whole {
                record.payload(&r.payload[..])
            } else {
                record
            };
            match self.send(record)? {
                None => return Ok(()),
                Some((Reason::TooLarge, _)) if whole => continue,
                Some((reason, e)) => {
                    return Err(TxnFailure::Aborted(
                        ErrorKind::Produce,
                        format!(
                            "the producer refuses a dead-letter record ({}): {e}",
                            reason.label()
                        ),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Sends one source record of slot `i` to its topic; `Some` when the producer refused it
    /// for itself before sending.
    fn send_record(
        &self,
        i: usize,
        r: &SourceRecord,
    ) -> Result<Option<(Reason, String)>, TxnFailure> {
        let slot = &self.slots[i];
        let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
        for h in &r.headers {
            headers = headers.insert(KafkaHeader {
                key: &h.name,
                value: Some(&*h.value),
            });
        }
        let sent = Box::new(Sent::Record {
            slot: i,
            offset: r.offset,
        });
        let record = BaseRecord::with_opaque_to(&slot.kafka_topic, sent)
            .partition(slot.partition as i32)
            .key(&r.key[..])
            .payload(&r.payload[..])
            .timestamp(r.timestamp_ms as i64)
            .headers(headers);
        self.send(record)
    }

    /// Enqueues one record, waiting while librdkafka's queue is full; `Some` when the producer
    /// refuses the record for itself (larger than its `message.max.bytes`).
    fn send<K, P>(
        &self,
        mut record: BaseRecord<'_, K, P, Box<Sent>>,
    ) -> Result<Option<(Reason, String)>, TxnFailure>
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
    {
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(None),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    self.producer.poll(Duration::from_millis(1));
                }
                Err((e, _)) => {
                    if let Some(reason) = e.rdkafka_error_code().and_then(Reason::of) {
                        return Ok(Some((reason, e.to_string())));
                    }
                    return Err(TxnFailure::Aborted(
                        kind_of(ErrorKind::Produce, &e),
                        format!("producing to Kafka: {e}"),
                    ));
                }
            }
        }
    }

    /// Serves delivery reports until every record sent is acknowledged. Sends what lingers
    /// at once: librdkafka ignores `linger.ms` while a flush is in progress.
    fn wait_acks(&self, flush: bool) -> Result<(), TxnFailure> {
        let timeout = self.shared.config.request_timeout * 2;
        let deadline = Instant::now() + timeout;
        while self.producer.in_flight_count() > 0 {
            if Instant::now() >= deadline {
                return Err(TxnFailure::Aborted(
                    ErrorKind::Produce,
                    format!(
                        "Kafka did not acknowledge {} records within {timeout:?}",
                        self.producer.in_flight_count(),
                    ),
                ));
            }
            if flush {
                // SAFETY: the pointer is the live producer's handle; rd_kafka_flush only
                // waits (delivery reports are events here, served by `poll` below).
                #[allow(unsafe_code)]
                unsafe {
                    rdkafka::bindings::rd_kafka_flush(self.producer.client().native_ptr(), 1);
                }
                self.producer.poll(Duration::ZERO);
            } else {
                self.producer.poll(Duration::from_millis(1));
            }
        }
        let failure = self
            .producer
            .context()
            .failure
            .lock()
            .expect("failure lock")
            .take();
        match failure {
            None => Ok(()),
            Some(e) => Err(TxnFailure::Aborted(
                kind_of(ErrorKind::Produce, &e),
                format!("Kafka refused a record: {e}"),
            )),
        }
    }

    fn commit(&self) -> Result<(), TxnFailure> {
        let timeout = self.shared.config.request_timeout;
        let mut attempts = 0;
        loop {
            match self.producer.commit_transaction(timeout) {
                Ok(()) => return Ok(()),
                Err(KafkaError::Transaction(e)) if e.is_retriable() && attempts < 5 => {
                    attempts += 1;
                    debug!("commit retriable failure: {e}");
                }
                Err(e) => return Err(TxnFailure::from(e)),
            }
        }
    }
}

/// What a read of a site's checkpoint partition found.
struct ReadCheckpoints {
    /// Per slot, every checkpoint of its partition, oldest first (group replication
    /// translates through them; the last one says where to resume).
    per_slot: Vec<Vec<Checkpoint>>,
    /// Whether the partition holds a checkpoint of this site written by this log.
    own_seen: bool,
    /// The source's identity as the read began.
    identity: Option<SourceIdentity>,
}

/// Reads the site's checkpoints from `partition` of `topic`, to the end of the partition
/// (read_committed).
fn read_checkpoints(
    shared: &Arc<Shared>,
    slots: &[Slot],
    topic: &str,
    partition: i32,
) -> Result<ReadCheckpoints, SessionError> {
    let config = &shared.config;
    let identity = shared.source.identity();
    let mut cc = client_config(config);
    cc.set(
        "group.id",
        format!("tributary-mirror-{}-checkpoints", config.site),
    )
    .set("isolation.level", "read_committed")
    .set("enable.auto.commit", "false")
    .set("enable.partition.eof", "true")
    .set("auto.offset.reset", "earliest")
    // A one-off read to the end: the broker need not hold a fetch of the (mostly empty) tail
    // for the default half second before the end of the partition is seen.
    .set("fetch.wait.max.ms", "20");
    let consumer: BaseConsumer<ReportingContext> = with_extra(cc, config)
        .create_with_context(ReportingContext {
            shared: shared.clone(),
        })
        .map_err(|e| kafka(ErrorKind::Other, "creating the checkpoint reader", e))?;
    let mut read = ReadCheckpoints {
        per_slot: vec![Vec::new(); slots.len()],
        own_seen: false,
        identity,
    };
    // A partition that has never held a record (the site's first start, the common case of a
    // backlog waiting for its first uplink) has nothing to read: its low and high watermarks
    // are equal. Anything else, or an error asking, is read to its end as below.
    if let Ok((low, high)) = consumer.fetch_watermarks(topic, partition, config.request_timeout) {
        if high <= low {
            debug!(site = %config.site, "{topic} partition {partition} is empty: no checkpoints");
            return Ok(read);
        }
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Beginning)
        .map_err(|e| {
            kafka(
                ErrorKind::Checkpoint,
                "assigning the checkpoint partition",
                e,
            )
        })?;
    consumer.assign(&tpl).map_err(|e| {
        kafka(
            ErrorKind::Checkpoint,
            "assigning the checkpoint partition",
            e,
        )
    })?;
    let deadline = Instant::now() + config.request_timeout * 2;
    let mut found = 0usize;
    loop {
        if Instant::now() >= deadline {
            return Err(failed(
                ErrorKind::Checkpoint,
                format!(
                    "reading checkpoints from {} partition {}: no end of partition within {:?}",
                    topic,
                    partition,
                    config.request_timeout * 2
                ),
            ));
        }
        if shared.stopping() {
            return Err(failed(
                ErrorKind::Checkpoint,
                "stopped while reading checkpoints".into(),
            ));
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => {
                debug!("checkpoint read: {e}");
                continue;
            }
            Some(Ok(m)) => {
                let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                    continue;
                };
                let Some(cp) = m.payload().and_then(Checkpoint::parse) else {
                    continue;
                };
                if cp.site != config.site {
                    continue;
                }
                if let (Some(identity), Some(id)) = (&read.identity, &cp.log_id) {
                    read.own_seen |= *id == identity.id;
                }
                if let Some(i) = slots
                    .iter()
                    .position(|s| checkpoint_key(&config.site, &s.topic, s.partition) == key)
                {
                    if cp.kafka_topic != slots[i].kafka_topic {
                        // The topic format changed: the new Kafka topic starts over.
                        continue;
                    }
                    read.per_slot[i].push(cp);
                    found += 1;
                }
            }
        }
    }
    debug!(site = %config.site, "read {found} checkpoint records from {topic}");
    Ok(read)
}

/// Whose each slot's latest checkpoint is (`Own` where there is none); a [`Refusal`] when
/// any is another log's and not adopted. Another log's checkpoint after one of this log's
/// means another edge writes the site's checkpoints now; without one of this log's, the
/// data directory may as well have been reset or replaced.
fn judge(
    shared: &Arc<Shared>,
    slots: &[Slot],
    read: &ReadCheckpoints,
) -> Result<Vec<Whose>, Refusal> {
    let config = &shared.config;
    let mut verdicts = Vec::with_capacity(slots.len());
    let mut foreign: Vec<(Option<String>, &Checkpoint)> = Vec::new();
    for checkpoints in &read.per_slot {
        let verdict = match checkpoints.last() {
            None => Whose::Own,
            Some(latest) => whose(latest, read.identity.as_ref()),
        };
        if let (Whose::Foreign(id), Some(latest)) = (&verdict, checkpoints.last()) {
            foreign.push((id.clone(), latest));
        }
        verdicts.push(verdict);
    }
    let Some((foreign_log, _)) = foreign.first() else {
        return Ok(verdicts);
    };
    let foreign_log = foreign_log.clone();
    let this = read
        .identity
        .as_ref()
        .map_or_else(|| "-".to_string(), |i| i.id.clone());
    let writer = match &foreign_log {
        Some(id) => format!("by log {id}"),
        None => "before checkpoints carried a log id, and this log was made after".to_string(),
    };
    let site = &config.site;
    let (reason, message) = if read.own_seen {
        (
            RefusalReason::DuplicateSite,
            format!(
                "another edge uses site {site}: Kafka's latest checkpoints of site {site} were \
                 written {writer}, after checkpoints of this log ({this}); mirroring stops, \
                 ingest goes on. Give one of the edges another cloud.site"
            ),
        )
    } else {
        (
            RefusalReason::ForeignLog,
            format!(
                "Kafka's checkpoints of site {site} were written {writer}, not by this log \
                 ({this}): this edge's data directory was reset or replaced, or another edge \
                 uses site {site}; mirroring stops, ingest goes on. If another edge uses site \
                 {site}, give one of them another cloud.site. If this data directory replaced \
                 the one that mirrored before, stop the edge and run `edge mirror-adopt`: \
                 this log is then mirrored after the old log's records"
            ),
        )
    };
    Err(Refusal {
        reason,
        message,
        foreign_log,
        checkpoints: foreign
            .iter()
            .map(|(_, c)| {
                (
                    c.topic.clone(),
                    c.partition,
                    c.next_edge_offset,
                    c.last_kafka_offset,
                )
            })
            .collect(),
        at_ms: now_ms(),
    })
}

/// What became of a source record in a transaction.
enum Outcome {
    /// Sent to its topic.
    Mirrored,
    /// Dead-lettered or left out: Kafka refuses it.
    Diverted,
    /// Its partition stops before it (`on_rejected = "stop"`).
    Stopped,
}

/// How a transaction failed.
enum TxnFailure {
    /// It was (or must be) aborted; the producer can go on.
    Aborted(ErrorKind, String),
    /// The producer cannot go on: a new session starts.
    Fatal(SessionError),
}

impl From<KafkaError> for TxnFailure {
    fn from(e: KafkaError) -> TxnFailure {
        match &e {
            KafkaError::Transaction(t) if t.txn_requires_abort() => TxnFailure::Aborted(
                kind_of(ErrorKind::Transaction, &e),
                format!("Kafka transaction failed: {e}"),
            ),
            _ => TxnFailure::Fatal(kafka(ErrorKind::Transaction, "Kafka transaction failed", e)),
        }
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        // Abandon whatever is open; the next producer with this transactional id fences it
        // if this abort does not get through.
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
        self.producer.poll(Duration::from_millis(100));
        let _ = self.producer.abort_transaction(Duration::from_millis(500));
    }
}

/// What a session needs to know of its Kafka topics.
struct Topics {
    /// Partitions of the site's checkpoint topic.
    checkpoint_partitions: i32,
    /// Partitions of the shared checkpoint topic of earlier versions, when it exists (and is
    /// not the site's own).
    legacy_partitions: Option<i32>,
}

/// The replication factor of a new checkpoint topic on a cluster of `brokers`, and its
/// `min.insync.replicas`: a checkpoint must survive the loss of a broker.
fn checkpoint_replication(configured: Option<i32>, brokers: usize) -> (i32, i32) {
    let rf = configured.unwrap_or_else(|| (brokers as i32).clamp(1, 3));
    (rf, (rf - 1).clamp(1, 2))
}

/// Creates the checkpoint topic, the dead-letter topic and the mirrored topics that are
/// missing (only those: a principal without CREATE rights mirrors to topics that exist) and
/// checks the partition counts of those that exist.
fn ensure_topics(
    shared: &Arc<Shared>,
    runtime: &tokio::runtime::Runtime,
    slots: &mut [Slot],
) -> Result<Topics, SessionError> {
    let config = &shared.config;
    let admin: AdminClient<ReportingContext> = with_extra(client_config(config), config)
        .create_with_context(ReportingContext {
            shared: shared.clone(),
        })
        .map_err(|e| kafka(ErrorKind::Other, "creating the Kafka admin client", e))?;
    let replication = || TopicReplication::Fixed(config.replication_factor.unwrap_or(-1));

    let mut wanted: Vec<(String, u32)> = Vec::new();
    for s in slots.iter() {
        match wanted.iter_mut().find(|(t, _)| *t == s.kafka_topic) {
            Some((_, n)) => *n = (*n).max(s.partition + 1),
            None => wanted.push((s.kafka_topic.clone(), s.partition + 1)),
        }
    }
    let before = admin
        .inner()
        .fetch_metadata(None, config.request_timeout)
        .map_err(|e| kafka(ErrorKind::Topics, "reading topic metadata", e))?;
    let exists = |name: &str| {
        before
            .topics()
            .iter()
            .any(|t| t.name() == name && t.error().is_none())
    };
    let (checkpoint_rf, checkpoint_min_isr) =
        checkpoint_replication(config.replication_factor, before.brokers().len());
    let checkpoint_min_isr = checkpoint_min_isr.to_string();
    let mut new_topics: Vec<NewTopic<'_>> = wanted
        .iter()
        .map(|(t, n)| NewTopic::new(t, *n as i32, replication()))
        .collect();
    new_topics.push(
        NewTopic::new(
            &config.checkpoint_topic,
            1,
            TopicReplication::Fixed(checkpoint_rf),
        )
        .set("cleanup.policy", "compact")
        .set("min.insync.replicas", &checkpoint_min_isr)
        .set("segment.ms", "600000")
        .set("min.cleanable.dirty.ratio", "0.1"),
    );
    // The dead-letter topic takes what the mirrored topics refuse: records as large as the
    // producer sends, and timestamps of any clock (the broker stamps them on append; the
    // edge's time is in a header).
    let dead_letter_topic = config.dead_letter_topic();
    let dead_letter_bytes = config.max_message_bytes.max(config.batch_bytes).to_string();
    let dead_letter = config.on_rejected == OnRejected::DeadLetter;
    if dead_letter {
        new_topics.push(
            NewTopic::new(&dead_letter_topic, 1, replication())
                .set("message.timestamp.type", "LogAppendTime")
                .set("max.message.bytes", &dead_letter_bytes),
        );
    }
    new_topics.retain(|t| !exists(t.name));
    let options = AdminOptions::new().operation_timeout(Some(config.request_timeout));
    let results = if new_topics.is_empty() {
        Vec::new()
    } else {
        runtime
            .block_on(async {
                tokio::time::timeout(
                    config.request_timeout * 2,
                    admin.create_topics(new_topics.iter(), &options),
                )
                .await
            })
            .map_err(|_| {
                failed(
                    ErrorKind::Topics,
                    format!(
                        "creating topics at {}: no answer within {:?} (is the cluster reachable?)",
                        config.bootstrap,
                        config.request_timeout * 2
                    ),
                )
            })?
            .map_err(|e| {
                kafka(
                    ErrorKind::Topics,
                    &format!("creating topics at {}", config.bootstrap),
                    e,
                )
            })?
    };
    for r in results {
        match r {
            Ok(topic) => info!("mirror: created Kafka topic {topic}"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(failed(
                    ErrorKind::Topics,
                    format!("creating Kafka topic {topic}: {code}"),
                ))
            }
        }
    }

    // A topic just created may take a moment to show in the metadata with all its partitions.
    let deadline = Instant::now() + config.request_timeout;
    let metadata = loop {
        let metadata = admin
            .inner()
            .fetch_metadata(None, config.request_timeout)
            .map_err(|e| kafka(ErrorKind::Topics, "reading topic metadata", e))?;
        let missing: Vec<&str> = wanted
            .iter()
            .map(|(t, _)| t.as_str())
            .chain([config.checkpoint_topic.as_str()])
            .chain(dead_letter.then_some(dead_letter_topic.as_str()))
            .filter(|name| {
                !metadata
                    .topics()
                    .iter()
                    .any(|t| t.name() == *name && t.error().is_none() && !t.partitions().is_empty())
            })
            .collect();
        if missing.is_empty() {
            break metadata;
        }
        if Instant::now() >= deadline {
            return Err(failed(
                ErrorKind::Topics,
                format!("Kafka topics {missing:?} do not show in the cluster metadata"),
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let count_of = |name: &str| {
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == name)
            .map(|t| t.partitions().len() as u32)
    };
    let mut status = shared.status.lock().expect("status lock");
    for (topic, need) in &wanted {
        let have = count_of(topic).unwrap_or(0);
        let refusal = (have < *need).then(|| {
            format!(
                "Kafka topic {topic} has {have} partitions but the edge topic has {need}: a key \
                 must land on the same partition number on both sides; add partitions \
                 (kafka-topics --alter --topic {topic} --partitions {need}) or choose another \
                 topic_format"
            )
        });
        if let Some(message) = &refusal {
            warn!("mirror: {message}");
        }
        for s in slots.iter_mut().filter(|s| &s.kafka_topic == topic) {
            s.refused = refusal.clone();
            status.partitions[s.status_index].error = refusal.clone();
        }
    }
    drop(status);
    let checkpoint_partitions = count_of(&config.checkpoint_topic).unwrap_or(0);
    if checkpoint_partitions == 0 {
        return Err(failed(
            ErrorKind::Topics,
            format!(
                "checkpoint topic {} has no partitions yet",
                config.checkpoint_topic
            ),
        ));
    }
    let legacy_partitions = config
        .legacy_checkpoint_topic
        .as_deref()
        .filter(|legacy| *legacy != config.checkpoint_topic)
        .and_then(count_of)
        .filter(|&n| n > 0)
        .map(|n| n as i32);
    Ok(Topics {
        checkpoint_partitions: checkpoint_partitions as i32,
        legacy_partitions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_of_the_step_that_met_it() {
        let timed_out = KafkaError::MetadataFetch(RDKafkaErrorCode::OperationTimedOut);
        let e = kafka(ErrorKind::Connect, "connecting to k:9092", timed_out);
        assert_eq!(e.kind(), ErrorKind::Connect);
        assert!(e.to_string().starts_with("connecting to k:9092: "), "{e}");
        let refused = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert_eq!(kind_of(ErrorKind::Produce, &refused), ErrorKind::Produce);
        let source = SessionError::from(crate::source::SourceError::UnknownPartition {
            topic: "t".into(),
            partition: 3,
        });
        assert_eq!(source.kind(), ErrorKind::Source);
    }

    #[test]
    fn checkpoints_are_replicated_to_three_brokers_where_there_are_three() {
        assert_eq!(checkpoint_replication(None, 1), (1, 1));
        assert_eq!(checkpoint_replication(None, 2), (2, 1));
        assert_eq!(checkpoint_replication(None, 3), (3, 2));
        assert_eq!(checkpoint_replication(None, 9), (3, 2));
        assert_eq!(checkpoint_replication(Some(5), 9), (5, 2));
        assert_eq!(checkpoint_replication(Some(1), 9), (1, 1));
    }
}
