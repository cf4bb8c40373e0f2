//! Consumer groups of the source, replicated to Kafka: each group's committed edge positions
//! become committed offsets of the same group id in the cloud cluster, so that the group can
//! fail over from the edge to Kafka consumers and resume where it was.
//!
//! # Translation
//!
//! An edge offset has no Kafka offset of its own: the mirror's transactions put records at
//! whatever offsets the Kafka partition gives them (transaction markers take offsets too). Per
//! partition, [`Translation`] keeps what the mirror knows for sure:
//! - the checkpoints `(e, k)` it committed or read at session start: every record below edge
//!   offset `e` is in Kafka, record `e - 1` at Kafka offset `k`;
//! - runs `(first_edge_offset, first_kafka_offset, count)` of its committed transactions
//!   whose records landed at consecutive Kafka offsets (checked from the delivery reports).
//!
//! A group position `g` (records below `g` are processed) translates to the Kafka offset a
//! Kafka consumer of the group should start from: the offset of record `g` itself when a run
//! covers it; otherwise `k + 1` of the greatest checkpoint with `e <= g` (the records from
//! `e` to `g - 1` are then seen again: a duplicate on failover, never a gap). A position
//! below every known checkpoint translates to nothing: there is nothing to commit yet. The
//! history is bounded, so a position far behind the mirror falls back to the oldest
//! checkpoints kept, or to nothing.
//!
//! # Commit rules
//!
//! Each `group_sync_interval`, per group: the translated offsets are committed under the
//! group's id (a "simple" commit: no membership, generation -1) only while the Kafka group
//! has no active members (the broker itself refuses such a commit to a group with members),
//! and only for partitions where the translated offset is greater than the one Kafka holds,
//! so a committed offset never moves backwards (a Kafka consumer that took over and moved on
//! is never overridden by an edge that comes back).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::mirror::{client_config, lower_priority, with_extra, Shared};
use crate::source::GroupPosition;
use crate::status::now_ms;

/// How many committed transactions of a partition [`Translation`] remembers.
pub const HISTORY: usize = 1024;

/// Records of one committed transaction of one partition that landed at consecutive Kafka
/// offsets, in edge offset order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Edge offset of the first record.
    pub first_edge_offset: u64,
    /// Kafka offset of the first record.
    pub first_kafka_offset: i64,
    /// Number of records; record `first_edge_offset + i` is at `first_kafka_offset + i`.
    pub count: u64,
}

impl Run {
    /// A run of a transaction that sent `count` records, from edge offset `first_edge_offset`
    /// up to (not including) `next_edge_offset`, whose delivery reports gave Kafka offsets
    /// from `min_kafka_offset` to `max_kafka_offset`, `delivered` of them. `None` unless both
    /// sides are consecutive: then, as the producer keeps a partition's records in order, the
    /// i-th record is at `min_kafka_offset + i`.
    pub fn verified(
        first_edge_offset: u64,
        next_edge_offset: u64,
        count: u64,
        min_kafka_offset: i64,
        max_kafka_offset: i64,
        delivered: u64,
    ) -> Option<Run> {
        let edge_dense = next_edge_offset.checked_sub(first_edge_offset) == Some(count);
        let kafka_span = max_kafka_offset
            .checked_sub(min_kafka_offset)
            .and_then(|d| u64::try_from(d).ok())
            .map(|d| d + 1);
        (count > 0
            && edge_dense
            && delivered == count
            && min_kafka_offset >= 0
            && kafka_span == Some(count))
        .then_some(Run {
            first_edge_offset,
            first_kafka_offset: min_kafka_offset,
            count,
        })
    }

    fn end_edge_offset(&self) -> u64 {
        self.first_edge_offset + self.count
    }
}

/// What the mirror knows of where one partition's edge records are in Kafka; see the module
/// documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Translation {
    /// `(next_edge_offset, last_kafka_offset)`, increasing.
    checkpoints: VecDeque<(u64, i64)>,
    /// Increasing and disjoint.
    runs: VecDeque<Run>,
}

impl Translation {
    /// Forgets everything (Kafka holds no checkpoint of the partition).
    pub fn clear(&mut self) {
        self.checkpoints.clear();
        self.runs.clear();
    }

