//! One client connection: CONNECT, then the inbound publish path, until the connection ends.
//!
//! Every packet read in one socket read is decoded, routed and encoded into one
//! [`AppendRequest`] sent to the appender; the acknowledgements of that request are written
//! when the appender reports its group commit durable. Requests complete in the order they
//! are sent, so PUBACKs and PUBRECs leave in the order their PUBLISHes arrived.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::codec::{
    self, reason, AckKind, ConnAckInfo, ConnectIn, Inbound, MessageProps, OutPublish, PublishIn,
    QoS, SubscribeIn, Version, WillIn,
};
use super::delivery::{
    client_prefix, parse_queue_value, queue_key, retained_key, split_client_key,
    subscription_value, Delivery, Fanouts, GroupAck, Hub, Message, Subscriber, Target, TAG_QUEUED,
    TAG_RELEASED, TAG_SUBSCRIPTION,
};
use super::limits::{
    check_message_props, Limits, PacketRefused, PublishRate, RateVerdict, Refused,
    CONNECT_BUFFER_BUDGET,
};
use super::session::{purge_ops, qos2_key, session_key, session_value, Handover, SessionData};
use super::subs::{self, Match, SubOptions};
use super::will::Admission;
use super::Broker;
use crate::auth::{ConnAcl, LoginRefusal};
use crate::log::appender::{
    now_ms, AppendRequest, CommitError, Committed, PendingRecord, ReplyTo, StateOp, TryAppendError,
};
use crate::log::record::{NewRecord, RecordTooLarge};
use crate::route::{TopicFilter, TopicId};

/// A request is sent to the appender once it holds this many bytes, even mid-read.
const MAX_REQUEST_BYTES: usize = 256 * 1024;
/// Routes remembered per connection (devices publish to few topics).
const ROUTE_CACHE_ENTRIES: usize = 64;
/// Read buffer sizing: a connection starts with a small buffer and doubles what it reads at
/// once while reads fill it, so an idle device costs little memory and a busy publisher
/// still reads in large chunks.
const READ_CHUNK_MIN: usize = 1024;
const READ_CHUNK_MAX: usize = 64 * 1024;
/// A read this long after the previous one finds a mostly idle connection (a device that
/// pings or reports now and then): it gives its buffers back once that read is handled. A
/// connection that keeps sending keeps them.
const IDLE_AFTER: Duration = Duration::from_secs(1);
/// Write buffers larger than this are released after they are flushed.
const WRITE_BUFFER_KEEP: usize = 64 * 1024;
/// Deliveries are taken from the outbox while less than this is waiting to be written.
const WRITE_BUFFER_HIGH: usize = 64 * 1024;
/// Deliveries taken from the outbox under one lock.
const POP_BATCH: usize = 64;
/// Queue entries of a persistent session read back from disk at once.
const REPLAY_PAGE: usize = 256;
/// Time a closing connection gets to write its last packets to a peer that does not read.
const FINAL_FLUSH: Duration = Duration::from_secs(2);

/// Why the connection is being closed by the edge.
#[derive(Debug)]
struct Close {
    /// 5.0 reason code for DISCONNECT (3.1.1 connections are just closed).
    code: u8,
    why: String,
    /// The limit a packet broke, counted when the connection closes.
    refused: Option<PacketRefused>,
}

impl Close {
    fn new(code: u8, why: impl Into<String>) -> Close {
        Close {
            code,
            why: why.into(),
            refused: None,
        }
    }

    /// A close for a packet over one of `[mqtt]`'s limits.
    fn refused(kind: PacketRefused, code: u8, why: impl Into<String>) -> Close {
        Close {
            code,
            why: why.into(),
            refused: Some(kind),
        }
    }
}

/// Where decoding the buffered bytes stopped.
enum Decoded {
    /// No whole packet is left.
    Drained,
    /// The request being built is large enough to send before decoding on.
    RequestFull,
    /// The client sent DISCONNECT.
    Disconnected,
}

/// Something written once the request it belongs to is committed.
#[derive(Debug)]
enum Deferred {
    /// An acknowledgement.
    Ack(PendingAck),
    /// A pre-encoded packet (SUBACK, UNSUBACK).
    Packet(BytesMut),
    /// Retained messages for a new subscription, after its SUBACK.
    Deliver(Vec<Delivery>),
}

/// A request sent to the appender and what to do when it is committed.
struct PendingReq {
    ticket: u64,
    deferred: Vec<Deferred>,
    fanout: Fanouts,
    retained: Vec<(Bytes, Option<Arc<Message>>)>,
}

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

#[derive(Debug, Clone, Copy)]
struct PendingAck {
    kind: AckKind,
    pkid: u16,
    code: u8,
    /// Whether this acknowledges a publish appended to the log (counted in
    /// `awaiting_commit`).
    logged: bool,
}

/// Serves one connection to its end: the two halves of a TCP stream, or of a TLS stream
/// over one. `cert_user` is the client's identity from its certificate (mutual TLS).
pub async fn serve<R, W>(
    broker: Arc<Broker>,
    reader: R,
    writer: W,
    peer: SocketAddr,
    cert_user: Option<Arc<str>>,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    // Each phase is boxed, so that the task (allocated once for the connection's whole life)
    // holds only a pointer to the phase it is in: a socket waiting for its CONNECT costs a
    // few hundred bytes, and a connected one keeps no room for the CONNECT phase.
    let Some((reader, writer, rbuf, connect, connect_held)) =
        Box::pin(accept_connect(&broker, reader, writer, peer)).await
    else {
        return;
    };
    let Some(opened) = Box::pin(open_session(
        broker,
        reader,
        writer,
        rbuf,
        peer,
        (connect, connect_held),
        cert_user,
    ))
    .await
    else {
        return;
    };
    Box::pin(serve_session(opened)).await;
}

/// Reads the CONNECT within `connect_timeout`; refuses (and closes) a connection whose
/// CONNECT is missing, malformed or too large.
async fn accept_connect<R, W>(
    broker: &Broker,
    mut reader: R,
    mut writer: W,
    peer: SocketAddr,
) -> Option<(R, W, BytesMut, Box<ConnectIn>, usize)>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let mut rbuf = BytesMut::new();
    let max_packet = broker.config.max_packet_size.0 as usize;
    let connect = tokio::time::timeout(
        broker.config.connect_timeout.0,
        read_connect(&mut reader, &mut rbuf, max_packet, &broker.limits),
    )
    .await;
    let limits = &broker.limits;
    let connect = match connect {
        Err(_) => {
            limits.refused(Refused::ConnectTimeout);
            tracing::debug!(%peer, "no CONNECT in time; closing");
            return None;
        }
        Ok(Err(refusal)) => {
            if let Some(kind) = refusal.kind {
                limits.refused(kind);
            }
            if let Some((version, code)) = refusal.answer {
                let mut out = BytesMut::new();
                codec::write_connack(
                    version,
                    &ConnAckInfo {
                        reason: code,
                        ..Default::default()
                    },
                    &mut out,
                );
                let _ = tokio::time::timeout(FINAL_FLUSH, writer.write_all(&out)).await;
            }
            if refusal.kind.is_none() {
                tracing::debug!(%peer, reason = %refusal.why, "connection ended");
            } else if let Some(held_back) = limits.log_budget.admit() {
                tracing::info!(%peer, reason = %refusal.why, held_back, "connection refused");
            }
            let _ = tokio::time::timeout(FINAL_FLUSH, writer.shutdown()).await;
            return None;
        }
        Ok(Ok(c)) => c,
    };
    let (connect, held) = connect;
    Some((reader, writer, rbuf, connect, held))
}

/// A connection with its session open and its CONNACK written, ready to serve.
struct Opened<R, W> {
    conn: Connection<R, W>,
    /// This connection's id in the session store.
    conn_id: u64,
    handover: EndsHandover,
}

