//! Durable consumer groups: named sets of positions over log partitions, read by MQTT
//! clients through shared subscriptions (`$share/{group}/{filter}`).
//!
//! # On-disk format
//!
//! In the log's `meta` keyspace, one entry per group and partition (key and value in
//! [`crate::log::meta`]): `committed` and `lease`. `committed` is the group's position: every record
//! below it has been processed by the group. `lease` bounds what may have been handed to a
//! member: nothing at or above it was sent before it was stored.
//!
//! # Invariants
//!
//! - Positions are written through the appender's group commits, so they are as durable as
//!   the records, and never ahead of what members acknowledged.
//! - A stored position only grows, except through `edge groups reset` on a stopped node.
//! - Records are handed to one member per partition at a time (see [`engine`]).
//!
//! # Recovery
//!
//! After a crash a group resumes at its stored positions: records acknowledged after the
//! last stored position are delivered again (at-least-once), with DUP set when they are below
//! the stored lease and so may have been sent before. A partition without a stored position
//! starts per the group's `start` setting.

pub mod assign;
mod engine;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::config::{GroupConfig, GroupStart};
use crate::log::{meta, Log, LogError};
use crate::mqtt::Broker;

/// File name of the group status in the data directory, rewritten every second by a running
/// edge, read by `edge groups` while the edge runs.
pub const STATUS_FILE: &str = "groups-status.json";

/// Writes the groups status file in `data_dir` (temporary file, then rename).
pub fn write_status(data_dir: &std::path::Path, status: &[GroupStatus]) -> std::io::Result<()> {
    let path = data_dir.join(STATUS_FILE);
    let tmp = data_dir.join(format!("{STATUS_FILE}.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, &path)
}

/// Reads the groups status file a running edge keeps in `data_dir`.
pub fn read_status(data_dir: &std::path::Path) -> Result<Vec<GroupStatus>, String> {
    let path = data_dir.join(STATUS_FILE);
    let text = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Stores a group's position in one partition: `committed` and `lease` (see the module doc).
pub fn position_op(
    group: &str,
    topic: &str,
    partition: u32,
    committed: u64,
    lease: u64,
) -> crate::log::appender::StateOp {
    crate::log::appender::StateOp::Put {
        key: meta::group_position_key(group, topic, partition),
        value: meta::group_position_value(committed, lease),
    }
}

/// A stored position, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPosition {
    /// Group name.
    pub group: String,
    /// Log topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// First record not processed by the group.
    pub committed: u64,
    /// Nothing at or above it was handed out before it was stored.
    pub lease: u64,
}

pub(crate) fn parse_position(key: &[u8], value: &[u8]) -> Option<StoredPosition> {
    let (group, topic, partition) = meta::parse_group_position_key(key)?;
    let (committed, lease) = meta::parse_group_position_value(value)?;
    Some(StoredPosition {
        group: group.to_string(),
        topic: topic.to_string(),
        partition,
        committed,
        lease,
    })
}

/// Every stored position (of `group` only, when given), in key order.
pub fn stored_positions(log: &Log, group: Option<&str>) -> Result<Vec<StoredPosition>, LogError> {
    let prefix = match group {
        Some(g) => meta::group_prefix(g),
        None => meta::Tag::Group.prefix().to_vec(),
    };
    // A position that does not decode is left out: the group starts that partition as a
    // group new to it would (`start` decides where).
    Ok(log
        .meta_scan(&prefix)?
        .into_iter()
        .filter_map(|(k, v)| {
            let parsed = parse_position(&k, &v);
            if parsed.is_none() {
                log.quarantine_meta(&k, "group position");
            }
            parsed
        })
        .collect())
}

/// The topics of `group`: those the config declares for it, then those it has stored
/// positions in (a group removed from the config, or a topic removed from a group).
pub fn group_topics(
    configs: &[GroupConfig],
    stored: &[StoredPosition],
    group: &str,
) -> Vec<String> {
    let mut topics: Vec<String> = configs
        .iter()
        .find(|g| g.name == group)
        .map(|g| g.topics.clone())
        .unwrap_or_default();
    for s in stored.iter().filter(|s| s.group == group) {
        if !topics.contains(&s.topic) {
            topics.push(s.topic.clone());
        }
    }
    topics
}

/// One partition of a group, as reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionPosition {
    /// Log topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// The stored position: every record below it is processed.
    pub committed: u64,
    /// One past the partition's last durable record.
    pub end: u64,
    /// Records not processed yet (`end - committed`).
    pub lag: u64,
    /// Client id of the member that owns the partition now.
    pub owner: Option<String>,
    /// Records handed to the owner and not acknowledged yet.
    pub in_flight: u64,
    /// Records retention deleted before the group read them.
    pub lost: u64,
    /// The Kafka consumer group's committed offset of the mirrored partition, as the mirror
    /// last read it after replicating the position (with `[cloud]`).
    #[serde(default)]
    pub kafka_offset: Option<i64>,
}

/// An online member, as reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Client id.
    pub client_id: String,
    /// Partitions it owns.
    pub partitions: u32,
    /// Records it holds unacknowledged.
    pub in_flight: u64,
}