    /// A session starts from the checkpoints `(next_edge_offset, last_kafka_offset)` read
    /// from Kafka, oldest first (the compacted topic still holds the recent ones; the last is
    /// where the mirror resumes). The history of earlier sessions stays only if the last one
    /// is the last it knows (nothing happened in between that it has not seen); otherwise the
    /// checkpoints read are all it knows.
    pub fn resume(&mut self, read: &[(u64, i64)]) {
        let Some(last) = read.last() else {
            self.clear();
            return;
        };
        if self.checkpoints.back() != Some(last) {
            self.clear();
            for &(e, k) in &read[read.len().saturating_sub(HISTORY)..] {
                self.committed(e, k, None);
            }
        }
    }

    /// A transaction committed: every record below `next_edge_offset` is in Kafka, the last
    /// at `last_kafka_offset`; `run` says exactly where its records are, when they are
    /// consecutive.
    pub fn committed(&mut self, next_edge_offset: u64, last_kafka_offset: i64, run: Option<Run>) {
        let follows = self
            .checkpoints
            .back()
            .is_none_or(|&(e, k)| e < next_edge_offset && k < last_kafka_offset);
        if !follows {
            // Not after what is known: the earlier history cannot be trusted with it.
            self.clear();
        }
        self.checkpoints
            .push_back((next_edge_offset, last_kafka_offset));
        if self.checkpoints.len() > HISTORY {
            self.checkpoints.pop_front();
        }
        if let Some(run) = run {
            let fits = run.end_edge_offset() == next_edge_offset
                && run.first_kafka_offset + run.count as i64 - 1 == last_kafka_offset
                && self
                    .runs
                    .back()
                    .is_none_or(|r| r.end_edge_offset() <= run.first_edge_offset);
            if fits {
                self.runs.push_back(run);
                if self.runs.len() > HISTORY {
                    self.runs.pop_front();
                }
            }
        }
    }

    /// The Kafka offset a consumer of a group whose position is `next_edge_offset` starts
    /// from; `None` when no checkpoint is at or below the position.
    pub fn translate(&self, next_edge_offset: u64) -> Option<i64> {
        let g = next_edge_offset;
        let &(last_e, last_k) = self.checkpoints.back()?;
        if g >= last_e {
            return Some(last_k + 1);
        }
        let i = self.runs.partition_point(|r| r.end_edge_offset() <= g);
        if let Some(run) = self.runs.get(i).filter(|r| r.first_edge_offset <= g) {
            return Some(run.first_kafka_offset + (g - run.first_edge_offset) as i64);
        }
        let i = self.checkpoints.partition_point(|&(e, _)| e <= g);
        i.checked_sub(1).map(|i| self.checkpoints[i].1 + 1)
    }
}

/// How a group's replication went in its last round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupSyncState {
    /// Kafka holds the translated offsets (or later ones) of every partition translated.
    Replicated,
    /// Nothing to commit yet: no checkpoint is at or below the group's positions.
    Waiting,
    /// The Kafka group has active members; the edge does not commit for it.
    MembersActive,
    /// Kafka failed; the next round tries again.
    Failed,
}

/// One partition of a replicated group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPartitionStatus {
    /// Source topic.
    pub topic: String,
    /// Kafka topic.
    pub kafka_topic: String,
    /// Partition number.
    pub partition: u32,
    /// The group's committed position at the edge (first offset not processed).
    pub edge_offset: u64,
    /// The Kafka offset that position translates to; `None` while nothing can be committed.
    pub translated_offset: Option<i64>,
    /// The offset Kafka holds for the group, as read after the last round's commit.
    pub kafka_offset: Option<i64>,
}

/// One group of the source, as last replicated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    /// Group name, the same as the Kafka group id.
    pub group: String,
    /// How the last round went.
    pub state: GroupSyncState,
    /// Why the offsets are not replicated, if they are not.
    pub error: Option<String>,
    /// When the last round ran (ms since the Unix epoch).
    pub updated_at_ms: u64,
    /// When offsets were last committed to Kafka for this group.
    pub committed_at_ms: Option<u64>,
    /// Per partition, ordered by topic then partition.
    pub partitions: Vec<GroupPartitionStatus>,
}

/// How often the same failure of a group is logged again.
const LOG_AGAIN: Duration = Duration::from_secs(300);

