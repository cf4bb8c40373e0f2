//! Consumer groups of the source, replicated to Kafka: each group's committed edge positions
//! become committed offsets of its Kafka group (the same id, or with `group_prefix` before
//! it) in the cloud cluster, so that the group can fail over from the edge to Kafka consumers
//! and resume where it was.
//!
//! The offsets committed are the group's edge positions translated through what the mirror
//! knows of where its records are in Kafka (see [`crate::translation`]).
//!
//! # Commit rules
//!
//! Each `group_sync_interval`, per group: the translated offsets are committed under the
//! group's Kafka id (a "simple" commit: no membership, generation -1) only while
//!
//! - the Kafka group has no active members (the broker itself refuses such a commit to a
//!   group with members), and
//! - Kafka holds, for every partition, the offset the edge committed last, or none: any other
//!   offset was committed by someone else (a consumer that subscribed, committed and left,
//!   or one that assigns partitions itself and never joins), who owns the group from then on.
//!   The edge stops replicating that group ([`GroupSyncState::OtherCommitter`]) until the
//!   group's offsets are deleted in Kafka.
//!
//! and only for partitions where the translated offset is greater than the one Kafka holds,
//! so a committed offset never moves backwards. What the edge committed last is kept in the
//! status, which the edge keeps on disk across restarts; a status written before the edge
//! tracked its commits takes what Kafka held at its last look as the edge's own, once.
//!
//! Kafka has no conditional commit: a consumer that commits and leaves between the edge's
//! read of the offsets and its commit (one request's time) is overwritten; the read after
//! the commit and the next round's check see any commit made after it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{info, warn};

use crate::kafka::{client_config, lower_priority, with_extra};
use crate::shared::Shared;
use crate::source::GroupPosition;
use crate::status::{now_ms, GroupPartitionStatus, GroupStatus, GroupSyncState};

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
                    edge_committed: None,
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
            let kafka_group = self.shared.config.kafka_group(&group);
            let committed_at_ms = before.and_then(|g| g.committed_at_ms);
            // A status of this Kafka group carries on; one of another Kafka group (the prefix
            // changed) does not, and one written before commits were tracked counts what
            // Kafka held at its last look as the edge's own.
            let carried = before.filter(|g| {
                g.kafka_group.is_none() || g.kafka_group.as_deref() == Some(kafka_group.as_str())
            });
            for p in &mut partitions {
                let old = carried.and_then(|g| {
                    g.partitions
                        .iter()
                        .find(|o| o.kafka_topic == p.kafka_topic && o.partition == p.partition)
                });
                // What Kafka held at the last look, until this round reads it.
                p.kafka_offset = old.and_then(|o| o.kafka_offset);
                p.edge_committed = match carried {
                    Some(g) if g.kafka_group.is_none() => {
                        g.committed_at_ms.and(old.and_then(|o| o.kafka_offset))
                    }
                    _ => old.and_then(|o| o.edge_committed),
                };
            }
            let mut st = GroupStatus {
                group,
                kafka_group: Some(kafka_group),
                state: GroupSyncState::Replicated,
                error: None,
                updated_at_ms: now_ms(),
                committed_at_ms: carried.and(committed_at_ms),
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
        let group = st
            .kafka_group
            .clone()
            .unwrap_or_else(|| config.kafka_group(&st.group));
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

        // Only while the edge is the group's one committer.
        let foreign: Vec<String> = st
            .partitions
            .iter()
            .filter(|p| p.kafka_offset.is_some() && p.kafka_offset != p.edge_committed)
            .map(|p| {
                format!(
                    "{}/{} at {} (the edge committed {})",
                    p.kafka_topic,
                    p.partition,
                    p.kafka_offset.unwrap_or_default(),
                    p.edge_committed
                        .map_or_else(|| "nothing".to_string(), |o| o.to_string())
                )
            })
            .collect();
        if !foreign.is_empty() {
            return Err(Failure {
                state: GroupSyncState::OtherCommitter,
                message: format!(
                    "Kafka group \"{group}\" holds offsets the edge did not commit ({}): \
                     another consumer commits to it, so the edge no longer replicates this \
                     group; delete the group's offsets in Kafka to hand it back to the edge",
                    foreign.join(", ")
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
        for p in &mut st.partitions {
            if let Some(e) = commit.find_partition(&p.kafka_topic, p.partition as i32) {
                if let Offset::Offset(o) = e.offset() {
                    p.edge_committed = Some(o);
                }
            }
        }
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
