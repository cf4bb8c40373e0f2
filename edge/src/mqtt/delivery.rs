//! Delivery to subscribers: messages, each session's bounded outbox, fan-out after commit,
//! retained messages and the broker's counters.
//!
//! A publish is matched against the subscriptions while its append request is built. A
//! persistent session (session expiry > 0) that gets it at QoS 1 or 2 has a queue entry added
//! to the same request ([`StateOp::Enqueue`]): a reference to the record's place in the log,
//! committed atomically with the record, so the payload is stored once. After the commit the
//! publisher's connection hands the message to each online subscriber's outbox; the
//! subscriber's connection sends from there within its in-flight window. QoS 0 and
//! non-persistent sessions live in memory only.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use super::codec::MessageProps;
use super::subs::{Match, SubscriptionTree};
use crate::log::appender::StateOp;
use crate::log::record::{self, BatchHeader, NewRecord, Record};
use crate::route::TopicFilter;

/// An application message as subscribers receive it.
#[derive(Debug)]
pub struct Message {
    /// Topic name.
    pub topic: Bytes,
    /// Body.
    pub payload: Bytes,
    /// QoS it was published with.
    pub qos: u8,
    /// Retain flag it was published with.
    pub retain: bool,
    /// Publisher's client id (empty for the broker's own `$SYS` messages).
    pub publisher: Arc<str>,
    /// 5.0 properties passed through.
    pub props: Props,
    /// When the edge received it (ms since the Unix epoch).
    pub received_ms: u64,
}

/// A message's 5.0 properties, out of line when it has any. Most messages have none, and
/// an `Arc<Message>` is made for every publish that has a subscriber and freed on the
/// subscriber's thread: with the properties inline it is 232 bytes, past the sizes glibc's
/// allocator serves from its fast bins; without them it is 120.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Props(Option<Box<MessageProps>>);

/// What [`Props`] reads as when a message has no properties.
static NO_PROPS: MessageProps = MessageProps {
    payload_format: None,
    message_expiry: None,
    content_type: None,
    response_topic: None,
    correlation_data: None,
    user_properties: Vec::new(),
};

impl Props {
    /// The properties, owned.
    pub fn into_inner(self) -> MessageProps {
        self.0.map(|p| *p).unwrap_or_default()
    }
}

impl From<MessageProps> for Props {
    fn from(p: MessageProps) -> Props {
        Props((!p.is_empty()).then(|| Box::new(p)))
    }
}

impl std::ops::Deref for Props {
    type Target = MessageProps;

    fn deref(&self) -> &MessageProps {
        self.0.as_deref().unwrap_or(&NO_PROPS)
    }
}

impl Message {
    /// The Message Expiry Interval left at `now_ms`: `None` when the message has expired,
    /// `Some(None)` when it never expires.
    pub fn expiry_left(&self, now_ms: u64) -> Option<Option<u32>> {
        match self.props.message_expiry {
            None => Some(None),
            Some(e) => {
                let elapsed = now_ms.saturating_sub(self.received_ms) / 1000;
                (elapsed < u64::from(e)).then(|| Some(e - elapsed as u32))
            }
        }
    }

    /// A copy that owns its bytes: topic, payload and correlation data may be slices of a
    /// connection's read buffer, which a long-lived message (a retained one) would hold whole.
    pub fn detached(&self) -> Message {
        Message {
            topic: Bytes::copy_from_slice(&self.topic),
            payload: Bytes::copy_from_slice(&self.payload),
            qos: self.qos,
            retain: self.retain,
            publisher: self.publisher.clone(),
            props: MessageProps {
                correlation_data: self
                    .props
                    .correlation_data
                    .as_ref()
                    .map(|c| Bytes::copy_from_slice(c)),
                ..(*self.props).clone()
            }
            .into(),
            received_ms: self.received_ms,
        }
    }

    /// Approximate memory it holds, for the outbox and retained-store byte bounds.
    pub fn size(&self) -> usize {
        Message::size_of(self.topic.len(), self.payload.len(), &self.props)
    }

    /// [`Message::size`] of a message not built yet.
    pub fn size_of(topic_len: usize, payload_len: usize, props: &MessageProps) -> usize {
        topic_len + payload_len + 96 + props_size(props)
    }

    /// The message a stored record holds.
    pub fn from_record(r: Record) -> Message {
        let h = r.headers;
        Message {
            topic: Bytes::from(h.mqtt_topic.into_bytes()),
            payload: r.payload,
            qos: h.qos,
            retain: h.retain,
            publisher: Arc::from(h.client_id),
            props: MessageProps {
                payload_format: h.payload_format,
                message_expiry: h.message_expiry,
                content_type: h.content_type,
                response_topic: h.response_topic,
                correlation_data: h.correlation_data,
                user_properties: h.user_properties,
            }
            .into(),
            received_ms: r.timestamp_ms,
        }
    }

    /// Encodes it as a one-record batch (the retained store's value format), or says which
    /// field does not fit.
    pub fn encode(&self) -> Result<Vec<u8>, record::RecordTooLarge> {
        Message::encode_parts(
            &self.topic,
            &self.payload,
            self.qos,
            self.retain,
            &self.publisher,
            &self.props,
            self.received_ms,
        )
    }

    /// [`Message::encode`] of a message not built yet.
    pub fn encode_parts(
        topic: &[u8],
        payload: &[u8],
        qos: u8,
        retain: bool,
        publisher: &str,
        props: &MessageProps,
        received_ms: u64,
    ) -> Result<Vec<u8>, record::RecordTooLarge> {
        let mut rec = Vec::with_capacity(topic.len() + payload.len() + 96);
        NewRecord {
            timestamp_ms: received_ms,
            key: &[],
            mqtt_topic: topic,
            qos,
            retain,
            client_id: publisher,
            content_type: props.content_type.as_deref(),
            payload_format: props.payload_format,
            message_expiry: props.message_expiry,
            response_topic: props.response_topic.as_deref(),
            correlation_data: props.correlation_data.as_deref(),
            user_properties: &props.user_properties,
            payload,
        }
        .encode_into(&mut rec)?;
        let mut out = Vec::with_capacity(rec.len() + record::BATCH_HEADER_LEN);
        out.push(meta::VALUE_FORMAT);
        record::encode_batch(
            BatchHeader {
                record_count: 1,
                first_timestamp_ms: received_ms,
                last_timestamp_ms: received_ms,
            },
            &rec,
            &mut out,
        );
        Ok(out)
    }

    /// Decodes [`Message::encode`]'s output.
    pub fn decode(value: &[u8]) -> Result<Message, record::CorruptBatch> {
        Message::decode_batch(meta::value_body(value).ok_or(record::CorruptBatch::Truncated)?)
    }

    /// Decodes the one-record batch of a stored retained message (its value past the
    /// format byte).
    pub fn decode_batch(batch: &[u8]) -> Result<Message, record::CorruptBatch> {
        let mut records = record::decode_batch(0, Bytes::copy_from_slice(batch))?;
        match records.pop() {
            Some(r) if records.is_empty() => Ok(Message::from_record(r)),
            _ => Err(record::CorruptBatch::Truncated),
        }
    }
}

/// Bytes a message's MQTT 5 properties hold (0 for none, the common case).
pub(crate) fn props_size(p: &MessageProps) -> usize {
    if p.is_empty() {
        return 0;
    }
    p.content_type.as_ref().map_or(0, String::len)
        + p.response_topic.as_ref().map_or(0, String::len)
        + p.correlation_data.as_ref().map_or(0, |c| c.len())
        + p.user_properties
            .iter()
            .map(|(k, v)| k.len() + v.len() + 48)
            .sum::<usize>()
}

