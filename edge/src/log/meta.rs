//! The `meta` keyspace: every key and value the node stores beside its record batches.
//!
//! This is the one place that knows their bytes. Sessions, deliveries and consumer groups
//! offer typed operations built from the encoders here; no code outside `log/` builds or
//! splits a meta key by hand.
//!
//! # Keys and values
//!
//! Integers are big-endian; `str16` is `len u16 | UTF-8 bytes`. Every value starts with a
//! format byte ([`VALUE_FORMAT`]); the table shows what follows it.
//!
//! | tag | key | value | written by |
//! |-----|-----|-------|------------|
//! | `V` | `V` | layout `u8` ([`LAYOUT`]) | [`migrate`], at open |
//! | `t` | `t \| name` | `topic_id u32 \| partitions u32` | the log, at open |
//! | `p` | `p \| topic_id u32 \| partition u32` | `end u64 \| bytes u64 \| removed u64` | the appender, each commit; retention |
//! | `c` | `c` | `jump_point_ms u64 \| skew_ms u64` | retention, after a forward clock jump |
//! | `s` | `s \| client_id` | `expiry_secs u32 \| disconnected_at_ms u64 [\| owner str16]` | sessions with expiry > 0 |
//! | `q` | `q \| client str16 \| pkid u16` | empty | a QoS 2 PUBLISH logged, PUBREL not yet seen |
//! | `u` | `u \| client str16 \| filter` | `qos u8 \| flags u8 \| subscription_id u32` | durable subscriptions |
//! | `o` | `o \| client str16 \| seq u64` | queue entry, below | messages queued for a session |
//! | `O` | `O \| client str16 \| seq u64` | empty | QoS 2 deliveries past PUBREC, waiting for PUBCOMP |
//! | `r` | `r \| topic` | a one-record batch ([`super::record`]) | retained messages |
//! | `g` | `g \| group str16 \| topic str16 \| partition u32` | `committed u64 \| lease u64` | consumer group positions |
//! | `f` | `f` | `unix_ms u64` | the appender, each group commit: after a crash, when the last commit that survived was made |
//! | `w` | `w \| client str16 \| will_id u64` | `disconnected_at_ms u64 \| delay_secs u32 \| has_user u8 [\| user str16] \| batch` | a connection's will, from its CONNACK until it is published or can no longer be due |
//! | `i` | `i` | `id [16] \| unmarked u8 \| n u16 \| predecessor id [16] × n` | the log, at open (fsynced before anything reads it); `edge mirror-adopt` |
//!
//! The log identity (`i`) is a random id made when the data directory is made: the mirror
//! writes it into every Kafka checkpoint and refuses checkpoints of another log (see
//! [`LogIdentity`]).
//!
//! A queue entry is `qos u8 | retain u8 | n u8 | subscription_id u32 × n | topic_id u32 |
//! partition u32 | offset u64`: where the record is in the log, never a copy of it. The
//! appender appends the position (see [`super::appender::StateOp::Enqueue`]); `seq` comes from
//! a node-wide counter that grows in commit order.
//!
//! A will's `batch` is the will as a one-record batch ([`super::record`], as a retained
//! message is stored); `disconnected_at_ms` is 0 while its connection is open; `delay_secs` is
//! the delay it waits once its connection has ended (already capped by the session expiry).
//!
//! Session flags in `u`: bit 0 no-local, bit 1 retain-as-published, bits 2-3 retain handling;
//! subscription id 0 means none.
//!
//! # Invariants
//!
//! - Keys of one client (`q`, `u`, `o`, `O`, `w`) share the prefix `tag | client str16`, so one
//!   prefix delete ends a session, and a client id can never be the prefix of another's.
//! - A key longer than fjall holds (64 KiB) is never written: the appender refuses the
//!   request whole (its `oversize_state`), so a `str16` length that would not fit never reaches
//!   the disk cut short.
//! - A decoder accepts exactly what its encoder writes, format byte included; anything else
//!   is an undecodable entry: counted, quarantined by `edge check --repair`, never fatal.
//!
//! # Recovery and migration
//!
//! Meta entries change only inside the appender's group commits (or, for the topic table and
//! the layout marker, in one fsynced write batch at open), so after a crash they are as whole
//! as the records they describe. Data directories written before values carried a format byte
//! have no `V` key: [`migrate`] rewrites every value with the byte in front, and writes `V`, in
//! one write batch, fsynced, before anything else reads them.

#![deny(clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;

use fjall::{Database, Keyspace};

use super::LogError;
use crate::route::TopicId;

/// The format byte in front of every meta value written by this version.
pub const VALUE_FORMAT: u8 = 1;
/// The layout this version writes, stored under [`Tag::Layout`].
pub const LAYOUT: u8 = 1;

/// The first byte of every meta key: what kind of entry it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Tag {
    /// The layout marker.
    Layout = b'V',
    /// A topic of the topic table.
    Topic = b't',
    /// A partition's end offset, bytes and removed count.
    Partition = b'p',
    /// The retention clock's correction after a forward jump.
    RetentionClock = b'c',
    /// A persistent session.
    Session = b's',
    /// A QoS 2 inbound marker.
    Qos2 = b'q',
    /// A durable subscription.
    Subscription = b'u',
    /// A queued delivery.
    Queued = b'o',
    /// A QoS 2 delivery past PUBREC.
    Released = b'O',
    /// A retained message.
    Retained = b'r',
    /// A consumer group position.
    Group = b'g',
    /// The wall time of the latest group commit.
    LastCommit = b'f',
    /// A connection's will.
    Will = b'w',
    /// The log identity.
    Identity = b'i',
}

