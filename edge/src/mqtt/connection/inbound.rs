//! The inbound side of a connection: what the client sends is built into one append request
//! per socket read, sent to the appender, and acknowledged once the appender reports that
//! request's group commit durable.
//!
//! Requests complete in the order they are sent, so acknowledgements leave in the order
//! their packets arrived; an acknowledgement that needs no commit waits behind the requests
//! already pending.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::staging::{stage_publish, Staged, Staging};
use super::types::{validate_topic, Client, Close, Deferred, PendingAck};
use crate::auth::ConnAcl;
use crate::log::appender::{AppendRequest, Committed, ReplyTo, Spare, StateOp, TryAppendError};
use crate::mqtt::codec::{self, reason, AckKind, PublishIn, QoS, Version};
use crate::mqtt::delivery::{Fanouts, Message, PlanCache, SubRef, Target};
use crate::mqtt::limits::{check_message_props, PacketRefused};
use crate::mqtt::session::{qos2_marker_op, qos2_release_op, SessionData};
use crate::mqtt::subs::Match;
use crate::mqtt::APPEND_BUDGET_BYTES;
use crate::route::TopicId;

/// A request is sent to the appender once it holds this many bytes, even mid-read.
const MAX_REQUEST_BYTES: usize = 256 * 1024;
/// A committed request's buffer is built in again up to this capacity; a larger one (a
/// request of large publishes) is given back to the allocator.
const SPARE_BUF_MAX: usize = MAX_REQUEST_BYTES;
/// Routes remembered per connection (devices publish to few topics).
const ROUTE_CACHE_ENTRIES: usize = 64;

/// A request sent to the appender and what to do when it is committed.
struct PendingReq {
    ticket: u64,
    deferred: Vec<Deferred>,
    fanout: Fanouts,
    retained: Vec<(Bytes, Option<Arc<Message>>)>,
}

/// The request being built from what the client sent, the requests sent and not yet
/// committed, and the inbound flows they acknowledge.
pub(super) struct InboundBatch {
    /// QoS 2 packet ids sent to the appender whose commit is not yet reported.
    qos2_pending: HashSet<u16>,
    /// QoS 1 and 2 publishes received and not yet fully acknowledged (QoS 2 until PUBCOMP):
    /// what MQTT 5's Receive Maximum counts.
    inflight: usize,
    /// QoS 1 and 2 publishes whose commit is not reported yet: what 3.1.1 read-ahead counts.
    /// A QoS 2 flow past PUBREC only waits for the client's PUBREL, which must still be read.
    awaiting_commit: usize,
    pending: VecDeque<PendingReq>,
    next_ticket: u64,
    /// Where the appender reports commits; created by the first request that needs a report
    /// and given back when the connection is idle with nothing pending (an unbounded channel
    /// allocates a block of 32 reports at once, about 3.4 KiB with the buffers handed back).
    commit_tx: Option<mpsc::UnboundedSender<Committed>>,
    commit_rx: Option<mpsc::UnboundedReceiver<Committed>>,
    /// 5.0 inbound topic aliases, grown as the client sets them.
    aliases: Vec<Option<Bytes>>,
    req: AppendRequest,
    req_acks: Vec<Deferred>,
    req_fanout: Fanouts,
    req_retained: Vec<(Bytes, Option<Arc<Message>>)>,
    /// Per topic: its route, and whether the ACL lets this client publish to it.
    route_cache: HashMap<Bytes, (TopicId, u32, Bytes, bool)>,
    scratch_matches: Vec<Match<SubRef>>,
    scratch_targets: Vec<Target>,
    /// Made by the first publish that has subscribers to plan for.
    plans: Option<Box<PlanCache>>,
    /// Acknowledgements written and publishes received since the node-wide counters were
    /// last updated (added once per loop turn rather than once per packet: every connection
    /// updating them per packet would contend for their cache line).
    acks_unreported: u32,
    received_unreported: u32,
}