/// One message on its way to one session.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message.
    pub msg: Arc<Message>,
    /// QoS it is delivered with.
    pub qos: u8,
    /// Retain flag as delivered.
    pub retain: bool,
    /// Subscription identifiers of the matching subscriptions.
    pub sub_ids: Vec<u32>,
    /// Seq of its durable queue entry (persistent sessions, QoS 1 and 2).
    pub seq: Option<u64>,
    /// Whether it may have been sent before (DUP).
    pub dup: bool,
    /// For a record of a durable consumer group: where its acknowledgement is reported.
    pub group: Option<GroupAck>,
}

/// Where a durable consumer group learns that its members are done with records: the
/// connection that delivered a record reports its offset here when the member acknowledged
/// it (PUBACK, PUBCOMP, or a refusing PUBREC) or when the record was not sent for good
/// (expired, too large for the client, denied by the ACL). The group's engine drains it.
#[derive(Debug, Default)]
pub struct AckInbox {
    offsets: Mutex<Vec<u64>>,
}

impl AckInbox {
    /// Moves the reported offsets into `out`.
    pub fn drain_into(&self, out: &mut Vec<u64>) {
        out.append(&mut self.offsets.lock().expect("ack inbox lock"));
    }
}

/// One group record on its way to a member: done when the member is done with it.
#[derive(Debug, Clone)]
pub struct GroupAck {
    /// The record's partition inbox.
    pub inbox: Arc<AckInbox>,
    /// The record's offset.
    pub offset: u64,
}

impl GroupAck {
    /// Reports the record as processed by the member.
    pub fn done(&self) {
        self.inbox
            .offsets
            .lock()
            .expect("ack inbox lock")
            .push(self.offset);
    }
}

/// Bounds of one session's outbox.
#[derive(Debug, Clone, Copy)]
pub struct OutboxLimits {
    /// Messages queued in memory for an online session.
    pub messages: usize,
    /// Bytes queued in memory for an online session.
    pub bytes: usize,
    /// Queue entries kept on disk for a persistent session while it is offline.
    pub offline_messages: u64,
}

#[derive(Debug, Default)]
struct Outbox {
    queue: VecDeque<Delivery>,
    bytes: usize,
    over_since: Option<Instant>,
}

/// The delivery side of a session: what subscriptions point at. It lives as long as the
/// session, across connections.
#[derive(Debug)]
pub struct Subscriber {
    /// Client id.
    pub client_id: Arc<str>,
    /// A connection is attached and takes deliveries.
    pub online: AtomicBool,
    /// The session is persistent: QoS 1 and 2 deliveries get durable queue entries.
    pub durable: AtomicBool,
    /// Durable queue entries added while offline (bounded by `offline_messages`).
    pub offline_queued: AtomicU64,
    /// Seqs of durable deliveries sent and unacknowledged when the last connection ended
    /// (resent with DUP set).
    pub sent: Mutex<std::collections::HashSet<u64>>,
    outbox: Mutex<Outbox>,
    /// Signalled when the outbox gets a message.
    pub notify: Notify,
    /// Bumped whenever a connection attaches or detaches: what was pushed to the outbox
    /// before the change may never have been sent.
    pub epoch: AtomicU64,
}

