//! What the mirror reports about itself: per partition how far it is, the link's health, and
//! how the source's consumer groups were last replicated to Kafka.

#![deny(clippy::expect_used, clippy::indexing_slicing)]

use serde::{Deserialize, Serialize};

use crate::source::PartitionedSource;

/// The mirror's state as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// Connecting, creating topics, reading checkpoints.
    Starting,
    /// Mirroring (or idle with nothing to send).
    Mirroring,
    /// The last attempt failed; waiting before the next.
    Retrying,
    /// Stopped by the edge.
    Stopped,
    /// Mirroring refused until an operator acts (see [`Refusal`]); ingest goes on.
    Refused,
}

/// Why a mirror refuses to mirror at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    /// Kafka's checkpoints of the site were written by another log, not adopted: the data
    /// directory was reset or replaced, or another edge uses the site.
    ForeignLog,
    /// Another edge uses the site: it wrote checkpoints after this log did, or fenced this
    /// mirror twice within a minute.
    DuplicateSite,
}

impl RefusalReason {
    /// Every reason, in a fixed order.
    pub const ALL: [RefusalReason; 2] = [RefusalReason::ForeignLog, RefusalReason::DuplicateSite];

    /// The name in metric labels and JSON.
    pub fn label(self) -> &'static str {
        match self {
            RefusalReason::ForeignLog => "foreign_log",
            RefusalReason::DuplicateSite => "duplicate_site",
        }
    }
}

/// Why and since when the mirror refuses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Why.
    pub reason: RefusalReason,
    /// What is wrong and what to do.
    pub message: String,
    /// The log whose checkpoints were found (`None`: checkpoints without an id, or a
    /// refusal for fencing).
    pub foreign_log: Option<String>,
    /// Per partition, the foreign checkpoint found: (topic, partition, next edge offset of
    /// that log, last Kafka offset).
    #[serde(default)]
    pub checkpoints: Vec<(String, u32, u64, i64)>,
    /// When it was decided (ms since the Unix epoch).
    pub at_ms: u64,
}

/// Which step of mirroring last failed: a closed set, so that a metric can carry it as a
/// label (the message itself is free text from Kafka, the network and the mirror).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// Reaching the cluster: connecting, name resolution, TLS, authentication, the idle link
    /// check, and the errors librdkafka reports on its own while mirroring.
    Connect,
    /// Creating the Kafka topics or finding them in the cluster's metadata.
    Topics,
    /// Reading the site's checkpoints.
    Checkpoint,
    /// Producing records: a record Kafka refused or did not acknowledge in time.
    Produce,
    /// Starting, beginning, committing or aborting a Kafka transaction.
    Transaction,
    /// Another producer with this site's transactional id took over: two edges share a site
    /// name, or an earlier run of this one is still alive.
    Fenced,
    /// Reading the edge's own log.
    Source,
    /// Anything else: a Kafka client that could not be created (its settings), the mirror's
    /// runtime that could not start, or a fatal error librdkafka reported on its own.
    Other,
}

impl ErrorKind {
    /// Every kind, in a fixed order.
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::Connect,
        ErrorKind::Topics,
        ErrorKind::Checkpoint,
        ErrorKind::Produce,
        ErrorKind::Transaction,
        ErrorKind::Fenced,
        ErrorKind::Source,
        ErrorKind::Other,
    ];

    /// The name in metric labels and JSON.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Topics => "topics",
            ErrorKind::Checkpoint => "checkpoint",
            ErrorKind::Produce => "produce",
            ErrorKind::Transaction => "transaction",
            ErrorKind::Fenced => "fenced",
            ErrorKind::Source => "source",
            ErrorKind::Other => "other",
        }
    }
}