impl Tag {
    /// Every tag, in the order of the table above.
    pub const ALL: [Tag; 14] = [
        Tag::Layout,
        Tag::Topic,
        Tag::Partition,
        Tag::RetentionClock,
        Tag::Session,
        Tag::Qos2,
        Tag::Subscription,
        Tag::Queued,
        Tag::Released,
        Tag::Retained,
        Tag::Group,
        Tag::LastCommit,
        Tag::Will,
        Tag::Identity,
    ];

    /// The tag of a stored key, if it is one of ours.
    pub fn of(key: &[u8]) -> Option<Tag> {
        let first = *key.first()?;
        Tag::ALL.into_iter().find(|t| *t as u8 == first)
    }

    /// The key prefix of every entry with this tag.
    pub fn prefix(self) -> [u8; 1] {
        [self as u8]
    }

    /// A name for operators (`edge check`, logs, metrics).
    pub fn kind(self) -> &'static str {
        match self {
            Tag::Layout => "layout",
            Tag::Topic => "topic",
            Tag::Partition => "partition",
            Tag::RetentionClock => "retention clock",
            Tag::Session => "session",
            Tag::Qos2 => "qos2 marker",
            Tag::Subscription => "subscription",
            Tag::Queued | Tag::Released => "queue entry",
            Tag::Retained => "retained message",
            Tag::Group => "group position",
            Tag::LastCommit => "last commit time",
            Tag::Will => "will",
            Tag::Identity => "log identity",
        }
    }
}

// ---- value framing ----

/// A value buffer that starts with the format byte, with room for `body` more bytes.
fn value_with_capacity(body: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + body);
    v.push(VALUE_FORMAT);
    v
}

/// The body of a stored value: `None` unless it starts with this version's format byte.
pub fn value_body(v: &[u8]) -> Option<&[u8]> {
    match v.split_first() {
        Some((&VALUE_FORMAT, body)) => Some(body),
        _ => None,
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Appends `len u16 | bytes`. A string longer than `u16::MAX` bytes gets the length
/// `u16::MAX`: the key it is part of is then longer than fjall holds and the appender refuses
/// it whole (see the invariants), so the wrong length is never stored.
fn push_str16(k: &mut Vec<u8>, s: &[u8]) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(s);
}

/// Splits `len u16 | UTF-8 | rest`.
fn split_str16(b: &[u8]) -> Option<(&str, &[u8])> {
    let (len, rest) = b.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_be_bytes(*len));
    let s = std::str::from_utf8(rest.get(..len)?).ok()?;
    Some((s, rest.get(len..)?))
}

// ---- layout ----

const LAYOUT_KEY: [u8; 1] = [Tag::Layout as u8];

/// Brings an older data directory's meta keyspace to this layout, before anything reads it:
/// a directory without the layout marker had values without a format byte; each gets one.
/// One write batch, fsynced. A directory written by a newer layout is refused.
pub(crate) fn migrate(db: &Database, meta: &Keyspace) -> Result<(), LogError> {
    match meta.get(LAYOUT_KEY)? {
        Some(v) if value_body(&v) == Some(&[LAYOUT][..]) => return Ok(()),
        Some(v) => {
            return Err(LogError::CorruptMeta(format!(
                "layout marker {:?}: this data directory was written by a newer edge (this one reads layout {LAYOUT})",
                v.as_ref()
            )))
        }
        None => {}
    }
    let mut batch = db.batch();
    let mut rewritten = 0u64;
    for item in meta.iter() {
        let (k, v) = item.into_inner()?;
        let mut with_format = value_with_capacity(v.len());
        with_format.extend_from_slice(&v);
        batch.insert(meta, k, with_format);
        rewritten += 1;
    }
    let mut marker = value_with_capacity(1);
    marker.push(LAYOUT);
    batch.insert(meta, LAYOUT_KEY, marker);
    batch
        .durability(Some(fjall::PersistMode::SyncAll))
        .commit()?;
    if rewritten > 0 {
        tracing::info!(
            entries = rewritten,
            layout = LAYOUT,
            "meta entries migrated to the current layout (a format byte in front of each value)"
        );
    }
    Ok(())
}

// ---- topics and partitions ----

/// `t | name`.
pub fn topic_key(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(Tag::Topic as u8);
    k.extend_from_slice(name.as_bytes());
    k
}

/// The topic name of a `t` key.
pub fn parse_topic_key(k: &[u8]) -> Option<&str> {
    std::str::from_utf8(k.strip_prefix(&[Tag::Topic as u8])?).ok()
}

/// A topic's id and partition count.
pub fn topic_value(id: TopicId, partitions: u32) -> Vec<u8> {
    let mut v = value_with_capacity(8);
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(&partitions.to_be_bytes());
    v
}

/// Decodes [`topic_value`]: id and partition count.
pub fn parse_topic_value(v: &[u8]) -> Option<(TopicId, u32)> {
    let b = value_body(v)?;
    (b.len() == 8).then_some((u32_at(b, 0)?, u32_at(b, 4)?))
}

/// `p | topic_id | partition`.
pub fn partition_key(topic: TopicId, partition: u32) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = Tag::Partition as u8;
    k[1..5].copy_from_slice(&topic.to_be_bytes());
    k[5..9].copy_from_slice(&partition.to_be_bytes());
    k
}

