//! One durable consumer group at run time: a thread that shares the group's partitions out
//! among its online members, hands each member its partitions' records from the log, takes
//! their acknowledgements back, and advances and stores the group's positions.
//!
//! Per partition it keeps:
//! - `committed`: every record below it is done (acknowledged, filtered out, or sent at
//!   QoS 0); the position that is stored and replicated.
//! - `done`: records above `committed` already done (acknowledged out of order, or by a
//!   member that left after acknowledging them), skipped when the partition is read again.
//! - `outstanding`: records handed to the member `holder` and not yet done.
//! - `next_read`: the next record to hand out. Everything below it and at or above
//!   `committed` is in `done` or `outstanding`, except after a rewind (a holder left), when
//!   `next_read` goes back to `committed` and what the holder had is read again.
//!
//! A partition changes owner only when its records are not held by another online member:
//! a member that loses a partition to a newcomer finishes what it holds first (or a timeout
//! takes the records back), so two members never work on one partition at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::assign::assign;
use super::{position_op, GroupStatus, MemberStatus, PartitionPosition};
use crate::log::appender::{AppendRequest, Committed, ReplyTo};
use crate::log::PartitionState;
use crate::mqtt::delivery::{AckInbox, Delivery, GroupAck, Message, Subscriber};
use crate::mqtt::subs::SubOptions;
use crate::mqtt::Broker;
use crate::route::{TopicFilter, TopicId};

/// Records handed out beyond the stored lease at most; see `Part::lease`.
const LEASE_AHEAD: u64 = 2048;
/// How often changed positions are stored.
const WRITE_EVERY: Duration = Duration::from_millis(100);
/// How often the status (API, status file, replication to Kafka) is refreshed; not every
/// round, which under load is every millisecond.
const STATUS_EVERY: Duration = Duration::from_millis(20);
/// Records read from the log at once per partition.
const READ_CHUNK: usize = 512;
/// Sleep after a round that delivered or took acknowledgements (acknowledgements and new
/// records are picked up by polling: cheaper than a wake-up per acknowledgement under load).
const POLL_ACTIVE: Duration = Duration::from_millis(1);
/// Sleep after a quiet round while members are online: the most a new record waits.
const POLL_QUIET: Duration = Duration::from_millis(5);
/// Sleep between rounds while no member is online.
const POLL_IDLE: Duration = Duration::from_millis(50);
/// A partition never runs more than this many records ahead of its committed position, so
/// that one record a member never acknowledges cannot make `done` grow without bound.
const MAX_SPAN: u64 = 65_536;
/// How long a member that lost a partition to another gets to finish the records it holds.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping group waits for its last positions to be stored.
const FINAL_WRITE_WAIT: Duration = Duration::from_secs(3);

/// One partition of the group.
pub(crate) struct Part {
    pub topic: String,
    pub topic_id: TopicId,
    pub partition: u32,
    pub state: Arc<PartitionState>,
    pub inbox: Arc<AckInbox>,
    pub committed: u64,
    done: BTreeSet<u64>,
    /// Offset -> bytes, held by `holder`.
    outstanding: BTreeMap<u64, usize>,
    holder: Option<Arc<str>>,
    owner: Option<Arc<str>>,
    /// Since when `owner` waits for another member's records to be done.
    waiting_since: Option<Instant>,
    next_read: u64,
    /// Records read from the log and not handed out yet, from `next_read` on.
    ahead: std::collections::VecDeque<crate::log::Record>,
    /// Records below this may have been sent before (DUP): the highest offset handed out,
    /// and after a restart the lease stored before it.
    dup_below: u64,
    /// Records at or above this are handed out only once a larger lease is stored: a lease
    /// bounds what may have been sent before a crash, so that a restart marks DUP on just
    /// those records.
    pub lease: u64,
    /// The committed position last stored (None: nothing stored yet).
    pub stored: Option<u64>,
    /// Records retention deleted before the group handed them out.
    pub lost: u64,
}