/// From a CONNECT to an open session (or a refusal): checks the client, authenticates it,
/// takes the client id over and continues or starts its session.
async fn open_session<R, W>(
    broker: Arc<Broker>,
    reader: R,
    mut writer: W,
    rbuf: BytesMut,
    peer: SocketAddr,
    (connect, connect_held): (Box<ConnectIn>, usize),
    cert_user: Option<Arc<str>>,
) -> Option<Box<Opened<R, W>>>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let limits = &broker.limits;
    // The CONNECT's bytes stay counted against the node's CONNECT budget until the login is
    // decided: a flood of large CONNECTs waiting for password checks is bounded too.
    let connect_share = limits.connect_buffer_held(CONNECT_BUFFER_BUDGET, connect_held);
    let version = connect.version;
    let refuse = |kind: Refused, code: u8, why: String| async move {
        limits.refused(kind);
        let mut out = BytesMut::new();
        codec::write_connack(
            version,
            &ConnAckInfo {
                reason: code,
                reason_string: Some(why.clone()),
                ..Default::default()
            },
            &mut out,
        );
        if let Some(held_back) = limits.log_budget.admit() {
            tracing::info!(%peer, reason = %why, held_back, "connection refused");
        }
        out
    };

    let active = broker.connections.load(Ordering::Relaxed);
    if active > broker.config.max_connections {
        let out = refuse(
            Refused::MaxConnections,
            reason::SERVER_BUSY,
            format!(
                "the edge holds its maximum of {} connections",
                broker.config.max_connections
            ),
        )
        .await;
        send_final(&mut writer, &out).await;
        return None;
    }

    // Client identifier rules.
    let mut assigned = None;
    let client_id = if connect.client_id.is_empty() {
        if version == Version::V311 && !connect.clean_start {
            let out = refuse(
                Refused::ClientId,
                reason::CLIENT_ID_NOT_VALID,
                "an empty client id needs clean session".into(),
            )
            .await;
            send_final(&mut writer, &out).await;
            return None;
        }
        let id = format!("auto-{:016x}", rand_id());
        assigned = (version == Version::V5).then(|| id.clone());
        id
    } else {
        connect.client_id.clone()
    };
    if client_id.len() > broker.config.max_client_id_length || client_id.contains('\0') {
        let out = refuse(
            Refused::ClientId,
            reason::CLIENT_ID_NOT_VALID,
            format!(
                "client id must be 1 to {} bytes without NUL",
                broker.config.max_client_id_length
            ),
        )
        .await;
        send_final(&mut writer, &out).await;
        return None;
    }
    // The will is stored with the session and published as a record: its fields get the
    // limits of a PUBLISH. 3.1.1 has no return code for this: the connection is closed.
    if let Some(will) = &connect.will {
        let checked = validate_topic(&will.topic, &broker.config)
            .map(|_| ())
            .map_err(|c| (c.code, c.why))
            .and_then(|()| {
                if will.topic.starts_with(b"$") {
                    Err((
                        reason::TOPIC_NAME_INVALID,
                        "topics starting with $ are reserved for the edge".to_string(),
                    ))
                } else {
                    Ok(())
                }
            })
            .and_then(|()| {
                check_message_props(&will.props, &broker.config)
                    .map_err(|(_, why)| (reason::PACKET_TOO_LARGE, why))
            });
        if let Err((code, why)) = checked {
            limits.packet_refused(PacketRefused::Will);
            let out = refuse(Refused::Malformed, code, format!("will: {why}")).await;
            if version == Version::V5 {
                send_final(&mut writer, &out).await;
            }
            return None;
        }
    }
    // Authentication, before the session is touched: a refused client takes nothing over.
    // Each address gets a fair share of the password-check queue, and no login waits in it
    // longer than a CONNECT may take to arrive.
    let auth = &broker.auth;
    let Some(login_slot) = auth.login_slot(peer.ip()) else {
        let out = refuse(
            Refused::LoginBusy,
            reason::SERVER_BUSY,
            format!(
                "{} logins from this address are in progress",
                crate::auth::MAX_LOGINS_PER_ADDRESS
            ),
        )
        .await;
        send_final(&mut writer, &out).await;
        return None;
    };
    let login = tokio::time::timeout(
        broker.config.connect_timeout.0,
        auth.authenticate(
            connect.username.as_deref(),
            connect.password.as_deref(),
            cert_user.as_deref().map(str::to_string),
        ),
    )
    .await;
    drop(login_slot);
    drop(connect_share);
    let Ok(login) = login else {
        let out = refuse(
            Refused::LoginBusy,
            reason::SERVER_BUSY,
            "the password check queue is full: try again".into(),
        )
        .await;
        send_final(&mut writer, &out).await;
        return None;
    };
    let (username, acl) = match login {
        Ok(user) => {
            let acl = auth.client_rules(user.as_deref(), &client_id);
            (user.map(Arc::<str>::from), acl)
        }
        Err(refusal) => {
            let (kind, code, why) = match refusal {
                LoginRefusal::BadCredentials => (
                    Refused::BadCredentials,
                    reason::BAD_USER_NAME_OR_PASSWORD,
                    match &connect.username {
                        Some(u) => format!("bad user name or password (user {u:?})"),
                        None => "a password without a user name".into(),
                    },
                ),
                LoginRefusal::NotAuthorized => (
                    Refused::NotAuthorized,
                    reason::NOT_AUTHORIZED,
                    "anonymous access is off: log in with a user name and password".into(),
                ),
            };
            let delay = auth.record_failure(peer.ip());
            tokio::time::sleep(delay).await;
            let out = refuse(kind, code, why).await;
            send_final(&mut writer, &out).await;
            return None;
        }
    };
    if !auth
        .client_id_policy
        .allows(username.as_deref(), &client_id)
    {
        let out = refuse(
            Refused::ClientId,
            reason::CLIENT_ID_NOT_VALID,
            format!(
                "user {:?} may not use client id {client_id:?} (auth.client_id = {:?})",
                username.as_deref().unwrap_or_default(),
                auth.client_id_policy
            ),
        )
        .await;
        send_final(&mut writer, &out).await;
        return None;
    }
    // A session a user started is theirs: no one else resumes or takes it over.
    if let Some(Some(owner)) = broker.sessions.owner_of(&client_id) {
        if username.as_deref() != Some(&*owner) {
            let out = refuse(
                Refused::NotAuthorized,
                reason::NOT_AUTHORIZED,
                format!("the session of client id {client_id:?} belongs to another user"),
            )
            .await;
            send_final(&mut writer, &out).await;
            return None;
        }
    }
    if let (Some(acl), Some(will)) = (&acl, &connect.will) {
        let topic = std::str::from_utf8(&will.topic).unwrap_or_default();
        if !acl.rules.may_publish(topic) {
            auth.stats.publishes_denied.fetch_add(1, Ordering::Relaxed);
            let out = refuse(
                Refused::NotAuthorized,
                reason::NOT_AUTHORIZED,
                format!("not authorized to publish the will topic {topic:?}"),
            )
            .await;
            send_final(&mut writer, &out).await;
            return None;
        }
    }
    if broker.log.poisoned().is_some() {
        let out = refuse(
            Refused::Unavailable,
            reason::SERVER_BUSY,
            "the log is failing".into(),
        )
        .await;
        send_final(&mut writer, &out).await;
        return None;
    }

    // A client id that holds no session starts one: within mqtt.max_sessions.
    let (sessions_held, holds_one) = broker.sessions.held(&client_id);
    if !holds_one && sessions_held >= broker.config.max_sessions {
        let out = refuse(
            Refused::MaxSessions,
            if version == Version::V5 {
                reason::QUOTA_EXCEEDED
            } else {
                reason::SERVER_BUSY
            },
            format!(
                "the edge holds its maximum of {} sessions (mqtt.max_sessions)",
                broker.config.max_sessions
            ),
        )
        .await;
        send_final(&mut writer, &out).await;
        return None;
    }

    // Session: take the client id over, then continue or start a session.
    let handover = EndsHandover(Arc::new(Handover::default()));
    let attachment = broker
        .sessions
        .attach(&client_id, username.clone(), handover.0.clone())
        .await;
    // A will waiting out its delay is not due once a new connection holds the session.
    broker.wills.cancel(&client_id);
    let mut ops = Vec::new();
    let hub = &broker.hub;
    let previous = attachment.previous.or(attachment.expired.clone());
    let (mut data, session_present) = match previous {
        Some(prev) if !connect.clean_start && attachment.expired.is_none() => (prev, true),
        prev => {
            if let Some(prev) = prev {
                if prev.durable {
                    ops.extend(purge_ops(&client_id));
                }
                if let Some(sub) = &prev.sub {
                    hub.remove_session(sub);
                }
            }
            let fresh = SessionData {
                owner: username.clone(),
                ..SessionData::default()
            };
            (fresh, false)
        }
    };
    let client_id: Arc<str> = Arc::from(client_id);
    let sub = data
        .sub
        .get_or_insert_with(|| Subscriber::new(client_id.clone(), false))
        .clone();
    data.expiry = match version {
        // 3.1.1 says only "persistent" (u32::MAX): the config says for how long.
        Version::V311 if connect.session_expiry > 0 => {
            broker.config.session_expiry_default.as_interval()
        }
        _ => connect.session_expiry,
    };
    if data.expiry > 0 {
        if !data.durable {
            // State so far was kept in memory only; make it durable with the session.
            for &pkid in &data.qos2 {
                ops.push(StateOp::Put {
                    key: qos2_key(&client_id, pkid),
                    value: crate::log::meta::marker_value(),
                });
            }
            for (filter, opts) in hub.subscriptions_of(&sub) {
                let mut key = client_prefix(TAG_SUBSCRIPTION, &client_id);
                key.extend_from_slice(filter.as_bytes());
                ops.push(StateOp::Put {
                    key,
                    value: subscription_value(&opts),
                });
            }
        }
        ops.push(StateOp::Put {
            key: session_key(&client_id),
            value: session_value(data.expiry, 0, data.owner.as_deref()),
        });
        data.durable = true;
    } else if data.durable {
        ops.extend(purge_ops(&client_id));
        data.durable = false;
    }
    sub.durable.store(data.durable, Ordering::Release);
    broker.sessions.set_subscriber(
        &client_id,
        attachment.conn,
        sub.clone(),
        data.expiry,
        data.owner.clone(),
    );
    let lost = sub.set_online(true);
    hub.stats.dropped.fetch_add(lost as u64, Ordering::Relaxed);
    let mut conn = Connection {
        broker: broker.clone(),
        version,
        client_id: client_id.clone(),
        peer,
        username,
        reader,
        writer,
        read_idle: rbuf.is_empty(),
        give_back: true,
        // An empty buffer is given back: the next read takes one.
        rbuf: if rbuf.is_empty() {
            BytesMut::new()
        } else {
            rbuf
        },
        read_chunk: READ_CHUNK_MIN,
        wbuf: BytesMut::new(),
        unflushed: false,
        keep_alive: None,
        deadline: Instant::now(),
        last_read: Instant::now(),
        inflight: data.qos2.len(),
        awaiting_commit: 0,
        session: data,
        qos2_pending: HashSet::new(),
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
        acl: acl.map(Box::new),
        taken_over: false,
        sub,
        out_limit: connect
            .receive_maximum
            .min(broker.config.max_inflight_messages) as usize,
        client_max_packet: connect.max_packet_size.map(|m| m as usize),
        client_alias_max: connect.topic_alias_maximum,
        out_aliases: HashMap::new(),
        inflight_out: HashMap::new(),
        next_pkid: 0,
        replay_after: None,
        replay: VecDeque::new(),
        popped: VecDeque::new(),
        replayed: HashSet::new(),
        problem_info: connect.request_problem_info,
        receives: false,
        will: connect.will.clone().map(own_will),
        publish_will: true,
        scratch_matches: Vec::new(),
        scratch_targets: Vec::new(),
        acks_unreported: 0,
        rate: publish_rate(&broker.config).map(Box::new),
        read_publishes: 0,
        paused_until: None,
    };
    if !ops.is_empty() {
        if let Err(why) = conn.commit_state(ops).await {
            let out = refuse(Refused::Unavailable, reason::SERVER_BUSY, why.to_string()).await;
            send_final(&mut conn.writer, &out).await;
            conn.publish_will = false;
            Box::pin(conn.finish(attachment.conn, &handover.0)).await;
            return None;
        }
    }

    // Keepalive: the client's value, capped by the configured maximum (announced to 5.0).
    let max_ka = broker.config.max_keepalive.0.as_secs() as u16;
    let mut server_keep_alive = None;
    let mut keep_alive = connect.keep_alive;
    if max_ka > 0 && version == Version::V5 && (keep_alive == 0 || keep_alive > max_ka) {
        keep_alive = max_ka;
        server_keep_alive = Some(max_ka);
    }
    conn.keep_alive = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
    let info = ConnAckInfo {
        session_present,
        reason: reason::SUCCESS,
        assigned_client_id: assigned,
        server_keep_alive,
        receive_maximum: broker.config.receive_maximum,
        max_packet_size: broker.config.max_packet_size.0 as u32,
        topic_alias_maximum: broker.config.topic_alias_maximum,
        reason_string: None,
    };
    codec::write_connack(version, &info, &mut conn.wbuf);
    tracing::debug!(%peer, client_id = %client_id, username = conn.username.as_deref(), ?version, session_present, "connected");
    if session_present && conn.session.durable {
        // Unacknowledged deliveries of the previous connection (or of the edge before a
        // restart) and messages queued while offline: PUBRELs first, then the queue.
        conn.resume_released();
        conn.replay_after = Some(client_prefix(TAG_QUEUED, &client_id));
        conn.receives = true;
    }
    Some(Box::new(Opened {
        conn,
        conn_id: attachment.conn,
        handover,
    }))
}