impl InboundBatch {
    /// `inflight`: the QoS 2 flows a continued session holds.
    pub(super) fn new(inflight: usize) -> InboundBatch {
        InboundBatch {
            qos2_pending: HashSet::new(),
            inflight,
            awaiting_commit: 0,
            pending: VecDeque::new(),
            next_ticket: 1,
            commit_tx: None,
            commit_rx: None,
            aliases: Vec::new(),
            req: AppendRequest::default(),
            req_acks: Vec::new(),
            req_fanout: Fanouts::default(),
            req_retained: Vec::new(),
            route_cache: HashMap::new(),
            scratch_matches: Vec::new(),
            scratch_targets: Vec::new(),
            plans: None,
            acks_unreported: 0,
            received_unreported: 0,
        }
    }

    /// QoS 1 and 2 publishes whose commit is not reported yet.
    pub(super) fn awaiting_commit(&self) -> usize {
        self.awaiting_commit
    }

    /// The request being built is large enough to send before decoding on.
    pub(super) fn is_full(&self) -> bool {
        self.req.buf.len() >= MAX_REQUEST_BYTES
    }

    /// Requests sent to the appender are not all committed yet.
    pub(super) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Gives back what only requests on their way need: the commit channel (only with
    /// nothing pending: then the appender holds no sender of it) and a committed request's
    /// buffers that nothing is being built in yet (see [`InboundBatch::reuse`]).
    pub(super) fn release_when_idle(&mut self) {
        debug_assert!(self.pending.is_empty());
        self.commit_tx = None;
        self.commit_rx = None;
        if self.req.records.is_empty() && self.req.buf.capacity() != 0 {
            self.req.records = Vec::new();
            self.req.buf = Vec::new();
        }
    }

    /// The state changes of the request being built.
    pub(super) fn state_ops(&mut self) -> &mut Vec<StateOp> {
        &mut self.req.state
    }

    /// Writes `d` once the request being built is committed.
    pub(super) fn defer(&mut self, d: Deferred) {
        self.req_acks.push(d);
    }

    /// Adds the acknowledgements written and the publishes received since the last call to
    /// the node-wide counters.
    pub(super) fn report_counts(&mut self, client: &Client) {
        let stats = &client.broker.hub.stats;
        if self.acks_unreported > 0 {
            stats
                .acks_sent
                .fetch_add(u64::from(self.acks_unreported), Ordering::Relaxed);
            self.acks_unreported = 0;
        }
        if self.received_unreported > 0 {
            stats
                .messages_received
                .fetch_add(u64::from(self.received_unreported), Ordering::Relaxed);
            self.received_unreported = 0;
        }
    }

    /// The next commit report; never resolves while there is no channel (nothing was sent).
    pub(super) async fn committed(&mut self) -> Option<Committed> {
        match &mut self.commit_rx {
            Some(rx) => rx.recv().await,
            None => std::future::pending().await,
        }
    }

    pub(super) fn on_publish(
        &mut self,
        client: &Client,
        acl: &mut Option<Box<ConnAcl>>,
        session: &SessionData,
        p: PublishIn,
        now: u64,
    ) -> Result<(), Close> {
        let broker = &client.broker;
        let cfg = &broker.config;
        if !p.props.is_empty() {
            check_message_props(&p.props, cfg)
                .map_err(|(kind, why)| Close::refused(kind, reason::PACKET_TOO_LARGE, why))?;
        }
        // Topic, through a 5.0 topic alias if one is used.
        let topic: Bytes = match p.topic_alias {
            Some(alias) => {
                if alias == 0 || alias > cfg.topic_alias_maximum {
                    return Err(Close::new(
                        reason::TOPIC_ALIAS_INVALID,
                        format!(
                            "topic alias {alias} is outside 1..={}",
                            cfg.topic_alias_maximum
                        ),
                    ));
                }
                if p.topic.is_empty() {
                    match self.aliases.get(alias as usize).and_then(|a| a.as_ref()) {
                        Some(t) => t.clone(),
                        None => {
                            return Err(Close::new(
                                reason::PROTOCOL_ERROR,
                                format!("topic alias {alias} was never set"),
                            ))
                        }
                    }
                } else {
                    validate_topic(&p.topic, cfg)?;
                    let t = p.topic.clone();
                    if self.aliases.len() <= alias as usize {
                        self.aliases.resize(alias as usize + 1, None);
                    }
                    self.aliases[alias as usize] = Some(t.clone());
                    t
                }
            }
            None if p.topic.is_empty() => {
                return Err(Close::new(
                    reason::PROTOCOL_ERROR,
                    "PUBLISH with an empty topic",
                ))
            }
            None => p.topic.clone(),
        };
        if let Some(acl) = acl.as_mut() {
            if acl.refresh(&broker.auth, &client.client_id) {
                self.route_cache.clear();
            }
        }
        // A topic in the route cache was validated when it was routed.
        let (topic_id, partition, key, allowed) = match self.route_cache.get(&topic) {
            Some(hit) => hit.clone(),
            None => {
                let text = validate_topic(&topic, cfg)?;
                let d = broker.router.route(text, &client.client_id);
                if self.route_cache.len() >= ROUTE_CACHE_ENTRIES {
                    self.route_cache.clear();
                }
                let allowed = acl.as_ref().is_none_or(|a| a.rules.may_publish(text));
                let route = (d.topic, d.partition, Bytes::from(d.key), allowed);
                self.route_cache.insert(topic.clone(), route.clone());
                route
            }
        };

        // `$` topics are the edge's own ($SYS): a client may read them, never write them.
        let reserved = topic.starts_with(b"$");
        if reserved && client.version == Version::V311 {
            return Err(Close::refused(
                PacketRefused::ReservedTopic,
                reason::TOPIC_NAME_INVALID,
                "topics starting with $ are reserved for the edge",
            ));
        }

        if p.qos != QoS::AtMostOnce {
            let is_resend = p.qos == QoS::ExactlyOnce
                && (self.qos2_pending.contains(&p.pkid) || session.qos2.contains(&p.pkid));
            if !is_resend {
                if client.version == Version::V5 && self.inflight >= cfg.receive_maximum as usize {
                    return Err(Close::new(
                        reason::RECEIVE_MAXIMUM_EXCEEDED,
                        format!(
                            "more than {} unacknowledged QoS 1/2 publishes",
                            cfg.receive_maximum
                        ),
                    ));
                }
                self.inflight += 1;
            }
        }

        if p.qos == QoS::ExactlyOnce {
            if self.qos2_pending.contains(&p.pkid) {
                // Resent before its PUBREC went out; that PUBREC answers both.
                return Ok(());
            }
            if session.qos2.contains(&p.pkid) {
                // Already in the log: acknowledge again, do not log twice.
                self.req_acks.push(Deferred::Ack(PendingAck {
                    kind: AckKind::PubRec,
                    pkid: p.pkid,
                    code: reason::SUCCESS,
                    logged: false,
                }));
                return Ok(());
            }
        }

        if reserved {
            broker.limits.packet_refused(PacketRefused::ReservedTopic);
            self.refuse_publish(p.qos, p.pkid, reason::TOPIC_NAME_INVALID);
            return Ok(());
        }

        if !allowed {
            broker
                .auth
                .stats
                .publishes_denied
                .fetch_add(1, Ordering::Relaxed);
            // 3.1.1 cannot say no to a publish: the connection is closed (MQTT-3.3.5-2).
            if client.version == Version::V311 {
                return Err(Close::new(
                    reason::NOT_AUTHORIZED,
                    format!(
                        "not authorized to publish to {:?}",
                        String::from_utf8_lossy(&topic)
                    ),
                ));
            }
            self.refuse_publish(p.qos, p.pkid, reason::NOT_AUTHORIZED);
            return Ok(());
        }

        if broker.log.rejects_publishes() {
            broker
                .log
                .counters
                .budget_rejected
                .fetch_add(1, Ordering::Relaxed);
            if client.version == Version::V311 && p.qos != QoS::AtMostOnce {
                return Err(Close::new(reason::QUOTA_EXCEEDED, "disk budget reached"));
            }
            self.refuse_publish(p.qos, p.pkid, reason::QUOTA_EXCEEDED);
            return Ok(());
        }

        if p.retain && !p.payload.is_empty() {
            let size = Message::size_of(topic.len(), p.payload.len(), &p.props);
            if !broker.hub.retained_room(
                &topic,
                size,
                cfg.max_retained_messages,
                cfg.max_retained_bytes.0,
            ) {
                let why = format!(
                    "the retained store is full (mqtt.max_retained_messages = {}, mqtt.max_retained_bytes = {})",
                    cfg.max_retained_messages, cfg.max_retained_bytes.0
                );
                if client.version == Version::V311 || p.qos == QoS::AtMostOnce {
                    return Err(Close::refused(
                        PacketRefused::RetainedQuota,
                        reason::QUOTA_EXCEEDED,
                        why,
                    ));
                }
                broker.limits.packet_refused(PacketRefused::RetainedQuota);
                self.refuse_publish(p.qos, p.pkid, reason::QUOTA_EXCEEDED);
                return Ok(());
            }
        }

        self.received_unreported += 1;
        let qos = p.qos;
        let pkid = p.pkid;
        let staged = stage_publish(
            &broker.hub,
            Staging {
                req: &mut self.req,
                retained: &mut self.req_retained,
                fanouts: &mut self.req_fanout,
                plans: Some(&mut self.plans),
            },
            &mut self.scratch_matches,
            &mut self.scratch_targets,
            (topic_id, partition, &key),
            Staged {
                topic,
                qos: qos as u8,
                retain: p.retain,
                publisher: &client.client_id,
                props: p.props,
                payload: p.payload,
                now,
            },
        );
        if let Err(e) = staged {
            return Err(Close::refused(
                PacketRefused::Encoding,
                reason::PACKET_TOO_LARGE,
                e.to_string(),
            ));
        }
        if qos != QoS::AtMostOnce {
            self.awaiting_commit += 1;
        }
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.req_acks.push(Deferred::Ack(PendingAck {
                kind: AckKind::PubAck,
                pkid,
                code: reason::SUCCESS,
                logged: true,
            })),
            QoS::ExactlyOnce => {
                if session.durable {
                    self.req.state.push(qos2_marker_op(&client.client_id, pkid));
                }
                self.qos2_pending.insert(pkid);
                self.req_acks.push(Deferred::Ack(PendingAck {
                    kind: AckKind::PubRec,
                    pkid,
                    code: reason::SUCCESS,
                    logged: true,
                }));
            }
        }
        Ok(())
    }

