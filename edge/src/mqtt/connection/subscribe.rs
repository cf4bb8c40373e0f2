//! SUBSCRIBE and UNSUBSCRIBE: each filter checked (limits, ACL, consumer groups), the
//! subscriptions changed in the hub at once and recorded durably for a persistent session,
//! and the SUBACK or UNSUBACK written once that record is committed.
//!
//! State changes go into the request the connection is building, passed in as `state`.

use std::sync::atomic::Ordering;

use bytes::BytesMut;

use super::types::{Client, Close};
use crate::auth::ConnAcl;
use crate::log::appender::StateOp;
use crate::mqtt::codec::{self, reason, SubscribeIn, Version};
use crate::mqtt::delivery::{subscribe_op, unsubscribe_op, Delivery};
use crate::mqtt::limits::PacketRefused;
use crate::mqtt::subs::{self, SubOptions};
use crate::route::TopicFilter;

/// What a SUBSCRIBE is answered with once its state is committed.
pub(super) struct Subscribed {
    /// The encoded SUBACK.
    pub(super) suback: BytesMut,
    /// Retained messages the new subscriptions ask for, delivered after the SUBACK.
    pub(super) retained: Vec<Delivery>,
}

/// SUBSCRIBE: checks each filter, records the subscriptions (durably for a persistent
/// session, `durable`) and finds the retained messages they ask for.
pub(super) fn on_subscribe(
    client: &Client,
    acl: &mut Option<Box<ConnAcl>>,
    durable: bool,
    s: SubscribeIn,
    now: u64,
    state: &mut Vec<StateOp>,
) -> Result<Subscribed, Close> {
    let broker = &client.broker;
    let cfg = &broker.config;
    let hub = &broker.hub;
    let mut codes = Vec::with_capacity(s.filters.len());
    let mut retained = Vec::new();
    let mut problem = None;
    for (filter, o) in s.filters {
        if o.qos > 2 || o.retain_handling > 2 {
            return Err(Close::new(
                reason::MALFORMED,
                "subscription options out of range",
            ));
        }
        if filter.len() > cfg.max_filter_length {
            broker.limits.packet_refused(PacketRefused::FilterLength);
            codes.push(reason::TOPIC_FILTER_INVALID);
            problem = Some(format!(
                "a topic filter of {} bytes, the limit (mqtt.max_filter_length) is {}",
                filter.len(),
                cfg.max_filter_length
            ));
            continue;
        }
        if let Err(why) = subs::validate_filter(&filter, cfg.max_topic_levels) {
            codes.push(reason::TOPIC_FILTER_INVALID);
            problem = Some(format!("{filter:?}: {why}"));
            continue;
        }
        if let Some(acl) = acl.as_mut() {
            acl.refresh(&broker.auth, &client.client_id);
            if !acl.rules.may_subscribe(&filter) {
                broker
                    .auth
                    .stats
                    .subscriptions_denied
                    .fetch_add(1, Ordering::Relaxed);
                codes.push(reason::NOT_AUTHORIZED);
                problem = Some(format!("{filter:?}: not authorized"));
                continue;
            }
        }
        if let Some(why) = group_refusal(client, acl, &filter) {
            codes.push(reason::NOT_AUTHORIZED);
            problem = Some(why);
            continue;
        }
        let shared = filter.starts_with("$share/");
        if shared && o.no_local && client.version == Version::V5 {
            return Err(Close::new(
                reason::PROTOCOL_ERROR,
                "No Local on a shared subscription",
            ));
        }
        let opts = SubOptions {
            qos: o.qos,
            no_local: o.no_local,
            retain_as_published: o.retain_as_published,
            retain_handling: o.retain_handling,
            id: s.id,
        };
        let max = cfg.max_subscriptions_per_client;
        let Some(existed) = hub.subscribe_within(&client.sub, &filter, opts, max) else {
            broker
                .limits
                .subscriptions_refused
                .fetch_add(1, Ordering::Relaxed);
            codes.push(reason::QUOTA_EXCEEDED);
            problem = Some(format!(
                "{filter:?}: this session holds mqtt.max_subscriptions_per_client = {max} subscriptions"
            ));
            continue;
        };
        if durable {
            state.push(subscribe_op(&client.client_id, &filter, &opts));
        }
        codes.push(o.qos);
        let send_retained = !shared
            && match o.retain_handling {
                0 => true,
                1 => !existed,
                _ => false,
            };
        if send_retained {
            if let Ok(f) = TopicFilter::parse(&filter) {
                for m in hub.retained_matching(&f, now) {
                    retained.push(Delivery {
                        qos: m.qos.min(o.qos),
                        msg: m,
                        retain: true,
                        sub_ids: s.id.into_iter().collect(),
                        seq: None,
                        dup: false,
                        group: None,
                    });
                }
            }
        }
    }
    let mut suback = BytesMut::new();
    let reason_string = problem.filter(|_| client.problem_info);
    codec::write_suback(
        client.version,
        s.pkid,
        &codes,
        reason_string.as_deref(),
        client.max_packet as usize,
        &mut suback,
    );
    Ok(Subscribed { suback, retained })
}

/// Why a `$share/{group}/{filter}` subscription may not join durable group `group`, if
/// it may not: a filter other than the group's, or (with an ACL) no `group read` grant
/// for it. Read rights on the filter are the ordinary subscribe check.
fn group_refusal(client: &Client, acl: &mut Option<Box<ConnAcl>>, filter: &str) -> Option<String> {
    let (group, inner) = filter.strip_prefix("$share/")?.split_once('/')?;
    let broker = &client.broker;
    let expected = broker.hub.durable_group_filter(group)?;
    if inner != &*expected {
        return Some(format!(
            "the consumer group {group:?} reads {expected:?}: subscribe to $share/{group}/{expected}"
        ));
    }
    if let Some(acl) = acl.as_mut() {
        acl.refresh(&broker.auth, &client.client_id);
        if !acl.rules.may_join_group(group) {
            broker
                .auth
                .stats
                .subscriptions_denied
                .fetch_add(1, Ordering::Relaxed);
            return Some(format!(
                "not authorized to join the consumer group {group:?} (the ACL needs `group read {group}`)"
            ));
        }
    }
    None
}

/// UNSUBSCRIBE: removes each filter's subscription (and its durable record); returns the
/// encoded UNSUBACK.
pub(super) fn on_unsubscribe(
    client: &Client,
    durable: bool,
    pkid: u16,
    filters: Vec<String>,
    state: &mut Vec<StateOp>,
) -> BytesMut {
    let mut codes = Vec::with_capacity(filters.len());
    for filter in filters {
        let existed = client.broker.hub.unsubscribe(&client.sub, &filter);
        if existed && durable {
            state.push(unsubscribe_op(&client.client_id, &filter));
        }
        codes.push(if existed {
            reason::SUCCESS
        } else {
            reason::NO_SUBSCRIPTION_EXISTED
        });
    }
    let mut out = BytesMut::new();
    codec::write_unsuback(client.version, pkid, &codes, &mut out);
    out
}
