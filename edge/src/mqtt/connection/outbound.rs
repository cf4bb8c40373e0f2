//! The outbound side of a connection: deliveries written to the client within its in-flight
//! window, their acknowledgements, outbound topic aliases, and the replay of a persistent
//! session's durable queue before its outbox.
//!
//! State changes (a queue entry deleted once delivered) go into the request the connection
//! is building, passed in as `state`, so they are committed with what the client sent.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::types::{Client, PendingAck, ReceiveLimits};
use crate::auth::ConnAcl;
use crate::log::appender::{now_ms, StateOp};
use crate::mqtt::codec::{self, reason, AckKind, OutPublish, Version};
use crate::mqtt::delivery::{
    complete_op, dequeue_op, read_queue, release_op, released_seqs, Delivery, GroupAck, Message,
    QueueCursor,
};

/// Deliveries are taken from the outbox while less than this is waiting to be written.
const WRITE_BUFFER_HIGH: usize = 64 * 1024;
/// Deliveries taken from the outbox under one lock.
const POP_BATCH: usize = 64;
/// Queue entries of a persistent session read back from disk at once.
const REPLAY_PAGE: usize = 256;

/// An outbound QoS 1 or 2 PUBLISH awaiting its acknowledgement.
#[derive(Debug, Clone)]
struct OutFlight {
    qos: u8,
    seq: Option<u64>,
    /// QoS 2: PUBREC received, PUBREL sent.
    released: bool,
    /// A durable consumer group's record: reported done at the end of the flow.
    group: Option<GroupAck>,
}

/// What the edge has sent the client and not yet seen acknowledged, and what it sends next.
pub(super) struct OutboundWindow {
    /// Outbound QoS 1/2 publishes allowed unacknowledged.
    limit: usize,
    /// 5.0 Maximum Packet Size of the client.
    client_max_packet: Option<usize>,
    /// 5.0 Topic Alias Maximum of the client.
    client_alias_max: u16,
    /// Outbound topic aliases given so far.
    aliases: HashMap<Bytes, u16>,
    /// Outbound QoS 1/2 publishes by packet id.
    inflight: HashMap<u16, OutFlight>,
    /// Last packet id given to a delivery without a durable entry.
    next_pkid: u16,
    /// Replaying the durable queue: the last key read (the prefix before the first page).
    replay_after: Option<QueueCursor>,
    /// Deliveries read back from the durable queue, sent before the outbox.
    replay: VecDeque<Delivery>,
    /// Deliveries taken from the outbox, not yet written.
    popped: VecDeque<Delivery>,
    /// Seqs replayed from disk: the same entries arriving through the outbox are skipped.
    replayed: HashSet<u64>,
}

impl OutboundWindow {
    /// (Its fields are kept apart, not as a `ReceiveLimits`, so that the small ones share a
    /// word with `next_pkid`: every connection holds one.)
    pub(super) fn new(limits: ReceiveLimits) -> OutboundWindow {
        OutboundWindow {
            limit: limits.inflight,
            client_max_packet: limits.max_packet,
            client_alias_max: limits.topic_alias_maximum,
            aliases: HashMap::new(),
            inflight: HashMap::new(),
            next_pkid: 0,
            replay_after: None,
            replay: VecDeque::new(),
            popped: VecDeque::new(),
            replayed: HashSet::new(),
        }
    }

    /// Continues a persistent session: unacknowledged deliveries of the previous connection
    /// (or of the edge before a restart) and messages queued while offline, PUBRELs first,
    /// then the queue.
    pub(super) fn resume(&mut self, client: &Client, wbuf: &mut BytesMut) {
        self.resume_released(client, wbuf);
        self.replay_after = Some(QueueCursor::default());
    }

    pub(super) fn on_puback(&mut self, client_id: &str, pkid: u16, state: &mut Vec<StateOp>) {
        if self.inflight.get(&pkid).is_some_and(|f| f.qos == 1) {
            if let Some(f) = self.inflight.remove(&pkid) {
                if let Some(g) = &f.group {
                    g.done();
                }
                if let Some(seq) = f.seq {
                    state.push(dequeue_op(client_id, seq));
                }
            }
        }
    }