/// Serves an open session to the connection's end.
/// (The connection comes boxed: an `async fn` moves its parameters into its body, so a large
/// one passed by value would take its room in the future twice.)
async fn serve_session<R, W>(mut opened: Box<Opened<R, W>>)
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let conn = &mut opened.conn;
    let (version, peer, client_id) = (conn.version, conn.peer, conn.client_id.clone());
    let broker = conn.broker.clone();
    let limits = &broker.limits;
    let end = conn.run(&opened.handover.0).await;
    if let Some(kind) = end.as_ref().err().and_then(|c| c.refused) {
        limits.packet_refused(kind);
    }
    if let Err(close) = &end {
        codec::write_disconnect(version, close.code, &close.why, &mut conn.wbuf);
        let level_info = close.code != reason::SESSION_TAKEN_OVER;
        if let Some(held_back) = level_info.then(|| limits.log_budget.admit()).flatten() {
            tracing::info!(held_back, %peer, client_id = %client_id, code = format!("{:#04x}", close.code), reason = %close.why, "closing connection");
        }
    }
    if let Err(close) = &end {
        // The edge going down is not the client's failure.
        if close.code == reason::SERVER_SHUTTING_DOWN {
            conn.publish_will = false;
        }
    }
    let _ = tokio::time::timeout(FINAL_FLUSH, conn.flush()).await;
    let _ = tokio::time::timeout(FINAL_FLUSH, conn.writer.shutdown()).await;
    let Opened {
        conn,
        conn_id,
        handover,
    } = *opened;
    Box::pin(conn.finish(conn_id, &handover.0)).await;
}

/// Tells a connection taking the client id over that this one has ended, however its task
/// ends (also when it is cancelled at shutdown).
struct EndsHandover(Arc<Handover>);

impl Drop for EndsHandover {
    fn drop(&mut self) {
        self.0.end();
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

/// Writes a last packet (a refusing CONNACK) and closes the connection (over TLS, with a
/// close_notify), within `FINAL_FLUSH`.
async fn send_final<W: AsyncWrite + Unpin>(writer: &mut W, out: &[u8]) {
    let _ = tokio::time::timeout(FINAL_FLUSH, async {
        writer.write_all(out).await?;
        writer.shutdown().await
    })
    .await;
}

struct Refusal {
    /// CONNACK to send before closing, if the protocol is known well enough to answer.
    answer: Option<(Version, u8)>,
    /// What the edge refused (`None`: the client went away).
    kind: Option<Refused>,
    why: String,
}

impl Refusal {
    fn malformed(answer: Option<(Version, u8)>, why: String) -> Refusal {
        Refusal {
            answer,
            kind: Some(Refused::Malformed),
            why,
        }
    }

    /// A CONNECT over the packet size limit; a 5.0 client hears 0x95 when its header shows
    /// the protocol (3.1.1 has no return code for it and is just closed).
    fn too_large(buf: &[u8], size: usize, max_packet: usize) -> Refusal {
        let answer = match codec::peek_version(buf) {
            Ok(Some(Version::V5)) => Some((Version::V5, reason::PACKET_TOO_LARGE)),
            _ => None,
        };
        Refusal {
            answer,
            kind: Some(Refused::PacketTooLarge),
            why: format!("CONNECT of {size} bytes exceeds mqtt.max_packet_size = {max_packet}"),
        }
    }
}

async fn read_connect<R: AsyncRead + Unpin>(
    reader: &mut R,
    rbuf: &mut BytesMut,
    max_packet: usize,
    limits: &Limits,
) -> Result<(Box<ConnectIn>, usize), Refusal> {
    let mut share = limits.connect_buffer(CONNECT_BUFFER_BUDGET);
    loop {
        match codec::detect_version(rbuf, max_packet) {
            Ok(Some(version)) => match codec::decode(version, rbuf, max_packet) {
                Ok(Some(Inbound::Connect(c))) => return Ok((c, share.keep())),
                Ok(Some(_)) => unreachable!("detect_version saw a CONNECT"),
                Ok(None) => {}
                Err(codec::DecodeError::TooLarge(n)) => {
                    return Err(Refusal::too_large(rbuf, n, max_packet))
                }
                Err(e) => {
                    return Err(Refusal::malformed(
                        Some((version, reason::MALFORMED)),
                        e.to_string(),
                    ))
                }
            },
            Ok(None) => {}
            Err(codec::DecodeError::TooLarge(n)) => {
                return Err(Refusal::too_large(rbuf, n, max_packet))
            }
            Err(codec::DecodeError::UnsupportedProtocol { name, level }) => {
                let answer = match (name.as_str(), level) {
                    ("MQTT", l) if l > 5 => Some((Version::V5, reason::UNSUPPORTED_PROTOCOL)),
                    ("MQTT" | "MQIsdp", _) => Some((Version::V311, reason::UNSUPPORTED_PROTOCOL)),
                    _ => None,
                };
                return Err(Refusal::malformed(
                    answer,
                    format!("unsupported protocol {name:?} level {level}"),
                ));
            }
            Err(e) => return Err(Refusal::malformed(None, e.to_string())),
        }
        rbuf.reserve(512);
        if !share.hold(rbuf.capacity()) {
            return Err(Refusal {
                answer: None,
                kind: Some(Refused::ConnectMemory),
                why: format!(
                    "CONNECT packets being received hold the node's {} MiB for them",
                    CONNECT_BUFFER_BUDGET >> 20
                ),
            });
        }
        match reader.read_buf(rbuf).await {
            Ok(0) | Err(_) => {
                return Err(Refusal {
                    answer: None,
                    kind: None,
                    why: "closed before CONNECT".into(),
                })
            }
            Ok(_) => {}
        }
    }
}

/// A connection's publish rate limiter, when `max_publish_rate` is set.
fn publish_rate(cfg: &crate::config::MqttConfig) -> Option<PublishRate> {
    let rate = cfg.max_publish_rate;
    let burst = if cfg.publish_burst == 0 {
        rate
    } else {
        cfg.publish_burst
    };
    (rate > 0).then(|| PublishRate::new(rate, burst, cfg.publish_rate_grace.0, Instant::now()))
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    h.finish()
}

struct Connection<R, W> {
    broker: Arc<Broker>,
    version: Version,
    client_id: Arc<str>,
    peer: SocketAddr,
    /// The user the client logged in as: its certificate's identity (mutual TLS) or the
    /// user name its password was checked for; `None` when anonymous.
    username: Option<Arc<str>>,
    reader: R,
    writer: W,
    rbuf: BytesMut,
    /// The connection is idle and `rbuf` holds no allocation: the next read goes through a
    /// buffer on the stack, and only bytes that arrive take a buffer.
    read_idle: bool,
    /// After a read that came after a quiet spell: the write buffer and the commit channel
    /// are given back once everything is written and nothing is pending.
    give_back: bool,
    /// Bytes reserved for the next read.
    read_chunk: usize,
    wbuf: BytesMut,
    /// The writer took all of `wbuf` but may still hold some of it (TLS records buffered in
    /// rustls): it must be flushed before the peer sees everything.
    unflushed: bool,
    keep_alive: Option<Duration>,
    deadline: Instant,
    /// When the socket last gave bytes.
    last_read: Instant,
    session: SessionData,
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
    /// allocates about 2 KiB at once).
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
    /// This client's ACL rules, when an ACL file is configured.
    acl: Option<Box<ConnAcl>>,
    taken_over: bool,
    /// This session's delivery side.
    sub: Arc<Subscriber>,
    /// Outbound QoS 1/2 publishes allowed unacknowledged.
    out_limit: usize,
    /// 5.0 Maximum Packet Size of the client.
    client_max_packet: Option<usize>,
    /// 5.0 Topic Alias Maximum of the client.
    client_alias_max: u16,
    /// Outbound topic aliases given so far.
    out_aliases: HashMap<Bytes, u16>,
    /// Outbound QoS 1/2 publishes by packet id.
    inflight_out: HashMap<u16, OutFlight>,
    /// Last packet id given to a delivery without a durable entry.
    next_pkid: u16,
    /// Replaying the durable queue: the last key read (the prefix before the first page).
    replay_after: Option<Vec<u8>>,
    /// Deliveries read back from the durable queue, sent before the outbox.
    replay: VecDeque<Delivery>,
    /// Deliveries taken from the outbox, not yet written.
    popped: VecDeque<Delivery>,
    /// Seqs replayed from disk: the same entries arriving through the outbox are skipped.
    replayed: HashSet<u64>,
    /// 5.0 Request Problem Information.
    problem_info: bool,
    /// The session has subscribed (or continues a session): its outbox is watched.
    receives: bool,
    /// The will, until a normal DISCONNECT discards it.
    will: Option<Box<WillIn>>,
    /// Whether the will is published when the connection ends.
    publish_will: bool,
    scratch_matches: Vec<Match<super::delivery::SubRef>>,
    scratch_targets: Vec<Target>,
    /// Acknowledgements written since the node-wide counter was last updated (added once per
    /// loop turn rather than once per ack, which would contend across connections).
    acks_unreported: u64,
    /// The publish rate limit (`max_publish_rate`), if one is set.
    rate: Option<Box<PublishRate>>,
    /// PUBLISH packets decoded from the latest socket read.
    read_publishes: u32,
    /// Over its publish rate: the socket is not read again before this.
    paused_until: Option<Instant>,
}

impl<R, W> Connection<R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    async fn run(&mut self, handover: &Handover) -> Result<(), Close> {
        let mut shutdown = self.broker.shutdown.clone();
        self.pump()?;
        self.try_flush()?;
        self.touch();
        // Only a session that receives is checked for being slow (an interval allocates).
        let mut slow_check = None;
        loop {
            if self.receives && slow_check.is_none() {
                let mut every = tokio::time::interval(Duration::from_millis(500));
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                slow_check = Some(every);
            }
            // 3.1.1 has no Receive Maximum: stop reading instead, so memory stays bounded.
            let can_read = (self.awaiting_commit < self.broker.config.receive_maximum as usize
                || self.version == Version::V5)
                && self.paused_until.is_none();
            let deadline = self.deadline;
            let paused = self.paused_until;
            // Not while the edge itself holds off reading (publish rate).
            let has_deadline = self.keep_alive.is_some() && self.paused_until.is_none();
            let spare = self.prepare_read();
            let unwritten = !self.wbuf.is_empty() || self.unflushed;
            tokio::select! {
                biased;
                Some(done) = recv_committed(&mut self.commit_rx) => self.on_committed(done)?,
                _ = handover.taken_over() => {
                    self.taken_over = true;
                    self.drain_pending().await;
                    return Err(Close::new(reason::SESSION_TAKEN_OVER, "another connection took this client id"));
                }
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                    self.drain_pending().await;
                    return Err(Close::new(reason::SERVER_SHUTTING_DOWN, "the edge is shutting down"));
                }
                written = write_some(&mut self.writer, &self.wbuf), if unwritten => {
                    match written {
                        Ok(n) => self.wrote(n)?,
                        Err(e) => return Err(Close::new(reason::UNSPECIFIED, format!("write failed: {e}"))),
                    }
                }
                read = read_some(&mut self.reader, &mut self.rbuf, self.read_idle, self.read_chunk), if can_read => {
                    match read {
                        Ok(0) => {
                            self.drain_pending().await;
                            return Ok(());
                        }
                        Ok(n) => {
                            let now = Instant::now();
                            let quiet = now.duration_since(self.last_read) >= IDLE_AFTER;
                            self.last_read = now;
                            self.touch();
                            // TLS may have records to send in answer to what was read (a key
                            // update); a flush sends them. Plain TCP has nothing to flush.
                            self.unflushed = true;
                            self.broker.hub.stats.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
                            // Publishes accepted before the end (or before an offending
                            // packet) are still committed and acknowledged.
                            match self.on_bytes().await {
                                Ok(None) => {
                                    self.adapt_read_buffer(n, spare, quiet);
                                    if let Err(close) = self.charge_rate() {
                                        self.drain_pending().await;
                                        return Err(close);
                                    }
                                }
                                Ok(Some(end)) => {
                                    self.drain_pending().await;
                                    return end;
                                }
                                Err(close) => {
                                    self.drain_pending().await;
                                    return Err(close);
                                }
                            }
                        }
                        Err(_) => {
                            self.drain_pending().await;
                            return Ok(());
                        }
                    }
                }
                _ = self.sub.notify.notified() => {}
                // One timer for both (a timer is a large part of an idle connection's state):
                // the keep-alive deadline does not run while the edge holds off reading.
                _ = tokio::time::sleep_until(paused.unwrap_or(deadline)), if paused.is_some() || has_deadline => {
                    if paused.is_none() {
                        return Err(Close::new(reason::KEEP_ALIVE_TIMEOUT, "no packet within 1.5 times the keepalive"));
                    }
                    // The client was sending all along (it is the edge that stopped reading).
                    self.paused_until = None;
                    self.touch();
                }
                _ = async { slow_check.as_mut().expect("created when receives").tick().await }, if self.receives => {
                    let limit = self.broker.config.slow_subscriber_timeout.0;
                    if self.sub.over_for().is_some_and(|d| d >= limit) {
                        self.broker.hub.stats.slow_disconnects.fetch_add(1, Ordering::Relaxed);
                        self.drain_pending().await;
                        return Err(Close::new(
                            reason::QUOTA_EXCEEDED,
                            format!(
                                "this subscriber stayed over its queue bound ({} messages / {} bytes) for {limit:?}",
                                self.broker.config.max_queued_messages,
                                self.broker.config.max_queued_bytes.0
                            ),
                        ));
                    }
                }
            }
            self.pump()?;
            self.report_acks();
            self.try_flush()?;
        }
    }

