//! From a socket to an open session: the CONNECT read within `connect_timeout`, the client
//! checked (client id rules, will, authentication, session ownership, limits), the client id
//! taken over and its session continued or started, and the CONNACK. What comes out is an
//! [`Opening`]: the parts the connection is built from, or why there is none.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::socket::linger;
use super::types::{validate_topic, Client, EndsHandover, ReceiveLimits, FINAL_FLUSH};
use crate::auth::{ConnAcl, LoginRefusal};
use crate::log::appender::now_ms;
use crate::log::meta::StoredWill;
use crate::mqtt::codec::{self, reason, ConnAckInfo, ConnectIn, Inbound, Version, WillIn};
use crate::mqtt::delivery::{subscribe_op, Subscriber};
use crate::mqtt::limits::{
    check_message_props, Limits, PacketRefused, PublishRate, Refused, CONNECT_BUFFER_BUDGET,
};
use crate::mqtt::session::{purge_ops, qos2_marker_op, session_put_op, Handover, SessionData};
use crate::mqtt::will;
use crate::mqtt::Broker;

/// Reads the CONNECT within `connect_timeout`; refuses (and closes) a connection whose
/// CONNECT is missing, malformed or too large.
pub(super) async fn accept_connect<R, W>(
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
            let mut out = BytesMut::new();
            if let Some((version, code)) = refusal.answer {
                codec::write_connack(
                    version,
                    &ConnAckInfo {
                        reason: code,
                        ..Default::default()
                    },
                    usize::MAX,
                    &mut out,
                );
            }
            if refusal.kind.is_none() {
                tracing::debug!(%peer, reason = %refusal.why, "connection ended");
            } else if let Some(held_back) = limits.log_budget.admit() {
                tracing::info!(%peer, reason = %refusal.why, held_back, "connection refused");
            }
            match refusal.answer {
                Some(_) => send_final(&mut reader, &mut writer, &out).await,
                // Nothing to hear (bytes that are no CONNECT): closed at once.
                None => {
                    let _ = tokio::time::timeout(FINAL_FLUSH, writer.shutdown()).await;
                }
            }
            return None;
        }
        Ok(Ok(c)) => c,
    };
    let (connect, held) = connect;
    Some((reader, writer, rbuf, connect, held))
}

/// What the connection is built from: a client whose session is open.
pub(super) struct Accepted<R, W> {
    pub(super) client: Client,
    pub(super) reader: R,
    pub(super) writer: W,
    /// Bytes read past the CONNECT.
    pub(super) rbuf: BytesMut,
    /// The CONNACK, not yet written (empty for an abandoned session).
    pub(super) wbuf: BytesMut,
    pub(super) session: SessionData,
    /// This client's ACL rules, when an ACL file is configured.
    pub(super) acl: Option<Box<ConnAcl>>,
    /// 1.5 times the keepalive, if there is one.
    pub(super) keep_alive: Option<Duration>,
    pub(super) will: Option<WillIn>,
    /// The id of the will's stored entry.
    pub(super) will_id: Option<u64>,
    /// The user the client logged in as.
    pub(super) username: Option<Arc<str>>,
    /// The publish rate limit (`max_publish_rate`), if one is set.
    pub(super) rate: Option<Box<PublishRate>>,
    pub(super) receive_limits: ReceiveLimits,
    /// The session continues a durable one: what it had in flight and queued is resent.
    pub(super) resume: bool,
    /// This connection's id in the session store.
    pub(super) conn_id: u64,
    pub(super) handover: EndsHandover,
    /// When the session was attached: the connection's clocks start here.
    pub(super) at: Instant,
}

/// How a CONNECT ended.
pub(super) enum Opening<R, W> {
    /// Refused before the session was touched (the socket is closed).
    Refused,
    /// The session is open and the CONNACK in `wbuf`.
    Open(Box<Accepted<R, W>>),
    /// The client id was taken over, but its session state could not be committed: the
    /// refusing CONNACK was sent, and the session must be handed back, without the will.
    Abandoned(Box<Accepted<R, W>>),
}

