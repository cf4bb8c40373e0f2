//! This connection's last will: set (and stored) by its CONNECT, discarded by a normal
//! DISCONNECT, and published (at once, or after its delay through the broker's
//! [`PendingWills`]) when the connection ends; and the wills found stored at start.
//! How a will is stored, and when its entry goes, is described in [`crate::mqtt::will`].
//!
//! [`PendingWills`]: crate::mqtt::will::PendingWills

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use super::staging::{stage_publish, Staged, Staging};
use super::types::{validate_topic, Client};
use crate::auth::ConnAcl;
use crate::log::appender::{now_ms, AppendRequest, StateOp};
use crate::log::meta::StoredWill;
use crate::mqtt::codec::{reason, MessageProps, WillIn};
use crate::mqtt::delivery::{Fanouts, Message};
use crate::mqtt::limits::PacketRefused;
use crate::mqtt::will::{self, will_bytes, Admission, Restored};
use crate::mqtt::Broker;

/// The will of a connection, until it ends.
pub(super) struct LastWill {
    /// The will, until a normal DISCONNECT discards it.
    will: Option<Box<WillIn>>,
    /// Whether the will is published when the connection ends.
    publish: bool,
    /// The id of its stored entry, until the entry is deleted or handed on with the will.
    stored: Option<u64>,
    /// The user the client logged in as (stored with a waiting will).
    user: Option<Arc<str>>,
    /// The edge is shutting down: a will with a delay stays stored, for the next start.
    shutting_down: bool,
}

/// What becomes of the will as its connection ends (its entry's change is already among
/// the state changes the connection commits as it ends).
pub(super) enum Settled {
    /// Nothing more: there was none, it is not due, or it stays stored for the next start.
    Done,
    /// Publish it now, deleting its stored entry in the same commit.
    PublishNow(Box<WillIn>, Option<u64>),
    /// Wait out its delay, then publish it unless its session was taken up.
    Wait(Waiting),
}

/// A will waiting out its delay.
pub(crate) struct Waiting {
    will: Box<WillIn>,
    stored: Option<u64>,
    delay: Duration,
    cancelled: Arc<Notify>,
}