/// A group, as reported by the admin API, the status file and `edge groups`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    /// Group name.
    pub name: String,
    /// Log topics it reads.
    pub topics: Vec<String>,
    /// Online members.
    pub members: Vec<MemberStatus>,
    /// Per partition.
    pub partitions: Vec<PartitionPosition>,
    /// Records handed to members since the edge started.
    pub delivered: u64,
    /// Records acknowledged by members since the edge started.
    pub acknowledged: u64,
    /// Records retention deleted before the group read them, since the edge started.
    pub lost: u64,
    /// Records outside the group's filter, skipped by design, since the edge started.
    #[serde(default)]
    pub filtered: u64,
    /// Members that lost their partitions for not acknowledging within `ack_timeout`.
    #[serde(default)]
    pub ack_timeouts: u64,
    /// How the last replication of the positions to Kafka went (with `[cloud]`):
    /// `replicated`, `waiting`, `members_active`, `other_committer` or `failed`.
    #[serde(default)]
    pub kafka_state: Option<cloud_sync::GroupSyncState>,
    /// Why the positions are not replicated, if they are not.
    #[serde(default)]
    pub kafka_error: Option<String>,
}

/// Adds to `groups` what the mirror last replicated of them to Kafka.
pub fn add_replication(groups: &mut [GroupStatus], mirror: &cloud_sync::MirrorStatus) {
    for g in groups {
        let Some(r) = mirror.groups.iter().find(|r| r.group == g.name) else {
            continue;
        };
        g.kafka_state = Some(r.state);
        g.kafka_error = r.error.clone();
        for p in &mut g.partitions {
            p.kafka_offset = r
                .partitions
                .iter()
                .find(|q| q.topic == p.topic && q.partition == p.partition)
                .and_then(|q| q.kafka_offset);
        }
    }
}

struct Running {
    shared: Arc<engine::Shared>,
    thread: Option<JoinHandle<()>>,
}

/// The groups of a running edge.
pub struct Groups {
    running: Mutex<Vec<Running>>,
    statuses: Vec<Arc<engine::Shared>>,
    stopped: AtomicBool,
}

impl std::fmt::Debug for Groups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Groups")
            .field("groups", &self.statuses.len())
            .finish()
    }
}

impl Groups {
    /// Starts one engine thread per configured group, from the stored positions.
    pub fn start(configs: &[GroupConfig], broker: &Arc<Broker>) -> Result<Groups, LogError> {
        let log = &broker.log;
        let mut running = Vec::new();
        let mut statuses = Vec::new();
        for g in configs {
            let stored = stored_positions(log, Some(&g.name))?;
            let mut parts = Vec::new();
            for topic in &g.topics {
                let t = log
                    .topic(topic)
                    .ok_or_else(|| LogError::UnknownTopic(topic.clone()))?;
                for (i, state) in t.partitions.iter().enumerate() {
                    let i = i as u32;
                    let found = stored
                        .iter()
                        .find(|s| &s.topic == topic && s.partition == i);
                    let (committed, lease) = match found {
                        // Below the partition's start now: the engine counts what
                        // retention deleted while the edge was down.
                        Some(s) => (s.committed, Some(s.lease)),
                        None => (
                            match g.start {
                                GroupStart::Earliest => state.start(),
                                GroupStart::Latest => state.durable_end(),
                            },
                            None,
                        ),
                    };
                    parts.push(engine::Part::new(
                        topic.clone(),
                        t.id,
                        i,
                        state.clone(),
                        committed,
                        lease,
                    ));
                }
            }
            let shared = Arc::new(engine::Shared {
                status: Mutex::new(GroupStatus::default()),
                stop: AtomicBool::new(false),
                delivered: AtomicU64::new(0),
                acknowledged: AtomicU64::new(0),
                lost: AtomicU64::new(0),
                filtered: AtomicU64::new(0),
                timeouts: AtomicU64::new(0),
            });
            let engine = engine::Engine::new(
                Arc::from(g.name.as_str()),
                g.topics.clone(),
                broker.clone(),
                parts,
                shared.clone(),
            )
            .with_ack_timeout(g.ack_timeout.0);
            let thread = std::thread::Builder::new()
                .name(format!("group-{}", g.name))
                .spawn(move || engine.run())
                .map_err(LogError::Thread)?;
            tracing::info!(group = %g.name, topics = ?g.topics, "consumer group started");
            statuses.push(shared.clone());
            running.push(Running {
                shared,
                thread: Some(thread),
            });
        }
        Ok(Groups {
            running: Mutex::new(running),
            statuses,
            stopped: AtomicBool::new(false),
        })
    }