impl Subscriber {
    /// A subscriber for a new session.
    pub fn new(client_id: Arc<str>, durable: bool) -> Arc<Subscriber> {
        Arc::new(Subscriber {
            client_id,
            online: AtomicBool::new(false),
            durable: AtomicBool::new(durable),
            offline_queued: AtomicU64::new(0),
            sent: Mutex::new(std::collections::HashSet::new()),
            outbox: Mutex::new(Outbox::default()),
            notify: Notify::new(),
            epoch: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().expect("outbox lock")
    }

    /// Queues a delivery for the attached connection. Past the bound QoS 0 is dropped; QoS 1
    /// and 2 go on to twice the bound (the connection disconnects a session that stays over
    /// its bound), then are dropped too. Returns false when it was dropped.
    pub fn push(&self, d: Delivery, limits: &OutboxLimits) -> bool {
        let mut dropped = 0;
        self.push_many(std::iter::once(d), limits, &mut dropped);
        dropped == 0
    }

    /// Queues deliveries under one lock and one wake-up; counts into `dropped` those dropped
    /// that have no durable entry to come back from.
    pub fn push_many(
        &self,
        list: impl IntoIterator<Item = Delivery>,
        limits: &OutboxLimits,
        dropped: &mut u64,
    ) {
        let mut ob = self.lock();
        let mut added = false;
        for d in list {
            let size = d.msg.size();
            if ob.queue.len() >= limits.messages || ob.bytes + size > limits.bytes {
                if ob.over_since.is_none() {
                    ob.over_since = Some(Instant::now());
                }
                let hard =
                    ob.queue.len() >= 2 * limits.messages || ob.bytes + size > 2 * limits.bytes;
                if d.qos == 0 || hard {
                    if d.seq.is_none() {
                        *dropped += 1;
                    }
                    continue;
                }
            }
            ob.bytes += size;
            ob.queue.push_back(d);
            added = true;
        }
        drop(ob);
        if added {
            self.notify.notify_one();
        }
    }

    /// Takes up to `max` deliveries into `out`.
    pub fn pop_into(&self, limits: &OutboxLimits, max: usize, out: &mut VecDeque<Delivery>) {
        let mut ob = self.lock();
        for _ in 0..max {
            let Some(d) = ob.queue.pop_front() else {
                break;
            };
            ob.bytes -= d.msg.size();
            out.push_back(d);
        }
        if ob.queue.len() < limits.messages && ob.bytes <= limits.bytes {
            ob.over_since = None;
        }
    }

    /// How long the outbox has been over its bound.
    pub fn over_for(&self) -> Option<Duration> {
        self.lock().over_since.map(|t| t.elapsed())
    }

    /// Sets whether the session is persistent.
    pub fn set_durable(&self, durable: bool) {
        self.durable.store(durable, Ordering::Release);
        plans_changed();
    }

    /// Marks the session online (a connection attached) or offline; going offline empties
    /// the outbox (durable entries stay on disk). Returns the deliveries discarded without a
    /// durable entry.
    pub fn set_online(&self, online: bool) -> usize {
        self.online.store(online, Ordering::Release);
        plans_changed();
        let mut ob = self.lock();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let lost = ob
            .queue
            .iter()
            .filter(|d| d.seq.is_none() && d.qos > 0)
            .count();
        ob.queue.clear();
        ob.bytes = 0;
        ob.over_since = None;
        if online {
            self.offline_queued.store(0, Ordering::Relaxed);
        }
        lost
    }

    /// Messages waiting in the outbox.
    pub fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    /// Whether the outbox holds less than half its bound, in messages and in bytes.
    pub fn has_room(&self, limits: &OutboxLimits) -> bool {
        let ob = self.lock();
        ob.queue.len() < limits.messages / 2 && ob.bytes < limits.bytes / 2
    }
}

/// A session subscribed to a durable consumer group: `$share/{group}/{filter}`.
#[derive(Debug, Clone)]
pub struct DurableMember {
    /// The session.
    pub sub: Arc<Subscriber>,
    /// The filter after the share name; the group delivers the records whose MQTT topic it
    /// matches.
    pub filter: String,
    /// Its subscription options (granted QoS, subscription id).
    pub opts: super::subs::SubOptions,
}

/// A subscriber as a key of the subscription index: equal when it is the same session.
#[derive(Debug, Clone)]
pub struct SubRef(pub Arc<Subscriber>);

impl PartialEq for SubRef {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SubRef {}

impl Hash for SubRef {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (Arc::as_ptr(&self.0) as usize).hash(state);
    }
}

/// One session a message goes to, with what its subscriptions ask.
#[derive(Debug, Clone)]
pub struct Target {
    /// The session.
    pub sub: Arc<Subscriber>,
    /// Delivered QoS.
    pub qos: u8,
    /// Retain flag as delivered.
    pub retain: bool,
    /// Subscription identifiers.
    pub sub_ids: Vec<u32>,
    /// Whether a durable queue entry is added for it.
    pub enqueue: bool,
    shared: bool,
}

/// Messages of one append request and where each goes, applied once it is committed.
#[derive(Debug, Default)]
pub struct Fanouts {
    /// Each message with where it goes.
    items: Vec<(Arc<Message>, Goes)>,
    targets: Vec<Target>,
    /// Address of the plan of the last [`Goes::Planned`] item (held in `items`, so no other
    /// plan can have it), only compared.
    last_plan: Option<usize>,
}

/// Where one message of a [`Fanouts`] goes.
#[derive(Debug)]
enum Goes {
    /// Its targets end there in `targets` (they start where the previous listed message's
    /// end).
    Listed(usize),
    /// A remembered plan (see [`PlanCache`]).
    Planned(Arc<[Target]>),
    /// The plan of the last [`Goes::Planned`] item before it (a connection publishing to one
    /// topic shares one plan without touching its count per message).
    Again,
}

impl Fanouts {
    /// Adds a message; takes its targets out of `targets`.
    pub fn push(&mut self, msg: Arc<Message>, targets: &mut Vec<Target>) {
        self.targets.append(targets);
        self.items.push((msg, Goes::Listed(self.targets.len())));
    }

    /// Adds a message going where a remembered plan says.
    pub(crate) fn push_planned(&mut self, msg: Arc<Message>, plan: &Arc<[Target]>) {
        let at = Arc::as_ptr(plan).cast::<Target>() as usize;
        if self.last_plan == Some(at) {
            self.items.push((msg, Goes::Again));
        } else {
            self.last_plan = Some(at);
            self.items.push((msg, Goes::Planned(plan.clone())));
        }
    }

    /// Whether there is nothing to deliver.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The plan every message goes by, when they all go by one.
    fn one_plan(&self) -> Option<Arc<[Target]>> {
        match self.items.split_first() {
            Some(((_, Goes::Planned(plan)), rest))
                if rest.iter().all(|(_, goes)| matches!(goes, Goes::Again)) =>
            {
                Some(plan.clone())
            }
            _ => None,
        }
    }
}

/// Bumped whenever what [`Hub::plan`] finds may change: a subscription added or removed, a
/// session attached or detached or its persistence changed. Process-wide rather than per
/// hub: a hub in a test only invalidates more often.
static PLAN_GENERATION: AtomicU64 = AtomicU64::new(0);

/// Tells the connections' [`PlanCache`]s that their plans may be out of date.
fn plans_changed() {
    PLAN_GENERATION.fetch_add(1, Ordering::AcqRel);
}

/// Plans remembered per topic.
const PLAN_CACHE_ENTRIES: usize = 64;

/// A connection's plans ([`Hub::plan`]) for the topics it publishes to, kept while no
/// subscription or session changes. Planning takes the subscription tree's lock and a
/// reference to every target's session per message; with many publishers on two cores those
/// shared counters cost more than the rest of the plan. Only plans without side effects or
/// per-message choices are kept: no durable queue entry (a persistent session at QoS 1 or 2)
/// and no shared subscription (each message picks a member).
#[derive(Debug, Default)]
pub(crate) struct PlanCache {
    generation: u64,
    plans: HashMap<Bytes, (u8, Arc<[Target]>)>,
}

impl PlanCache {
    /// The remembered plan of a `qos` publish to `topic`, if it is still the plan. Call it
    /// before planning: what it has read is what a plan made next is remembered against.
    pub(crate) fn get(&mut self, topic: &Bytes, qos: u8) -> Option<&Arc<[Target]>> {
        let now = PLAN_GENERATION.load(Ordering::Acquire);
        if now != self.generation {
            self.plans.clear();
            self.generation = now;
            return None;
        }
        self.plans
            .get(topic)
            .filter(|(q, _)| *q == qos)
            .map(|(_, plan)| plan)
    }

    /// Remembers a plan made after [`PlanCache::get`] missed, when it may be kept; returns it
    /// shared, or gives `targets` back when it may not be kept.
    pub(crate) fn keep(
        &mut self,
        topic: &Bytes,
        qos: u8,
        targets: &mut Vec<Target>,
    ) -> Option<Arc<[Target]>> {
        if targets.iter().any(|t| t.enqueue || t.shared) {
            return None;
        }
        if self.plans.len() >= PLAN_CACHE_ENTRIES {
            self.plans.clear();
        }
        let plan: Arc<[Target]> = targets.drain(..).collect();
        self.plans.insert(topic.clone(), (qos, plan.clone()));
        Some(plan)
    }
}

/// The broker's counters, published under `$SYS`.
#[derive(Debug)]
pub struct Stats {
    /// Start time.
    pub started: Instant,
    /// PUBLISH packets received.
    pub messages_received: AtomicU64,
    /// PUBLISH packets sent.
    pub messages_sent: AtomicU64,
    /// Bytes read from clients.
    pub bytes_received: AtomicU64,
    /// Bytes written to clients.
    pub bytes_sent: AtomicU64,
    /// Deliveries dropped: QoS 0 past a full outbox, and QoS 1/2 past twice the bound or past
    /// an offline session's queue bound.
    pub dropped: AtomicU64,
    /// Deliveries not sent because the message expired first.
    pub expired: AtomicU64,
    /// Deliveries skipped because they exceed the client's Maximum Packet Size.
    pub oversize: AtomicU64,
    /// Sessions disconnected for staying over their outbox bound.
    pub slow_disconnects: AtomicU64,
    /// PUBACK, PUBREC and PUBCOMP packets written for publishes received.
    pub acks_sent: AtomicU64,
    /// Queued deliveries whose record could not be read (an I/O error, not a deletion):
    /// kept for a later attempt.
    pub queue_read_errors: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            messages_received: AtomicU64::new(0),
            messages_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            oversize: AtomicU64::new(0),
            slow_disconnects: AtomicU64::new(0),
            acks_sent: AtomicU64::new(0),
            queue_read_errors: AtomicU64::new(0),
        }
    }
}

/// Subscriptions, retained messages and counters of the node.
pub struct Hub {
    tree: RwLock<SubscriptionTree<SubRef>>,
    /// Subscriptions in the tree (read without the lock: publishing skips matching at 0).
    count: AtomicU64,
    /// The largest queue seq found on disk at start: entries up to it may have been sent
    /// before the restart, so they are resent with DUP set.
    pub boot_seq: AtomicU64,
    retained: RwLock<HashMap<Bytes, Arc<Message>>>,
    /// [`Message::size`] of the retained messages of client topics held, summed (the
    /// edge's own `$SYS` messages do not count against the clients' limits).
    retained_bytes: AtomicU64,
    /// Retained messages of client topics held.
    retained_clients: AtomicU64,
    /// Members of the durable consumer groups, by group.
    durable: Mutex<HashMap<Arc<str>, Vec<DurableMember>>>,
    /// The topic filter of each durable group (members join with exactly it).
    durable_filters: RwLock<HashMap<Arc<str>, Arc<str>>>,
    /// Bumped whenever a durable group gains, loses or changes a member subscription.
    pub durable_generation: AtomicU64,
    /// Outbox bounds.
    pub limits: OutboxLimits,
    /// Counters.
    pub stats: Stats,
}

// The durable keys and values of deliveries are defined in `log::meta`; the MQTT layer
// changes them through the typed operations below and never builds a key itself.
use crate::log::meta::{self, Tag};
pub(crate) use crate::log::meta::{parse_queue_value, QueueEntry};
use crate::log::{Log, LogError};