/// The group replicator's thread: a round every `group_sync_interval`, and a last one when
/// the mirror stops (so that a graceful stop leaves Kafka with the final positions).
pub(crate) fn replicate(shared: &Arc<Shared>) {
    lower_priority();
    let mut replicator = Replicator {
        shared: shared.clone(),
        consumers: HashMap::new(),
        logged: HashMap::new(),
    };
    loop {
        shared.sleep(shared.config.group_sync_interval);
        let last = shared.stopping();
        replicator.round();
        if last {
            return;
        }
    }
}

/// The last error librdkafka reported of a group's client (connection, authentication),
/// which the failed request's own error (often a time-out) does not name.
#[derive(Default)]
struct GroupClientContext {
    last_error: Mutex<Option<String>>,
}

impl ClientContext for GroupClientContext {
    fn error(&self, error: KafkaError, reason: &str) {
        *self.last_error.lock().expect("client error lock") = Some(format!("{reason} ({error})"));
    }
}

impl ConsumerContext for GroupClientContext {}

/// A Kafka consumer used only to read and commit a group's offsets: it never subscribes, so
/// it never joins the group, and its commits are "simple" ones (generation -1).
type GroupClient = BaseConsumer<GroupClientContext>;

struct Replicator {
    shared: Arc<Shared>,
    consumers: HashMap<String, GroupClient>,
    /// Per group, the failure last logged and when.
    logged: HashMap<String, (String, Instant)>,
}

/// Why a round failed for a group.
struct Failure {
    state: GroupSyncState,
    message: String,
}

impl Replicator {
    fn round(&mut self) {
        let positions = self.shared.source.group_positions();
        let mut groups: BTreeMap<String, Vec<GroupPartitionStatus>> = BTreeMap::new();
        let mut unmirrored: BTreeMap<String, Vec<String>> = BTreeMap::new();
        {
            let translations = self.shared.translations.lock().expect("translations lock");
            let status = self.shared.status.lock().expect("status lock");
            for GroupPosition {
                group,
                topic,
                partition,
                next_offset,
            } in positions
            {
                let Some(i) = status
                    .partitions
                    .iter()
                    .position(|p| p.topic == topic && p.partition == partition)
                else {
                    let topics = unmirrored.entry(group.clone()).or_default();
                    if !topics.contains(&topic) {
                        topics.push(topic);
                    }
                    groups.entry(group).or_default();
                    continue;
                };
                groups.entry(group).or_default().push(GroupPartitionStatus {
                    topic,
                    kafka_topic: status.partitions[i].kafka_topic.clone(),
                    partition,
                    edge_offset: next_offset,
                    translated_offset: translations[i].translate(next_offset),
                    kafka_offset: None,
                });
            }
        }
        let previous = self
            .shared
            .status
            .lock()
            .expect("status lock")
            .groups
            .clone();
        self.consumers.retain(|g, _| groups.contains_key(g));
        let mut done = Vec::with_capacity(groups.len());
        for (group, mut partitions) in groups {
            partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
            let before = previous.iter().find(|g| g.group == group);
            let committed_at_ms = before.and_then(|g| g.committed_at_ms);
            // What Kafka held at the last look, until this round reads it.
            for p in &mut partitions {
                p.kafka_offset = before
                    .and_then(|g| {
                        g.partitions
                            .iter()
                            .find(|o| o.kafka_topic == p.kafka_topic && o.partition == p.partition)
                    })
                    .and_then(|o| o.kafka_offset);
            }
            let mut st = GroupStatus {
                group,
                state: GroupSyncState::Replicated,
                error: None,
                updated_at_ms: now_ms(),
                committed_at_ms,
                partitions,
            };
            if let Err(f) = self.replicate_group(&mut st) {
                st.state = f.state;
                st.error = Some(f.message);
            }
            if st.partitions.is_empty() {
                let topics = unmirrored.remove(&st.group).unwrap_or_default();
                st.state = GroupSyncState::Waiting;
                st.error = Some(format!(
                    "none of the group's topics ({}) is mirrored to Kafka (see cloud.topics)",
                    topics.join(", ")
                ));
            }
            self.log(&st);
            done.push(st);
        }
        self.shared.status.lock().expect("status lock").groups = done;
    }