/// A partition's next offset, batch bytes and removed count.
pub fn partition_value(end: u64, bytes: u64, removed: u64) -> [u8; 25] {
    let mut v = [0u8; 25];
    v[0] = VALUE_FORMAT;
    v[1..9].copy_from_slice(&end.to_be_bytes());
    v[9..17].copy_from_slice(&bytes.to_be_bytes());
    v[17..25].copy_from_slice(&removed.to_be_bytes());
    v
}

/// Decodes [`partition_value`]: end, bytes, removed.
pub fn parse_partition_value(v: &[u8]) -> Option<(u64, u64, u64)> {
    let b = value_body(v)?;
    (b.len() == 24).then_some((u64_at(b, 0)?, u64_at(b, 8)?, u64_at(b, 16)?))
}

// ---- retention clock ----

/// The retention clock's one key.
pub const RETENTION_CLOCK_KEY: [u8; 1] = [Tag::RetentionClock as u8];

/// The retention clock's jump point and skew.
pub fn retention_clock_value(jump_point_ms: u64, skew_ms: u64) -> Vec<u8> {
    let mut v = value_with_capacity(16);
    v.extend_from_slice(&jump_point_ms.to_be_bytes());
    v.extend_from_slice(&skew_ms.to_be_bytes());
    v
}

/// Decodes [`retention_clock_value`].
pub fn parse_retention_clock_value(v: &[u8]) -> Option<(u64, u64)> {
    let b = value_body(v)?;
    (b.len() == 16).then_some((u64_at(b, 0)?, u64_at(b, 8)?))
}

// ---- last commit ----

/// The last commit time's one key.
pub const LAST_COMMIT_KEY: [u8; 1] = [Tag::LastCommit as u8];

/// The wall time (ms since the Unix epoch) of a group commit.
pub fn last_commit_value(unix_ms: u64) -> [u8; 9] {
    let mut v = [0u8; 9];
    v[0] = VALUE_FORMAT;
    v[1..].copy_from_slice(&unix_ms.to_be_bytes());
    v
}

/// Decodes [`last_commit_value`].
pub fn parse_last_commit_value(v: &[u8]) -> Option<u64> {
    let b = value_body(v)?;
    (b.len() == 8).then_some(u64_at(b, 0)?)
}

// ---- log identity ----

/// The log identity's one key.
pub const IDENTITY_KEY: [u8; 1] = [Tag::Identity as u8];

/// What the mirror makes of Kafka checkpoints that carry no log identity (written before
/// checkpoints carried one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnmarkedCheckpoints {
    /// They are refused: this log was made after the upgrade, so they are another log's.
    Refused,
    /// They are this log's own: the identity was given to a log that existed before the
    /// upgrade, at its first open.
    Own,
    /// An operator adopted them (`edge mirror-adopt`) as a predecessor's.
    Predecessor,
}

impl UnmarkedCheckpoints {
    fn byte(self) -> u8 {
        match self {
            UnmarkedCheckpoints::Refused => 0,
            UnmarkedCheckpoints::Own => 1,
            UnmarkedCheckpoints::Predecessor => 2,
        }
    }

    fn of(b: u8) -> Option<UnmarkedCheckpoints> {
        match b {
            0 => Some(UnmarkedCheckpoints::Refused),
            1 => Some(UnmarkedCheckpoints::Own),
            2 => Some(UnmarkedCheckpoints::Predecessor),
            _ => None,
        }
    }
}

/// A log's identity: a random id made with the data directory, and the logs whose Kafka
/// checkpoints an operator adopted for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogIdentity {
    /// The id.
    pub id: [u8; 16],
    /// What checkpoints without an identity are to this log.
    pub unmarked: UnmarkedCheckpoints,
    /// Logs whose checkpoints were adopted (`edge mirror-adopt`), oldest first.
    pub predecessors: Vec<[u8; 16]>,
}

/// An id as 32 lowercase hex digits.
pub fn id_hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses [`id_hex`].
pub fn parse_id_hex(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

/// The identity's value. More predecessors than `u16::MAX` are never stored: adoption
/// refuses past [`MAX_PREDECESSORS`].
pub fn identity_value(identity: &LogIdentity) -> Vec<u8> {
    let n = identity.predecessors.len().min(MAX_PREDECESSORS);
    let mut v = value_with_capacity(16 + 1 + 2 + 16 * n);
    v.extend_from_slice(&identity.id);
    v.push(identity.unmarked.byte());
    v.extend_from_slice(&(n as u16).to_be_bytes());
    for p in identity.predecessors.iter().take(n) {
        v.extend_from_slice(p);
    }
    v
}

/// How many adopted predecessors a log keeps.
pub const MAX_PREDECESSORS: usize = 1024;

/// Decodes [`identity_value`].
pub fn parse_identity_value(v: &[u8]) -> Option<LogIdentity> {
    let b = value_body(v)?;
    let id: [u8; 16] = b.get(..16)?.try_into().ok()?;
    let unmarked = UnmarkedCheckpoints::of(*b.get(16)?)?;
    let n = usize::from(u16::from_be_bytes(b.get(17..19)?.try_into().ok()?));
    let rest = b.get(19..)?;
    if rest.len() != 16 * n || n > MAX_PREDECESSORS {
        return None;
    }
    let predecessors = rest
        .chunks_exact(16)
        .map(|c| c.try_into().ok())
        .collect::<Option<Vec<[u8; 16]>>>()?;
    Some(LogIdentity {
        id,
        unmarked,
        predecessors,
    })
}

// ---- sessions ----

/// `s | client_id`.
pub fn session_key(client_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + client_id.len());
    k.push(Tag::Session as u8);
    k.extend_from_slice(client_id.as_bytes());
    k
}