impl Part {
    /// A partition starting at `committed`, with `lease` stored before (`None`: new).
    pub(super) fn new(
        topic: String,
        topic_id: TopicId,
        partition: u32,
        state: Arc<PartitionState>,
        committed: u64,
        stored_lease: Option<u64>,
    ) -> Part {
        let end = state.durable_end();
        Part {
            topic,
            topic_id,
            partition,
            state,
            inbox: Arc::new(AckInbox::default()),
            committed,
            done: BTreeSet::new(),
            outstanding: BTreeMap::new(),
            holder: None,
            owner: None,
            waiting_since: None,
            next_read: committed,
            ahead: std::collections::VecDeque::new(),
            // Only records that existed at start can have been sent before it.
            dup_below: stored_lease.unwrap_or(0).min(end),
            lease: stored_lease.unwrap_or(committed).max(committed),
            stored: stored_lease.map(|_| committed),
            lost: 0,
        }
    }

    fn advance(&mut self) {
        while self.done.first() == Some(&self.committed) {
            self.done.pop_first();
            self.committed += 1;
        }
        // After a rewind, records an earlier holder acknowledged may lie past `next_read`.
        self.next_read = self.next_read.max(self.committed);
    }
}

/// A member as the engine tracks it.
struct Member {
    sub: Arc<Subscriber>,
    /// The subscriber's epoch when it joined: a different one means its connection changed
    /// and what it held was lost.
    epoch: u64,
    filters: Vec<(TopicFilter, SubOptions)>,
    /// Partitions it owns (set when partitions are shared out).
    owned: usize,
    outstanding: usize,
    bytes: usize,
    /// When it last acknowledged a record, or was handed records holding none.
    last_progress: Instant,
}

/// Lowers the engine thread's CPU priority (nice 10), so that on a busy node ingest wins over
/// a group draining a backlog; an idle node still gives the group all it wants.
fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread's own id.
    #[allow(unsafe_code)]
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

/// A roster session seen online: its subscriber, epoch and filters in the group.
type OnlineMember = (Arc<Subscriber>, u64, Vec<(TopicFilter, SubOptions)>);

/// What the server shares with the engine thread.
pub(crate) struct Shared {
    pub status: Mutex<GroupStatus>,
    pub stop: AtomicBool,
    pub delivered: AtomicU64,
    pub acknowledged: AtomicU64,
    pub lost: AtomicU64,
    pub filtered: AtomicU64,
    pub timeouts: AtomicU64,
}

pub(crate) struct Engine {
    pub name: Arc<str>,
    pub topics: Vec<String>,
    pub broker: Arc<Broker>,
    pub parts: Vec<Part>,
    pub shared: Arc<Shared>,
    members: BTreeMap<Arc<str>, Member>,
    generation: u64,
    roster: Vec<crate::mqtt::delivery::DurableMember>,
    reply_tx: mpsc::UnboundedSender<Committed>,
    reply_rx: mpsc::UnboundedReceiver<Committed>,
    /// The write in progress: ticket and per part (committed, lease) it stores.
    pending: Option<(u64, Vec<(u64, u64)>)>,
    next_ticket: u64,
    last_write: Instant,
    /// When the status was last published for the API and the status file.
    last_status: Instant,
    /// Where the next delivery round starts, so that no partition is always served last.
    rotate: usize,
    scratch: Vec<u64>,
    /// See `GroupConfig::ack_timeout`.
    ack_timeout: Duration,
    /// Members that timed out, with the epoch they timed out in: left out until their
    /// connection changes.
    timed_out: HashMap<Arc<str>, u64>,
    /// Partitions must be shared out again (a member was removed outside the roster).
    reassign: bool,
}

impl Engine {
    pub(super) fn new(
        name: Arc<str>,
        topics: Vec<String>,
        broker: Arc<Broker>,
        parts: Vec<Part>,
        shared: Arc<Shared>,
    ) -> Engine {
        let (reply_tx, reply_rx) = mpsc::unbounded_channel();
        Engine {
            name,
            topics,
            broker,
            parts,
            shared,
            members: BTreeMap::new(),
            generation: u64::MAX,
            roster: Vec::new(),
            reply_tx,
            reply_rx,
            pending: None,
            next_ticket: 0,
            last_write: Instant::now() - WRITE_EVERY,
            last_status: Instant::now() - STATUS_EVERY,
            rotate: 0,
            scratch: Vec::new(),
            ack_timeout: Duration::from_secs(60),
            timed_out: HashMap::new(),
            reassign: false,
        }
    }