/// From a CONNECT to an open session (or a refusal): checks the client, authenticates it,
/// takes the client id over and continues or starts its session.
pub(super) async fn open_session<R, W>(
    broker: Arc<Broker>,
    mut reader: R,
    mut writer: W,
    rbuf: BytesMut,
    peer: SocketAddr,
    (connect, connect_held): (Box<ConnectIn>, usize),
    cert_user: Option<Arc<str>>,
) -> Opening<R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let limits = &broker.limits;
    // The CONNECT's bytes stay counted against the node's CONNECT budget until the login is
    // decided: a flood of large CONNECTs waiting for password checks is bounded too.
    let connect_share = limits.connect_buffer_held(CONNECT_BUFFER_BUDGET, connect_held);
    let version = connect.version;
    let client_max_packet = connect.max_packet_size.unwrap_or(u32::MAX) as usize;
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
            client_max_packet,
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
        send_final(&mut reader, &mut writer, &out).await;
        return Opening::Refused;
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
            send_final(&mut reader, &mut writer, &out).await;
            return Opening::Refused;
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
        send_final(&mut reader, &mut writer, &out).await;
        return Opening::Refused;
    }
    // Enhanced authentication (MQTT 5 4.12) is not supported: a client asking for it is
    // refused (MQTT-4.12.0-1), never let in on a login it did not choose.
    if let Some(method) = &connect.auth_method {
        let out = refuse(
            Refused::NotAuthorized,
            reason::BAD_AUTHENTICATION_METHOD,
            format!(
                "enhanced authentication is not supported (Authentication Method {method:?}): \
                 connect without one, with a user name and password or a client certificate"
            ),
        )
        .await;
        send_final(&mut reader, &mut writer, &out).await;
        return Opening::Refused;
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
                send_final(&mut reader, &mut writer, &out).await;
            }
            return Opening::Refused;
        }
    }
    // The will as it is stored with the session (checked here, before anything is taken over).
    let will_batch = match connect
        .will
        .as_ref()
        .map(|w| will::encode_batch(&client_id, w, now_ms()))
    {
        None => None,
        Some(Ok(batch)) => Some(batch),
        Some(Err(why)) => {
            limits.packet_refused(PacketRefused::Will);
            let out = refuse(
                Refused::Malformed,
                reason::PACKET_TOO_LARGE,
                format!("will: {why}"),
            )
            .await;
            if version == Version::V5 {
                send_final(&mut reader, &mut writer, &out).await;
            }
            return Opening::Refused;
        }
    };
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
        send_final(&mut reader, &mut writer, &out).await;
        return Opening::Refused;
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
        send_final(&mut reader, &mut writer, &out).await;
        return Opening::Refused;
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
            send_final(&mut reader, &mut writer, &out).await;
            return Opening::Refused;
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
        send_final(&mut reader, &mut writer, &out).await;
        return Opening::Refused;
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
            send_final(&mut reader, &mut writer, &out).await;
            return Opening::Refused;
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
            send_final(&mut reader, &mut writer, &out).await;
            return Opening::Refused;
        }
    }
    if broker.log.poisoned().is_some() {
        let out = refuse(
            Refused::Unavailable,
            reason::SERVER_BUSY,
            "the log is failing".into(),
        )
        .await;
        send_final(&mut reader, &mut writer, &out).await;
        return Opening::Refused;
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
        send_final(&mut reader, &mut writer, &out).await;
        return Opening::Refused;
    }

    // Session: take the client id over, then continue or start a session.
    let handover = EndsHandover(Arc::new(Handover::default()));
    let attachment = broker
        .sessions
        .attach(&client_id, username.clone(), handover.0.clone())
        .await;
    let mut ops = Vec::new();
    // A will waiting out its delay is not due once a new connection holds the session: its
    // entry goes in this connection's commit.
    if let Some(id) = broker.wills.cancel(&client_id) {
        ops.push(will::delete_op(&client_id, id));
    }
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
                ops.push(qos2_marker_op(&client_id, pkid));
            }
            for (filter, opts) in hub.subscriptions_of(&sub) {
                ops.push(subscribe_op(&client_id, &filter, &opts));
            }
        }
        ops.push(session_put_op(
            &client_id,
            data.expiry,
            0,
            data.owner.as_deref(),
        ));
        data.durable = true;
    } else if data.durable && session_present {
        // Resumed with Session Expiry 0 (or none, as many clients send): the session goes on
        // as it was stored, queue included, and ends when this connection closes
        // (MQTT 5 3.1.2.11.2); `detach` purges it then. Its record says expiry 0 meanwhile,
        // so a restart discards it as it would have ended with the connection.
        ops.push(session_put_op(&client_id, 0, 0, data.owner.as_deref()));
    } else if data.durable {
        ops.extend(purge_ops(&client_id));
        data.durable = false;
    }
    // The will is stored with the session, durable before the CONNACK (last: after any
    // purge of the session's earlier state).
    let mut will_id = None;
    if let (Some(w), Some(batch)) = (&connect.will, &will_batch) {
        let id = broker.wills.next_will_id();
        let delay = will::effective_delay(w.delay, data.expiry, broker.config.max_will_delay.0);
        let stored = StoredWill {
            disconnected_at_ms: 0,
            delay_secs: delay,
            user: username.as_deref(),
            batch,
        };
        if let Some(op) = will::put_op(&client_id, id, &stored) {
            ops.push(op);
            will_id = Some(id);
        }
    }
    sub.set_durable(data.durable);
    broker.sessions.set_subscriber(
        &client_id,
        attachment.conn,
        sub.clone(),
        data.expiry,
        data.owner.clone(),
    );
    let lost = sub.set_online(true);
    hub.stats.dropped.fetch_add(lost as u64, Ordering::Relaxed);
    let mut accepted = Box::new(Accepted {
        client: Client {
            broker: broker.clone(),
            version,
            client_id: client_id.clone(),
            peer,
            sub,
            problem_info: connect.request_problem_info,
            max_packet: connect.max_packet_size.unwrap_or(u32::MAX),
        },
        reader,
        writer,
        rbuf,
        wbuf: BytesMut::new(),
        session: data,
        acl: acl.map(Box::new),
        keep_alive: None,
        will: connect.will.clone(),
        will_id: None,
        username: username.clone(),
        rate: publish_rate(&broker.config).map(Box::new),
        receive_limits: ReceiveLimits {
            inflight: connect
                .receive_maximum
                .min(broker.config.max_inflight_messages) as usize,
            max_packet: connect.max_packet_size.map(|m| m as usize),
            topic_alias_maximum: connect.topic_alias_maximum,
        },
        resume: false,
        conn_id: attachment.conn,
        handover,
        at: Instant::now(),
    });
    if !ops.is_empty() {
        // Boxed: it runs once; inline it would make this future larger by its size.
        if let Err(why) = Box::pin(broker.appender.commit_state(ops)).await {
            let out = refuse(Refused::Unavailable, reason::SERVER_BUSY, why.to_string()).await;
            // Lingering waits until the session is handed back (`abandon`).
            write_final(&mut accepted.writer, &out).await;
            return Opening::Abandoned(accepted);
        }
    }
    accepted.will_id = will_id;

    // Keepalive: the client's value, capped by the configured maximum (announced to 5.0).
    let max_ka = broker.config.max_keepalive.0.as_secs() as u16;
    let mut server_keep_alive = None;
    let mut keep_alive = connect.keep_alive;
    if max_ka > 0 && version == Version::V5 && (keep_alive == 0 || keep_alive > max_ka) {
        keep_alive = max_ka;
        server_keep_alive = Some(max_ka);
    }
    accepted.keep_alive =
        (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
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
    codec::write_connack(
        version,
        &info,
        accepted.client.max_packet as usize,
        &mut accepted.wbuf,
    );
    tracing::debug!(%peer, client_id = %client_id, username = username.as_deref(), ?version, session_present, "connected");
    accepted.resume = session_present && accepted.session.durable;
    Opening::Open(accepted)
}

/// Writes a last packet (a refusing CONNACK), shuts the writing half down and lingers (see
/// [`linger`]), so that the packet reaches a client that sent more after its CONNECT.
async fn send_final<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    reader: &mut R,
    writer: &mut W,
    out: &[u8],
) {
    write_final(writer, out).await;
    linger(reader).await;
}

/// Writes a last packet and shuts the writing half down (over TLS, with a close_notify),
/// within `FINAL_FLUSH`.
async fn write_final<W: AsyncWrite + Unpin>(writer: &mut W, out: &[u8]) {
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
                // 3.1.1 has no return code for a malformed CONNECT: the connection is
                // closed without a CONNACK ([MQTT-3.1.4-1], [MQTT-3.2.2-6] of 3.1.1).
                Err(e) => {
                    return Err(Refusal::malformed(
                        (version == Version::V5).then_some((version, reason::MALFORMED)),
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