/// Stores a durable subscription of a persistent session.
pub(crate) fn subscribe_op(client_id: &str, filter: &str, o: &super::subs::SubOptions) -> StateOp {
    StateOp::Put {
        key: meta::subscription_key(client_id, filter),
        value: subscription_value(o),
    }
}

/// Deletes a durable subscription.
pub(crate) fn unsubscribe_op(client_id: &str, filter: &str) -> StateOp {
    StateOp::Delete {
        key: meta::subscription_key(client_id, filter),
    }
}

/// Queues a record of the request for a persistent session (see [`StateOp::Enqueue`]).
pub(crate) fn enqueue_op(
    client_id: &str,
    record: u32,
    qos: u8,
    retain: bool,
    sub_ids: &[u32],
) -> StateOp {
    StateOp::Enqueue {
        prefix: meta::client_prefix(Tag::Queued, client_id),
        record,
        value: meta::queue_value_head(qos, retain, sub_ids),
    }
}

/// Ends a queue entry: delivered and acknowledged, refused, dropped or deleted by retention.
pub(crate) fn dequeue_op(client_id: &str, seq: u64) -> StateOp {
    StateOp::Delete {
        key: meta::queue_key(Tag::Queued, client_id, seq),
    }
}

/// Records that the subscriber received a QoS 2 delivery (PUBREC), so that a new connection
/// resends the PUBREL, not the PUBLISH. Comes with [`dequeue_op`] of the same seq.
pub(crate) fn release_op(client_id: &str, seq: u64) -> StateOp {
    StateOp::Put {
        key: meta::queue_key(Tag::Released, client_id, seq),
        value: meta::marker_value(),
    }
}

/// Ends a released QoS 2 delivery (PUBCOMP).
pub(crate) fn complete_op(client_id: &str, seq: u64) -> StateOp {
    StateOp::Delete {
        key: meta::queue_key(Tag::Released, client_id, seq),
    }
}

/// Stores a retained message (`value` from [`Message::encode_parts`]).
pub(crate) fn retain_op(topic: &[u8], value: Vec<u8>) -> StateOp {
    StateOp::Put {
        key: meta::retained_key(topic),
        value,
    }
}

/// Deletes a retained message.
pub(crate) fn clear_retained_op(topic: &[u8]) -> StateOp {
    StateOp::Delete {
        key: meta::retained_key(topic),
    }
}

/// A retained message as stored: its topic and its value (what [`Message::decode`] reads).
pub(crate) type StoredRetained = (Vec<u8>, Vec<u8>);

/// Every stored retained message.
pub(crate) fn stored_retained(log: &Log) -> Result<Vec<StoredRetained>, LogError> {
    Ok(log
        .meta_scan(&Tag::Retained.prefix())?
        .into_iter()
        .map(|(k, v)| (k.get(1..).unwrap_or_default().to_vec(), v))
        .collect())
}

/// Sets aside a stored retained message that does not decode (see [`Log::quarantine_meta`]).
pub(crate) fn quarantine_retained(log: &Log, topic: &[u8]) {
    log.quarantine_meta(&meta::retained_key(topic), "retained message");
}

/// The seqs of a session's QoS 2 deliveries past PUBREC.
pub(crate) fn released_seqs(log: &Log, client_id: &str) -> Result<Vec<u64>, LogError> {
    Ok(log
        .meta_scan(&meta::client_prefix(Tag::Released, client_id))?
        .into_iter()
        .filter_map(|(k, _)| meta::parse_queue_key(&k).map(|(_, _, seq)| seq))
        .collect())
}

/// Where reading a session's durable queue goes on: at its start, or after an entry.
#[derive(Debug, Clone, Default)]
pub(crate) struct QueueCursor(Option<Vec<u8>>);

/// A page of a session's durable queue, in seq order.
#[derive(Debug, Default)]
pub(crate) struct QueuePage {
    /// The entries that decode: (seq, entry).
    pub entries: Vec<(u64, QueueEntry)>,
    /// Where the next page starts, when this one was full.
    pub next: Option<QueueCursor>,
}

/// Reads up to `max` entries of a session's queue from `cursor`. An entry that does not
/// decode is quarantined (counted, logged once, left on disk for `edge check`), never
/// deleted, and the page goes on past it.
pub(crate) fn read_queue(
    log: &Log,
    client_id: &str,
    cursor: &QueueCursor,
    max: usize,
) -> Result<QueuePage, LogError> {
    let prefix = meta::client_prefix(Tag::Queued, client_id);
    let page = log.meta_page(&prefix, cursor.0.as_deref(), max)?;
    let next = (page.len() == max)
        .then(|| page.last().map(|(k, _)| QueueCursor(Some(k.clone()))))
        .flatten();
    let mut entries = Vec::with_capacity(page.len());
    for (k, v) in page {
        match (meta::parse_queue_key(&k), parse_queue_value(&v)) {
            (Some((_, _, seq)), Some(entry)) => entries.push((seq, entry)),
            _ => log.quarantine_meta(&k, "queue entry"),
        }
    }
    Ok(QueuePage { entries, next })
}

/// Value of a durable subscription.
pub(crate) fn subscription_value(o: &super::subs::SubOptions) -> Vec<u8> {
    meta::subscription_value(&meta::StoredSubscription {
        qos: o.qos,
        no_local: o.no_local,
        retain_as_published: o.retain_as_published,
        retain_handling: o.retain_handling,
        id: o.id,
    })
}

/// Decodes [`subscription_value`].
pub(crate) fn parse_subscription_value(v: &[u8]) -> Option<super::subs::SubOptions> {
    let o = meta::parse_subscription_value(v)?;
    Some(super::subs::SubOptions {
        qos: o.qos,
        no_local: o.no_local,
        retain_as_published: o.retain_as_published,
        retain_handling: o.retain_handling,
        id: o.id,
    })
}

impl Hub {
    /// An empty router.
    pub fn new(limits: OutboxLimits) -> Hub {
        Hub {
            tree: RwLock::new(SubscriptionTree::new()),
            count: AtomicU64::new(0),
            boot_seq: AtomicU64::new(0),
            retained: RwLock::new(HashMap::new()),
            retained_bytes: AtomicU64::new(0),
            retained_clients: AtomicU64::new(0),
            durable: Mutex::new(HashMap::new()),
            durable_filters: RwLock::new(HashMap::new()),
            durable_generation: AtomicU64::new(0),
            limits,
            stats: Stats::default(),
        }
    }

    /// Declares the durable consumer groups: `$share/{name}/{filter}` subscriptions to
    /// them make their sessions group members instead of live shared subscribers. Called
    /// once, before any subscription is added.
    pub fn declare_durable_groups(&self, groups: &[(&str, &str)]) {
        self.tree
            .write()
            .expect("subscription lock")
            .set_durable_groups(groups.iter().map(|(name, _)| *name));
        let mut durable = self.durable.lock().expect("durable lock");
        let mut filters = self.durable_filters.write().expect("durable filters lock");
        for (name, filter) in groups {
            durable.insert(Arc::from(*name), Vec::new());
            filters.insert(Arc::from(*name), Arc::from(*filter));
        }
    }

    /// The filter of durable group `name`, if `name` is one.
    pub fn durable_group_filter(&self, name: &str) -> Option<Arc<str>> {
        self.durable_filters
            .read()
            .expect("durable filters lock")
            .get(name)
            .cloned()
    }