impl LastWill {
    /// The will a CONNECT carried, if any, stored as `stored` (by the user the client logged
    /// in as), due unless something cancels it.
    pub(super) fn new(
        will: Option<WillIn>,
        stored: Option<u64>,
        user: Option<Arc<str>>,
    ) -> LastWill {
        LastWill {
            will: will.map(own_will),
            publish: true,
            stored,
            user,
            shutting_down: false,
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

    /// The edge closes the connection because it is shutting down: the will is due (the
    /// client did not disconnect), but one with a delay waits it out across the restart.
    pub(super) fn on_shutdown(&mut self) {
        self.shutting_down = true;
    }

    /// The deletion of the stored entry of a will that will not be published (a normal
    /// DISCONNECT): committed before the edge closes the socket, so a client that saw the
    /// close knows no restart brings its will back.
    pub(super) fn discarded_entry(&mut self, client_id: &str) -> Option<StateOp> {
        if self.publish && self.will.is_some() {
            return None;
        }
        self.stored.take().map(|id| will::delete_op(client_id, id))
    }

    /// Decides what becomes of the will now that the connection ends (its session expiry is
    /// `expiry`; `taken_over`: a new connection took its client id); the change to its
    /// stored entry goes to `ops`. A will that waits takes its place in the node's pending
    /// wills now, before the session is handed on, so that a new connection cancels it.
    pub(super) fn settle(
        &mut self,
        client: &Client,
        acl: &mut Option<Box<ConnAcl>>,
        conn_id: u64,
        expiry: u32,
        taken_over: bool,
        ops: &mut Vec<StateOp>,
    ) -> Settled {
        let client_id = &client.client_id;
        let stored = self.stored.take();
        let Some(will) = self.take_due(client, acl) else {
            ops.extend(stored.map(|id| will::delete_op(client_id, id)));
            return Settled::Done;
        };
        let broker = &client.broker;
        let cfg = &broker.config;
        let delay = will::effective_delay(will.delay, expiry, cfg.max_will_delay.0);
        if delay == 0 {
            return Settled::PublishNow(will, stored);
        }
        if taken_over {
            // The new connection holds the session: a delayed will is not due.
            ops.extend(stored.map(|id| will::delete_op(client_id, id)));
            return Settled::Done;
        }
        let cancelled = if self.shutting_down {
            None
        } else {
            match broker.wills.admit(
                client_id,
                conn_id,
                stored,
                will_bytes(&will),
                cfg.max_pending_wills,
                cfg.max_pending_will_bytes.0,
            ) {
                Admission::PublishNow => return Settled::PublishNow(will, stored),
                Admission::Wait(cancelled) => Some(cancelled),
            }
        };
        if let Some(id) = stored {
            ops.extend(waiting_entry(
                client_id,
                id,
                &will,
                delay,
                self.user.as_deref(),
            ));
        }
        match cancelled {
            // Shutting down: it waits, stored, for the next start.
            None => Settled::Done,
            Some(cancelled) => Settled::Wait(Waiting {
                will,
                stored,
                delay: Duration::from_secs(u64::from(delay)),
                cancelled,
            }),
        }
    }

    /// Takes the will to publish now that the connection ends: `None` when there is none,
    /// it was cancelled, or the ACL no longer allows its topic.
    fn take_due(&mut self, client: &Client, acl: &mut Option<Box<ConnAcl>>) -> Option<Box<WillIn>> {
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

/// The stored entry of a will that waits out `delay` seconds from now; `None` (the entry
/// stays as it was: due from the edge's stop) if it cannot be encoded, which its CONNECT
/// already ruled out.
fn waiting_entry(
    client_id: &str,
    will_id: u64,
    will: &WillIn,
    delay: u32,
    user: Option<&str>,
) -> Option<StateOp> {
    let now = now_ms();
    let batch = will::encode_batch(client_id, will, now).ok()?;
    will::put_op(
        client_id,
        will_id,
        &StoredWill {
            disconnected_at_ms: now,
            delay_secs: delay,
            user,
            batch: &batch,
        },
    )
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

/// Waits out a will's delay, then publishes it if no new connection holds its session by
/// then; deletes its stored entry if it is not published.
pub(super) fn wait_then_publish(
    broker: &Arc<Broker>,
    client_id: &Arc<str>,
    conn_id: u64,
    w: Waiting,
) {
    let broker = broker.clone();
    let client_id = client_id.clone();
    tokio::spawn(async move {
        let Waiting {
            will,
            stored,
            delay,
            cancelled,
        } = w;
        let due = tokio::select! {
            () = tokio::time::sleep(delay) => broker.sessions.will_due(&client_id, conn_id),
            () = cancelled.notified() => false,
        };
        if due {
            publish_will(&broker, &client_id, *will, stored).await;
        } else if let Some(id) = stored {
            // The new connection deleted it in its CONNACK commit; this one comes after a
            // rewrite that may have been queued behind that commit.
            let _ = broker
                .appender
                .commit_state(vec![will::delete_op(&client_id, id)])
                .await;
        }
        broker.wills.release(&client_id, conn_id);
    });
}

/// Restores the wills found stored at start: those whose delay is over are published before
/// this returns (before the edge accepts connections); the others wait, as connection 0 of
/// their client id, until they are due or a client takes their session up.
pub(crate) async fn restore(broker: &Arc<Broker>, wills: Vec<Restored>) {
    if wills.is_empty() {
        return;
    }
    let cfg = &broker.config;
    let now = now_ms();
    let (total, mut waiting) = (wills.len(), 0usize);
    let mut refused = Vec::new();
    let mut due_now = tokio::task::JoinSet::new();
    for r in wills {
        let topic = std::str::from_utf8(&r.will.topic).unwrap_or_default();
        let allowed = broker
            .auth
            .client_rules(r.user.as_deref(), &r.client_id)
            .is_none_or(|acl| acl.rules.may_publish(topic));
        if !allowed {
            broker
                .auth
                .stats
                .publishes_denied
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(client_id = %r.client_id, topic, "a stored will is no longer allowed by the ACL; not published");
            refused.push(will::delete_op(&r.client_id, r.will_id));
            continue;
        }
        let left = r.due_at_ms.saturating_sub(now);
        let admission = (left > 0).then(|| {
            broker.wills.admit(
                &r.client_id,
                0,
                Some(r.will_id),
                will_bytes(&r.will),
                cfg.max_pending_wills,
                cfg.max_pending_will_bytes.0,
            )
        });
        match admission {
            Some(Admission::Wait(cancelled)) => {
                waiting += 1;
                let w = Waiting {
                    will: Box::new(r.will),
                    stored: Some(r.will_id),
                    delay: Duration::from_millis(left),
                    cancelled,
                };
                wait_then_publish(broker, &r.client_id, 0, w);
            }
            None | Some(Admission::PublishNow) => {
                let broker = broker.clone();
                due_now.spawn(async move {
                    publish_will(&broker, &r.client_id, r.will, Some(r.will_id)).await;
                });
            }
        }
    }
    if !refused.is_empty() {
        let _ = broker.appender.commit_state(refused).await;
    }
    let published = due_now.len();
    while due_now.join_next().await.is_some() {}
    tracing::info!(
        stored = total,
        published,
        waiting,
        "wills of connections that ended without DISCONNECT (or were open when the edge stopped) restored"
    );
}

/// Publishes a will: logged, retained if asked, delivered, like a client's publish. Its
/// stored entry (`stored`) is deleted in the commit that logs it, so it is published once; a
/// will that cannot be published has its entry deleted alone.
pub(super) async fn publish_will(
    broker: &Arc<Broker>,
    client_id: &Arc<str>,
    will: WillIn,
    stored: Option<u64>,
) {
    let delete = stored.map(|id| will::delete_op(client_id, id));
    if let Some(delete) = log_will(broker, client_id, will, delete).await {
        let _ = broker.appender.commit_state(vec![delete]).await;
    }
}

/// [`publish_will`]; gives the deletion back when the will was not logged.
async fn log_will(
    broker: &Arc<Broker>,
    client_id: &Arc<str>,
    mut will: WillIn,
    delete: Option<StateOp>,
) -> Option<StateOp> {
    let topic_bytes = will.topic.clone();
    let Ok(topic_text) = std::str::from_utf8(&topic_bytes) else {
        return delete;
    };
    if validate_topic(&will.topic, &broker.config).is_err() {
        tracing::info!(client_id = %client_id, topic = %topic_text, "will topic is not valid; not published");
        return delete;
    }
    if broker.log.rejects_publishes() {
        tracing::warn!(client_id = %client_id, "disk budget reached: will not published");
        return delete;
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
            plans: None,
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
        return delete;
    }
    req.state.extend(delete);
    let Ok(done) = broker.appender.commit(req).await else {
        // Nothing of it is durable: it stays stored, due at the next start.
        return None;
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
    None
}