    fn report_acks(&mut self) {
        if self.acks_unreported > 0 {
            self.broker
                .hub
                .stats
                .acks_sent
                .fetch_add(self.acks_unreported, Ordering::Relaxed);
            self.acks_unreported = 0;
        }
    }

    /// Charges the publishes of the latest read to the rate limit: pauses reading while the
    /// client is over its rate, disconnects it once it has stayed over for the grace period.
    fn charge_rate(&mut self) -> Result<(), Close> {
        let publishes = std::mem::take(&mut self.read_publishes);
        let Some(rate) = self.rate.as_mut().filter(|_| publishes > 0) else {
            return Ok(());
        };
        let limits = &self.broker.limits;
        match rate.charge(publishes, Instant::now()) {
            RateVerdict::Within => Ok(()),
            RateVerdict::PauseUntil(until) => {
                limits.rate_throttles.fetch_add(1, Ordering::Relaxed);
                self.paused_until = Some(until);
                Ok(())
            }
            RateVerdict::Exceeded => {
                limits.rate_disconnects.fetch_add(1, Ordering::Relaxed);
                let cfg = &self.broker.config;
                Err(Close::new(
                    reason::MESSAGE_RATE_TOO_HIGH,
                    format!(
                        "over mqtt.max_publish_rate = {} publishes per second for mqtt.publish_rate_grace = {:?}",
                        cfg.max_publish_rate, cfg.publish_rate_grace.0
                    ),
                ))
            }
        }
    }