    /// Sets `GroupConfig::ack_timeout`.
    pub(super) fn with_ack_timeout(mut self, timeout: Duration) -> Engine {
        self.ack_timeout = timeout;
        self
    }

    /// A member holding records that acknowledged none of them for `ack_timeout` loses its
    /// partitions; what it held is handed out again.
    fn expire_silent_members(&mut self) {
        let silent: Vec<(Arc<str>, u64)> = self
            .members
            .iter()
            .filter(|(_, m)| m.outstanding > 0 && m.last_progress.elapsed() >= self.ack_timeout)
            .map(|(id, m)| (id.clone(), m.epoch))
            .collect();
        for (id, epoch) in silent {
            tracing::warn!(group = %self.name, client_id = %id, timeout = ?self.ack_timeout, "a member acknowledged nothing it held within the group's ack_timeout: its partitions and records go to other members until it reconnects");
            self.shared.timeouts.fetch_add(1, Ordering::Relaxed);
            self.timed_out.insert(id.clone(), epoch);
            self.member_left(&id);
            self.reassign = true;
        }
    }

    /// Runs until asked to stop, then stores the last positions.
    pub(super) fn run(mut self) {
        lower_priority();
        loop {
            let before = (
                self.shared.delivered.load(Ordering::Relaxed),
                self.shared.acknowledged.load(Ordering::Relaxed),
            );
            let stopping = self.shared.stop.load(Ordering::Acquire);
            self.take_replies();
            self.refresh_members();
            self.take_acks();
            self.expire_silent_members();
            self.apply_retention();
            if stopping {
                self.final_write();
                self.publish_status();
                return;
            }
            self.deliver();
            self.maybe_write();
            if self.last_status.elapsed() >= STATUS_EVERY {
                self.publish_status();
            }
            let busy = before
                != (
                    self.shared.delivered.load(Ordering::Relaxed),
                    self.shared.acknowledged.load(Ordering::Relaxed),
                );
            std::thread::sleep(if self.members.is_empty() {
                POLL_IDLE
            } else if busy {
                POLL_ACTIVE
            } else {
                POLL_QUIET
            });
        }
    }

    /// Follows subscriptions, connections and disconnections of the group's members.
    fn refresh_members(&mut self) {
        let hub = &self.broker.hub;
        let generation = hub.durable_generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.generation = generation;
            self.roster = hub.durable_members(&self.name);
        }
        // Online sessions of the roster, with their filters.
        let mut online: BTreeMap<Arc<str>, OnlineMember> = BTreeMap::new();
        for m in &self.roster {
            let epoch = m.sub.epoch.load(Ordering::Acquire);
            if !m.sub.online.load(Ordering::Acquire) {
                continue;
            }
            if self.timed_out.get(&m.sub.client_id) == Some(&epoch) {
                continue;
            }
            let Ok(filter) = TopicFilter::parse(&m.filter) else {
                continue;
            };
            let entry = online
                .entry(m.sub.client_id.clone())
                .or_insert_with(|| (m.sub.clone(), epoch, Vec::new()));
            entry.2.push((filter, m.opts));
        }
        let mut changed = false;
        let gone: Vec<Arc<str>> = self
            .members
            .iter()
            .filter(|(id, m)| match online.get(*id) {
                None => true,
                Some((sub, epoch, _)) => !Arc::ptr_eq(sub, &m.sub) || *epoch != m.epoch,
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.member_left(&id);
            changed = true;
        }
        for (id, (sub, epoch, filters)) in online {
            match self.members.get_mut(&id) {
                Some(m) => m.filters = filters,
                None => {
                    tracing::info!(group = %self.name, client_id = %id, "member joined");
                    self.members.insert(
                        id,
                        Member {
                            sub,
                            epoch,
                            filters,
                            owned: 0,
                            outstanding: 0,
                            bytes: 0,
                            last_progress: Instant::now(),
                        },
                    );
                    changed = true;
                }
            }
        }
        // A timed-out member that reconnected (another epoch) may join again.
        self.timed_out.retain(|id, epoch| {
            self.roster
                .iter()
                .any(|m| &m.sub.client_id == id && m.sub.epoch.load(Ordering::Acquire) == *epoch)
        });
        if changed || std::mem::take(&mut self.reassign) {
            let ids: Vec<Arc<str>> = self.members.keys().cloned().collect();
            let current: Vec<Option<Arc<str>>> =
                self.parts.iter().map(|p| p.owner.clone()).collect();
            for m in self.members.values_mut() {
                m.owned = 0;
            }
            for (p, owner) in self.parts.iter_mut().zip(assign(&current, &ids)) {
                if let Some(m) = owner.as_ref().and_then(|o| self.members.get_mut(o)) {
                    m.owned += 1;
                }
                if p.owner != owner {
                    p.owner = owner;
                    p.waiting_since = None;
                }
            }
        }
    }