    /// A snapshot of every group.
    pub fn status(&self) -> Vec<GroupStatus> {
        self.statuses
            .iter()
            .map(|s| s.status.lock().expect("group status lock").clone())
            .collect()
    }

    /// The stored positions, for replication to Kafka.
    pub fn positions(&self) -> Vec<cloud_sync::GroupPosition> {
        self.status()
            .into_iter()
            .flat_map(|g| {
                g.partitions
                    .into_iter()
                    .map(move |p| cloud_sync::GroupPosition {
                        group: g.name.clone(),
                        topic: p.topic,
                        partition: p.partition,
                        next_offset: p.committed,
                    })
            })
            .collect()
    }

    /// Stops the engines after they stored their last positions. Call before the appender
    /// shuts down.
    pub fn stop(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut running = self.running.lock().expect("groups lock");
        for r in running.iter() {
            r.shared.stop.store(true, Ordering::Release);
        }
        for r in running.iter_mut() {
            if let Some(t) = r.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Where `edge groups reset` moves a group's positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// The first record each partition holds.
    Earliest,
    /// Each partition's end.
    Latest,
    /// This offset in every partition (clamped to what the partition holds).
    Offset(u64),
}

impl std::str::FromStr for ResetTo {
    type Err = String;
    fn from_str(s: &str) -> Result<ResetTo, String> {
        match s {
            "earliest" => Ok(ResetTo::Earliest),
            "latest" => Ok(ResetTo::Latest),
            _ => s.parse().map(ResetTo::Offset).map_err(|_| {
                format!("\"{s}\": give earliest, latest or an offset (a whole number)")
            }),
        }
    }
}

/// The stores that move `group`'s positions in every partition of `topics` to `to`, for a
/// stopped node whose stored positions are `stored`: returns the state changes and the new
/// positions.
pub fn reset_ops(
    log: &Log,
    group: &str,
    topics: &[String],
    stored: &[StoredPosition],
    to: ResetTo,
) -> Result<(Vec<crate::log::appender::StateOp>, Vec<StoredPosition>), LogError> {
    let mut ops = Vec::new();
    let mut out = Vec::new();
    for topic in topics {
        let t = log
            .topic(topic)
            .ok_or_else(|| LogError::UnknownTopic(topic.clone()))?;
        for (i, p) in t.partitions.iter().enumerate() {
            let start = p.start();
            let end = p.durable_end();
            let committed = match to {
                ResetTo::Earliest => start,
                ResetTo::Latest => end,
                ResetTo::Offset(o) => o.clamp(start, end),
            };
            // The lease stays: records below it may have been sent before.
            let lease = stored
                .iter()
                .find(|s| s.group == group && &s.topic == topic && s.partition == i as u32)
                .map_or(committed, |s| s.lease);
            ops.push(position_op(group, topic, i as u32, committed, lease));
            out.push(StoredPosition {
                group: group.to_string(),
                topic: topic.clone(),
                partition: i as u32,
                committed,
                lease,
            });
        }
    }
    Ok((ops, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_keys_round_trip() {
        let crate::log::appender::StateOp::Put { key: k, value: v } =
            position_op("alarms", "telemetry", 7, 120, 4096)
        else {
            panic!("a position is a put");
        };
        assert_eq!(
            parse_position(&k, &v),
            Some(StoredPosition {
                group: "alarms".into(),
                topic: "telemetry".into(),
                partition: 7,
                committed: 120,
                lease: 4096,
            })
        );
        assert!(k.starts_with(&meta::group_prefix("alarms")));
        assert!(!k.starts_with(&meta::group_prefix("alarm")));
    }

    #[test]
    fn reset_targets_parse() {
        assert_eq!("earliest".parse(), Ok(ResetTo::Earliest));
        assert_eq!("latest".parse(), Ok(ResetTo::Latest));
        assert_eq!("42".parse(), Ok(ResetTo::Offset(42)));
        assert!("-1".parse::<ResetTo>().is_err());
    }
}