    /// Writes (and flushes) what the writer takes without waiting: polled once with a waker
    /// that does nothing, as the run loop's next `write_some` registers the real one.
    fn try_flush(&mut self) -> Result<(), Close> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        while !self.wbuf.is_empty() {
            match Pin::new(&mut self.writer).poll_write(&mut cx, &self.wbuf) {
                Poll::Ready(Ok(n)) => self.wrote(n)?,
                Poll::Ready(Err(e)) => {
                    return Err(Close::new(
                        reason::UNSPECIFIED,
                        format!("write failed: {e}"),
                    ))
                }
                Poll::Pending => return Ok(()),
            }
        }
        self.release_written();
        if self.unflushed {
            match Pin::new(&mut self.writer).poll_flush(&mut cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(e)) => {
                    return Err(Close::new(
                        reason::UNSPECIFIED,
                        format!("write failed: {e}"),
                    ))
                }
                Poll::Pending => {}
            }
        }
        Ok(())
    }

    /// Accounts for `n` bytes of `wbuf` taken by the writer (0 with `wbuf` empty: a flush
    /// completed).
    fn wrote(&mut self, n: usize) -> Result<(), Close> {
        if self.wbuf.is_empty() {
            self.unflushed = false;
            return Ok(());
        }
        if n == 0 {
            return Err(Close::new(
                reason::UNSPECIFIED,
                "write failed: the connection takes no more bytes",
            ));
        }
        self.broker
            .hub
            .stats
            .bytes_sent
            .fetch_add(n as u64, Ordering::Relaxed);
        let _ = self.wbuf.split_to(n);
        self.unflushed = true;
        Ok(())
    }

    fn touch(&mut self) {
        if let Some(ka) = self.keep_alive {
            self.deadline = Instant::now() + ka;
        }
    }

    async fn flush(&mut self) -> Result<(), Close> {
        if !self.wbuf.is_empty() {
            self.broker
                .hub
                .stats
                .bytes_sent
                .fetch_add(self.wbuf.len() as u64, Ordering::Relaxed);
            self.writer
                .write_all(&self.wbuf)
                .await
                .map_err(|e| Close::new(reason::UNSPECIFIED, format!("write failed: {e}")))?;
            self.release_written();
        }
        self.writer
            .flush()
            .await
            .map_err(|e| Close::new(reason::UNSPECIFIED, format!("write failed: {e}")))?;
        self.unflushed = false;
        Ok(())
    }

    /// Empties the write buffer once all of it was written, giving back a large one, and any
    /// one (and the commit channel) when the connection is idle with nothing pending.
    fn release_written(&mut self) {
        let idle = self.give_back && self.pending.is_empty();
        if idle {
            self.give_back = false;
        }
        if self.wbuf.capacity() > WRITE_BUFFER_KEEP || idle {
            self.wbuf = BytesMut::new();
        } else {
            self.wbuf.clear();
        }
        if idle {
            // No request is pending, so the appender holds no sender of this channel.
            self.commit_tx = None;
            self.commit_rx = None;
        }
    }

    /// Makes room for the next read; returns the spare capacity offered to it.
    fn prepare_read(&mut self) -> usize {
        if self.read_idle {
            return READ_CHUNK_MIN;
        }
        if self.rbuf.capacity() - self.rbuf.len() < self.read_chunk / 2 {
            self.rbuf.reserve(self.read_chunk);
        }
        self.rbuf.capacity() - self.rbuf.len()
    }

    /// Grows the read size while reads fill the buffer; after a small read that left nothing
    /// buffered, goes back to the minimum and gives a large buffer back. After a small read
    /// that came after a quiet spell (an idle device's PINGREQ, say), gives any buffer back
    /// until bytes arrive again.
    fn adapt_read_buffer(&mut self, read: usize, offered: usize, quiet: bool) {
        self.read_idle = false;
        self.give_back = quiet;
        if read >= offered {
            self.read_chunk = (self.read_chunk * 2).min(READ_CHUNK_MAX);
        } else if read < READ_CHUNK_MIN / 2 && self.rbuf.is_empty() {
            self.read_chunk = READ_CHUNK_MIN;
            if quiet || self.rbuf.capacity() > 4 * READ_CHUNK_MIN {
                self.rbuf = BytesMut::new();
                self.read_idle = quiet;
            }
        }
    }

    /// Decodes everything buffered. `Some(end)`: the client ended the connection.
    async fn on_bytes(&mut self) -> Result<Option<Result<(), Close>>, Close> {
        loop {
            let step = self.decode_buffered();
            // Publishes accepted before the end (or before an offending packet) are still
            // committed and acknowledged. Awaited here, with no packet held, so that this
            // wait adds little to the future every connection keeps.
            self.send_request().await?;
            match step? {
                Decoded::Drained => return Ok(None),
                Decoded::RequestFull => {}
                Decoded::Disconnected => return Ok(Some(Ok(()))),
            }
        }
    }

    /// Decodes buffered packets until none is left whole, the request being built is full
    /// or the client ends the connection.
    fn decode_buffered(&mut self) -> Result<Decoded, Close> {
        let max_packet = self.broker.config.max_packet_size.0 as usize;
        let now = now_ms();
        loop {
            let packet = match codec::decode(self.version, &mut self.rbuf, max_packet) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(Decoded::Drained),
                Err(codec::DecodeError::TooLarge(n)) => {
                    return Err(Close::new(
                        reason::PACKET_TOO_LARGE,
                        format!("packet of {n} bytes exceeds the maximum of {max_packet}"),
                    ));
                }
                Err(e) => {
                    return Err(Close::new(reason::MALFORMED, e.to_string()));
                }
            };
            match packet {
                Inbound::Publish(p) => {
                    self.read_publishes += 1;
                    // What was accepted before an offending packet is still logged.
                    self.on_publish(p, now)?;
                }
                Inbound::PubRel(pkid) => self.on_pubrel(pkid),
                Inbound::PingReq => codec::write_pingresp(&mut self.wbuf),
                Inbound::Subscribe(sub) => self.on_subscribe(sub, now)?,
                Inbound::Unsubscribe(pkid, filters) => self.on_unsubscribe(pkid, filters),
                Inbound::PubAck(pkid) => self.on_puback(pkid),
                Inbound::PubRec(pkid, code) => self.on_pubrec(pkid, code),
                Inbound::PubComp(pkid) => self.on_pubcomp(pkid),
                Inbound::Disconnect {
                    reason: code,
                    session_expiry,
                } => {
                    // A normal DISCONNECT discards the will; 0x04 asks for it.
                    self.publish_will = code == reason::DISCONNECT_WITH_WILL;
                    if let Some(e) = session_expiry {
                        if self.session.expiry == 0 && e != 0 {
                            return Err(Close::new(
                                reason::PROTOCOL_ERROR,
                                "DISCONNECT may not set a session expiry when CONNECT had 0",
                            ));
                        }
                        self.session.expiry = e;
                    }
                    tracing::debug!(client_id = %self.client_id, code, "client disconnected");
                    return Ok(Decoded::Disconnected);
                }
                Inbound::Connect(_) => {
                    return Err(Close::new(
                        reason::PROTOCOL_ERROR,
                        "a second CONNECT on one connection",
                    ));
                }
                Inbound::Auth => {
                    return Err(Close::new(
                        reason::PROTOCOL_ERROR,
                        "AUTH without an authentication method",
                    ));
                }
                Inbound::ServerOnly(name) => {
                    return Err(Close::new(
                        reason::PROTOCOL_ERROR,
                        format!("{name} is sent by servers only"),
                    ));
                }
            }
            if self.req.buf.len() >= MAX_REQUEST_BYTES {
                return Ok(Decoded::RequestFull);
            }
        }
    }

    fn on_publish(&mut self, p: PublishIn, now: u64) -> Result<(), Close> {
        let cfg = &self.broker.config;
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
        if let Some(acl) = &mut self.acl {
            if acl.refresh(&self.broker.auth, &self.client_id) {
                self.route_cache.clear();
            }
        }
        // A topic in the route cache was validated when it was routed.
        let (topic_id, partition, key, allowed) = match self.route_cache.get(&topic) {
            Some(hit) => hit.clone(),
            None => {
                let text = validate_topic(&topic, cfg)?;
                let d = self.broker.router.route(text, &self.client_id);
                if self.route_cache.len() >= ROUTE_CACHE_ENTRIES {
                    self.route_cache.clear();
                }
                let allowed = self.acl.as_ref().is_none_or(|a| a.rules.may_publish(text));
                let route = (d.topic, d.partition, Bytes::from(d.key), allowed);
                self.route_cache.insert(topic.clone(), route.clone());
                route
            }
        };

        // `$` topics are the edge's own ($SYS): a client may read them, never write them.
        let reserved = topic.starts_with(b"$");
        if reserved && self.version == Version::V311 {
            return Err(Close::refused(
                PacketRefused::ReservedTopic,
                reason::TOPIC_NAME_INVALID,
                "topics starting with $ are reserved for the edge",
            ));
        }

        if p.qos != QoS::AtMostOnce {
            let is_resend = p.qos == QoS::ExactlyOnce
                && (self.qos2_pending.contains(&p.pkid) || self.session.qos2.contains(&p.pkid));
            if !is_resend {
                if self.version == Version::V5 && self.inflight >= cfg.receive_maximum as usize {
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
            if self.session.qos2.contains(&p.pkid) {
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
            self.broker
                .limits
                .packet_refused(PacketRefused::ReservedTopic);
            self.refuse_publish(p.qos, p.pkid, reason::TOPIC_NAME_INVALID);
            return Ok(());
        }

        if !allowed {
            self.broker
                .auth
                .stats
                .publishes_denied
                .fetch_add(1, Ordering::Relaxed);
            // 3.1.1 cannot say no to a publish: the connection is closed (MQTT-3.3.5-2).
            if self.version == Version::V311 {
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

        if self.broker.log.rejects_publishes() {
            self.broker
                .log
                .counters
                .budget_rejected
                .fetch_add(1, Ordering::Relaxed);
            if self.version == Version::V311 && p.qos != QoS::AtMostOnce {
                return Err(Close::new(reason::QUOTA_EXCEEDED, "disk budget reached"));
            }
            self.refuse_publish(p.qos, p.pkid, reason::QUOTA_EXCEEDED);
            return Ok(());
        }

        if p.retain && !p.payload.is_empty() {
            let size = Message::size_of(topic.len(), p.payload.len(), &p.props);
            if !self.broker.hub.retained_room(
                &topic,
                size,
                cfg.max_retained_messages,
                cfg.max_retained_bytes.0,
            ) {
                let why = format!(
                    "the retained store is full (mqtt.max_retained_messages = {}, mqtt.max_retained_bytes = {})",
                    cfg.max_retained_messages, cfg.max_retained_bytes.0
                );
                if self.version == Version::V311 || p.qos == QoS::AtMostOnce {
                    return Err(Close::refused(
                        PacketRefused::RetainedQuota,
                        reason::QUOTA_EXCEEDED,
                        why,
                    ));
                }
                self.broker
                    .limits
                    .packet_refused(PacketRefused::RetainedQuota);
                self.refuse_publish(p.qos, p.pkid, reason::QUOTA_EXCEEDED);
                return Ok(());
            }
        }

        self.broker
            .hub
            .stats
            .messages_received
            .fetch_add(1, Ordering::Relaxed);
        let qos = p.qos;
        let pkid = p.pkid;
        let staged = stage_publish(
            &self.broker.hub,
            Staging {
                req: &mut self.req,
                retained: &mut self.req_retained,
                fanouts: &mut self.req_fanout,
            },
            &mut self.scratch_matches,
            &mut self.scratch_targets,
            (topic_id, partition, &key),
            Staged {
                topic,
                qos: qos as u8,
                retain: p.retain,
                publisher: &self.client_id,
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
                if self.session.durable {
                    self.req.state.push(StateOp::Put {
                        key: qos2_key(&self.client_id, pkid),
                        value: crate::log::meta::marker_value(),
                    });
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

    fn on_pubrel(&mut self, pkid: u16) {
        let known = self.session.qos2.contains(&pkid) || self.qos2_pending.contains(&pkid);
        if known && self.session.durable {
            self.req.state.push(StateOp::Delete {
                key: qos2_key(&self.client_id, pkid),
            });
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
    /// is pending, answers them at once).
    async fn send_request(&mut self) -> Result<(), Close> {
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
                    self.apply_deferred(d);
                }
                return Ok(());
            }
        }
        let mut req = std::mem::take(&mut self.req);
        // A request larger than the whole budget takes all of it, so it still goes through.
        let budget = &self.broker.append_budget;
        let want = (req.buf.len().max(1) as u32).min(super::APPEND_BUDGET_BYTES);
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
        match self.broker.appender.try_append(req) {
            Ok(()) => Ok(()),
            Err(TryAppendError::Full(req)) => Box::pin(self.broker.appender.append(req))
                .await
                .map_err(|_| closed()),
            Err(TryAppendError::Closed) => Err(closed()),
        }
    }

    fn on_committed(&mut self, done: Committed) -> Result<(), Close> {
        let Some(p) = self.pending.pop_front() else {
            return Ok(());
        };
        debug_assert_eq!(
            p.ticket, done.ticket,
            "the appender completes requests in order"
        );
        if let Err(why) = done.outcome {
            return Err(Close::new(
                reason::IMPLEMENTATION_SPECIFIC,
                format!("the log failed: {why}"),
            ));
        }
        for d in p.deferred {
            self.apply_deferred(d);
        }
        let hub = &self.broker.hub;
        for (topic, msg) in p.retained {
            hub.set_retained(topic, msg);
        }
        if !p.fanout.is_empty() {
            hub.deliver(p.fanout, &mut done.seqs.into_iter());
        }
        Ok(())
    }

    fn apply_deferred(&mut self, d: Deferred) {
        match d {
            Deferred::Ack(ack) => self.apply_ack(ack),
            Deferred::Packet(bytes) => self.wbuf.extend_from_slice(&bytes),
            Deferred::Deliver(list) => {
                for d in list {
                    self.sub.push(d, &self.broker.hub.limits);
                }
            }
        }
    }

    fn apply_ack(&mut self, ack: PendingAck) {
        codec::write_ack(self.version, ack.kind, ack.pkid, ack.code, &mut self.wbuf);
        self.acks_unreported += 1;
        if ack.logged {
            self.awaiting_commit -= 1;
        }
        match ack.kind {
            AckKind::PubAck => self.inflight = self.inflight.saturating_sub(1),
            AckKind::PubRec if ack.code == reason::SUCCESS => {
                if self.qos2_pending.remove(&ack.pkid) {
                    self.session.qos2.insert(ack.pkid);
                }
            }
            AckKind::PubRec => self.inflight = self.inflight.saturating_sub(1),
            AckKind::PubComp => {
                if self.session.qos2.remove(&ack.pkid) || self.qos2_pending.remove(&ack.pkid) {
                    self.inflight = self.inflight.saturating_sub(1);
                }
            }
            AckKind::PubRel => {}
        }
    }

    /// Waits for every request already sent to be committed, writing their acks, so the
    /// session state handed on is exact. Stops early if the log fails.
    /// Boxed: it runs once, when the connection ends; inline it would make every
    /// connection's task larger by its size.
    fn drain_pending(&mut self) -> Pin<Box<impl std::future::Future<Output = ()> + '_>> {
        Box::pin(async move {
            let _ = self.send_request().await;
            while !self.pending.is_empty() {
                match recv_committed(&mut self.commit_rx).await {
                    Some(done) => {
                        if self.on_committed(done).is_err() {
                            break;
                        }
                    }
                    None => break,
                }
            }
            let _ = tokio::time::timeout(FINAL_FLUSH, self.flush()).await;
        })
    }

    /// Commits state changes and waits until they are durable. Boxed, as `drain_pending`.
    fn commit_state(
        &mut self,
        ops: Vec<StateOp>,
    ) -> Pin<Box<impl std::future::Future<Output = Result<(), CommitError>> + '_>> {
        Box::pin(self.broker.appender.commit_state(ops))
    }

    /// SUBSCRIBE: checks each filter, records the subscriptions (durably for a persistent
    /// session, SUBACK once committed) and queues the retained messages they ask for.
    fn on_subscribe(&mut self, s: SubscribeIn, now: u64) -> Result<(), Close> {
        self.receives = true;
        let broker = self.broker.clone();
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
                self.broker
                    .limits
                    .packet_refused(PacketRefused::FilterLength);
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
            if let Some(acl) = &mut self.acl {
                acl.refresh(&self.broker.auth, &self.client_id);
                if !acl.rules.may_subscribe(&filter) {
                    self.broker
                        .auth
                        .stats
                        .subscriptions_denied
                        .fetch_add(1, Ordering::Relaxed);
                    codes.push(reason::NOT_AUTHORIZED);
                    problem = Some(format!("{filter:?}: not authorized"));
                    continue;
                }
            }
            if let Some(why) = self.group_refusal(&filter) {
                codes.push(reason::NOT_AUTHORIZED);
                problem = Some(why);
                continue;
            }
            let shared = filter.starts_with("$share/");
            if shared && o.no_local && self.version == Version::V5 {
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
            let Some(existed) = hub.subscribe_within(&self.sub, &filter, opts, max) else {
                self.broker
                    .limits
                    .subscriptions_refused
                    .fetch_add(1, Ordering::Relaxed);
                codes.push(reason::QUOTA_EXCEEDED);
                problem = Some(format!(
                    "{filter:?}: this session holds mqtt.max_subscriptions_per_client = {max} subscriptions"
                ));
                continue;
            };
            if self.session.durable {
                let mut key = client_prefix(TAG_SUBSCRIPTION, &self.client_id);
                key.extend_from_slice(filter.as_bytes());
                self.req.state.push(StateOp::Put {
                    key,
                    value: subscription_value(&opts),
                });
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
        let mut out = BytesMut::new();
        let reason_string = problem.filter(|_| self.problem_info);
        codec::write_suback(
            self.version,
            s.pkid,
            &codes,
            reason_string.as_deref(),
            &mut out,
        );
        self.req_acks.push(Deferred::Packet(out));
        if !retained.is_empty() {
            self.req_acks.push(Deferred::Deliver(retained));
        }
        Ok(())
    }

    /// Why a `$share/{group}/{filter}` subscription may not join durable group `group`, if
    /// it may not: a filter other than the group's, or (with an ACL) no `group read` grant
    /// for it. Read rights on the filter are the ordinary subscribe check.
    fn group_refusal(&mut self, filter: &str) -> Option<String> {
        let (group, inner) = filter.strip_prefix("$share/")?.split_once('/')?;
        let expected = self.broker.hub.durable_group_filter(group)?;
        if inner != &*expected {
            return Some(format!(
                "the consumer group {group:?} reads {expected:?}: subscribe to $share/{group}/{expected}"
            ));
        }
        if let Some(acl) = &mut self.acl {
            acl.refresh(&self.broker.auth, &self.client_id);
            if !acl.rules.may_join_group(group) {
                self.broker
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

    fn on_unsubscribe(&mut self, pkid: u16, filters: Vec<String>) {
        let mut codes = Vec::with_capacity(filters.len());
        for filter in filters {
            let existed = self.broker.hub.unsubscribe(&self.sub, &filter);
            if existed && self.session.durable {
                let mut key = client_prefix(TAG_SUBSCRIPTION, &self.client_id);
                key.extend_from_slice(filter.as_bytes());
                self.req.state.push(StateOp::Delete { key });
            }
            codes.push(if existed {
                reason::SUCCESS
            } else {
                reason::NO_SUBSCRIPTION_EXISTED
            });
        }
        let mut out = BytesMut::new();
        codec::write_unsuback(self.version, pkid, &codes, &mut out);
        self.req_acks.push(Deferred::Packet(out));
    }

    fn on_puback(&mut self, pkid: u16) {
        if self.inflight_out.get(&pkid).is_some_and(|f| f.qos == 1) {
            if let Some(f) = self.inflight_out.remove(&pkid) {
                if let Some(g) = &f.group {
                    g.done();
                }
                if let Some(seq) = f.seq {
                    self.req.state.push(StateOp::Delete {
                        key: queue_key(TAG_QUEUED, &self.client_id, seq),
                    });
                }
            }
        }
    }

    fn on_pubrec(&mut self, pkid: u16, code: u8) {
        let Some(f) = self.inflight_out.get_mut(&pkid) else {
            return;
        };
        if f.qos != 2 {
            return;
        }
        let f = f.clone();
        if code >= 0x80 {
            // The subscriber refused it: the flow ends here.
            self.inflight_out.remove(&pkid);
            if let Some(g) = &f.group {
                g.done();
            }
            if let Some(seq) = f.seq {
                self.req.state.push(StateOp::Delete {
                    key: queue_key(TAG_QUEUED, &self.client_id, seq),
                });
            }
            return;
        }
        if let Some(x) = self.inflight_out.get_mut(&pkid) {
            x.released = true;
        }
        match f.seq {
            Some(seq) if !f.released => {
                // The PUBREL goes out once the new state is durable, so a restart never
                // resends a PUBLISH the subscriber has already released.
                self.req.state.push(StateOp::Delete {
                    key: queue_key(TAG_QUEUED, &self.client_id, seq),
                });
                self.req.state.push(StateOp::Put {
                    key: queue_key(TAG_RELEASED, &self.client_id, seq),
                    value: crate::log::meta::marker_value(),
                });
                self.req_acks.push(Deferred::Ack(PendingAck {
                    kind: AckKind::PubRel,
                    pkid,
                    code: reason::SUCCESS,
                    logged: false,
                }));
            }
            _ => codec::write_ack(
                self.version,
                AckKind::PubRel,
                pkid,
                reason::SUCCESS,
                &mut self.wbuf,
            ),
        }
    }

    fn on_pubcomp(&mut self, pkid: u16) {
        if self
            .inflight_out
            .get(&pkid)
            .is_some_and(|f| f.qos == 2 && f.released)
        {
            if let Some(f) = self.inflight_out.remove(&pkid) {
                if let Some(g) = &f.group {
                    g.done();
                }
                if let Some(seq) = f.seq {
                    self.req.state.push(StateOp::Delete {
                        key: queue_key(TAG_RELEASED, &self.client_id, seq),
                    });
                }
            }
        }
    }

    /// Resends the PUBRELs of QoS 2 deliveries the subscriber had received (PUBREC) when the
    /// previous connection ended.
    fn resume_released(&mut self) {
        let prefix = client_prefix(TAG_RELEASED, &self.client_id);
        let entries = match self.broker.log.meta_scan(&prefix) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(client_id = %self.client_id, "reading released deliveries: {e}");
                return;
            }
        };
        for (k, _) in entries {
            let Some(seq) = seq_of(&k) else { continue };
            let pkid = durable_pkid(seq);
            self.inflight_out.insert(
                pkid,
                OutFlight {
                    qos: 2,
                    seq: Some(seq),
                    released: true,
                    group: None,
                },
            );
            codec::write_ack(
                self.version,
                AckKind::PubRel,
                pkid,
                reason::SUCCESS,
                &mut self.wbuf,
            );
        }
    }

    /// Reads the next page of the durable queue into `replay`.
    fn refill_replay(&mut self) {
        let Some(after) = self.replay_after.take() else {
            return;
        };
        let prefix = client_prefix(TAG_QUEUED, &self.client_id);
        let log = &self.broker.log;
        let from = (after != prefix).then_some(after.as_slice());
        let page = match log.meta_page(&prefix, from, REPLAY_PAGE) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(client_id = %self.client_id, "reading queued deliveries: {e}");
                return;
            }
        };
        if page.len() == REPLAY_PAGE {
            self.replay_after = page.last().map(|(k, _)| k.clone());
        }
        let mut entries = Vec::with_capacity(page.len());
        for (k, v) in page {
            match (seq_of(&k), parse_queue_value(&v)) {
                (Some(seq), Some(entry)) => entries.push((k, seq, entry)),
                _ => {
                    tracing::warn!(client_id = %self.client_id, "discarding an unreadable queue entry");
                    self.req.state.push(StateOp::Delete { key: k });
                }
            }
        }
        // Queued records are mostly consecutive in a few partitions: each partition's span
        // is read once (a stored batch holds many records), not one read per entry.
        let mut spans: HashMap<(u32, u32), (u64, u64)> = HashMap::new();
        for (_, _, e) in &entries {
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
        for (k, seq, entry) in entries {
            let (topic, partition, offset) = entry.position;
            let record = match records.remove(&entry.position) {
                Some(r) => Some(r),
                None => match log.read(topic, partition, offset, 1) {
                    Ok(mut r) => r.pop().filter(|r| r.offset == offset),
                    // Not a deletion: the entry stays on disk and a later connection (or
                    // restart) tries again.
                    Err(e) => {
                        self.broker
                            .hub
                            .stats
                            .queue_read_errors
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(client_id = %self.client_id, topic, partition, offset, "reading a queued record failed; the entry is kept: {e}");
                        continue;
                    }
                },
            };
            let Some(record) = record else {
                // Retention or the disk budget deleted the record before it was delivered.
                self.broker
                    .hub
                    .stats
                    .dropped
                    .fetch_add(1, Ordering::Relaxed);
                self.req.state.push(StateOp::Delete { key: k });
                continue;
            };
            self.replayed.insert(seq);
            // Sent before: unacknowledged when the previous connection ended, or queued
            // before a restart (whether it went out then is not known).
            let dup = seq <= self.broker.hub.boot_seq.load(Ordering::Relaxed)
                || self.sub.sent.lock().expect("sent lock").remove(&seq);
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
    fn next_delivery(&mut self) -> Option<Delivery> {
        loop {
            if self.replay.is_empty() && self.replay_after.is_some() {
                self.refill_replay();
            }
            if let Some(d) = self.replay.pop_front() {
                return Some(d);
            }
            if self.popped.is_empty() {
                self.sub
                    .pop_into(&self.broker.hub.limits, POP_BATCH, &mut self.popped);
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

    /// Writes deliveries while the in-flight window and the write buffer have room.
    fn pump(&mut self) -> Result<(), Close> {
        let broker = self.broker.clone();
        let stats = &broker.hub.stats;
        let now = now_ms();
        while self.wbuf.len() < WRITE_BUFFER_HIGH && self.inflight_out.len() < self.out_limit {
            let Some(d) = self.next_delivery() else {
                break;
            };
            let Some(expiry_left) = d.msg.expiry_left(now) else {
                stats.expired.fetch_add(1, Ordering::Relaxed);
                self.forget(&d);
                continue;
            };
            if let Some(acl) = &mut self.acl {
                acl.refresh(&broker.auth, &self.client_id);
                let topic = std::str::from_utf8(&d.msg.topic).unwrap_or_default();
                if !acl.rules.may_read(topic) {
                    self.forget(&d);
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
            if self.version == Version::V5 && self.client_alias_max > 0 {
                match self.out_aliases.get(&d.msg.topic) {
                    Some(&a) => {
                        publish.alias = Some(a);
                        publish.topic = &[];
                    }
                    None if self.out_aliases.len() < self.client_alias_max as usize => {
                        let a = self.out_aliases.len() as u16 + 1;
                        publish.alias = Some(a);
                        new_alias = Some(a);
                    }
                    None => {}
                }
            }
            if let Some(max) = self.client_max_packet {
                if codec::publish_size(self.version, &publish) > max {
                    // Too large for this client: discarded as if delivered (MQTT 5 3.1.2.25).
                    stats.oversize.fetch_add(1, Ordering::Relaxed);
                    self.forget(&d);
                    continue;
                }
            }
            codec::write_publish(self.version, &publish, &mut self.wbuf);
            if let Some(a) = new_alias {
                self.out_aliases.insert(d.msg.topic.clone(), a);
            }
            stats.messages_sent.fetch_add(1, Ordering::Relaxed);
            if d.qos > 0 {
                self.inflight_out.insert(
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
        Ok(())
    }

    /// Puts a delivery that could not be sent yet back where it came from.
    fn unsend(&mut self, d: Delivery) {
        if d.seq.is_some_and(|s| self.replayed.contains(&s)) {
            self.replay.push_front(d);
        } else {
            self.popped.push_front(d);
        }
    }

    /// Drops a delivery that will not be sent, with its durable entry.
    fn forget(&mut self, d: &Delivery) {
        if let Some(g) = &d.group {
            g.done();
        }
        if let Some(seq) = d.seq {
            self.req.state.push(StateOp::Delete {
                key: queue_key(TAG_QUEUED, &self.client_id, seq),
            });
        }
    }

    /// A packet id for an outbound QoS 1/2 publish. A delivery with a durable entry gets one
    /// derived from its seq, so it is resent with the same id after a restart; `None` while
    /// that id is still in flight.
    fn alloc_pkid(&mut self, seq: Option<u64>) -> Option<u16> {
        if let Some(seq) = seq {
            let p = durable_pkid(seq);
            return (!self.inflight_out.contains_key(&p)).then_some(p);
        }
        loop {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.inflight_out.contains_key(&self.next_pkid) {
                return Some(self.next_pkid);
            }
        }
    }

    /// Hands the session back and publishes the will. Callers box it, as `drain_pending`.
    async fn finish(mut self, conn_id: u64, handover: &Handover) {
        self.report_acks();
        // Whatever is still to be acknowledged by this client stays in the durable queue
        // of a persistent session; the rest of the outbox goes.
        let lost = self.sub.set_online(false)
            + self
                .popped
                .iter()
                .filter(|d| d.seq.is_none() && d.qos > 0)
                .count();
        {
            let mut sent = self.sub.sent.lock().expect("sent lock");
            sent.clear();
            sent.extend(self.inflight_out.values().filter_map(|f| f.seq));
        }
        let hub = &self.broker.hub;
        hub.stats.dropped.fetch_add(lost as u64, Ordering::Relaxed);
        let mut will = self.will.take().filter(|_| self.publish_will);
        if let (Some(acl), Some(w)) = (&mut self.acl, &will) {
            // The will was allowed at CONNECT; an ACL reloaded since then decides now.
            acl.refresh(&self.broker.auth, &self.client_id);
            if !acl
                .rules
                .may_publish(std::str::from_utf8(&w.topic).unwrap_or_default())
            {
                self.broker
                    .auth
                    .stats
                    .publishes_denied
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(client_id = %self.client_id, "the will is no longer allowed by the ACL; not published");
                will = None;
            }
        }
        let expiry = self.session.expiry;
        let data = std::mem::take(&mut self.session);
        let (ops, ended) = self
            .broker
            .sessions
            .detach(&self.client_id, conn_id, data, now_ms());
        if let Some(sub) = ended {
            hub.remove_session(&sub);
        }
        if !ops.is_empty() {
            let _ = self
                .broker
                .appender
                .append(AppendRequest {
                    state: ops,
                    ..Default::default()
                })
                .await;
        }
        handover.end();
        if let Some(will) = will {
            let cfg = &self.broker.config;
            let delay = u64::from(will.delay.min(expiry)).min(cfg.max_will_delay.0.as_secs());
            let broker = self.broker.clone();
            let client_id = self.client_id.clone();
            let admission = (delay > 0).then(|| {
                broker.wills.admit(
                    &client_id,
                    conn_id,
                    super::will::will_bytes(&will),
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
        tracing::debug!(peer = %self.peer, client_id = %self.client_id, "connection ended");
    }
}

/// Writes some of `wbuf`, or flushes the writer when `wbuf` is empty; resolves with the bytes
/// taken (0 for a flush) once the writer makes progress. Nothing is written unless it
/// resolves, so it may be dropped unfinished.
fn write_some<'a, W: AsyncWrite + Unpin>(
    writer: &'a mut W,
    wbuf: &'a [u8],
) -> impl std::future::Future<Output = std::io::Result<usize>> + 'a {
    std::future::poll_fn(move |cx| {
        if wbuf.is_empty() {
            Pin::new(&mut *writer).poll_flush(cx).map_ok(|()| 0)
        } else {
            Pin::new(&mut *writer).poll_write(cx, wbuf)
        }
    })
}

/// Reads into `rbuf`. While the connection is idle (`rbuf` given back), the read goes through
/// a buffer on the stack and `rbuf` takes `chunk` bytes only once bytes have arrived, so a
/// connection waiting for its next packet holds no read buffer.
async fn read_some<R: AsyncRead + Unpin>(
    reader: &mut R,
    rbuf: &mut BytesMut,
    idle: bool,
    chunk: usize,
) -> std::io::Result<usize> {
    if !idle {
        return reader.read_buf(rbuf).await;
    }
    std::future::poll_fn(move |cx| {
        let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK_MIN];
        let mut buf = tokio::io::ReadBuf::uninit(&mut stack);
        std::task::ready!(Pin::new(&mut *reader).poll_read(cx, &mut buf))?;
        let read = buf.filled();
        rbuf.reserve(chunk.max(read.len()));
        rbuf.extend_from_slice(read);
        Poll::Ready(Ok(read.len()))
    })
    .await
}

/// The next commit report; never resolves while there is no channel (nothing was sent).
async fn recv_committed(rx: &mut Option<mpsc::UnboundedReceiver<Committed>>) -> Option<Committed> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The packet id of a delivery with a durable queue entry.
fn durable_pkid(seq: u64) -> u16 {
    (seq % 65_535) as u16 + 1
}

/// The seq at the end of a queue key.
fn seq_of(key: &[u8]) -> Option<u64> {
    let (_, rest) = split_client_key(key)?;
    Some(u64::from_be_bytes(rest.try_into().ok()?))
}

/// Where [`stage_publish`] adds a publish: the request being built and what to do once it
/// is committed.
struct Staging<'a> {
    req: &'a mut AppendRequest,
    retained: &'a mut Vec<(Bytes, Option<Arc<Message>>)>,
    fanouts: &'a mut Fanouts,
}

/// A publish about to be staged.
struct Staged<'a> {
    topic: Bytes,
    qos: u8,
    retain: bool,
    publisher: &'a Arc<str>,
    props: MessageProps,
    payload: Bytes,
    now: u64,
}

/// Adds a publish to an append request: its record, its change to the retained store and
/// the durable queue entries of persistent subscribers. Returns what to deliver once the
/// request is committed. A publish whose fields do not fit the record encoding (the limits
/// checked on entry keep them far below) adds nothing and returns the error.
fn stage_publish(
    hub: &Hub,
    into: Staging<'_>,
    scratch: &mut Vec<Match<super::delivery::SubRef>>,
    targets: &mut Vec<Target>,
    route: (TopicId, u32, &[u8]),
    p: Staged<'_>,
) -> Result<(), RecordTooLarge> {
    let Staging {
        req,
        retained,
        fanouts,
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
    let topic_text = std::str::from_utf8(&p.topic).unwrap_or_default();
    hub.plan(topic_text, p.qos, p.retain, p.publisher, scratch, targets);
    if targets.is_empty() && !p.retain {
        return Ok(());
    }
    let msg = Arc::new(Message {
        topic: p.topic,
        payload: p.payload,
        qos: p.qos,
        retain: p.retain,
        publisher: p.publisher.clone(),
        props: p.props,
        received_ms: p.now,
    });
    if p.retain {
        let key = retained_key(&msg.topic);
        if msg.payload.is_empty() {
            req.state.push(StateOp::Delete { key });
            retained.push((msg.topic.clone(), None));
        } else if let Some(value) = retained_value {
            req.state.push(StateOp::Put { key, value });
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

/// Checks a published topic name.
fn validate_topic<'a>(topic: &'a [u8], cfg: &crate::config::MqttConfig) -> Result<&'a str, Close> {
    let text = std::str::from_utf8(topic)
        .map_err(|_| Close::new(reason::MALFORMED, "topic is not valid UTF-8"))?;
    if text.contains('\0') {
        return Err(Close::new(reason::MALFORMED, "topic contains U+0000"));
    }
    if text.contains(['+', '#']) {
        return Err(Close::new(
            reason::TOPIC_NAME_INVALID,
            format!("topic {text:?} contains a wildcard; wildcards are for subscriptions"),
        ));
    }
    if text.len() > cfg.max_topic_length {
        return Err(Close::refused(
            PacketRefused::TopicLength,
            reason::TOPIC_NAME_INVALID,
            format!(
                "topic is {} bytes, the limit is {}",
                text.len(),
                cfg.max_topic_length
            ),
        ));
    }
    if text.split('/').count() > cfg.max_topic_levels {
        return Err(Close::refused(
            PacketRefused::TopicLevels,
            reason::TOPIC_NAME_INVALID,
            format!("topic has more than {} levels", cfg.max_topic_levels),
        ));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, FsyncMode};
    use crate::log::appender;
    use crate::log::Log;
    use crate::mqtt::delivery::OutboxLimits;
    use crate::mqtt::session::SessionStore;
    use crate::route::Router;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::watch;

    /// 3.1.1 CONNECT of client "c1", clean session, keepalive 60.
    const CONNECT: &[u8] = &[
        0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'c', b'1',
    ];
    /// QoS 1 PUBLISH of "hi" to "t/1", packet id 1.
    const PUBLISH: &[u8] = &[0x32, 9, 0, 3, b't', b'/', b'1', 0, 1, b'h', b'i'];

    /// A broker over a new log in `dir`, as `server::run` builds one (without listeners).
    type Running = (
        Arc<Broker>,
        watch::Sender<bool>,
        std::thread::JoinHandle<Result<(), CommitError>>,
    );

    fn broker(dir: &std::path::Path) -> Running {
        let config = Config::default();
        let plan = config.route_plan().unwrap();
        let log = Arc::new(Log::open(dir, Some(&plan.topics), None).unwrap());
        let hub = Hub::new(OutboxLimits {
            messages: 1000,
            bytes: 1 << 20,
            offline_messages: 1000,
        });
        let (sessions, _) = SessionStore::load(&log, &hub, now_ms()).unwrap();
        let (appender, thread) =
            appender::spawn(log.clone(), FsyncMode::Never, 1000, 64, 1, |_| {});
        let router = Router::new(&plan, |name| {
            let t = log.topic(name).unwrap();
            (t.id, t.partitions.len() as u32)
        });
        let (shutdown_tx, shutdown) = watch::channel(false);
        let broker = Broker {
            config: config.mqtt.clone(),
            router,
            log,
            appender,
            sessions,
            hub,
            append_budget: Arc::new(tokio::sync::Semaphore::new(
                super::super::APPEND_BUDGET_BYTES as usize,
            )),
            connections: AtomicUsize::new(1),
            limits: Default::default(),
            wills: Default::default(),
            shutdown,
            auth: crate::auth::Auth::new(&config.auth, false).unwrap(),
        };
        (Arc::new(broker), shutdown_tx, thread)
    }

    /// A writer whose flush completes only when polled again after it said Pending (having
    /// woken the caller), as a TLS stream's flush completes once its full socket drains.
    struct SlowFlush<W> {
        inner: W,
        ready: bool,
    }

    impl<W: AsyncWrite + Unpin> AsyncWrite for SlowFlush<W> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            if !self.ready {
                self.ready = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.ready = false;
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// What a TLS stream does when the socket is full: the writer takes bytes and holds them
    /// until it is flushed, and the flush itself may have to wait. The connection must see
    /// the flush through, or its peer waits forever.
    #[tokio::test]
    async fn packets_reach_a_writer_that_holds_bytes_until_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, _shutdown, appender_thread) = broker(dir.path());
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let (reader, writer) = tokio::io::split(server);
        let writer = SlowFlush {
            inner: tokio::io::BufWriter::new(writer),
            ready: false,
        };
        let peer = "127.0.0.1:1".parse().unwrap();
        let conn = tokio::spawn(serve(broker.clone(), reader, writer, peer, None));

        let mut got = [0u8; 4];
        client.write_all(CONNECT).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
            .await
            .expect("the CONNACK was flushed")
            .unwrap();
        assert_eq!(got, [0x20, 2, 0, 0]);
        client.write_all(PUBLISH).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
            .await
            .expect("the PUBACK was flushed")
            .unwrap();
        assert_eq!(got, [0x40, 2, 0, 1]);

        drop(client);
        conn.await.unwrap();
        let _ = broker.appender.shutdown().await;
        drop(broker);
        appender_thread.join().unwrap().unwrap();
    }

    /// A 3.1.1 QoS 1 PUBLISH.
    fn publish_packet(topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(&pkid.to_be_bytes());
        body.extend_from_slice(payload);
        let mut packet = vec![0x32];
        let mut len = body.len();
        loop {
            let byte = (len % 128) as u8;
            len /= 128;
            packet.push(if len > 0 { byte | 0x80 } else { byte });
            if len == 0 {
                break;
            }
        }
        packet.extend_from_slice(&body);
        packet
    }

    async fn expect(client: &mut tokio::io::DuplexStream, want: &[u8]) {
        let mut got = vec![0u8; want.len()];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
            .await
            .expect("an answer")
            .unwrap();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn an_idle_read_takes_a_buffer_only_once_bytes_arrive() {
        use std::future::Future;
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let mut rbuf = BytesMut::new();
        let waker = std::task::Waker::noop();
        {
            let read = read_some(&mut server, &mut rbuf, true, 4096);
            tokio::pin!(read);
            assert!(read
                .as_mut()
                .poll(&mut Context::from_waker(waker))
                .is_pending());
        }
        assert_eq!(rbuf.capacity(), 0, "nothing arrived, nothing allocated");
        client.write_all(&[0xc0, 0]).await.unwrap();
        let n = read_some(&mut server, &mut rbuf, true, 4096).await.unwrap();
        assert_eq!(n, 2);
        assert_eq!(&rbuf[..], &[0xc0, 0]);
        assert!(rbuf.capacity() >= 4096, "the read size for what follows");
    }

    /// An idle connection gives its read buffer and commit channel back; a large packet
    /// arriving in pieces afterwards is still read whole, logged and acknowledged, and so is
    /// the next one after the connection idled again.
    #[tokio::test]
    async fn publishes_after_idling_are_read_whole_and_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, _shutdown, appender_thread) = broker(dir.path());
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let (reader, writer) = tokio::io::split(server);
        let peer = "127.0.0.1:1".parse().unwrap();
        let conn = tokio::spawn(serve(broker.clone(), reader, writer, peer, None));

        client.write_all(CONNECT).await.unwrap();
        expect(&mut client, &[0x20, 2, 0, 0]).await;
        let big: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let small = b"after idling again".to_vec();
        for (pkid, payload) in [(7u16, &big), (8, &small)] {
            // A PINGREQ after a quiet spell: the connection is idle after answering it.
            tokio::time::sleep(IDLE_AFTER + Duration::from_millis(100)).await;
            client.write_all(&[0xc0, 0]).await.unwrap();
            expect(&mut client, &[0xd0, 0]).await;
            let packet = publish_packet("t/big", pkid, payload);
            let (a, rest) = packet.split_at(3);
            let (b, c) = rest.split_at(rest.len() / 2);
            for piece in [a, b, c] {
                client.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let [hi, lo] = pkid.to_be_bytes();
            expect(&mut client, &[0x40, 2, hi, lo]).await;
        }

        let d = broker.router.route("t/big", "c1");
        let records = broker.log.read(d.topic, d.partition, 0, 10).unwrap();
        let payloads: Vec<&[u8]> = records.iter().map(|r| &r.payload[..]).collect();
        assert_eq!(payloads, [&big[..], &small[..]]);

        drop(client);
        conn.await.unwrap();
        let _ = broker.appender.shutdown().await;
        drop(broker);
        appender_thread.join().unwrap().unwrap();
    }

    fn future_size<F: FnOnce() -> T, T>(_make: &F) -> usize {
        std::mem::size_of::<T>()
    }

    /// What every idle connection holds for its whole life: its task (the `serve` future),
    /// the boxed `serve_session` future and the `Connection`. Waits that happen once or only
    /// under back-pressure are boxed apart; awaiting one inline again would show here.
    #[test]
    #[allow(unreachable_code, unused_variables, clippy::diverging_sub_expression)]
    fn a_connections_lasting_state_stays_small() {
        use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
        type Tcp = Connection<OwnedReadHalf, OwnedWriteHalf>;
        let serve_size = future_size(&|| {
            let (reader, writer): (OwnedReadHalf, OwnedWriteHalf) = unimplemented!();
            serve(unimplemented!(), reader, writer, unimplemented!(), None)
        });
        let session_size = future_size(&|| {
            let opened: Box<Opened<OwnedReadHalf, OwnedWriteHalf>> = unimplemented!();
            serve_session(opened)
        });
        let connection_size = std::mem::size_of::<Tcp>();
        assert!(serve_size <= 256, "serve future: {serve_size} bytes");
        assert!(
            session_size <= 1280,
            "serve_session future: {session_size} bytes"
        );
        assert!(
            connection_size <= 1152,
            "Connection: {connection_size} bytes"
        );
    }
}