    /// A member went away: what it held is read again for the partitions' next owners.
    fn member_left(&mut self, id: &Arc<str>) {
        tracing::info!(group = %self.name, client_id = %id, "member left");
        self.members.remove(id);
        for p in &mut self.parts {
            if p.holder.as_ref() == Some(id) {
                p.outstanding.clear();
                p.holder = None;
                p.next_read = p.committed;
            }
            if p.owner.as_ref() == Some(id) {
                p.owner = None;
            }
        }
    }

    fn take_acks(&mut self) {
        let mut acked = 0;
        for p in &mut self.parts {
            self.scratch.clear();
            p.inbox.drain_into(&mut self.scratch);
            for &o in &self.scratch {
                if o < p.committed {
                    continue;
                }
                if let Some(bytes) = p.outstanding.remove(&o) {
                    if let Some(m) = p.holder.as_ref().and_then(|h| self.members.get_mut(h)) {
                        m.outstanding -= 1;
                        m.bytes -= bytes;
                        m.last_progress = Instant::now();
                    }
                }
                if p.done.insert(o) {
                    acked += 1;
                }
            }
            if p.outstanding.is_empty() {
                p.holder = None;
            }
            p.advance();
        }
        self.shared.acknowledged.fetch_add(acked, Ordering::Relaxed);
    }

    /// Records retention removed before the group read them are counted and skipped.
    fn apply_retention(&mut self) {
        for p in &mut self.parts {
            let start = p.state.start();
            if start <= p.committed {
                continue;
            }
            let unread_from = p.next_read.max(p.committed);
            let lost =
                start.saturating_sub(unread_from) - p.done.range(unread_from..start).count() as u64;
            if lost > 0 {
                p.lost += lost;
                self.shared.lost.fetch_add(lost, Ordering::Relaxed);
                tracing::warn!(
                    group = %self.name,
                    topic = %p.topic,
                    partition = p.partition,
                    lost,
                    "retention deleted records before the group read them"
                );
            }
            let kept = p.outstanding.split_off(&start);
            if let Some(m) = p.holder.as_ref().and_then(|h| self.members.get_mut(h)) {
                for bytes in p.outstanding.values() {
                    m.outstanding -= 1;
                    m.bytes -= bytes;
                }
            }
            p.outstanding = kept;
            if p.outstanding.is_empty() {
                p.holder = None;
            }
            p.done = p.done.split_off(&start);
            p.committed = start;
            p.next_read = p.next_read.max(start);
            p.advance();
        }
    }