/// The client id of an `s` key.
pub fn parse_session_key(k: &[u8]) -> Option<&str> {
    std::str::from_utf8(k.strip_prefix(&[Tag::Session as u8])?).ok()
}

/// A session's expiry, disconnect time (0 while connected) and the user who started it. An
/// owner longer than a `str16` holds is not stored (the session then has no owner), never
/// stored cut; user names are capped far below that where they enter.
pub fn session_value(expiry: u32, disconnected_at_ms: u64, owner: Option<&str>) -> Vec<u8> {
    let mut v = value_with_capacity(14 + owner.map_or(0, str::len));
    v.extend_from_slice(&expiry.to_be_bytes());
    v.extend_from_slice(&disconnected_at_ms.to_be_bytes());
    if let Some(owner) = owner.filter(|o| o.len() <= usize::from(u16::MAX)) {
        push_str16(&mut v, owner.as_bytes());
    }
    v
}

/// Decodes [`session_value`]: expiry, disconnect time, owner.
pub fn parse_session_value(v: &[u8]) -> Option<(u32, u64, Option<Arc<str>>)> {
    let b = value_body(v)?;
    let expiry = u32_at(b, 0)?;
    let disconnected = u64_at(b, 4)?;
    let owner = match b.get(12..)? {
        [] => None,
        rest => match split_str16(rest)? {
            (owner, []) => Some(Arc::from(owner)),
            _ => return None,
        },
    };
    Some((expiry, disconnected, owner))
}

// ---- per-client keys: QoS 2 markers, subscriptions, queues ----

/// `tag | client str16`: the prefix of every key of one kind of one client.
pub fn client_prefix(tag: Tag, client_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + client_id.len() + 8);
    k.push(tag as u8);
    push_str16(&mut k, client_id.as_bytes());
    k
}

/// Splits `tag | client str16 | rest` into the tag, the client id and the rest.
pub fn split_client_key(k: &[u8]) -> Option<(Tag, &str, &[u8])> {
    let tag = Tag::of(k)?;
    let (client, rest) = split_str16(k.get(1..)?)?;
    Some((tag, client, rest))
}

/// `q | client | pkid`.
pub fn qos2_key(client_id: &str, pkid: u16) -> Vec<u8> {
    let mut k = client_prefix(Tag::Qos2, client_id);
    k.extend_from_slice(&pkid.to_be_bytes());
    k
}

/// Decodes [`qos2_key`]: client id and packet id.
pub fn parse_qos2_key(k: &[u8]) -> Option<(&str, u16)> {
    match split_client_key(k)? {
        (Tag::Qos2, client, pkid) => Some((client, u16::from_be_bytes(pkid.try_into().ok()?))),
        _ => None,
    }
}

/// The value of an entry whose key says it all (QoS 2 markers, released deliveries):
/// nothing but the format byte.
pub fn marker_value() -> Vec<u8> {
    value_with_capacity(0)
}

/// Whether `v` is a [`marker_value`].
pub fn is_marker_value(v: &[u8]) -> bool {
    value_body(v) == Some(&[][..])
}

/// `u | client | filter`.
pub fn subscription_key(client_id: &str, filter: &str) -> Vec<u8> {
    let mut k = client_prefix(Tag::Subscription, client_id);
    k.extend_from_slice(filter.as_bytes());
    k
}

/// Decodes [`subscription_key`]: client id and filter.
pub fn parse_subscription_key(k: &[u8]) -> Option<(&str, &str)> {
    match split_client_key(k)? {
        (Tag::Subscription, client, filter) => Some((client, std::str::from_utf8(filter).ok()?)),
        _ => None,
    }
}

/// A subscription's options as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredSubscription {
    /// Maximum QoS granted.
    pub qos: u8,
    /// No Local.
    pub no_local: bool,
    /// Retain As Published.
    pub retain_as_published: bool,
    /// Retain Handling (0..=2).
    pub retain_handling: u8,
    /// Subscription identifier, if any.
    pub id: Option<u32>,
}

/// Encodes a durable subscription's options.
pub fn subscription_value(o: &StoredSubscription) -> Vec<u8> {
    let flags = u8::from(o.no_local)
        | (u8::from(o.retain_as_published) << 1)
        | ((o.retain_handling & 3) << 2);
    let mut v = value_with_capacity(6);
    v.push(o.qos);
    v.push(flags);
    v.extend_from_slice(&o.id.unwrap_or(0).to_be_bytes());
    v
}

/// Decodes [`subscription_value`].
pub fn parse_subscription_value(v: &[u8]) -> Option<StoredSubscription> {
    let b = value_body(v)?;
    let (&qos, rest) = b.split_first()?;
    let (&flags, id) = rest.split_first()?;
    if qos > 2 || id.len() != 4 || flags >> 4 != 0 || (flags >> 2) & 3 == 3 {
        return None;
    }
    let id = u32_at(id, 0)?;
    Some(StoredSubscription {
        qos,
        no_local: flags & 1 != 0,
        retain_as_published: flags & 2 != 0,
        retain_handling: (flags >> 2) & 3,
        id: (id != 0).then_some(id),
    })
}

