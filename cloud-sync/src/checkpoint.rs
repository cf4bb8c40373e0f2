//! Checkpoint records: where each source partition's mirror stands, written to a compacted
//! Kafka topic inside the same transaction as the records they describe.
//!
//! Key: `{site}/{topic}/{partition}` (UTF-8). Value: JSON
//! `{"site","topic","partition","kafka_topic","next_edge_offset","last_kafka_offset","log_id"}`:
//! every source record below `next_edge_offset` is in `kafka_topic` exactly once, the last
//! one at Kafka offset `last_kafka_offset`; `log_id` is the identity of the source log whose
//! offsets these are (absent in checkpoints written before identities: see [`whose`]). All checkpoints of a site go to one partition of
//! the checkpoint topic (FNV-1a of the site name modulo the partition count), so a mirror
//! reads only its own on start. Because the transaction commits records and checkpoint
//! together, a `read_committed` reader sees both or neither: the checkpoint is the truth.

#![deny(clippy::expect_used, clippy::indexing_slicing)]

use serde::{Deserialize, Serialize};

use crate::source::{SourceIdentity, UnmarkedCheckpoints};

/// One partition's position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Edge site.
    pub site: String,
    /// Source topic.
    pub topic: String,
    /// Partition number (the same on both sides).
    pub partition: u32,
    /// Kafka topic the partition is mirrored to.
    pub kafka_topic: String,
    /// First source offset not yet mirrored.
    pub next_edge_offset: u64,
    /// Kafka offset of the record at `next_edge_offset - 1`.
    pub last_kafka_offset: i64,
    /// The identity of the source log whose offsets these are; `None` in checkpoints of
    /// earlier versions (and of sources without an identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_id: Option<String>,
}

/// Whose a checkpoint is, to a source log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Whose {
    /// The log's own: mirroring resumes at its `next_edge_offset`.
    Own,
    /// An adopted predecessor's: its offsets are not this log's, which is mirrored from its
    /// own first offset after the predecessor's records.
    Predecessor,
    /// Another log's (its id; `None`: a checkpoint without an id), not adopted: refused.
    Foreign(Option<String>),
}

/// Whose `checkpoint` is to a log of `identity` (a source without an identity takes every
/// checkpoint of its site as its own).
pub fn whose(checkpoint: &Checkpoint, identity: Option<&SourceIdentity>) -> Whose {
    let Some(identity) = identity else {
        return Whose::Own;
    };
    match &checkpoint.log_id {
        Some(id) if *id == identity.id => Whose::Own,
        Some(id) if identity.predecessors.contains(id) => Whose::Predecessor,
        Some(id) => Whose::Foreign(Some(id.clone())),
        None => match identity.unmarked {
            UnmarkedCheckpoints::Own => Whose::Own,
            UnmarkedCheckpoints::Predecessor => Whose::Predecessor,
            UnmarkedCheckpoints::Refused => Whose::Foreign(None),
        },
    }
}

impl Checkpoint {
    /// The record key.
    pub fn key(&self) -> String {
        checkpoint_key(&self.site, &self.topic, self.partition)
    }

    /// The record value.
    pub fn value(&self) -> Vec<u8> {
        // A struct of strings and integers always serializes.
        #[allow(clippy::expect_used)]
        serde_json::to_vec(self).expect("a checkpoint serializes")
    }

    /// Parses a record value; `None` when it is not a checkpoint (or a tombstone).
    pub fn parse(value: &[u8]) -> Option<Checkpoint> {
        serde_json::from_slice(value).ok()
    }
}

/// The record key of a partition's checkpoint.
pub fn checkpoint_key(site: &str, topic: &str, partition: u32) -> String {
    format!("{site}/{topic}/{partition}")
}

/// The checkpoint-topic partition that holds a site's checkpoints.
pub fn checkpoint_partition(site: &str, partitions: i32) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in site.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (hash % partitions.max(1) as u32) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_round_trips() {
        let c = Checkpoint {
            site: "plant-7".into(),
            topic: "telemetry".into(),
            partition: 3,
            kafka_topic: "plant-7.telemetry".into(),
            next_edge_offset: 1200,
            last_kafka_offset: 1250,
            log_id: Some("ab".repeat(16)),
        };
        assert_eq!(Checkpoint::parse(&c.value()), Some(c.clone()));
        assert_eq!(c.key(), "plant-7/telemetry/3");
    }

    #[test]
    fn a_checkpoint_of_an_earlier_version_parses_without_a_log_id() {
        let old = br#"{"site":"s","topic":"t","partition":0,"kafka_topic":"s.t","next_edge_offset":5,"last_kafka_offset":4}"#;
        assert_eq!(Checkpoint::parse(old).unwrap().log_id, None);
    }

    #[test]
    fn only_own_and_adopted_checkpoints_are_accepted() {
        let cp = |id: Option<&str>| Checkpoint {
            site: "s".into(),
            topic: "t".into(),
            partition: 0,
            kafka_topic: "s.t".into(),
            next_edge_offset: 5,
            last_kafka_offset: 4,
            log_id: id.map(String::from),
        };
        let mut me = SourceIdentity {
            id: "me".into(),
            unmarked: UnmarkedCheckpoints::Refused,
            predecessors: vec!["old".into()],
        };
        assert_eq!(whose(&cp(Some("me")), Some(&me)), Whose::Own);
        assert_eq!(whose(&cp(Some("old")), Some(&me)), Whose::Predecessor);
        assert_eq!(
            whose(&cp(Some("other")), Some(&me)),
            Whose::Foreign(Some("other".into()))
        );
        assert_eq!(whose(&cp(None), Some(&me)), Whose::Foreign(None));
        me.unmarked = UnmarkedCheckpoints::Own;
        assert_eq!(whose(&cp(None), Some(&me)), Whose::Own);
        me.unmarked = UnmarkedCheckpoints::Predecessor;
        assert_eq!(whose(&cp(None), Some(&me)), Whose::Predecessor);
        assert_eq!(whose(&cp(Some("other")), None), Whose::Own);
    }

    #[test]
    fn foreign_values_are_not_checkpoints() {
        assert_eq!(Checkpoint::parse(b""), None);
        assert_eq!(Checkpoint::parse(b"{\"site\":1}"), None);
    }

    #[test]
    fn a_site_always_uses_the_same_partition() {
        let p = checkpoint_partition("plant-7", 6);
        assert!((0..6).contains(&p));
        assert_eq!(p, checkpoint_partition("plant-7", 6));
        assert_eq!(checkpoint_partition("plant-7", 1), 0);
    }
}