/// One partition of the mirror.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionStatus {
    /// Source topic.
    pub topic: String,
    /// Kafka topic.
    pub kafka_topic: String,
    /// Partition number.
    pub partition: u32,
    /// First offset the edge still holds.
    pub edge_start_offset: u64,
    /// One past the last durable offset of the edge.
    pub edge_end_offset: u64,
    /// First offset not yet in Kafka; `None` until the checkpoint has been read.
    pub mirrored_offset: Option<u64>,
    /// Kafka offset of the last mirrored record.
    pub last_kafka_offset: Option<i64>,
    /// Records held by the edge and not yet mirrored.
    pub lag_records: u64,
    /// Bytes of those records, estimated from the partition's average stored record size.
    pub lag_bytes: u64,
    /// Records deleted at the edge (retention, disk budget) before they were mirrored.
    pub lost_before_mirror: u64,
    /// Records below this offset that were deleted unmirrored are counted in
    /// `lost_before_mirror` already (so that a retried read never counts them twice).
    #[serde(default)]
    pub loss_counted_until: u64,
    /// Why this partition is not being mirrored, if it is not.
    pub error: Option<String>,
}

/// A snapshot of the mirror.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorStatus {
    /// Edge site.
    pub site: String,
    /// Kafka bootstrap servers.
    pub bootstrap: String,
    /// Overall state.
    pub state: LinkState,
    /// Last failure, as reported by Kafka or the mirror.
    pub last_error: Option<String>,
    /// Which step the last failure was in.
    #[serde(default)]
    pub last_error_kind: Option<ErrorKind>,
    /// When it happened (ms since the Unix epoch).
    pub last_error_at_ms: Option<u64>,
    /// Last time a transaction committed or the idle link was confirmed working.
    pub last_healthy_at_ms: Option<u64>,
    /// When this snapshot was taken.
    pub updated_at_ms: u64,
    /// Transactions committed since start.
    pub transactions: u64,
    /// Records committed to Kafka since start.
    pub records_mirrored: u64,
    /// Record bytes committed to Kafka since start.
    pub bytes_mirrored: u64,
    /// Records Kafka refused for themselves that transactions committed since start as
    /// dead-lettered or skipped, per reason label (`too_large`, `invalid_timestamp`,
    /// `invalid_record`).
    #[serde(default)]
    pub records_rejected: std::collections::BTreeMap<String, u64>,
    /// When a transaction last committed, or the current session began mirroring (ms since
    /// the Unix epoch): how long the mirror has gone without progress.
    #[serde(default)]
    pub progress_at_ms: Option<u64>,
    /// Records wait and nothing committed for the stall timeout: the link counts as down.
    #[serde(default)]
    pub stalled: bool,
    /// Per partition, ordered by topic then partition.
    pub partitions: Vec<PartitionStatus>,
    /// The source's consumer groups as last replicated to Kafka, ordered by name.
    #[serde(default)]
    pub groups: Vec<GroupStatus>,
    /// The source log's identity, as written into the checkpoints.
    #[serde(default)]
    pub log_id: Option<String>,
    /// Why the mirror refuses, while it does.
    #[serde(default)]
    pub refusal: Option<Refusal>,
}

impl MirrorStatus {
    /// Refreshes each partition's edge offsets and lag from `source`.
    pub fn refresh_from(&mut self, source: &dyn PartitionedSource) {
        for p in &mut self.partitions {
            if let Ok(b) = source.bounds(&p.topic, p.partition) {
                p.edge_start_offset = b.start;
                p.edge_end_offset = b.end;
                let from = p.mirrored_offset.unwrap_or(b.start).max(b.start);
                p.lag_records = b.end.saturating_sub(from);
                let held = b.end - b.start;
                p.lag_bytes = if held == 0 {
                    0
                } else {
                    (b.bytes as u128 * p.lag_records as u128 / held as u128) as u64
                };
            }
        }
    }

    /// Whether, at `now_ms`, records wait and nothing has committed for `stall_ms`.
    pub fn is_stalled(&self, now_ms: u64, stall_ms: u64) -> bool {
        self.lag_records() > 0
            && self
                .progress_at_ms
                .is_some_and(|at| now_ms.saturating_sub(at) >= stall_ms)
    }