/// `o | client | seq` or `O | client | seq`.
pub fn queue_key(tag: Tag, client_id: &str, seq: u64) -> Vec<u8> {
    let mut k = client_prefix(tag, client_id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Decodes [`queue_key`]: tag, client id, seq.
pub fn parse_queue_key(k: &[u8]) -> Option<(Tag, &str, u64)> {
    match split_client_key(k)? {
        (tag @ (Tag::Queued | Tag::Released), client, seq) => {
            Some((tag, client, u64::from_be_bytes(seq.try_into().ok()?)))
        }
        _ => None,
    }
}

/// Subscription identifiers a queue entry stores at most (its count is a `u8`); a message
/// matching more subscriptions with identifiers is delivered with the first 255.
pub const MAX_QUEUED_SUB_IDS: usize = u8::MAX as usize;

/// The start of a queue entry's value; the appender appends the record's position
/// ([`queue_value`] gives the whole value, for an entry rewritten with its position known).
pub fn queue_value_head(qos: u8, retain: bool, sub_ids: &[u32]) -> Vec<u8> {
    let ids = sub_ids.get(..MAX_QUEUED_SUB_IDS).unwrap_or(sub_ids);
    let mut v = value_with_capacity(3 + 4 * ids.len() + 16);
    v.push(qos);
    v.push(u8::from(retain));
    v.push(u8::try_from(ids.len()).unwrap_or(u8::MAX));
    for id in ids {
        v.extend_from_slice(&id.to_be_bytes());
    }
    v
}

/// A whole queue entry value.
pub fn queue_value(entry: &QueueEntry) -> Vec<u8> {
    let mut v = queue_value_head(entry.qos, entry.retain, &entry.sub_ids);
    let (topic, partition, offset) = entry.position;
    v.extend_from_slice(&topic.to_be_bytes());
    v.extend_from_slice(&partition.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v
}

/// A decoded queue entry value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    /// Delivered QoS.
    pub qos: u8,
    /// Retain flag as delivered.
    pub retain: bool,
    /// Subscription identifiers.
    pub sub_ids: Vec<u32>,
    /// Log topic, partition and offset of the record.
    pub position: (u32, u32, u64),
}

/// Decodes a queue entry value.
pub fn parse_queue_value(v: &[u8]) -> Option<QueueEntry> {
    let b = value_body(v)?;
    let (&qos, b) = b.split_first()?;
    let (&retain, b) = b.split_first()?;
    let (&n, b) = b.split_first()?;
    let n = usize::from(n);
    if qos > 2 || retain > 1 || b.len() != 4 * n + 16 {
        return None;
    }
    let sub_ids = (0..n).map(|i| u32_at(b, 4 * i)).collect::<Option<_>>()?;
    let at = 4 * n;
    Some(QueueEntry {
        qos,
        retain: retain != 0,
        sub_ids,
        position: (u32_at(b, at)?, u32_at(b, at + 4)?, u64_at(b, at + 8)?),
    })
}

// ---- retained messages ----

/// `r | topic`.
pub fn retained_key(topic: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + topic.len());
    k.push(Tag::Retained as u8);
    k.extend_from_slice(topic);
    k
}

/// The value of a retained message: the format byte, then `batch` (a one-record batch).
pub fn retained_value(batch: &[u8]) -> Vec<u8> {
    let mut v = value_with_capacity(batch.len());
    v.extend_from_slice(batch);
    v
}

// ---- consumer groups ----

/// `g | group str16`: the prefix of one group's positions.
pub fn group_prefix(group: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + group.len());
    k.push(Tag::Group as u8);
    push_str16(&mut k, group.as_bytes());
    k
}

/// `g | group | topic str16 | partition`.
pub fn group_position_key(group: &str, topic: &str, partition: u32) -> Vec<u8> {
    let mut k = group_prefix(group);
    push_str16(&mut k, topic.as_bytes());
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// Decodes [`group_position_key`]: group, topic, partition.
pub fn parse_group_position_key(k: &[u8]) -> Option<(&str, &str, u32)> {
    let rest = k.strip_prefix(&[Tag::Group as u8])?;
    let (group, rest) = split_str16(rest)?;
    let (topic, rest) = split_str16(rest)?;
    let partition = u32::from_be_bytes(rest.try_into().ok()?);
    Some((group, topic, partition))
}

/// A group position: committed and lease.
pub fn group_position_value(committed: u64, lease: u64) -> Vec<u8> {
    let mut v = value_with_capacity(16);
    v.extend_from_slice(&committed.to_be_bytes());
    v.extend_from_slice(&lease.to_be_bytes());
    v
}

/// Decodes [`group_position_value`]: committed, lease.
pub fn parse_group_position_value(v: &[u8]) -> Option<(u64, u64)> {
    let b = value_body(v)?;
    (b.len() == 16).then_some((u64_at(b, 0)?, u64_at(b, 8)?))
}

// ---- wills ----

/// `w | client | will_id`.
pub fn will_key(client_id: &str, will_id: u64) -> Vec<u8> {
    let mut k = client_prefix(Tag::Will, client_id);
    k.extend_from_slice(&will_id.to_be_bytes());
    k
}

/// Decodes [`will_key`]: client id and will id.
pub fn parse_will_key(k: &[u8]) -> Option<(&str, u64)> {
    match split_client_key(k)? {
        (Tag::Will, client, id) => Some((client, u64::from_be_bytes(id.try_into().ok()?))),
        _ => None,
    }
}

/// A stored will, decoded: when its connection ended, its delay, the user its client
/// logged in as, and the will itself as a one-record batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredWill<'a> {
    /// When its connection ended (ms since the Unix epoch); 0 while it is open.
    pub disconnected_at_ms: u64,
    /// Seconds it waits once its connection has ended.
    pub delay_secs: u32,
    /// The user the client logged in as (the ACL is asked again before it is published).
    pub user: Option<&'a str>,
    /// The will as a one-record batch.
    pub batch: &'a [u8],
}