    /// Answers a refused QoS 1/2 publish with `code` (after what was accepted before it); a
    /// refused QoS 0 publish is dropped silently.
    fn refuse_publish(&mut self, qos: QoS, pkid: u16, code: u8) {
        let kind = match qos {
            QoS::AtMostOnce => return,
            QoS::AtLeastOnce => AckKind::PubAck,
            QoS::ExactlyOnce => AckKind::PubRec,
        };
        self.req_acks.push(Deferred::Ack(PendingAck {
            kind,
            pkid,
            code,
            logged: false,
        }));
    }

    pub(super) fn on_pubrel(&mut self, client_id: &str, session: &SessionData, pkid: u16) {
        let known = session.qos2.contains(&pkid) || self.qos2_pending.contains(&pkid);
        if known && session.durable {
            self.req.state.push(qos2_release_op(client_id, pkid));
        }
        self.req_acks.push(Deferred::Ack(PendingAck {
            kind: AckKind::PubComp,
            pkid,
            code: if known {
                reason::SUCCESS
            } else {
                reason::PACKET_ID_NOT_FOUND
            },
            logged: false,
        }));
    }

    /// Sends the request being built to the appender (or, when it holds only acks and nothing
    /// is pending, answers them at once into `wbuf`).
    pub(super) async fn send_request(
        &mut self,
        client: &Client,
        session: &mut SessionData,
        wbuf: &mut BytesMut,
    ) -> Result<(), Close> {
        let acks = std::mem::take(&mut self.req_acks);
        let fanout = std::mem::take(&mut self.req_fanout);
        let retained = std::mem::take(&mut self.req_retained);
        let has_data = !self.req.records.is_empty() || !self.req.state.is_empty();
        if !has_data {
            if acks.is_empty() {
                return Ok(());
            }
            if self.pending.is_empty() {
                for d in acks {
                    self.apply_deferred(client, session, wbuf, d);
                }
                return Ok(());
            }
        }
        let mut req = std::mem::take(&mut self.req);
        let broker = &client.broker;
        // A request larger than the whole budget takes all of it, so it still goes through.
        let budget = &broker.append_budget;
        let want = (req.buf.len().max(1) as u32).min(APPEND_BUDGET_BYTES);
        let closed = || Close::new(reason::SERVER_SHUTTING_DOWN, "the log is closed");
        // The waits are boxed: inline, they would make every connection's task larger by
        // their size, idle or not, and they happen only under back-pressure.
        req.permit = Some(match budget.clone().try_acquire_many_owned(want) {
            Ok(permit) => permit,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                Box::pin(budget.clone().acquire_many_owned(want))
                    .await
                    .map_err(|_| closed())?
            }
            Err(tokio::sync::TryAcquireError::Closed) => return Err(closed()),
        });
        if !acks.is_empty() || !req.state.is_empty() || !fanout.is_empty() || !retained.is_empty() {
            let ticket = self.next_ticket;
            self.next_ticket += 1;
            let commit_rx = &mut self.commit_rx;
            let tx = self.commit_tx.get_or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                *commit_rx = Some(rx);
                tx
            });
            req.reply = Some(ReplyTo {
                tx: tx.clone(),
                ticket,
            });
            self.pending.push_back(PendingReq {
                ticket,
                deferred: acks,
                fanout,
                retained,
            });
        }
        match broker.appender.try_append(req) {
            Ok(()) => Ok(()),
            Err(TryAppendError::Full(req)) => Box::pin(broker.appender.append(req))
                .await
                .map_err(|_| closed()),
            Err(TryAppendError::Closed) => Err(closed()),
        }
    }

    /// The oldest pending request is committed: writes its acknowledgements into `wbuf`,
    /// updates the retained store and delivers its publishes.
    pub(super) fn on_committed(
        &mut self,
        client: &Client,
        session: &mut SessionData,
        wbuf: &mut BytesMut,
        done: Committed,
    ) -> Result<(), Close> {
        let Some(p) = self.pending.pop_front() else {
            return Ok(());
        };
        debug_assert_eq!(
            p.ticket, done.ticket,
            "the appender completes requests in order"
        );
        self.reuse(done.spare);
        if let Err(why) = done.outcome {
            return Err(Close::new(
                reason::IMPLEMENTATION_SPECIFIC,
                format!("the log failed: {why}"),
            ));
        }
        for d in p.deferred {
            self.apply_deferred(client, session, wbuf, d);
        }
        let hub = &client.broker.hub;
        for (topic, msg) in p.retained {
            hub.set_retained(topic, msg);
        }
        if !p.fanout.is_empty() {
            hub.deliver(p.fanout, &mut done.seqs.into_iter());
        }
        Ok(())
    }

    /// Builds the next request in a committed request's buffers when nothing is being built
    /// yet; drops them otherwise, on this connection's thread. A client that keeps a window
    /// of publishes in flight has one request at a time on its way, the next one read once
    /// this one's acknowledgements are out, so it is built in the same buffers instead of a
    /// fresh one grown a reallocation at a time. A connection that publishes less than once
    /// a second keeps no buffer between its publishes: its reads follow a quiet spell, so
    /// [`InboundBatch::release_when_idle`] gives them back once the acknowledgement is
    /// written and nothing is pending.
    fn reuse(&mut self, spare: Spare) {
        if self.req.buf.capacity() == 0
            && self.req.records.capacity() == 0
            && spare.buf.capacity() <= SPARE_BUF_MAX
        {
            self.req.records = spare.records;
            self.req.buf = spare.buf;
        }
    }

    /// Sends the request being built and waits for every request sent to be committed,
    /// writing their acks, so the session state handed on is exact. Stops early if the log
    /// fails.
    pub(super) async fn drain(
        &mut self,
        client: &Client,
        session: &mut SessionData,
        wbuf: &mut BytesMut,
    ) {
        let _ = self.send_request(client, session, wbuf).await;
        while !self.pending.is_empty() {
            match self.committed().await {
                Some(done) => {
                    if self.on_committed(client, session, wbuf, done).is_err() {
                        break;
                    }
                }
                None => break,
            }
        }
    }

    fn apply_deferred(
        &mut self,
        client: &Client,
        session: &mut SessionData,
        wbuf: &mut BytesMut,
        d: Deferred,
    ) {
        match d {
            Deferred::Ack(ack) => self.apply_ack(client.version, session, wbuf, ack),
            Deferred::Packet(bytes) => wbuf.extend_from_slice(&bytes),
            Deferred::Deliver(list) => {
                for d in list {
                    client.sub.push(d, &client.broker.hub.limits);
                }
            }
        }
    }

    fn apply_ack(
        &mut self,
        version: Version,
        session: &mut SessionData,
        wbuf: &mut BytesMut,
        ack: PendingAck,
    ) {
        codec::write_ack(version, ack.kind, ack.pkid, ack.code, wbuf);
        self.acks_unreported += 1;
        if ack.logged {
            self.awaiting_commit -= 1;
        }
        match ack.kind {
            AckKind::PubAck => self.inflight = self.inflight.saturating_sub(1),
            AckKind::PubRec if ack.code == reason::SUCCESS => {
                if self.qos2_pending.remove(&ack.pkid) {
                    session.qos2.insert(ack.pkid);
                }
            }
            AckKind::PubRec => self.inflight = self.inflight.saturating_sub(1),
            AckKind::PubComp => {
                if session.qos2.remove(&ack.pkid) || self.qos2_pending.remove(&ack.pkid) {
                    self.inflight = self.inflight.saturating_sub(1);
                }
            }
            AckKind::PubRel => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::appender::PendingRecord;

    fn spare(bytes: usize) -> Spare {
        Spare {
            records: Vec::with_capacity(8),
            buf: Vec::with_capacity(bytes),
        }
    }

    fn one_more_pending(batch: &mut InboundBatch) {
        batch.pending.push_back(PendingReq {
            ticket: batch.pending.len() as u64,
            deferred: Vec::new(),
            fanout: Fanouts::default(),
            retained: Vec::new(),
        });
    }

    #[test]
    fn committed_buffers_are_built_in_again_and_given_back_when_idle() {
        let mut batch = InboundBatch::new(0);
        // One request at a time (a client waiting for its acknowledgements): the next one is
        // built in its buffers.
        batch.reuse(spare(1000));
        assert!(batch.req.buf.capacity() >= 1000 && batch.req.records.capacity() >= 8);
        // Idle with nothing being built: given back.
        batch.release_when_idle();
        assert_eq!(batch.req.buf.capacity(), 0);
        assert_eq!(batch.req.records.capacity(), 0);
        // Another request on its way: built in as well.
        one_more_pending(&mut batch);
        batch.reuse(spare(1000));
        assert!(batch.req.buf.capacity() >= 1000 && batch.req.records.capacity() >= 8);
        // A request being built keeps its own buffers and what it holds.
        batch.req.buf.extend_from_slice(b"record");
        batch.req.records.push(PendingRecord {
            topic: 0,
            partition: 0,
            start: 0,
            len: 6,
            timestamp_ms: 1,
        });
        let building = batch.req.buf.as_ptr();
        batch.reuse(spare(4000));
        assert_eq!(batch.req.buf.as_ptr(), building);
        assert_eq!(&batch.req.buf[..], b"record");
        assert_eq!(batch.req.records.len(), 1);
        // Idle with a request being built: it stays.
        batch.pending.clear();
        batch.release_when_idle();
        assert_eq!(&batch.req.buf[..], b"record");
        // Once sent (taken), a buffer past the bound is not kept.
        batch.req = AppendRequest::default();
        batch.reuse(spare(SPARE_BUF_MAX + 1));
        assert_eq!(batch.req.buf.capacity(), 0);
        assert_eq!(batch.req.records.capacity(), 0);
    }
}