    /// Total records not yet mirrored.
    pub fn lag_records(&self) -> u64 {
        self.partitions.iter().map(|p| p.lag_records).sum()
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
    /// The Kafka group holds offsets the edge did not commit: another consumer (one that
    /// subscribes, or one that assigns partitions itself) commits to it, so the edge leaves
    /// the group alone until its offsets in Kafka are deleted.
    OtherCommitter,
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
    /// The offset the edge last committed for the group; while Kafka holds another one,
    /// someone else commits to the group.
    #[serde(default)]
    pub edge_committed: Option<i64>,
}

/// One group of the source, as last replicated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    /// Group name at the edge.
    pub group: String,
    /// The Kafka group id (`cloud.group_prefix` and the name); absent in a status written
    /// before the edge tracked its own commits.
    #[serde(default)]
    pub kafka_group: Option<String>,
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

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_file_from_before_group_replication_still_parses() {
        let old = r#"{"site":"plant-7","bootstrap":"k:9092","state":"mirroring","last_error":null,
            "last_error_at_ms":null,"last_healthy_at_ms":1,"updated_at_ms":2,"transactions":3,
            "records_mirrored":4,"bytes_mirrored":5,"partitions":[]}"#;
        let s: MirrorStatus = serde_json::from_str(old).unwrap();
        assert!(s.groups.is_empty());
        assert_eq!(s.records_mirrored, 4);
        assert_eq!(s.last_error_kind, None);
    }

    #[test]
    fn a_group_status_from_before_commits_were_tracked_still_parses() {
        let old = r#"{"group":"alarms","state":"replicated","error":null,"updated_at_ms":1,
            "committed_at_ms":2,"partitions":[{"topic":"t","kafka_topic":"p.t","partition":0,
            "edge_offset":10,"translated_offset":11,"kafka_offset":11}]}"#;
        let g: GroupStatus = serde_json::from_str(old).unwrap();
        assert_eq!(g.kafka_group, None);
        assert_eq!(g.partitions[0].edge_committed, None);
        assert_eq!(g.partitions[0].kafka_offset, Some(11));
        assert_eq!(
            serde_json::to_value(GroupSyncState::OtherCommitter).unwrap(),
            "other_committer"
        );
    }

    fn status_with_lag(lag: u64, progress_at_ms: Option<u64>) -> MirrorStatus {
        let mut s: MirrorStatus = serde_json::from_str(
            r#"{"site":"p","bootstrap":"k:9092","state":"mirroring","last_error":null,
            "last_error_at_ms":null,"last_healthy_at_ms":1,"updated_at_ms":2,"transactions":3,
            "records_mirrored":4,"bytes_mirrored":5,"partitions":[]}"#,
        )
        .unwrap();
        s.progress_at_ms = progress_at_ms;
        s.partitions.push(PartitionStatus {
            topic: "t".into(),
            kafka_topic: "p.t".into(),
            partition: 0,
            edge_start_offset: 0,
            edge_end_offset: lag,
            mirrored_offset: Some(0),
            last_kafka_offset: None,
            lag_records: lag,
            lag_bytes: 0,
            lost_before_mirror: 0,
            loss_counted_until: 0,
            error: None,
        });
        s
    }

    #[test]
    fn stalled_only_with_lag_and_no_progress_for_the_timeout() {
        assert!(status_with_lag(5, Some(1_000)).is_stalled(61_000, 60_000));
        assert!(!status_with_lag(5, Some(1_000)).is_stalled(60_999, 60_000));
        assert!(!status_with_lag(0, Some(1_000)).is_stalled(500_000, 60_000));
        // Never mirrored in this process: the state (not mirroring) says it already.
        assert!(!status_with_lag(5, None).is_stalled(500_000, 60_000));
    }

    #[test]
    fn error_kinds_serialize_as_their_labels() {
        for kind in ErrorKind::ALL {
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::Value::from(kind.label())
            );
            assert!(
                kind.label().bytes().all(|b| b.is_ascii_lowercase()),
                "{kind:?}"
            );
        }
    }
}