/// Encodes a [`StoredWill`]. A user name longer than a `str16` holds is refused (`None`)
/// rather than stored cut; user names are capped far below that where they enter.
pub fn will_value(w: &StoredWill<'_>) -> Option<Vec<u8>> {
    let user_len = w.user.map_or(0, str::len);
    if user_len > usize::from(u16::MAX) {
        return None;
    }
    let mut v = value_with_capacity(13 + 2 + user_len + w.batch.len());
    v.extend_from_slice(&w.disconnected_at_ms.to_be_bytes());
    v.extend_from_slice(&w.delay_secs.to_be_bytes());
    v.push(u8::from(w.user.is_some()));
    if let Some(user) = w.user {
        push_str16(&mut v, user.as_bytes());
    }
    v.extend_from_slice(w.batch);
    Some(v)
}

/// Decodes [`will_value`] (the batch is returned as stored, for its own decoder).
pub fn parse_will_value(v: &[u8]) -> Option<StoredWill<'_>> {
    let b = value_body(v)?;
    let disconnected_at_ms = u64_at(b, 0)?;
    let delay_secs = u32_at(b, 8)?;
    let (user, batch) = match b.get(12..)?.split_first()? {
        (0, rest) => (None, rest),
        (1, rest) => {
            let (user, rest) = split_str16(rest)?;
            (Some(user), rest)
        }
        _ => return None,
    };
    if batch.is_empty() {
        return None;
    }
    Some(StoredWill {
        disconnected_at_ms,
        delay_secs,
        user,
        batch,
    })
}

// ---- checking ----

