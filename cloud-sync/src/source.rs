//! What the mirror reads: a partitioned, append-only source of records with dense offsets.
//!
//! `edge` implements [`PartitionedSource`] over its fjall log; [`MemorySource`] is an
//! in-memory implementation for tests and benchmarks.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Mutex;

use bytes::Bytes;

/// A topic of the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTopic {
    /// Name, used in the Kafka topic name.
    pub name: String,
    /// Number of partitions; the Kafka topic gets at least as many.
    pub partitions: u32,
}

/// What a partition holds right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionBounds {
    /// First offset still held (earlier ones were deleted by retention or a disk budget).
    pub start: u64,
    /// One past the last offset that is durable and may be mirrored.
    pub end: u64,
    /// Bytes the partition holds (as stored; for lag estimates).
    pub bytes: u64,
}

/// One Kafka header of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Header name.
    pub name: Cow<'static, str>,
    /// Header value.
    pub value: Cow<'static, [u8]>,
}

/// One record of a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRecord {
    /// Offset in its partition.
    pub offset: u64,
    /// Timestamp (ms since the Unix epoch), the Kafka record's CreateTime.
    pub timestamp_ms: u64,
    /// Partition key, the Kafka record key.
    pub key: Bytes,
    /// Body, the Kafka record value.
    pub payload: Bytes,
    /// Metadata, the Kafka record headers, in order.
    pub headers: Vec<Header>,
}

impl SourceRecord {
    /// Bytes this record puts on the wire (for transaction sizing and the bandwidth cap).
    pub fn wire_bytes(&self) -> usize {
        self.key.len()
            + self.payload.len()
            + self
                .headers
                .iter()
                .map(|h| h.name.len() + h.value.len())
                .sum::<usize>()
    }
}

/// A failure of the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The topic or partition does not exist.
    #[error("no partition {partition} of topic \"{topic}\" in the source")]
    UnknownPartition {
        /// Topic name.
        topic: String,
        /// Partition number.
        partition: u32,
    },
    /// The source could not be read (a storage error, corruption).
    #[error("reading {topic}/{partition}: {message}")]
    Read {
        /// Topic name.
        topic: String,
        /// Partition number.
        partition: u32,
        /// What went wrong.
        message: String,
    },
}

/// Where a consumer group of the source stands in one partition: every record below
/// `next_offset` has been processed by the group (durably, at the source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPosition {
    /// Group name; the Kafka consumer group it is replicated to has the same id.
    pub group: String,
    /// Source topic.
    pub topic: String,
    /// Partition number.
    pub partition: u32,
    /// First offset the group has not processed.
    pub next_offset: u64,
}

/// What Kafka checkpoints without a log identity (written before checkpoints carried one)
/// are to a source log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnmarkedCheckpoints {
    /// Another log's: refused until an operator adopts them.
    Refused,
    /// Its own: the log existed before identities did.
    Own,
    /// An adopted predecessor's.
    Predecessor,
}

/// A source log's identity: a random id made with the log, written into every checkpoint,
/// and the logs whose checkpoints an operator adopted for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceIdentity {
    /// The log's id.
    pub id: String,
    /// What checkpoints without an id are to this log.
    pub unmarked: UnmarkedCheckpoints,
    /// Ids of the logs whose checkpoints were adopted.
    pub predecessors: Vec<String>,
}

/// A partitioned log the mirror reads in order.
pub trait PartitionedSource: Send + Sync + 'static {
    /// Every topic of the source.
    fn topics(&self) -> Vec<SourceTopic>;

    /// What `topic`/`partition` holds right now.
    fn bounds(&self, topic: &str, partition: u32) -> Result<PartitionBounds, SourceError>;

    /// Appends to `out` up to `max_records` records of the partition in offset order,
    /// starting at `from` (or at the first record held, if `from` was deleted), never at or
    /// past [`PartitionBounds::end`].
    fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max_records: usize,
        out: &mut Vec<SourceRecord>,
    ) -> Result<(), SourceError>;

    /// The committed positions of the source's consumer groups, to be replicated to Kafka.
    /// A source without groups has none.
    fn group_positions(&self) -> Vec<GroupPosition> {
        Vec::new()
    }

    /// The log's identity. A source without one takes every checkpoint of its site as its
    /// own (as mirrors did before identities).
    fn identity(&self) -> Option<SourceIdentity> {
        None
    }
}

#[derive(Debug, Default)]
struct MemoryPartition {
    start: u64,
    bytes: u64,
    records: std::collections::VecDeque<SourceRecord>,
}