    /// Returns the PUBREL to write once `state` is committed, when it must wait for that.
    pub(super) fn on_pubrec(
        &mut self,
        client: &Client,
        pkid: u16,
        code: u8,
        state: &mut Vec<StateOp>,
        wbuf: &mut BytesMut,
    ) -> Option<PendingAck> {
        let f = self.inflight.get_mut(&pkid)?;
        if f.qos != 2 {
            return None;
        }
        let f = f.clone();
        if code >= 0x80 {
            // The subscriber refused it: the flow ends here.
            self.inflight.remove(&pkid);
            if let Some(g) = &f.group {
                g.done();
            }
            if let Some(seq) = f.seq {
                state.push(dequeue_op(&client.client_id, seq));
            }
            return None;
        }
        if let Some(x) = self.inflight.get_mut(&pkid) {
            x.released = true;
        }
        match f.seq {
            Some(seq) if !f.released => {
                // The PUBREL goes out once the new state is durable, so a restart never
                // resends a PUBLISH the subscriber has already released.
                state.push(dequeue_op(&client.client_id, seq));
                state.push(release_op(&client.client_id, seq));
                Some(PendingAck {
                    kind: AckKind::PubRel,
                    pkid,
                    code: reason::SUCCESS,
                    logged: false,
                })
            }
            _ => {
                codec::write_ack(client.version, AckKind::PubRel, pkid, reason::SUCCESS, wbuf);
                None
            }
        }
    }

    pub(super) fn on_pubcomp(&mut self, client_id: &str, pkid: u16, state: &mut Vec<StateOp>) {
        if self
            .inflight
            .get(&pkid)
            .is_some_and(|f| f.qos == 2 && f.released)
        {
            if let Some(f) = self.inflight.remove(&pkid) {
                if let Some(g) = &f.group {
                    g.done();
                }
                if let Some(seq) = f.seq {
                    state.push(complete_op(client_id, seq));
                }
            }
        }
    }