    /// Hands each owner the next records of its partitions, within its window.
    fn deliver(&mut self) {
        let limits = self.broker.hub.limits;
        let window = (limits.messages / 2).clamp(1, 2048);
        let window_bytes = (limits.bytes / 2).max(1);
        let n = self.parts.len();
        if n == 0 {
            return;
        }
        self.rotate = (self.rotate + 1) % n;
        let mut batches: HashMap<Arc<str>, Vec<Delivery>> = HashMap::new();
        let mut delivered = 0u64;
        for k in 0..n {
            let p = &mut self.parts[(self.rotate + k) % n];
            let Some(owner) = p.owner.clone() else {
                continue;
            };
            if let Some(h) = &p.holder {
                if *h != owner {
                    // The previous owner still holds records of this partition.
                    let since = *p.waiting_since.get_or_insert_with(Instant::now);
                    if since.elapsed() < REVOKE_TIMEOUT {
                        continue;
                    }
                    tracing::warn!(
                        group = %self.name,
                        client_id = %h,
                        topic = %p.topic,
                        partition = p.partition,
                        "a member did not finish the records of a partition it lost within {REVOKE_TIMEOUT:?}: they go to the new owner"
                    );
                    if let Some(m) = self.members.get_mut(h) {
                        for bytes in p.outstanding.values() {
                            m.outstanding -= 1;
                            m.bytes -= bytes;
                        }
                    }
                    p.outstanding.clear();
                    p.holder = None;
                    p.next_read = p.committed;
                }
            }
            p.waiting_since = None;
            let Some(member) = self.members.get_mut(&owner) else {
                continue;
            };
            let share = (window / member.owned.max(1)).max(1);
            let end = p
                .state
                .durable_end()
                .min(p.lease)
                .min(p.committed + MAX_SPAN);
            if p.next_read >= end {
                continue;
            }
            let room = share.saturating_sub(p.outstanding.len());
            if room == 0 || member.outstanding >= window || member.bytes >= window_bytes {
                continue;
            }
            let want = room.min((end - p.next_read) as usize);
            if p.ahead.front().is_none_or(|r| r.offset != p.next_read) {
                // Read a chunk ahead: a read decodes the whole batch that holds its first
                // record, so reading just what the window allows would decode the same
                // batches again and again.
                p.ahead.clear();
                let chunk = READ_CHUNK.min((end - p.next_read) as usize);
                match self
                    .broker
                    .log
                    .read(p.topic_id, p.partition, p.next_read, chunk)
                {
                    Ok(r) => p.ahead.extend(r),
                    Err(e) => {
                        tracing::error!(group = %self.name, topic = %p.topic, partition = p.partition, "reading the log: {e}");
                        continue;
                    }
                }
            }
            let batch = batches.entry(owner.clone()).or_default();
            let take = want.min(p.ahead.len());
            let records: Vec<_> = p.ahead.drain(..take).collect();
            for r in records {
                if r.offset >= end {
                    p.ahead.clear();
                    break;
                }
                p.next_read = r.offset + 1;
                if p.done.contains(&r.offset) {
                    continue;
                }
                let mut qos = None;
                let mut sub_ids = Vec::new();
                let mut retain_as_published = false;
                for (f, o) in &member.filters {
                    if f.matches(&r.headers.mqtt_topic) {
                        qos = Some(qos.unwrap_or(0).max(o.qos));
                        sub_ids.extend(o.id);
                        retain_as_published |= o.retain_as_published;
                    }
                }
                let Some(qos) = qos else {
                    // Outside the group's filter (every member joins with exactly it).
                    p.done.insert(r.offset);
                    self.shared.filtered.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let offset = r.offset;
                let dup = offset < p.dup_below;
                p.dup_below = p.dup_below.max(offset + 1);
                let retain = retain_as_published && r.headers.retain;
                let msg = Arc::new(Message::from_record(r));
                let group = if qos == 0 {
                    p.done.insert(offset);
                    None
                } else {
                    let size = msg.size();
                    if member.outstanding == 0 {
                        member.last_progress = Instant::now();
                    }
                    p.outstanding.insert(offset, size);
                    p.holder = Some(owner.clone());
                    member.outstanding += 1;
                    member.bytes += size;
                    Some(GroupAck {
                        inbox: p.inbox.clone(),
                        offset,
                    })
                };
                delivered += 1;
                batch.push(Delivery {
                    msg,
                    qos,
                    retain,
                    sub_ids,
                    seq: None,
                    dup,
                    group,
                });
            }
            p.advance();
        }
        for (owner, batch) in batches {
            if batch.is_empty() {
                continue;
            }
            let Some(member) = self.members.get(&owner) else {
                continue;
            };
            let mut dropped = 0;
            member.sub.push_many(batch, &limits, &mut dropped);
            if dropped > 0 {
                // The window keeps the outbox below its bound, so this means the session
                // changed under us: take back what it held and hand it out again.
                tracing::warn!(group = %self.name, client_id = %owner, dropped, "the member's outbox refused records; they are handed out again");
                self.member_left(&owner);
                self.generation = u64::MAX;
            }
        }
        self.shared
            .delivered
            .fetch_add(delivered, Ordering::Relaxed);
    }

    fn take_replies(&mut self) {
        while let Ok(c) = self.reply_rx.try_recv() {
            let Some((ticket, values)) = self.pending.take() else {
                continue;
            };
            if c.ticket != ticket {
                self.pending = Some((ticket, values));
                continue;
            }
            match c.outcome {
                Ok(()) => {
                    for (p, (committed, lease)) in self.parts.iter_mut().zip(values) {
                        p.stored = Some(committed);
                        p.lease = p.lease.max(lease);
                    }
                }
                Err(why) => {
                    tracing::error!(group = %self.name, "storing the group's positions failed: {why}");
                }
            }
        }
    }

    /// Stores positions that changed, and a larger lease where deliveries near it.
    fn maybe_write(&mut self) {
        if self.pending.is_some() {
            return;
        }
        let starved = self.parts.iter().any(|p| {
            p.next_read + LEASE_AHEAD / 2 >= p.lease && p.state.durable_end() > p.next_read
        });
        let changed = self.parts.iter().any(|p| p.stored != Some(p.committed));
        if starved || (changed && self.last_write.elapsed() >= WRITE_EVERY) {
            self.write();
        }
    }

    fn write(&mut self) {
        let mut state = Vec::with_capacity(self.parts.len());
        let mut values = Vec::with_capacity(self.parts.len());
        for p in &self.parts {
            let lease = if p.next_read + LEASE_AHEAD / 2 >= p.lease {
                p.next_read + LEASE_AHEAD
            } else {
                p.lease
            };
            state.push(position_op(
                &self.name,
                &p.topic,
                p.partition,
                p.committed,
                lease,
            ));
            values.push((p.committed, lease));
        }
        self.next_ticket += 1;
        let req = AppendRequest {
            state,
            reply: Some(ReplyTo {
                tx: self.reply_tx.clone(),
                ticket: self.next_ticket,
            }),
            ..Default::default()
        };
        if self.broker.appender.blocking_append(req).is_ok() {
            self.pending = Some((self.next_ticket, values));
        }
        self.last_write = Instant::now();
    }

    fn final_write(&mut self) {
        let deadline = Instant::now() + FINAL_WRITE_WAIT;
        // A write in progress may predate the last acknowledgements: wait for it, then
        // store the latest positions.
        for round in 0..2 {
            while self.pending.is_some() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
                self.take_replies();
            }
            if round == 0 && self.parts.iter().any(|p| p.stored != Some(p.committed)) {
                self.write();
            }
        }
    }

