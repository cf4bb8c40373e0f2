//! Checkpoint records: where each source partition's mirror stands, written to a compacted
//! Kafka topic inside the same transaction as the records they describe.
//!
//! Key: `{site}/{topic}/{partition}` (UTF-8). Value: JSON
//! `{"site","topic","partition","kafka_topic","next_edge_offset","last_kafka_offset"}`:
//! every source record below `next_edge_offset` is in `kafka_topic` exactly once, the last
//! one at Kafka offset `last_kafka_offset`. All checkpoints of a site go to one partition of
//! the checkpoint topic (FNV-1a of the site name modulo the partition count), so a mirror
//! reads only its own on start. Because the transaction commits records and checkpoint
//! together, a `read_committed` reader sees both or neither: the checkpoint is the truth.

#![deny(clippy::expect_used, clippy::indexing_slicing)]

use serde::{Deserialize, Serialize};

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
        };
        assert_eq!(Checkpoint::parse(&c.value()), Some(c.clone()));
        assert_eq!(c.key(), "plant-7/telemetry/3");
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