    /// The members of durable group `name` (sessions and their filters in the group, online
    /// or not).
    pub fn durable_members(&self, name: &str) -> Vec<DurableMember> {
        self.durable
            .lock()
            .expect("durable lock")
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    /// Keeps the durable member index in step with a subscription added (`Some(opts)`) or
    /// removed (`None`).
    fn track_durable(
        &self,
        sub: &Arc<Subscriber>,
        filter: &str,
        opts: Option<super::subs::SubOptions>,
    ) {
        let (Some(group), inner) = super::subs::split_shared(filter) else {
            return;
        };
        let mut durable = self.durable.lock().expect("durable lock");
        let Some(members) = durable.get_mut(group) else {
            return;
        };
        let at = members
            .iter()
            .position(|m| Arc::ptr_eq(&m.sub, sub) && m.filter == inner);
        match (at, opts) {
            (Some(i), Some(opts)) => members[i].opts = opts,
            (None, Some(opts)) => members.push(DurableMember {
                sub: sub.clone(),
                filter: inner.to_string(),
                opts,
            }),
            (Some(i), None) => {
                members.remove(i);
            }
            (None, None) => return,
        }
        self.durable_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Ends a change to the subscription tree: its count is updated, the lock released and
    /// the connections' kept plans marked out of date.
    fn tree_changed(&self, tree: std::sync::RwLockWriteGuard<'_, SubscriptionTree<SubRef>>) {
        self.count.store(tree.len() as u64, Ordering::Relaxed);
        drop(tree);
        plans_changed();
    }

    /// Adds or replaces a subscription; returns whether it replaced one.
    pub fn subscribe(
        &self,
        sub: &Arc<Subscriber>,
        filter: &str,
        opts: super::subs::SubOptions,
    ) -> bool {
        let mut tree = self.tree.write().expect("subscription lock");
        let replaced = tree.subscribe(SubRef(sub.clone()), filter, opts);
        self.tree_changed(tree);
        self.track_durable(sub, filter, Some(opts));
        replaced
    }

    /// Like [`Hub::subscribe`] unless the session holds `max` subscriptions already and
    /// this filter is not one of them: then `None`, and nothing changes.
    pub fn subscribe_within(
        &self,
        sub: &Arc<Subscriber>,
        filter: &str,
        opts: super::subs::SubOptions,
        max: usize,
    ) -> Option<bool> {
        let mut tree = self.tree.write().expect("subscription lock");
        let who = SubRef(sub.clone());
        if tree.count_of(&who) >= max && !tree.holds(&who, filter) {
            return None;
        }
        let replaced = tree.subscribe(who, filter, opts);
        self.tree_changed(tree);
        self.track_durable(sub, filter, Some(opts));
        Some(replaced)
    }

    /// Removes a subscription; returns whether it existed.
    pub fn unsubscribe(&self, sub: &Arc<Subscriber>, filter: &str) -> bool {
        let mut tree = self.tree.write().expect("subscription lock");
        let existed = tree.unsubscribe(&SubRef(sub.clone()), filter);
        self.tree_changed(tree);
        if existed {
            self.track_durable(sub, filter, None);
        }
        existed
    }

    /// Removes every subscription of a session that ended.
    pub fn remove_session(&self, sub: &Arc<Subscriber>) {
        let mut tree = self.tree.write().expect("subscription lock");
        tree.remove_all(&SubRef(sub.clone()));
        self.tree_changed(tree);
        let mut durable = self.durable.lock().expect("durable lock");
        let mut changed = false;
        for members in durable.values_mut() {
            let before = members.len();
            members.retain(|m| !Arc::ptr_eq(&m.sub, sub));
            changed |= members.len() != before;
        }
        if changed {
            self.durable_generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// A session's subscriptions (filter, options).
    pub fn subscriptions_of(
        &self,
        sub: &Arc<Subscriber>,
    ) -> Vec<(String, super::subs::SubOptions)> {
        self.tree
            .read()
            .expect("subscription lock")
            .subscriptions_of(&SubRef(sub.clone()))
    }

    /// Number of subscriptions.
    pub fn subscription_count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Finds where a message published to `topic` goes. Targets with a durable queue entry
    /// come first in `out`, in the order their Enqueue ops must be added.
    pub fn plan(
        &self,
        topic: &str,
        qos: u8,
        retain: bool,
        publisher: &str,
        scratch: &mut Vec<Match<SubRef>>,
        out: &mut Vec<Target>,
    ) {
        out.clear();
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        scratch.clear();
        self.tree.read().expect("subscription lock").matches(
            topic,
            |s: &SubRef| s.0.online.load(Ordering::Acquire),
            scratch,
        );
        if scratch.len() == 1 {
            // The common case: one subscription matches.
            let m = scratch.pop().expect("one match");
            let shared = m.group.is_some();
            if m.opts.no_local && !shared && &*m.who.0.client_id == publisher {
                return;
            }
            let q = qos.min(m.opts.qos);
            let sub = m.who.0;
            let online = sub.online.load(Ordering::Acquire);
            let mut enqueue = q > 0 && sub.durable.load(Ordering::Acquire);
            if enqueue && !online {
                enqueue = self.reserve_offline(&sub);
            }
            if enqueue || online {
                out.push(Target {
                    sub,
                    qos: q,
                    retain: retain && m.opts.retain_as_published,
                    sub_ids: m.opts.id.into_iter().collect(),
                    enqueue,
                    shared,
                });
            }
            return;
        }
        for m in scratch.drain(..) {
            let shared = m.group.is_some();
            if m.opts.no_local && !shared && &*m.who.0.client_id == publisher {
                continue;
            }
            let q = qos.min(m.opts.qos);
            let r = retain && m.opts.retain_as_published;
            if !shared {
                if let Some(t) = out
                    .iter_mut()
                    .find(|t| !t.shared && Arc::ptr_eq(&t.sub, &m.who.0))
                {
                    t.qos = t.qos.max(q);
                    t.retain |= r;
                    t.sub_ids.extend(m.opts.id);
                    continue;
                }
            }
            out.push(Target {
                sub: m.who.0,
                qos: q,
                retain: r,
                sub_ids: m.opts.id.into_iter().collect(),
                enqueue: false,
                shared,
            });
        }
        for t in out.iter_mut() {
            t.enqueue = t.qos > 0 && t.sub.durable.load(Ordering::Acquire);
            if t.enqueue && !t.sub.online.load(Ordering::Acquire) {
                t.enqueue = self.reserve_offline(&t.sub);
            }
        }
        // Offline targets without a durable entry get nothing.
        out.retain(|t| t.enqueue || t.sub.online.load(Ordering::Acquire));
        out.sort_by_key(|t| !t.enqueue);
    }

    /// Takes a place in a disconnected session's durable queue; false (counted as dropped)
    /// when it is full.
    fn reserve_offline(&self, sub: &Subscriber) -> bool {
        let queued = sub.offline_queued.fetch_add(1, Ordering::Relaxed);
        if queued >= self.limits.offline_messages {
            sub.offline_queued.fetch_sub(1, Ordering::Relaxed);
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// The Enqueue ops of a plan's targets, for record `record` of the request.
    pub fn enqueue_ops(targets: &[Target], record: u32, ops: &mut Vec<StateOp>) {
        for t in targets.iter().take_while(|t| t.enqueue) {
            ops.push(enqueue_op(
                &t.sub.client_id,
                record,
                t.qos,
                t.retain,
                &t.sub_ids,
            ));
        }
    }

    /// Hands committed messages to their online targets, one outbox lock per subscriber.
    /// `seqs` yields the seqs of the request's Enqueue ops in order.
    pub fn deliver(&self, fanouts: Fanouts, seqs: &mut impl Iterator<Item = u64>) {
        if let Some(plan) = fanouts.one_plan() {
            if let [t] = &*plan {
                // The usual fan-out: a connection whose publishes all go to one session by
                // one remembered plan. They go into its outbox as they are, under one lock.
                if t.sub.online.load(Ordering::Acquire) {
                    let list = fanouts.items.into_iter().map(|(msg, _)| Delivery {
                        msg,
                        qos: t.qos,
                        retain: t.retain,
                        sub_ids: t.sub_ids.clone(),
                        seq: None,
                        dup: false,
                        group: None,
                    });
                    let mut dropped = 0;
                    t.sub.push_many(list, &self.limits, &mut dropped);
                    self.count_dropped(dropped);
                }
                return;
            }
        }
        let mut batches: Vec<(Arc<Subscriber>, Vec<Delivery>)> = Vec::new();
        let mut last = 0;
        let mut add = |t: &Target, msg: Arc<Message>, seq: Option<u64>, sub_ids: Vec<u32>| {
            if !t.sub.online.load(Ordering::Acquire) {
                return;
            }
            let d = Delivery {
                msg,
                qos: t.qos,
                retain: t.retain,
                sub_ids,
                seq,
                dup: false,
                group: None,
            };
            let i = if batches.get(last).is_some_and(|b| Arc::ptr_eq(&b.0, &t.sub)) {
                last
            } else {
                match batches.iter().position(|b| Arc::ptr_eq(&b.0, &t.sub)) {
                    Some(i) => i,
                    None => {
                        batches.push((t.sub.clone(), Vec::new()));
                        batches.len() - 1
                    }
                }
            };
            batches[i].1.push(d);
            last = i;
        };
        let mut targets = fanouts.targets.into_iter();
        let mut at = 0;
        let mut plan: Option<Arc<[Target]>> = None;
        for (msg, goes) in fanouts.items {
            let planned: &[Target] = match goes {
                Goes::Listed(end) => {
                    for mut t in targets.by_ref().take(end - at) {
                        let seq = if t.enqueue { seqs.next() } else { None };
                        let sub_ids = std::mem::take(&mut t.sub_ids);
                        add(&t, msg.clone(), seq, sub_ids);
                    }
                    at = end;
                    continue;
                }
                Goes::Planned(p) => plan.insert(p),
                Goes::Again => plan.as_deref().unwrap_or(&[]),
            };
            // The last target takes the fan-out's reference to the message (a remembered
            // plan, the usual case): one count change less per delivery.
            if let Some((last, others)) = planned.split_last() {
                for t in others {
                    add(t, msg.clone(), None, t.sub_ids.clone());
                }
                add(last, msg, None, last.sub_ids.clone());
            }
        }
        let mut dropped = 0;
        for (sub, list) in batches {
            sub.push_many(list, &self.limits, &mut dropped);
        }
        self.count_dropped(dropped);
    }

    /// Adds deliveries dropped at full outboxes to the node's counter.
    fn count_dropped(&self, dropped: u64) {
        if dropped > 0 {
            self.stats.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
    }

    /// Delivers a message that is not in the log (`$SYS`) to online subscribers, at once.
    pub fn deliver_now(&self, msg: Arc<Message>) {
        let mut scratch = Vec::new();
        let mut targets = Vec::new();
        self.plan(
            std::str::from_utf8(&msg.topic).unwrap_or_default(),
            msg.qos,
            msg.retain,
            "",
            &mut scratch,
            &mut targets,
        );
        for t in &mut targets {
            t.enqueue = false;
        }
        let mut f = Fanouts::default();
        f.push(msg, &mut targets);
        self.deliver(f, &mut std::iter::empty());
    }

    /// Sets (or with `None` clears) the retained message of a topic.
    pub fn set_retained(&self, topic: Bytes, msg: Option<Arc<Message>>) {
        let mut map = self.retained.write().expect("retained lock");
        let client_topic = !topic.starts_with(b"$");
        let added = msg.as_ref().map(|m| m.size() as u64);
        let old = match msg {
            Some(m) => map.insert(topic, m),
            None => map.remove(&topic),
        };
        if !client_topic {
            return;
        }
        let removed = old.map(|m| m.size() as u64);
        // Under the write lock: the sums and the map change together.
        let bytes = self.retained_bytes.load(Ordering::Relaxed) + added.unwrap_or(0);
        self.retained_bytes
            .store(bytes - removed.unwrap_or(0).min(bytes), Ordering::Relaxed);
        let count = self.retained_clients.load(Ordering::Relaxed) + u64::from(added.is_some());
        self.retained_clients.store(
            count - u64::from(removed.is_some()).min(count),
            Ordering::Relaxed,
        );
    }

    /// Whether the retained store has room for a message of `size` bytes
    /// ([`Message::size`]) on `topic` (replacing the one there, if any) within `max_count`
    /// messages and `max_bytes` bytes. Checked against what is held when the publish
    /// arrives.
    pub fn retained_room(
        &self,
        topic: &[u8],
        size: usize,
        max_count: usize,
        max_bytes: u64,
    ) -> bool {
        let map = self.retained.read().expect("retained lock");
        let old = map.get(topic);
        let count = self.retained_clients.load(Ordering::Relaxed) + u64::from(old.is_none());
        let held = self.retained_bytes.load(Ordering::Relaxed);
        let bytes = held - old.map_or(0, |m| m.size() as u64).min(held) + size as u64;
        count <= max_count as u64 && bytes <= max_bytes
    }

    /// Bytes ([`Message::size`]) of the retained messages of client topics held.
    pub fn retained_bytes(&self) -> u64 {
        self.retained_bytes.load(Ordering::Relaxed)
    }

    /// Retained messages matching a filter (not expired at `now_ms`).
    pub fn retained_matching(&self, filter: &TopicFilter, now_ms: u64) -> Vec<Arc<Message>> {
        let map = self.retained.read().expect("retained lock");
        let mut out: Vec<Arc<Message>> = map
            .iter()
            .filter(|(t, m)| {
                std::str::from_utf8(t).is_ok_and(|t| filter.matches(t))
                    && m.expiry_left(now_ms).is_some()
            })
            .map(|(_, m)| m.clone())
            .collect();
        out.sort_by(|a, b| a.topic.cmp(&b.topic));
        out
    }

    /// Number of retained messages.
    pub fn retained_count(&self) -> usize {
        self.retained.read().expect("retained lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::subs::SubOptions;

    fn msg(topic: &str, qos: u8) -> Arc<Message> {
        Arc::new(Message {
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            payload: Bytes::from_static(b"x"),
            qos,
            retain: false,
            publisher: Arc::from("pub"),
            props: Props::default(),
            received_ms: 0,
        })
    }

    fn opts(qos: u8, id: Option<u32>) -> SubOptions {
        SubOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            id,
        }
    }

    #[test]
    fn retained_room_counts_client_topics_and_replacements() {
        let hub = Hub::new(OutboxLimits {
            messages: 10,
            bytes: 1 << 20,
            offline_messages: 10,
        });
        let size = msg("a", 0).size();
        hub.set_retained(Bytes::from_static(b"$SYS/x"), Some(msg("$SYS/x", 0)));
        hub.set_retained(Bytes::from_static(b"a"), Some(msg("a", 0)));
        hub.set_retained(Bytes::from_static(b"b"), Some(msg("b", 0)));
        assert_eq!(hub.retained_bytes(), 2 * size as u64, "$SYS does not count");
        assert!(!hub.retained_room(b"c", size, 2, u64::MAX), "a third topic");
        assert!(hub.retained_room(b"a", size, 2, u64::MAX), "a replacement");
        assert!(hub.retained_room(b"c", size, 3, 3 * size as u64));
        assert!(!hub.retained_room(b"c", size, 3, 3 * size as u64 - 1));
        hub.set_retained(Bytes::from_static(b"a"), None);
        assert_eq!(hub.retained_bytes(), size as u64);
        assert!(hub.retained_room(b"c", size, 2, u64::MAX));
    }

    #[test]
    fn overlapping_subscriptions_give_one_copy_at_the_highest_qos_with_every_id() {
        let router = Hub::new(OutboxLimits {
            messages: 10,
            bytes: 1 << 20,
            offline_messages: 10,
        });
        let s = Subscriber::new(Arc::from("s"), false);
        s.set_online(true);
        router.subscribe(&s, "a/+", opts(1, Some(1)));
        router.subscribe(&s, "a/#", opts(2, Some(2)));
        router.subscribe(&s, "b", opts(2, Some(3)));
        let (mut scratch, mut out) = (Vec::new(), Vec::new());
        router.plan("a/b", 2, false, "pub", &mut scratch, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].qos, 2);
        let mut ids = out[0].sub_ids.clone();
        ids.sort();
        assert_eq!(ids, vec![1, 2]);
        // Delivered QoS is the minimum of the publish and the subscription.
        router.plan("a/b", 0, false, "pub", &mut scratch, &mut out);
        assert_eq!(out[0].qos, 0);
    }

    fn hub() -> Hub {
        Hub::new(OutboxLimits {
            messages: 10,
            bytes: 1 << 20,
            offline_messages: 10,
        })
    }

    fn online(id: &str, durable: bool) -> Arc<Subscriber> {
        let s = Subscriber::new(Arc::from(id), durable);
        s.set_online(true);
        s
    }

    /// Plans `qos` to `topic` for publisher "pub" and offers the plan to `cache`.
    fn plan_and_keep(
        hub: &Hub,
        cache: &mut PlanCache,
        topic: &'static str,
        qos: u8,
    ) -> (Option<Arc<[Target]>>, Vec<Target>) {
        let (mut scratch, mut targets) = (Vec::new(), Vec::new());
        hub.plan(topic, qos, false, "pub", &mut scratch, &mut targets);
        let kept = cache.keep(&Bytes::from_static(topic.as_bytes()), qos, &mut targets);
        (kept, targets)
    }

    fn names(plan: &[Target]) -> Vec<String> {
        let mut v: Vec<String> = plan.iter().map(|t| t.sub.client_id.to_string()).collect();
        v.sort();
        v
    }

    /// A connection's remembered plan is used only while no subscription or session
    /// changed: a stale plan would deliver to a session that left, or miss one that just
    /// subscribed. (Tests share the generation, so a hit is asserted only when no other
    /// test moved it meanwhile.)
    #[test]
    fn a_kept_plan_is_used_until_subscriptions_or_sessions_change() {
        let hub = hub();
        let topic = Bytes::from_static(b"a/b");
        let mut cache = PlanCache::default();
        let s = online("s", false);
        let t = online("t", false);
        hub.subscribe(&s, "a/#", opts(0, None));
        assert!(cache.get(&topic, 0).is_none());
        let before = PLAN_GENERATION.load(Ordering::Acquire);
        let (kept, _) = plan_and_keep(&hub, &mut cache, "a/b", 0);
        let kept = kept.expect("a QoS 0 plan is kept");
        assert_eq!(names(&kept), ["s"]);
        let hit = cache.get(&topic, 0).cloned();
        if PLAN_GENERATION.load(Ordering::Acquire) == before {
            assert!(
                hit.is_some_and(|p| Arc::ptr_eq(&p, &kept)),
                "kept plan used"
            );
            assert!(cache.get(&topic, 1).is_none(), "kept for QoS 0 only");
        }

        // Each change below makes the cache miss, and the next plan sees the change.
        hub.subscribe(&t, "a/b", opts(1, None));
        assert!(cache.get(&topic, 0).is_none(), "a new subscription");
        let (kept, _) = plan_and_keep(&hub, &mut cache, "a/b", 0);
        assert_eq!(names(&kept.unwrap()), ["s", "t"]);

        s.set_online(false);
        assert!(cache.get(&topic, 0).is_none(), "a session detached");
        let (kept, _) = plan_and_keep(&hub, &mut cache, "a/b", 0);
        assert_eq!(names(&kept.unwrap()), ["t"]);

        s.set_online(true);
        assert!(cache.get(&topic, 0).is_none(), "a session attached");
        plan_and_keep(&hub, &mut cache, "a/b", 0);

        hub.unsubscribe(&t, "a/b");
        assert!(cache.get(&topic, 0).is_none(), "an unsubscribe");
        let (kept, _) = plan_and_keep(&hub, &mut cache, "a/b", 0);
        assert_eq!(names(&kept.unwrap()), ["s"]);

        t.set_durable(true);
        assert!(
            cache.get(&topic, 0).is_none(),
            "a session became persistent"
        );
        plan_and_keep(&hub, &mut cache, "a/b", 0);

        hub.remove_session(&s);
        assert!(cache.get(&topic, 0).is_none(), "a session ended");
        let (kept, _) = plan_and_keep(&hub, &mut cache, "a/b", 0);
        assert!(
            kept.unwrap().is_empty(),
            "nobody left: an empty plan is kept too"
        );
    }

    /// A plan with a durable queue entry (its ops go into the request) or a shared
    /// subscription (each message picks a member) is made again for every message.
    #[test]
    fn plans_with_queue_entries_or_shared_subscriptions_are_not_kept() {
        let hub = hub();
        let mut cache = PlanCache::default();
        let d = online("durable", true);
        hub.subscribe(&d, "d/#", opts(1, None));
        let (kept, targets) = plan_and_keep(&hub, &mut cache, "d/x", 1);
        assert!(kept.is_none(), "QoS 1 to a persistent session");
        assert_eq!(
            names(&targets),
            ["durable"],
            "the targets are left to the caller"
        );
        assert!(targets[0].enqueue);
        let (kept, _) = plan_and_keep(&hub, &mut cache, "d/x", 0);
        assert_eq!(
            names(&kept.unwrap()),
            ["durable"],
            "QoS 0 has no queue entry"
        );

        let (m1, m2) = (online("m1", false), online("m2", false));
        hub.subscribe(&m1, "$share/g/e/#", opts(0, None));
        hub.subscribe(&m2, "$share/g/e/#", opts(0, None));
        let (kept, targets) = plan_and_keep(&hub, &mut cache, "e/x", 0);
        assert!(kept.is_none(), "a shared subscription");
        assert_eq!(targets.len(), 1);
    }

    /// Messages of one request that share a plan, listed ones between them, reach every
    /// target in the order they were published.
    #[test]
    fn planned_and_listed_messages_are_delivered_in_order() {
        let hub = hub();
        let mut cache = PlanCache::default();
        let (s1, s2) = (online("s1", false), online("s2", false));
        hub.subscribe(&s1, "a/#", opts(0, None));
        hub.subscribe(&s2, "a/#", opts(0, None));
        hub.subscribe(&s1, "b", opts(0, None));
        let plan = plan_and_keep(&hub, &mut cache, "a/x", 0).0.unwrap();
        let (mut scratch, mut listed) = (Vec::new(), Vec::new());
        hub.plan("b", 0, false, "pub", &mut scratch, &mut listed);
        let mut f = Fanouts::default();
        f.push_planned(msg("a/x", 0), &plan);
        f.push_planned(msg("a/x", 0), &plan);
        f.push(msg("b", 0), &mut listed);
        f.push_planned(msg("a/x", 0), &plan);
        assert_eq!(
            Arc::strong_count(&plan),
            3,
            "one count for the request, not one per message"
        );
        hub.deliver(f, &mut std::iter::empty());
        let topics = |s: &Subscriber| {
            let mut out = VecDeque::new();
            s.pop_into(&hub.limits, 100, &mut out);
            out.iter()
                .map(|d| String::from_utf8(d.msg.topic.to_vec()).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(topics(&s1), ["a/x", "a/x", "b", "a/x"]);
        assert_eq!(topics(&s2), ["a/x", "a/x", "a/x"]);
        assert_eq!(Arc::strong_count(&plan), 2, "the cache's and this one");
    }

    /// The usual fan-out, every message of a request by one remembered plan to one session,
    /// takes a shorter way into the outbox: it must give what the general way gives (the
    /// target's QoS and subscription identifiers, order, nothing for a session that went
    /// offline, drops past the bound counted).
    #[test]
    fn a_request_by_one_plan_to_one_session_is_delivered_as_planned() {
        let hub = hub();
        let mut cache = PlanCache::default();
        let s = online("s", false);
        hub.subscribe(&s, "a/#", opts(1, Some(7)));
        let plan = plan_and_keep(&hub, &mut cache, "a/x", 2).0.unwrap();
        assert_eq!(plan.len(), 1);
        let mut f = Fanouts::default();
        for topic in ["a/1", "a/2", "a/3"] {
            f.push_planned(msg(topic, 2), &plan);
        }
        hub.deliver(f, &mut std::iter::empty());
        let mut out = VecDeque::new();
        s.pop_into(&hub.limits, 100, &mut out);
        let got: Vec<_> = out
            .iter()
            .map(|d| (d.msg.topic.clone(), d.qos, d.sub_ids.clone(), d.seq, d.dup))
            .collect();
        let want: Vec<_> = ["a/1", "a/2", "a/3"]
            .into_iter()
            .map(|t| (Bytes::from_static(t.as_bytes()), 1, vec![7], None, false))
            .collect();
        assert_eq!(got, want);

        // Past the bound of 10, QoS 0 is dropped and counted.
        let plan = plan_and_keep(&hub, &mut cache, "a/y", 0).0.unwrap();
        let mut f = Fanouts::default();
        for _ in 0..25 {
            f.push_planned(msg("a/y", 0), &plan);
        }
        hub.deliver(f, &mut std::iter::empty());
        assert_eq!(s.queued(), 10);
        assert_eq!(hub.stats.dropped.load(Ordering::Relaxed), 15);

        // A session that went offline after the plan was made gets nothing.
        let gone = online("gone", false);
        hub.subscribe(&gone, "g", opts(0, None));
        let plan = plan_and_keep(&hub, &mut cache, "g", 0).0.unwrap();
        gone.set_online(false);
        let mut f = Fanouts::default();
        f.push_planned(msg("g", 0), &plan);
        hub.deliver(f, &mut std::iter::empty());
        assert_eq!(gone.queued(), 0);
        assert_eq!(hub.stats.dropped.load(Ordering::Relaxed), 15);
    }

    #[test]
    fn subscriptions_past_the_per_session_bound_are_refused() {
        let hub = Hub::new(OutboxLimits {
            messages: 10,
            bytes: 1 << 20,
            offline_messages: 10,
        });
        let s = Subscriber::new(Arc::from("s"), false);
        let other = Subscriber::new(Arc::from("other"), false);
        assert_eq!(
            hub.subscribe_within(&s, "a/#", opts(1, None), 2),
            Some(false)
        );
        assert_eq!(
            hub.subscribe_within(&s, "$share/g/b", opts(1, None), 2),
            Some(false)
        );
        assert_eq!(hub.subscribe_within(&s, "c", opts(1, None), 2), None);
        assert_eq!(
            hub.subscribe_within(&s, "a/#", opts(2, None), 2),
            Some(true),
            "replacing a held subscription is not a new one"
        );
        assert_eq!(
            hub.subscribe_within(&other, "c", opts(1, None), 2),
            Some(false),
            "the bound is per session"
        );
        assert_eq!(hub.subscription_count(), 3);
        assert!(hub.unsubscribe(&s, "a/#"));
        assert_eq!(hub.subscribe_within(&s, "c", opts(1, None), 2), Some(false));
    }

    #[test]
    fn no_local_skips_the_publisher() {
        let router = Hub::new(OutboxLimits {
            messages: 10,
            bytes: 1 << 20,
            offline_messages: 10,
        });
        let s = Subscriber::new(Arc::from("me"), false);
        s.set_online(true);
        let mut o = opts(1, None);
        o.no_local = true;
        router.subscribe(&s, "t", o);
        let (mut scratch, mut out) = (Vec::new(), Vec::new());
        router.plan("t", 1, false, "me", &mut scratch, &mut out);
        assert!(out.is_empty());
        router.plan("t", 1, false, "other", &mut scratch, &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn full_outbox_drops_qos0_first_and_bounds_qos1_at_twice() {
        let limits = OutboxLimits {
            messages: 2,
            bytes: 1 << 20,
            offline_messages: 10,
        };
        let s = Subscriber::new(Arc::from("s"), false);
        s.set_online(true);
        let d = |qos| Delivery {
            msg: msg("t", qos),
            qos,
            retain: false,
            sub_ids: Vec::new(),
            seq: None,
            dup: false,
            group: None,
        };
        assert!(s.push(d(0), &limits));
        assert!(s.push(d(1), &limits));
        assert!(!s.push(d(0), &limits), "QoS 0 past the bound is dropped");
        assert!(s.over_for().is_some());
        assert!(s.push(d(1), &limits));
        assert!(s.push(d(1), &limits));
        assert!(
            !s.push(d(1), &limits),
            "QoS 1 past twice the bound is dropped"
        );
        let mut out = VecDeque::new();
        s.pop_into(&limits, 100, &mut out);
        assert_eq!(out.len(), 4);
        assert!(s.over_for().is_none());
    }

    #[test]
    fn queue_and_subscription_values_round_trip() {
        let mut v = meta::queue_value_head(2, true, &[7, 9]);
        v.extend_from_slice(&3u32.to_be_bytes());
        v.extend_from_slice(&1u32.to_be_bytes());
        v.extend_from_slice(&42u64.to_be_bytes());
        assert_eq!(
            parse_queue_value(&v),
            Some(QueueEntry {
                qos: 2,
                retain: true,
                sub_ids: vec![7, 9],
                position: (3, 1, 42)
            })
        );
        let o = SubOptions {
            qos: 1,
            no_local: true,
            retain_as_published: false,
            retain_handling: 2,
            id: Some(5),
        };
        assert_eq!(parse_subscription_value(&subscription_value(&o)), Some(o));
        let StateOp::Delete { key } = dequeue_op("dev", 9) else {
            panic!("a dequeue deletes");
        };
        assert_eq!(meta::parse_queue_key(&key), Some((Tag::Queued, "dev", 9)));
    }

    #[test]
    fn messages_round_trip_through_the_retained_encoding() {
        let m = Message {
            topic: Bytes::from_static(b"a/b"),
            payload: Bytes::from_static(b"hello"),
            qos: 1,
            retain: true,
            publisher: Arc::from("p"),
            props: MessageProps {
                payload_format: Some(1),
                message_expiry: Some(60),
                content_type: Some("text/plain".into()),
                response_topic: Some("r".into()),
                correlation_data: Some(Bytes::from_static(b"c")),
                user_properties: vec![("k".into(), "v".into())],
            }
            .into(),
            received_ms: 1234,
        };
        let d = Message::decode(&m.encode().unwrap()).unwrap();
        assert_eq!(d.topic, m.topic);
        assert_eq!(d.payload, m.payload);
        assert_eq!(d.props, m.props);
        assert_eq!(d.received_ms, 1234);
        assert_eq!(m.expiry_left(1234 + 59_000), Some(Some(1)));
        assert_eq!(m.expiry_left(1234 + 60_000), None);
    }
}
