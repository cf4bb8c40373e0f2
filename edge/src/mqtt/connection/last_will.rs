//! This connection's last will: set by its CONNECT, discarded by a normal DISCONNECT, and
//! published (at once, or after its delay through the broker's [`PendingWills`]) when the
//! connection ends.
//!
//! [`PendingWills`]: crate::mqtt::will::PendingWills

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::staging::{stage_publish, Staged, Staging};
use super::types::{validate_topic, Client};
use crate::auth::ConnAcl;
use crate::log::appender::{now_ms, AppendRequest};
use crate::mqtt::codec::{reason, MessageProps, WillIn};
use crate::mqtt::delivery::{Fanouts, Message};
use crate::mqtt::limits::PacketRefused;
use crate::mqtt::will::{will_bytes, Admission};
use crate::mqtt::Broker;

/// The will of a connection, until it ends.
pub(super) struct LastWill {
    /// The will, until a normal DISCONNECT discards it.
    will: Option<Box<WillIn>>,
    /// Whether the will is published when the connection ends.
    publish: bool,
}

impl LastWill {
    /// The will a CONNECT carried, if any, due unless something cancels it.
    pub(super) fn new(will: Option<WillIn>) -> LastWill {
        LastWill {
            will: will.map(own_will),
            publish: true,
        }
    }

    /// The client sent DISCONNECT with `code`: a normal one discards the will; 0x04 asks
    /// for it.
    pub(super) fn on_disconnect(&mut self, code: u8) {
        self.publish = code == reason::DISCONNECT_WITH_WILL;
    }

    /// The connection ends for a reason that is not the client's failure: no will.
    pub(super) fn cancel(&mut self) {
        self.publish = false;
    }

    /// Takes the will to publish now that the connection ends: `None` when there is none,
    /// it was cancelled, or the ACL no longer allows its topic.
    pub(super) fn take_due(
        &mut self,
        client: &Client,
        acl: &mut Option<Box<ConnAcl>>,
    ) -> Option<Box<WillIn>> {
        let mut will = self.will.take().filter(|_| self.publish);
        if let (Some(acl), Some(w)) = (acl, &will) {
            // The will was allowed at CONNECT; an ACL reloaded since then decides now.
            let auth = &client.broker.auth;
            acl.refresh(auth, &client.client_id);
            if !acl
                .rules
                .may_publish(std::str::from_utf8(&w.topic).unwrap_or_default())
            {
                auth.stats.publishes_denied.fetch_add(1, Ordering::Relaxed);
                tracing::info!(client_id = %client.client_id, "the will is no longer allowed by the ACL; not published");
                will = None;
            }
        }
        will
    }
}

/// A will kept for the connection's life, in buffers of its own: the decoded one points into
/// the buffer the CONNECT was read into, which would stay allocated as long.
fn own_will(will: WillIn) -> Box<WillIn> {
    Box::new(WillIn {
        topic: Bytes::copy_from_slice(&will.topic),
        payload: Bytes::copy_from_slice(&will.payload),
        props: MessageProps {
            correlation_data: will
                .props
                .correlation_data
                .as_deref()
                .map(Bytes::copy_from_slice),
            ..will.props
        },
        ..will
    })
}

/// Publishes the will of connection `conn_id` now, or once its delay (capped by the session
/// expiry and `max_will_delay`) has passed with no new connection holding the session.
pub(super) async fn release(
    broker: &Arc<Broker>,
    client_id: &Arc<str>,
    conn_id: u64,
    session_expiry: u32,
    will: Box<WillIn>,
) {
    let cfg = &broker.config;
    let delay = u64::from(will.delay.min(session_expiry)).min(cfg.max_will_delay.0.as_secs());
    let broker = broker.clone();
    let client_id = client_id.clone();
    let admission = (delay > 0).then(|| {
        broker.wills.admit(
            &client_id,
            conn_id,
            will_bytes(&will),
            cfg.max_pending_wills,
            cfg.max_pending_will_bytes.0,
        )
    });
    match admission {
        None | Some(Admission::PublishNow) => {
            publish_will(&broker, &client_id, *will).await;
        }
        Some(Admission::Wait(cancelled)) => {
            tokio::spawn(async move {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(delay)) => {
                        if broker.sessions.will_due(&client_id, conn_id) {
                            publish_will(&broker, &client_id, *will).await;
                        }
                    }
                    () = cancelled.notified() => {}
                }
                broker.wills.release(&client_id, conn_id);
            });
        }
    }
}

/// Publishes a will: logged, retained if asked, delivered, like a client's publish.
async fn publish_will(broker: &Arc<Broker>, client_id: &Arc<str>, mut will: WillIn) {
    let topic_bytes = will.topic.clone();
    let Ok(topic_text) = std::str::from_utf8(&topic_bytes) else {
        return;
    };
    if validate_topic(&will.topic, &broker.config).is_err() {
        tracing::info!(client_id = %client_id, topic = %topic_text, "will topic is not valid; not published");
        return;
    }
    if broker.log.rejects_publishes() {
        tracing::warn!(client_id = %client_id, "disk budget reached: will not published");
        return;
    }
    if will.retain && !will.payload.is_empty() {
        let cfg = &broker.config;
        let size = Message::size_of(will.topic.len(), will.payload.len(), &will.props);
        if !broker.hub.retained_room(
            &will.topic,
            size,
            cfg.max_retained_messages,
            cfg.max_retained_bytes.0,
        ) {
            broker.limits.packet_refused(PacketRefused::RetainedQuota);
            tracing::warn!(client_id = %client_id, topic = %topic_text, "the retained store is full: the will is published but not retained");
            will.retain = false;
        }
    }
    let d = broker.router.route(topic_text, client_id);
    let mut req = AppendRequest::default();
    let mut retained = Vec::new();
    let mut fanout = Fanouts::default();
    let staged = stage_publish(
        &broker.hub,
        Staging {
            req: &mut req,
            retained: &mut retained,
            fanouts: &mut fanout,
        },
        &mut Vec::new(),
        &mut Vec::new(),
        (d.topic, d.partition, &d.key),
        Staged {
            topic: will.topic.clone(),
            qos: will.qos as u8,
            retain: will.retain,
            publisher: client_id,
            props: will.props,
            payload: will.payload,
            now: now_ms(),
        },
    );
    if let Err(e) = staged {
        broker.limits.packet_refused(PacketRefused::Encoding);
        tracing::warn!(client_id = %client_id, error = %e, "will not published");
        return;
    }
    let Ok(done) = broker.appender.commit(req).await else {
        return;
    };
    broker
        .hub
        .stats
        .messages_received
        .fetch_add(1, Ordering::Relaxed);
    for (topic, msg) in retained {
        broker.hub.set_retained(topic, msg);
    }
    if !fanout.is_empty() {
        broker.hub.deliver(fanout, &mut done.seqs.into_iter());
    }
    tracing::debug!(client_id = %client_id, topic = %topic_text, "will published");
}