/// An in-memory [`PartitionedSource`] for tests and benchmarks.
#[derive(Debug, Default)]
pub struct MemorySource {
    topics: Mutex<BTreeMap<String, Vec<MemoryPartition>>>,
    /// Group positions by (group, topic, partition).
    groups: Mutex<BTreeMap<(String, String, u32), u64>>,
    identity: Mutex<Option<SourceIdentity>>,
}

impl MemorySource {
    /// An empty source.
    pub fn new() -> MemorySource {
        MemorySource::default()
    }

    /// Gives the source a log identity.
    pub fn set_identity(&self, identity: SourceIdentity) {
        *self.identity.lock().expect("source lock") = Some(identity);
    }

    /// Adds a topic with `partitions` empty partitions.
    pub fn add_topic(&self, name: &str, partitions: u32) {
        let parts = (0..partitions)
            .map(|_| MemoryPartition::default())
            .collect();
        self.topics
            .lock()
            .expect("source lock")
            .insert(name.to_string(), parts);
    }

    /// Appends a record and returns its offset.
    pub fn append(
        &self,
        topic: &str,
        partition: u32,
        timestamp_ms: u64,
        key: &[u8],
        payload: &[u8],
        headers: Vec<Header>,
    ) -> u64 {
        let mut topics = self.topics.lock().expect("source lock");
        let p = &mut topics.get_mut(topic).expect("known topic")[partition as usize];
        let offset = p.start + p.records.len() as u64;
        let record = SourceRecord {
            offset,
            timestamp_ms,
            key: Bytes::copy_from_slice(key),
            payload: Bytes::copy_from_slice(payload),
            headers,
        };
        p.bytes += record.wire_bytes() as u64;
        p.records.push_back(record);
        offset
    }

    /// Deletes every record before `new_start`, as retention would.
    pub fn delete_before(&self, topic: &str, partition: u32, new_start: u64) {
        let mut topics = self.topics.lock().expect("source lock");
        let p = &mut topics.get_mut(topic).expect("known topic")[partition as usize];
        let n = (new_start.saturating_sub(p.start) as usize).min(p.records.len());
        for r in p.records.drain(..n) {
            p.bytes -= r.wire_bytes() as u64;
        }
        p.start += n as u64;
    }

    /// Sets the committed position of `group` in `topic`/`partition`, as a consumer group of
    /// the source would (any value: the mirror must cope with positions that go back).
    pub fn set_group_position(&self, group: &str, topic: &str, partition: u32, next_offset: u64) {
        self.groups.lock().expect("source lock").insert(
            (group.to_string(), topic.to_string(), partition),
            next_offset,
        );
    }
}

fn memory_partition<'a>(
    topics: &'a BTreeMap<String, Vec<MemoryPartition>>,
    topic: &str,
    partition: u32,
) -> Result<&'a MemoryPartition, SourceError> {
    topics
        .get(topic)
        .and_then(|t| t.get(partition as usize))
        .ok_or_else(|| SourceError::UnknownPartition {
            topic: topic.to_string(),
            partition,
        })
}

impl PartitionedSource for MemorySource {
    fn identity(&self) -> Option<SourceIdentity> {
        self.identity.lock().expect("source lock").clone()
    }

    fn topics(&self) -> Vec<SourceTopic> {
        self.topics
            .lock()
            .expect("source lock")
            .iter()
            .map(|(name, parts)| SourceTopic {
                name: name.clone(),
                partitions: parts.len() as u32,
            })
            .collect()
    }

    fn bounds(&self, topic: &str, partition: u32) -> Result<PartitionBounds, SourceError> {
        let topics = self.topics.lock().expect("source lock");
        let p = memory_partition(&topics, topic, partition)?;
        Ok(PartitionBounds {
            start: p.start,
            end: p.start + p.records.len() as u64,
            bytes: p.bytes,
        })
    }

    fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max_records: usize,
        out: &mut Vec<SourceRecord>,
    ) -> Result<(), SourceError> {
        let topics = self.topics.lock().expect("source lock");
        let p = memory_partition(&topics, topic, partition)?;
        let first = from.saturating_sub(p.start) as usize;
        out.extend(
            p.records
                .range(first.min(p.records.len())..)
                .take(max_records)
                .cloned(),
        );
        Ok(())
    }

    fn group_positions(&self) -> Vec<GroupPosition> {
        self.groups
            .lock()
            .expect("source lock")
            .iter()
            .map(|((group, topic, partition), &next_offset)| GroupPosition {
                group: group.clone(),
                topic: topic.clone(),
                partition: *partition,
                next_offset,
            })
            .collect()
    }
}