    fn publish_status(&mut self) {
        self.last_status = Instant::now();
        let partitions = self
            .parts
            .iter()
            .map(|p| {
                let end = p.state.durable_end();
                let committed = p.stored.unwrap_or(p.committed);
                PartitionPosition {
                    topic: p.topic.clone(),
                    partition: p.partition,
                    committed,
                    end,
                    lag: end.saturating_sub(committed),
                    owner: p.owner.as_deref().map(str::to_string),
                    in_flight: p.outstanding.len() as u64,
                    lost: p.lost,
                    kafka_offset: None,
                }
            })
            .collect();
        let members = self
            .members
            .iter()
            .map(|(id, m)| MemberStatus {
                client_id: id.to_string(),
                partitions: m.owned as u32,
                in_flight: m.outstanding as u64,
            })
            .collect();
        let mut status = self.shared.status.lock().expect("group status lock");
        status.name = self.name.to_string();
        status.topics = self.topics.clone();
        status.members = members;
        status.partitions = partitions;
        status.delivered = self.shared.delivered.load(Ordering::Relaxed);
        status.acknowledged = self.shared.acknowledged.load(Ordering::Relaxed);
        status.lost = self.shared.lost.load(Ordering::Relaxed);
        status.filtered = self.shared.filtered.load(Ordering::Relaxed);
        status.ack_timeouts = self.shared.timeouts.load(Ordering::Relaxed);
        status.kafka_state = None;
        status.kafka_error = None;
    }
}