    /// Commits the translated offsets of `st`'s partitions to its Kafka group where the rules
    /// allow, and fills in what Kafka holds.
    fn replicate_group(&mut self, st: &mut GroupStatus) -> Result<(), Failure> {
        if st.partitions.is_empty() {
            return Ok(());
        }
        if st.partitions.iter().all(|p| p.translated_offset.is_none()) {
            return Err(Failure {
                state: GroupSyncState::Waiting,
                message: "no mirror checkpoint is at or below the group's positions yet: \
                          nothing to commit"
                    .into(),
            });
        }
        let config = &self.shared.config;
        let timeout = config.request_timeout;
        let group = st.group.clone();
        let consumer = match self.consumers.entry(group.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let mut cc = client_config(config);
                cc.set("group.id", &group)
                    .set("enable.auto.commit", "false")
                    .set("enable.auto.offset.store", "false");
                let c: GroupClient = with_extra(cc, config)
                    .create_with_context(GroupClientContext::default())
                    .map_err(|e| failed(format!("creating a Kafka client for the group: {e}")))?;
                e.insert(c)
            }
        };
        // Serve the client's queued events (errors), which nothing else polls.
        for _ in 0..100 {
            if consumer.poll(Duration::ZERO).is_none() {
                break;
            }
        }
        let with_client_error = |message: String| match consumer
            .context()
            .last_error
            .lock()
            .expect("client error lock")
            .take()
        {
            Some(client) => format!("{message} (Kafka client: {client})"),
            None => message,
        };

        let listed = consumer
            .fetch_group_list(Some(&group), timeout)
            .map_err(|e| {
                failed(with_client_error(format!(
                    "describing the Kafka group: {e}"
                )))
            })?;
        let active = listed
            .groups()
            .iter()
            .find(|g| g.name() == group)
            .filter(|g| !g.members().is_empty() && !matches!(g.state(), "Empty" | "Dead"))
            .map(|g| (g.members().len(), g.state().to_string()));

        let mut wanted = TopicPartitionList::new();
        for p in st
            .partitions
            .iter()
            .filter(|p| p.translated_offset.is_some())
        {
            wanted.add_partition(&p.kafka_topic, p.partition as i32);
        }
        let read_committed = |st: &mut GroupStatus| -> Result<(), Failure> {
            let committed = consumer
                .committed_offsets(wanted.clone(), timeout)
                .map_err(|e| {
                    failed(with_client_error(format!(
                        "reading the Kafka group's committed offsets: {e}"
                    )))
                })?;
            for p in st
                .partitions
                .iter_mut()
                .filter(|p| p.translated_offset.is_some())
            {
                p.kafka_offset = committed
                    .find_partition(&p.kafka_topic, p.partition as i32)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    });
            }
            Ok(())
        };
        read_committed(st)?;
        if let Some((members, state)) = active {
            return Err(Failure {
                state: GroupSyncState::MembersActive,
                message: format!(
                    "Kafka group \"{group}\" has {members} active member(s) (state {state}): \
                     not replicating while Kafka consumers own it"
                ),
            });
        }

        // Only forward: a Kafka consumer that took over and moved on is never overridden.
        let mut commit = TopicPartitionList::new();
        for p in &st.partitions {
            if let Some(t) = p.translated_offset {
                if p.kafka_offset.is_none_or(|k| t > k) {
                    commit
                        .add_partition_offset(&p.kafka_topic, p.partition as i32, Offset::Offset(t))
                        .map_err(|e| failed(format!("offset {t}: {e}")))?;
                }
            }
        }
        if commit.count() == 0 {
            return Ok(());
        }
        if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
            let refused_for_members = matches!(
                e.rdkafka_error_code(),
                Some(
                    RDKafkaErrorCode::UnknownMemberId
                        | RDKafkaErrorCode::IllegalGeneration
                        | RDKafkaErrorCode::RebalanceInProgress
                        | RDKafkaErrorCode::FencedInstanceId
                        | RDKafkaErrorCode::StaleMemberEpoch
                )
            );
            return Err(if refused_for_members {
                Failure {
                    state: GroupSyncState::MembersActive,
                    message: format!(
                        "Kafka refused the commit: group \"{group}\" has active members ({e})"
                    ),
                }
            } else {
                failed(with_client_error(format!(
                    "committing offsets of the Kafka group: {e}"
                )))
            });
        }
        st.committed_at_ms = Some(now_ms());
        read_committed(st)?;
        let behind: Vec<String> = st
            .partitions
            .iter()
            .filter(|p| {
                p.translated_offset
                    .is_some_and(|t| p.kafka_offset.is_none_or(|k| k < t))
            })
            .map(|p| format!("{}/{}", p.kafka_topic, p.partition))
            .collect();
        if !behind.is_empty() {
            return Err(failed(format!(
                "Kafka did not take the commit of {}",
                behind.join(", ")
            )));
        }
        Ok(())
    }

    /// Logs a group's failure when it is new, and again every [`LOG_AGAIN`] while it lasts.
    fn log(&mut self, st: &GroupStatus) {
        match &st.error {
            Some(message) => {
                let again = self
                    .logged
                    .get(&st.group)
                    .is_none_or(|(m, at)| m != message || at.elapsed() >= LOG_AGAIN);
                if again {
                    warn!(group = %st.group, "group replication to Kafka: {message}");
                    self.logged
                        .insert(st.group.clone(), (message.clone(), Instant::now()));
                }
            }
            None => {
                if self.logged.remove(&st.group).is_some() {
                    info!(group = %st.group, "group replication to Kafka: replicating again");
                }
            }
        }
    }
}

