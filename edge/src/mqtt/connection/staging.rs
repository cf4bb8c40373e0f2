//! Building append requests: a publish staged into the request being built (its record, its
//! change to the retained store, the queue entries of persistent subscribers).

use std::sync::Arc;

use bytes::Bytes;

use crate::log::appender::{AppendRequest, PendingRecord};
use crate::log::record::{NewRecord, RecordTooLarge};
use crate::mqtt::codec::MessageProps;
use crate::mqtt::delivery::{
    clear_retained_op, retain_op, Fanouts, Hub, Message, PlanCache, SubRef, Target,
};
use crate::mqtt::subs::Match;
use crate::route::TopicId;

/// Where [`stage_publish`] adds a publish: the request being built and what to do once it
/// is committed.
pub(super) struct Staging<'a> {
    pub(super) req: &'a mut AppendRequest,
    pub(super) retained: &'a mut Vec<(Bytes, Option<Arc<Message>>)>,
    pub(super) fanouts: &'a mut Fanouts,
    /// The connection's remembered plans, if it keeps them (made on first use).
    pub(super) plans: Option<&'a mut Option<Box<PlanCache>>>,
}

/// A publish about to be staged.
pub(super) struct Staged<'a> {
    pub(super) topic: Bytes,
    pub(super) qos: u8,
    pub(super) retain: bool,
    pub(super) publisher: &'a Arc<str>,
    pub(super) props: MessageProps,
    pub(super) payload: Bytes,
    pub(super) now: u64,
}

/// Adds a publish to an append request: its record, its change to the retained store and
/// the durable queue entries of persistent subscribers. Returns what to deliver once the
/// request is committed. A publish whose fields do not fit the record encoding (the limits
/// checked on entry keep them far below) adds nothing and returns the error.
pub(super) fn stage_publish(
    hub: &Hub,
    into: Staging<'_>,
    scratch: &mut Vec<Match<SubRef>>,
    targets: &mut Vec<Target>,
    route: (TopicId, u32, &[u8]),
    p: Staged<'_>,
) -> Result<(), RecordTooLarge> {
    let Staging {
        req,
        retained,
        fanouts,
        plans,
    } = into;
    let start = req.buf.len();
    NewRecord {
        timestamp_ms: p.now,
        key: route.2,
        mqtt_topic: &p.topic,
        qos: p.qos,
        retain: p.retain,
        client_id: p.publisher,
        content_type: p.props.content_type.as_deref(),
        payload_format: p.props.payload_format,
        message_expiry: p.props.message_expiry,
        response_topic: p.props.response_topic.as_deref(),
        correlation_data: p.props.correlation_data.as_deref(),
        user_properties: &p.props.user_properties,
        payload: &p.payload,
    }
    .encode_into(&mut req.buf)?;
    // Encoded like the record (with an empty key), so it fits when the record does; it is
    // encoded before anything is added so that a failure leaves the request as it was.
    let retained_value = if p.retain && !p.payload.is_empty() {
        match Message::encode_parts(
            &p.topic,
            &p.payload,
            p.qos,
            p.retain,
            p.publisher,
            &p.props,
            p.now,
        ) {
            Ok(v) => Some(v),
            Err(e) => {
                req.buf.truncate(start);
                return Err(e);
            }
        }
    } else {
        None
    };
    let record = req.records.len() as u32;
    req.records.push(PendingRecord {
        topic: route.0,
        partition: route.1,
        start: start as u32,
        len: (req.buf.len() - start) as u32,
        timestamp_ms: p.now,
    });
    if !p.retain && hub.subscription_count() == 0 {
        return Ok(());
    }
    // A retained publish changes the retained store as well: it is planned every time.
    if let Some(plans) = plans.filter(|_| !p.retain) {
        let plans = plans.get_or_insert_with(Box::default);
        if let Some(plan) = plans.get(&p.topic, p.qos) {
            if !plan.is_empty() {
                fanouts.push_planned(message(p), plan);
            }
            return Ok(());
        }
        let topic_text = std::str::from_utf8(&p.topic).unwrap_or_default();
        hub.plan(topic_text, p.qos, false, p.publisher, scratch, targets);
        if let Some(plan) = plans.keep(&p.topic, p.qos, targets) {
            if !plan.is_empty() {
                fanouts.push_planned(message(p), &plan);
            }
            return Ok(());
        }
    } else {
        let topic_text = std::str::from_utf8(&p.topic).unwrap_or_default();
        hub.plan(topic_text, p.qos, p.retain, p.publisher, scratch, targets);
    }
    if targets.is_empty() && !p.retain {
        return Ok(());
    }
    let retain = p.retain;
    let msg = message(p);
    if retain {
        if msg.payload.is_empty() {
            req.state.push(clear_retained_op(&msg.topic));
            retained.push((msg.topic.clone(), None));
        } else if let Some(value) = retained_value {
            req.state.push(retain_op(&msg.topic, value));
            let kept = msg.detached();
            retained.push((kept.topic.clone(), Some(Arc::new(kept))));
        }
    }
    if targets.is_empty() {
        return Ok(());
    }
    Hub::enqueue_ops(targets, record, &mut req.state);
    fanouts.push(msg, targets);
    Ok(())
}

/// The message subscribers get of a staged publish.
fn message(p: Staged<'_>) -> Arc<Message> {
    Arc::new(Message {
        topic: p.topic,
        payload: p.payload,
        qos: p.qos,
        retain: p.retain,
        publisher: p.publisher.clone(),
        props: p.props.into(),
        received_ms: p.now,
    })
}
