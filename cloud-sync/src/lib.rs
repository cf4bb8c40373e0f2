//! cloud-sync: mirrors a partitioned log to Apache Kafka exactly once.
//!
//! The edge implements [`PartitionedSource`] over its log and starts a [`Mirror`] when its
//! config has a `[cloud]` section. See [`mirror`] for the protocol, [`checkpoint`] for
//! the checkpoint records, [`translation`] for how edge offsets map to Kafka offsets and
//! [`groups`] for how the source's consumer group positions are replicated to Kafka.
//!
//! # What lands in Kafka
//!
//! Each source topic `T` goes to Kafka topic `{site}.{T}` (configurable), partition `p` to
//! partition `p`. A record's Kafka key is the source key, its value the payload, its
//! timestamp the source timestamp (CreateTime), and its headers the source headers; the edge
//! gives `mqtt.topic`, `mqtt.client_id`, `mqtt.qos`, `mqtt.retain`, `mqtt.content_type`,
//! `mqtt.response_topic` and `mqtt.correlation_data` (when set) and then each MQTT 5 user property under its own name. Readers use
//! `isolation.level=read_committed`.

// Each module depends only on those above it. First, what knows nothing of Kafka's client:
pub mod checkpoint;
pub mod config;
pub mod source;
pub mod status;
pub mod translation;
// why a mirror could not start;
mod error;
// how transactions are sized and spaced;
#[cfg(feature = "kafka")]
mod pacing;
// the state the mirror's threads share;
#[cfg(feature = "kafka")]
mod shared;
// the Kafka clients' common ground;
#[cfg(feature = "kafka")]
mod kafka;
// records Kafka refuses for themselves;
pub mod rejection;
// the group replicator, and the mirror that starts it.
#[cfg(feature = "kafka")]
pub mod groups;
#[cfg(feature = "kafka")]
pub mod mirror;
// A build without the `kafka` feature (no librdkafka, no C build of it) has the same types,
// and a mirror that refuses to start.
#[cfg(not(feature = "kafka"))]
#[path = "without_kafka.rs"]
pub mod mirror;

pub use config::{MirrorConfig, OnRejected, Security, RECORD_HEADROOM};
pub use mirror::{Mirror, MirrorError};
pub use source::{
    GroupPosition, Header, MemorySource, PartitionBounds, PartitionedSource, SourceError,
    SourceIdentity, SourceRecord, SourceTopic, UnmarkedCheckpoints,
};
pub use status::{
    ErrorKind, GroupPartitionStatus, GroupStatus, GroupSyncState, LinkState, MirrorStatus,
    PartitionStatus, Refusal, RefusalReason,
};