fn failed(message: String) -> Failure {
    Failure {
        state: GroupSyncState::Failed,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(first_edge_offset: u64, first_kafka_offset: i64, count: u64) -> Option<Run> {
        Some(Run {
            first_edge_offset,
            first_kafka_offset,
            count,
        })
    }

    #[test]
    fn nothing_known_translates_to_nothing() {
        assert_eq!(Translation::default().translate(0), None);
        assert_eq!(Translation::default().translate(100), None);
    }

    #[test]
    fn checkpoint_only_gives_the_offset_after_the_greatest_checkpoint_at_or_below() {
        let mut t = Translation::default();
        t.resume(&[(100, 140)]); // read at session start
        t.committed(150, 191, None);
        t.committed(200, 242, None);
        assert_eq!(t.translate(99), None, "below every checkpoint");
        assert_eq!(t.translate(100), Some(141));
        assert_eq!(t.translate(149), Some(141), "between: from the lower one");
        assert_eq!(t.translate(150), Some(192));
        assert_eq!(t.translate(199), Some(192));
        assert_eq!(t.translate(200), Some(243));
        assert_eq!(
            t.translate(500),
            Some(243),
            "past the mirror: where the next record will go"
        );
    }

    #[test]
    fn a_run_gives_the_exact_offset_of_the_first_unprocessed_record() {
        let mut t = Translation::default();
        t.resume(&[(100, 140)]);
        // Records 100..150 at 142..192 (141 is the previous transaction's marker).
        t.committed(150, 191, run(100, 142, 50));
        assert_eq!(
            t.translate(100),
            Some(142),
            "the run says exactly where record 100 is"
        );
        assert_eq!(t.translate(101), Some(143));
        assert_eq!(t.translate(149), Some(191));
        assert_eq!(t.translate(150), Some(192));
    }

    #[test]
    fn non_consecutive_deliveries_make_no_run() {
        // 50 records but Kafka offsets 142..=192 span 51: another producer wrote in between.
        assert_eq!(Run::verified(100, 150, 50, 142, 192, 50), None);
        // Edge offsets 100..151 for 50 records: one was deleted before it was read.
        assert_eq!(Run::verified(100, 151, 50, 142, 191, 50), None);
        // A delivery report missing.
        assert_eq!(Run::verified(100, 150, 50, 142, 191, 49), None);
        // Nothing delivered (min still at its initial value).
        assert_eq!(Run::verified(100, 150, 50, i64::MAX, -1, 0), None);
        assert_eq!(Run::verified(100, 150, 50, 142, 191, 50), run(100, 142, 50));
    }

    #[test]
    fn without_a_run_a_position_falls_back_to_the_checkpoint_below() {
        let mut t = Translation::default();
        t.resume(&[(100, 140)]);
        t.committed(150, 195, Run::verified(100, 150, 50, 142, 195, 50));
        assert_eq!(t.translate(120), Some(141));
        assert_eq!(t.translate(150), Some(196));
    }

    #[test]
    fn a_run_that_does_not_match_its_checkpoint_is_not_kept() {
        let mut t = Translation::default();
        t.resume(&[(100, 140)]);
        t.committed(150, 191, run(100, 142, 49));
        assert_eq!(t.translate(120), Some(141));
    }

    #[test]
    fn never_ahead_of_an_unprocessed_record_nor_behind_the_checkpoint_below() {
        // Transactions of varying sizes, every other one with a run; Kafka offsets as a
        // transactional producer gets them (a commit marker after each transaction).
        let mut t = Translation::default();
        let mut kafka_of = Vec::new(); // Kafka offset of each edge record
        let mut checkpoints = Vec::new();
        let mut exact = Vec::new(); // edge offsets covered by a run
        let mut next_kafka = 0i64;
        let mut e = 0u64;
        for (i, size) in [3u64, 1, 7, 2, 5, 4].into_iter().enumerate() {
            let first_kafka = next_kafka;
            for _ in 0..size {
                kafka_of.push(next_kafka);
                next_kafka += 1;
            }
            let k = next_kafka - 1;
            next_kafka += 1;
            let r = if i % 2 == 0 {
                exact.extend(e..e + size);
                Run::verified(e, e + size, size, first_kafka, k, size)
            } else {
                None
            };
            e += size;
            t.committed(e, k, r);
            checkpoints.push(e);
        }
        for g in 0..=e + 3 {
            let below = checkpoints.iter().rev().find(|&&c| c <= g);
            let Some(&c) = below else {
                let expected = exact.contains(&g).then(|| kafka_of[g as usize]);
                assert_eq!(
                    t.translate(g),
                    expected,
                    "position {g}: below every checkpoint"
                );
                continue;
            };
            let o = t.translate(g).unwrap();
            assert!(
                o > kafka_of[c as usize - 1],
                "position {g}: {o} repeats before {c}"
            );
            if let Some(&first_unprocessed) = kafka_of.get(g as usize) {
                assert!(
                    o <= first_unprocessed,
                    "position {g}: {o} skips {first_unprocessed}"
                );
                if exact.contains(&g) {
                    assert_eq!(o, first_unprocessed, "position {g} is covered by a run");
                }
            }
        }
        assert_eq!(t.translate(e), Some(next_kafka - 1));
    }

    #[test]
    fn resume_keeps_history_only_when_it_continues() {
        let mut t = Translation::default();
        t.resume(&[(100, 140)]);
        t.committed(150, 191, run(100, 142, 50));
        t.resume(&[(100, 140), (150, 191)]);
        assert_eq!(
            t.translate(120),
            Some(162),
            "same checkpoint: the run is kept"
        );
        t.resume(&[(150, 300)]); // the Kafka topic was recreated, say
        assert_eq!(t.translate(120), None);
        assert_eq!(t.translate(150), Some(301));
        t.resume(&[]);
        assert_eq!(
            t.translate(150),
            None,
            "no checkpoint in Kafka: nothing known"
        );
    }

    #[test]
    fn every_checkpoint_read_at_session_start_is_used() {
        let mut t = Translation::default();
        // Older checkpoints not compacted away yet, then one from before a topic was
        // recreated (its offsets go back), then the current ones.
        t.resume(&[(50, 60), (100, 120), (120, 5), (150, 40), (200, 95)]);
        assert_eq!(t.translate(60), None, "before the recreation: forgotten");
        assert_eq!(t.translate(130), Some(6));
        assert_eq!(t.translate(170), Some(41));
        assert_eq!(t.translate(200), Some(96));
    }

    #[test]
    fn a_checkpoint_that_does_not_follow_resets_the_history() {
        let mut t = Translation::default();
        t.committed(150, 191, run(100, 142, 50));
        t.committed(120, 500, None);
        assert_eq!(t.translate(110), None);
        assert_eq!(t.translate(130), Some(501));
    }

    #[test]
    fn history_is_bounded() {
        let mut t = Translation::default();
        for i in 0..(HISTORY as u64 + 10) {
            let k = 2 * i as i64;
            t.committed(i + 1, k, run(i, k, 1));
        }
        assert_eq!(t.checkpoints.len(), HISTORY);
        assert_eq!(t.runs.len(), HISTORY);
        assert_eq!(t.translate(5), None, "forgotten");
        assert_eq!(t.translate(20), Some(40));
    }
}