/// Decodes one stored entry by its tag: `Err((kind, why))` when it does not decode. Used by
/// `edge check` and the fuzz oracle; the one-record batch of a retained message or a will is
/// checked by `one_record`.
pub fn check_entry(
    k: &[u8],
    v: &[u8],
    one_record: impl FnOnce(&[u8]) -> Result<(), String>,
) -> Result<(), (&'static str, String)> {
    let Some(tag) = Tag::of(k) else {
        return Err((
            "unknown",
            "no part of the edge writes a key with this tag".to_string(),
        ));
    };
    let fail = |why: &str| Err((tag.kind(), why.to_string()));
    let ok = match tag {
        Tag::Layout => k.len() == 1 && value_body(v) == Some(&[LAYOUT][..]),
        Tag::Topic => parse_topic_key(k).is_some() && parse_topic_value(v).is_some(),
        Tag::Partition => k.len() == 9 && parse_partition_value(v).is_some(),
        Tag::RetentionClock => k.len() == 1 && parse_retention_clock_value(v).is_some(),
        Tag::Session => parse_session_key(k).is_some() && parse_session_value(v).is_some(),
        Tag::Qos2 => parse_qos2_key(k).is_some() && is_marker_value(v),
        Tag::Subscription => {
            parse_subscription_key(k).is_some() && parse_subscription_value(v).is_some()
        }
        Tag::Queued => parse_queue_key(k).is_some() && parse_queue_value(v).is_some(),
        Tag::Released => parse_queue_key(k).is_some() && is_marker_value(v),
        Tag::Retained => {
            let Some(body) = value_body(v) else {
                return fail("no format byte");
            };
            return one_record(body).map_err(|why| (tag.kind(), why));
        }
        Tag::Will => {
            if parse_will_key(k).is_none() {
                return fail("not a client id and a will id");
            }
            let Some(will) = parse_will_value(v) else {
                return fail("not a disconnect time, a delay, a user and a will");
            };
            return one_record(will.batch).map_err(|why| (tag.kind(), why));
        }
        Tag::Group => {
            parse_group_position_key(k).is_some() && parse_group_position_value(v).is_some()
        }
        Tag::LastCommit => k.len() == 1 && parse_last_commit_value(v).is_some(),
        Tag::Identity => k.len() == 1 && parse_identity_value(v).is_some(),
    };
    if ok {
        Ok(())
    } else {
        fail(match tag {
            Tag::Layout => "not a layout marker",
            Tag::Topic => "not a topic name with an id and a partition count",
            Tag::Partition => "not a partition's end, bytes and removed count",
            Tag::RetentionClock => "not a jump point and a skew",
            Tag::Session => "not an expiry, a disconnect time and an owner",
            Tag::Qos2 => "not a client id and a packet id",
            Tag::Subscription => "not a client id, a filter and its options",
            Tag::Queued => "not a client id, a seq and a record position",
            Tag::Released => "not a client id and a seq",
            Tag::Retained => "not a retained message",
            Tag::Group => "not a group, topic, partition and position",
            Tag::LastCommit => "not a time",
            Tag::Will => "not a will",
            Tag::Identity => "not a log id, an unmarked-checkpoint rule and predecessors",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_log_identity_round_trips_and_a_cut_one_does_not_decode() {
        let identity = LogIdentity {
            id: [7; 16],
            unmarked: UnmarkedCheckpoints::Predecessor,
            predecessors: vec![[1; 16], [2; 16]],
        };
        let v = identity_value(&identity);
        assert_eq!(parse_identity_value(&v), Some(identity.clone()));
        assert_eq!(parse_identity_value(&v[..v.len() - 1]), None);
        let mut bad_rule = v.clone();
        bad_rule[17] = 9;
        assert_eq!(parse_identity_value(&bad_rule), None);
        assert_eq!(parse_id_hex(&id_hex(&identity.id)), Some(identity.id));
        assert_eq!(id_hex(&[0xab; 16]).len(), 32);
        assert_eq!(parse_id_hex("zz"), None);
    }

    #[test]
    fn every_tag_is_distinct_and_found_again() {
        for t in Tag::ALL {
            assert_eq!(Tag::of(&t.prefix()), Some(t));
            assert_eq!(Tag::ALL.iter().filter(|u| **u as u8 == t as u8).count(), 1);
        }
        assert_eq!(Tag::of(b"z"), None);
        assert_eq!(Tag::of(b""), None);
    }

    #[test]
    fn a_value_without_the_format_byte_does_not_decode() {
        let v = group_position_value(5, 9);
        assert_eq!(parse_group_position_value(&v), Some((5, 9)));
        assert_eq!(parse_group_position_value(&v[1..]), None);
        let mut other = v.clone();
        other[0] = VALUE_FORMAT + 1;
        assert_eq!(parse_group_position_value(&other), None);
    }

    #[test]
    fn client_ids_never_prefix_one_another() {
        let a = client_prefix(Tag::Queued, "dev");
        let b = client_prefix(Tag::Queued, "dev2");
        assert!(!b.starts_with(&a));
        assert!(queue_key(Tag::Queued, "dev", 1).starts_with(&a));
    }

    #[test]
    fn a_key_of_another_kind_does_not_parse_as_this_one() {
        let q = qos2_key("c", 7);
        assert_eq!(parse_qos2_key(&q), Some(("c", 7)));
        assert_eq!(parse_queue_key(&q), None);
        assert_eq!(parse_subscription_key(&q), None);
        let o = queue_key(Tag::Released, "c", 7);
        assert_eq!(parse_queue_key(&o), Some((Tag::Released, "c", 7)));
        assert_eq!(parse_qos2_key(&o), None);
        assert_eq!(parse_qos2_key(b"q"), None);
        assert_eq!(parse_qos2_key(b"q\x00\x05ab"), None);
    }

    #[test]
    fn check_entry_names_the_kind_of_what_does_not_decode() {
        let ok = |_: &[u8]| Ok(());
        assert!(check_entry(&session_key("a"), &session_value(1, 2, None), ok).is_ok());
        assert_eq!(check_entry(b"sbad", b"123", ok).unwrap_err().0, "session");
        assert_eq!(check_entry(b"zz", b"", ok).unwrap_err().0, "unknown");
        // A released delivery is a key alone; a queued one needs its record position.
        let released = queue_key(Tag::Released, "c", 3);
        assert!(check_entry(&released, &marker_value(), ok).is_ok());
        let queued = queue_key(Tag::Queued, "c", 3);
        assert_eq!(
            check_entry(&queued, &marker_value(), ok).unwrap_err().0,
            "queue entry"
        );
        assert_eq!(
            check_entry(b"rx", &retained_value(b"batch"), |_| Err("no".into())).unwrap_err(),
            ("retained message", "no".to_string())
        );
    }

    #[test]
    fn a_will_is_checked_with_its_record_and_a_too_long_user_is_refused() {
        let w = StoredWill {
            disconnected_at_ms: 0,
            delay_secs: 5,
            user: Some("alice"),
            batch: b"batch",
        };
        let k = will_key("dev", 3);
        let v = will_value(&w).unwrap();
        assert!(check_entry(&k, &v, |b| (b == b"batch").then_some(()).ok_or("x".into())).is_ok());
        assert_eq!(
            check_entry(&k, &v, |_| Err("bad record".into())).unwrap_err(),
            ("will", "bad record".to_string())
        );
        assert_eq!(check_entry(&k, &v[..10], |_| Ok(())).unwrap_err().0, "will");
        assert_eq!(check_entry(b"w\x00", &v, |_| Ok(())).unwrap_err().0, "will");
        let long = "u".repeat(65_536);
        assert_eq!(
            will_value(&StoredWill {
                user: Some(&long),
                ..w
            }),
            None
        );
    }

    #[test]
    fn migration_puts_the_format_byte_in_front_of_old_values_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::builder(dir.path()).open().unwrap();
        let meta = db
            .keyspace("meta", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        // As an edge before the format byte wrote them.
        meta.insert(b"sdev", [0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0])
            .unwrap();
        meta.insert(b"g\x00\x01a\x00\x01t\x00\x00\x00\x02", [0u8; 16])
            .unwrap();
        migrate(&db, &meta).unwrap();
        assert_eq!(
            parse_session_value(&meta.get(b"sdev").unwrap().unwrap()),
            Some((9, 0, None))
        );
        let g = meta
            .get(b"g\x00\x01a\x00\x01t\x00\x00\x00\x02")
            .unwrap()
            .unwrap();
        assert_eq!(parse_group_position_value(&g), Some((0, 0)));
        // A second open changes nothing.
        migrate(&db, &meta).unwrap();
        assert_eq!(
            parse_session_value(&meta.get(b"sdev").unwrap().unwrap()),
            Some((9, 0, None))
        );
    }

    #[test]
    fn a_newer_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::builder(dir.path()).open().unwrap();
        let meta = db
            .keyspace("meta", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        meta.insert(LAYOUT_KEY, [VALUE_FORMAT, LAYOUT + 1]).unwrap();
        assert!(matches!(
            migrate(&db, &meta),
            Err(LogError::CorruptMeta(why)) if why.contains("newer edge")
        ));
    }

    fn client_id() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9/_-]{0,24}",
            // At the configured ceiling of a client id.
            Just("c".repeat(16_384)),
        ]
    }

    proptest! {
        #[test]
        fn session_values_round_trip(
            expiry: u32,
            at: u64,
            owner in proptest::option::of(prop_oneof![
                "[a-zA-Z0-9@.-]{0,64}",
                // The longest owner a str16 holds.
                Just("o".repeat(65_535)),
            ]),
        ) {
            let v = session_value(expiry, at, owner.as_deref());
            let (e, a, o) = parse_session_value(&v).unwrap();
            prop_assert_eq!((e, a, o.as_deref()), (expiry, at, owner.as_deref()));
        }

        #[test]
        fn queue_entries_round_trip(
            client in client_id(),
            seq: u64,
            qos in 0u8..=2,
            retain: bool,
            sub_ids in proptest::collection::vec(1u32.., 0..=255),
            position: (u32, u32, u64),
            released: bool,
        ) {
            let tag = if released { Tag::Released } else { Tag::Queued };
            let k = queue_key(tag, &client, seq);
            prop_assert_eq!(parse_queue_key(&k), Some((tag, client.as_str(), seq)));
            let entry = QueueEntry { qos, retain, sub_ids, position };
            prop_assert_eq!(parse_queue_value(&queue_value(&entry)), Some(entry));
        }

        #[test]
        fn more_than_255_subscription_ids_keep_the_first_255(n in 256usize..600) {
            let ids: Vec<u32> = (1..=n as u32).collect();
            let mut v = queue_value_head(1, false, &ids);
            v.extend_from_slice(&[0u8; 16]);
            let entry = parse_queue_value(&v).unwrap();
            prop_assert_eq!(entry.sub_ids, ids[..255].to_vec());
        }

        #[test]
        fn subscriptions_round_trip(
            client in client_id(),
            filter in "[a-z+#/]{1,40}",
            qos in 0u8..=2,
            no_local: bool,
            rap: bool,
            rh in 0u8..=2,
            id in proptest::option::of(1u32..=268_435_455),
        ) {
            let k = subscription_key(&client, &filter);
            prop_assert_eq!(parse_subscription_key(&k), Some((client.as_str(), filter.as_str())));
            let o = StoredSubscription { qos, no_local, retain_as_published: rap, retain_handling: rh, id };
            prop_assert_eq!(parse_subscription_value(&subscription_value(&o)), Some(o));
        }

        #[test]
        fn qos2_markers_round_trip(client in client_id(), pkid: u16) {
            let k = qos2_key(&client, pkid);
            prop_assert_eq!(parse_qos2_key(&k), Some((client.as_str(), pkid)));
            prop_assert!(is_marker_value(&marker_value()));
        }

        #[test]
        fn group_positions_round_trip(
            group in "[a-z0-9_-]{1,40}|g{65000}",
            topic in "[a-z0-9_.-]{1,40}",
            partition: u32,
            committed: u64,
            lease: u64,
        ) {
            let k = group_position_key(&group, &topic, partition);
            prop_assert!(k.starts_with(&group_prefix(&group)));
            prop_assert_eq!(parse_group_position_key(&k), Some((group.as_str(), topic.as_str(), partition)));
            prop_assert_eq!(parse_group_position_value(&group_position_value(committed, lease)), Some((committed, lease)));
        }

        #[test]
        fn wills_round_trip(
            client in client_id(),
            will_id: u64,
            disconnected_at_ms: u64,
            delay_secs: u32,
            user in proptest::option::of(prop_oneof![
                "[a-zA-Z0-9@.-]{0,64}",
                // The longest user name a str16 holds.
                Just("u".repeat(65_535)),
            ]),
            batch in proptest::collection::vec(any::<u8>(), 1..300),
        ) {
            let k = will_key(&client, will_id);
            prop_assert!(k.starts_with(&client_prefix(Tag::Will, &client)));
            prop_assert_eq!(parse_will_key(&k), Some((client.as_str(), will_id)));
            prop_assert_eq!(parse_queue_key(&k), None);
            let w = StoredWill { disconnected_at_ms, delay_secs, user: user.as_deref(), batch: &batch };
            let v = will_value(&w).unwrap();
            prop_assert_eq!(parse_will_value(&v), Some(w));
            // Cut before its will, it does not decode.
            let cut = 13 + user.as_ref().map_or(0, |u| 2 + u.len());
            prop_assert_eq!(parse_will_value(&v[..cut]), None);
        }

        #[test]
        fn topics_partitions_and_the_clock_round_trip(
            name in "[a-z0-9_.-]{1,64}",
            id: u32,
            parts: u32,
            counters: (u64, u64, u64),
            clock: (u64, u64),
        ) {
            let k = topic_key(&name);
            prop_assert_eq!(parse_topic_key(&k), Some(name.as_str()));
            prop_assert_eq!(parse_topic_value(&topic_value(id, parts)), Some((id, parts)));
            prop_assert_eq!(parse_partition_value(&partition_value(counters.0, counters.1, counters.2)), Some(counters));
            prop_assert_eq!(parse_retention_clock_value(&retention_clock_value(clock.0, clock.1)), Some(clock));
        }
    }
}