    /// Resends the PUBRELs of QoS 2 deliveries the subscriber had received (PUBREC) when the
    /// previous connection ended.
    fn resume_released(&mut self, client: &Client, wbuf: &mut BytesMut) {
        let seqs = match released_seqs(&client.broker.log, &client.client_id) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(client_id = %client.client_id, "reading released deliveries: {e}");
                return;
            }
        };
        for seq in seqs {
            let pkid = durable_pkid(seq);
            self.inflight.insert(
                pkid,
                OutFlight {
                    qos: 2,
                    seq: Some(seq),
                    released: true,
                    group: None,
                },
            );
            codec::write_ack(client.version, AckKind::PubRel, pkid, reason::SUCCESS, wbuf);
        }
    }

    /// Reads the next page of the durable queue into `replay`.
    fn refill_replay(&mut self, client: &Client, state: &mut Vec<StateOp>) {
        let Some(after) = self.replay_after.take() else {
            return;
        };
        let client_id = &client.client_id;
        let log = &client.broker.log;
        let page = match read_queue(log, client_id, &after, REPLAY_PAGE) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(client_id = %client_id, "reading queued deliveries: {e}");
                // Tried again by the next refill.
                self.replay_after = Some(after);
                return;
            }
        };
        self.replay_after = page.next;
        let entries = page.entries;
        // Queued records are mostly consecutive in a few partitions: each partition's span
        // is read once (a stored batch holds many records), not one read per entry.
        let mut spans: HashMap<(u32, u32), (u64, u64)> = HashMap::new();
        for (_, e) in &entries {
            let (t, p, o) = e.position;
            let span = spans.entry((t, p)).or_insert((o, o));
            span.0 = span.0.min(o);
            span.1 = span.1.max(o);
        }
        let mut records: HashMap<(u32, u32, u64), crate::log::Record> = HashMap::new();
        for ((t, p), (lo, hi)) in spans {
            if hi - lo < 4 * REPLAY_PAGE as u64 {
                if let Ok(read) = log.read(t, p, lo, (hi - lo + 1) as usize) {
                    records.extend(read.into_iter().map(|r| ((t, p, r.offset), r)));
                }
            }
        }
        let stats = &client.broker.hub.stats;
        for (seq, entry) in entries {
            let (topic, partition, offset) = entry.position;
            let record = match records.remove(&entry.position) {
                Some(r) => Some(r),
                None => match log.read(topic, partition, offset, 1) {
                    Ok(mut r) => r.pop().filter(|r| r.offset == offset),
                    // Not a deletion: the entry stays on disk and a later connection (or
                    // restart) tries again.
                    Err(e) => {
                        stats.queue_read_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(client_id = %client_id, topic, partition, offset, "reading a queued record failed; the entry is kept: {e}");
                        continue;
                    }
                },
            };
            let Some(record) = record else {
                // Retention or the disk budget deleted the record before it was delivered.
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                state.push(dequeue_op(client_id, seq));
                continue;
            };
            self.replayed.insert(seq);
            // Sent before: unacknowledged when the previous connection ended, or queued
            // before a restart (whether it went out then is not known).
            let dup = seq <= client.broker.hub.boot_seq.load(Ordering::Relaxed)
                || client.sub.sent.lock().expect("sent lock").remove(&seq);
            self.replay.push_back(Delivery {
                msg: Arc::new(Message::from_record(record)),
                qos: entry.qos,
                retain: entry.retain,
                sub_ids: entry.sub_ids,
                seq: Some(seq),
                dup,
                group: None,
            });
        }
    }

    /// The next delivery: replayed ones first, then the outbox.
    fn next_delivery(&mut self, client: &Client, state: &mut Vec<StateOp>) -> Option<Delivery> {
        loop {
            if self.replay.is_empty() && self.replay_after.is_some() {
                self.refill_replay(client, state);
            }
            if let Some(d) = self.replay.pop_front() {
                return Some(d);
            }
            if self.popped.is_empty() {
                client
                    .sub
                    .pop_into(&client.broker.hub.limits, POP_BATCH, &mut self.popped);
            }
            let d = self.popped.pop_front()?;
            if let Some(seq) = d.seq {
                if self.replayed.remove(&seq) {
                    continue;
                }
            }
            return Some(d);
        }
    }

    /// Writes deliveries while the in-flight window and the write buffer have room. True
    /// when it stopped because the write buffer is full: deliveries may still be waiting.
    pub(super) fn pump(
        &mut self,
        client: &Client,
        acl: &mut Option<Box<ConnAcl>>,
        wbuf: &mut BytesMut,
        state: &mut Vec<StateOp>,
    ) -> bool {
        let broker = &client.broker;
        let stats = &broker.hub.stats;
        let now = now_ms();
        // Added to the node-wide counter once per call, not per packet (see `report_counts`).
        let mut sent = 0;
        while wbuf.len() < WRITE_BUFFER_HIGH && self.inflight.len() < self.limit {
            let Some(d) = self.next_delivery(client, state) else {
                break;
            };
            // A message already sent once (a resend of its unacknowledged PUBLISH) has
            // started onward delivery, so expiry no longer applies to it [MQTT-3.3.2-5],
            // [MQTT-4.3.3-7]: it goes again, with no time left.
            let expiry_left = match d.msg.expiry_left(now) {
                Some(left) => left,
                None if d.dup => Some(0),
                None => {
                    stats.expired.fetch_add(1, Ordering::Relaxed);
                    forget(&client.client_id, &d, state);
                    continue;
                }
            };
            if let Some(acl) = acl.as_mut() {
                acl.refresh(&broker.auth, &client.client_id);
                let topic = std::str::from_utf8(&d.msg.topic).unwrap_or_default();
                if !acl.rules.may_read(topic) {
                    forget(&client.client_id, &d, state);
                    continue;
                }
            }
            let pkid = if d.qos > 0 {
                match self.alloc_pkid(d.seq) {
                    Some(p) => p,
                    None => {
                        // Its packet id is still in flight; wait for that acknowledgement.
                        self.unsend(d);
                        break;
                    }
                }
            } else {
                0
            };
            let mut publish = OutPublish {
                topic: &d.msg.topic,
                alias: None,
                pkid,
                qos: d.qos,
                retain: d.retain,
                dup: d.dup,
                props: &d.msg.props,
                expiry_left,
                sub_ids: &d.sub_ids,
                payload: &d.msg.payload,
            };
            let mut new_alias = None;
            if client.version == Version::V5 && self.client_alias_max > 0 {
                match self.aliases.get(&d.msg.topic) {
                    Some(&a) => {
                        publish.alias = Some(a);
                        publish.topic = &[];
                    }
                    None if self.aliases.len() < self.client_alias_max as usize => {
                        let a = self.aliases.len() as u16 + 1;
                        publish.alias = Some(a);
                        new_alias = Some(a);
                    }
                    None => {}
                }
            }
            if let Some(max) = self.client_max_packet {
                if codec::publish_size(client.version, &publish) > max {
                    // Too large for this client: discarded as if delivered (MQTT 5 3.1.2.25).
                    stats.oversize.fetch_add(1, Ordering::Relaxed);
                    forget(&client.client_id, &d, state);
                    continue;
                }
            }
            codec::write_publish(client.version, &publish, wbuf);
            if let Some(a) = new_alias {
                self.aliases.insert(d.msg.topic.clone(), a);
            }
            sent += 1;
            if d.qos > 0 {
                self.inflight.insert(
                    pkid,
                    OutFlight {
                        qos: d.qos,
                        seq: d.seq,
                        released: false,
                        group: d.group,
                    },
                );
            }
        }
        if sent > 0 {
            stats.messages_sent.fetch_add(sent, Ordering::Relaxed);
        }
        wbuf.len() >= WRITE_BUFFER_HIGH
    }

    /// Puts a delivery that could not be sent yet back where it came from.
    fn unsend(&mut self, d: Delivery) {
        if d.seq.is_some_and(|s| self.replayed.contains(&s)) {
            self.replay.push_front(d);
        } else {
            self.popped.push_front(d);
        }
    }

    /// A packet id for an outbound QoS 1/2 publish. A delivery with a durable entry gets one
    /// derived from its seq, so it is resent with the same id after a restart; `None` while
    /// that id is still in flight.
    fn alloc_pkid(&mut self, seq: Option<u64>) -> Option<u16> {
        if let Some(seq) = seq {
            let p = durable_pkid(seq);
            return (!self.inflight.contains_key(&p)).then_some(p);
        }
        loop {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&self.next_pkid) {
                return Some(self.next_pkid);
            }
        }
    }

    /// The connection ends: the session goes offline. Whatever is still to be acknowledged by
    /// this client stays in the durable queue of a persistent session; the rest of the
    /// outbox goes. Returns the deliveries lost.
    pub(super) fn close(&self, client: &Client) -> usize {
        let lost = client.sub.set_online(false)
            + self
                .popped
                .iter()
                .filter(|d| d.seq.is_none() && d.qos > 0)
                .count();
        let mut sent = client.sub.sent.lock().expect("sent lock");
        sent.clear();
        sent.extend(self.inflight.values().filter_map(|f| f.seq));
        lost
    }
}

/// Drops a delivery that will not be sent, with its durable entry.
fn forget(client_id: &str, d: &Delivery, state: &mut Vec<StateOp>) {
    if let Some(g) = &d.group {
        g.done();
    }
    if let Some(seq) = d.seq {
        state.push(dequeue_op(client_id, seq));
    }
}

/// The packet id of a delivery with a durable queue entry.
fn durable_pkid(seq: u64) -> u16 {
    (seq % 65_535) as u16 + 1
}
