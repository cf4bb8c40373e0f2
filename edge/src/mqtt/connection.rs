//! One client connection: CONNECT, then the inbound publish path, until the connection ends.
//!
//! Every packet read in one socket read is decoded, routed and encoded into one
//! [`AppendRequest`] sent to the appender; the acknowledgements of that request are written
//! when the appender reports its group commit durable. Requests complete in the order they
//! are sent, so PUBACKs and PUBRECs leave in the order their PUBLISHes arrived.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::codec::{
    self, reason, AckKind, ConnAckInfo, ConnectIn, Inbound, PublishIn, QoS, Version,
};
use super::session::{qos2_key, qos2_prefix, session_key, session_value, Control, SessionData};
use super::Broker;
use crate::log::appender::{
    now_ms, AppendRequest, AppenderMsg, Committed, PendingRecord, ReplyTo, StateOp,
};
use crate::log::record::NewRecord;
use crate::route::TopicId;

/// A request is sent to the appender once it holds this many bytes, even mid-read.
const MAX_REQUEST_BYTES: usize = 256 * 1024;
/// Routes remembered per connection (devices publish to few topics).
const ROUTE_CACHE_ENTRIES: usize = 64;
/// Read buffer sizing: a connection starts with a small buffer and doubles what it reads at
/// once while reads fill it, so an idle device costs little memory and a busy publisher
/// still reads in large chunks.
const READ_CHUNK_MIN: usize = 1024;
const READ_CHUNK_MAX: usize = 64 * 1024;
/// Write buffers larger than this are released after they are flushed.
const WRITE_BUFFER_KEEP: usize = 64 * 1024;

/// Why the connection is being closed by the edge.
#[derive(Debug)]
struct Close {
    /// 5.0 reason code for DISCONNECT (3.1.1 connections are just closed).
    code: u8,
    why: String,
}

impl Close {
    fn new(code: u8, why: impl Into<String>) -> Close {
        Close {
            code,
            why: why.into(),
        }
    }
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

/// Serves one TCP connection to its end.
pub async fn serve(broker: Arc<Broker>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let (reader, writer) = stream.into_split();
    let mut rbuf = BytesMut::new();
    let mut reader = reader;
    let mut writer = writer;
    let max_packet = broker.config.max_packet_size.0 as usize;
    let connect = tokio::time::timeout(
        broker.config.connect_timeout.0,
        read_connect(&mut reader, &mut rbuf, max_packet),
    )
    .await;
    let connect = match connect {
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT in time; closing");
            return;
        }
        Ok(Err(refusal)) => {
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
                let _ = writer.write_all(&out).await;
            }
            tracing::info!(%peer, reason = %refusal.why, "connection refused");
            let _ = writer.shutdown().await;
            return;
        }
        Ok(Ok(c)) => c,
    };
    let version = connect.version;
    let refuse = |code: u8, why: String| async move {
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
        tracing::info!(%peer, reason = %why, "connection refused");
        out
    };

    let active = broker.connections.load(Ordering::Relaxed);
    if active > broker.config.max_connections {
        let out = refuse(
            reason::SERVER_BUSY,
            format!(
                "the edge holds its maximum of {} connections",
                broker.config.max_connections
            ),
        )
        .await;
        let _ = writer.write_all(&out).await;
        return;
    }

    // Client identifier rules.
    let mut assigned = None;
    let client_id = if connect.client_id.is_empty() {
        if version == Version::V311 && !connect.clean_start {
            let out = refuse(
                reason::CLIENT_ID_NOT_VALID,
                "an empty client id needs clean session".into(),
            )
            .await;
            let _ = writer.write_all(&out).await;
            return;
        }
        let id = format!("auto-{:016x}", rand_id());
        assigned = (version == Version::V5).then(|| id.clone());
        id
    } else {
        connect.client_id.clone()
    };
    if client_id.len() > broker.config.max_client_id_length || client_id.contains('\0') {
        let out = refuse(
            reason::CLIENT_ID_NOT_VALID,
            format!(
                "client id must be 1 to {} bytes without NUL",
                broker.config.max_client_id_length
            ),
        )
        .await;
        let _ = writer.write_all(&out).await;
        return;
    }
    if broker.log.poisoned().is_some() {
        let out = refuse(reason::SERVER_BUSY, "the log is failing".into()).await;
        let _ = writer.write_all(&out).await;
        return;
    }

    // Session: take the client id over, then continue or start a session.
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (done_tx, done_rx) = watch::channel(false);
    let attachment = broker
        .sessions
        .attach(&client_id, control_tx, done_rx)
        .await;
    let mut ops = Vec::new();
    let (mut data, session_present) = match attachment.previous {
        Some(prev) if !connect.clean_start => (prev, true),
        prev => {
            if prev.as_ref().is_some_and(|p| p.durable) {
                ops.push(StateOp::DeletePrefix {
                    prefix: qos2_prefix(&client_id),
                });
                ops.push(StateOp::Delete {
                    key: session_key(&client_id),
                });
            }
            (SessionData::default(), false)
        }
    };
    data.expiry = connect.session_expiry;
    if data.expiry > 0 {
        if !data.durable {
            // Markers so far were kept in memory only; make them durable with the session.
            for &pkid in &data.qos2 {
                ops.push(StateOp::Put {
                    key: qos2_key(&client_id, pkid),
                    value: Vec::new(),
                });
            }
        }
        ops.push(StateOp::Put {
            key: session_key(&client_id),
            value: session_value(data.expiry, 0),
        });
        data.durable = true;
    } else if data.durable {
        ops.push(StateOp::DeletePrefix {
            prefix: qos2_prefix(&client_id),
        });
        ops.push(StateOp::Delete {
            key: session_key(&client_id),
        });
        data.durable = false;
    }
    let client_id: Arc<str> = Arc::from(client_id);
    let (commit_tx, commit_rx) = mpsc::unbounded_channel();
    let mut conn = Connection {
        broker: broker.clone(),
        version,
        client_id: client_id.clone(),
        peer,
        reader,
        writer,
        rbuf,
        read_chunk: READ_CHUNK_MIN,
        wbuf: BytesMut::new(),
        keep_alive: None,
        deadline: Instant::now(),
        inflight: data.qos2.len(),
        awaiting_commit: 0,
        session: data,
        qos2_pending: HashSet::new(),
        pending: VecDeque::new(),
        next_ticket: 1,
        commit_tx,
        commit_rx,
        aliases: Vec::new(),
        req: AppendRequest::default(),
        req_acks: Vec::new(),
        route_cache: HashMap::new(),
        taken_over: false,
    };
    if !ops.is_empty() {
        if let Err(why) = conn.commit_state(ops).await {
            let out = refuse(reason::SERVER_BUSY, why).await;
            let _ = conn.writer.write_all(&out).await;
            conn.finish(attachment.conn, &done_tx).await;
            return;
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
    tracing::debug!(%peer, client_id = %client_id, ?version, session_present, "connected");

    let end = conn.run(control_rx).await;
    if let Err(close) = &end {
        codec::write_disconnect(version, close.code, &close.why, &mut conn.wbuf);
        let level_info = close.code != reason::SESSION_TAKEN_OVER;
        if level_info {
            tracing::info!(%peer, client_id = %client_id, code = format!("{:#04x}", close.code), reason = %close.why, "closing connection");
        }
    }
    let _ = conn.flush().await;
    let _ = conn.writer.shutdown().await;
    conn.finish(attachment.conn, &done_tx).await;
}

struct Refusal {
    /// CONNACK to send before closing, if the protocol is known well enough to answer.
    answer: Option<(Version, u8)>,
    why: String,
}

async fn read_connect(
    reader: &mut OwnedReadHalf,
    rbuf: &mut BytesMut,
    max_packet: usize,
) -> Result<Box<ConnectIn>, Refusal> {
    loop {
        match codec::detect_version(rbuf, max_packet) {
            Ok(Some(version)) => match codec::decode(version, rbuf, max_packet) {
                Ok(Some(Inbound::Connect(c))) => return Ok(c),
                Ok(Some(_)) => unreachable!("detect_version saw a CONNECT"),
                Ok(None) => {}
                Err(e) => {
                    return Err(Refusal {
                        answer: Some((version, reason::MALFORMED)),
                        why: e.to_string(),
                    })
                }
            },
            Ok(None) => {}
            Err(codec::DecodeError::UnsupportedProtocol { name, level }) => {
                let answer = match (name.as_str(), level) {
                    ("MQTT", l) if l > 5 => Some((Version::V5, reason::UNSUPPORTED_PROTOCOL)),
                    ("MQTT" | "MQIsdp", _) => Some((Version::V311, reason::UNSUPPORTED_PROTOCOL)),
                    _ => None,
                };
                return Err(Refusal {
                    answer,
                    why: format!("unsupported protocol {name:?} level {level}"),
                });
            }
            Err(e) => {
                return Err(Refusal {
                    answer: None,
                    why: e.to_string(),
                })
            }
        }
        rbuf.reserve(512);
        match reader.read_buf(rbuf).await {
            Ok(0) | Err(_) => {
                return Err(Refusal {
                    answer: None,
                    why: "closed before CONNECT".into(),
                })
            }
            Ok(_) => {}
        }
    }
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    h.finish()
}

struct Connection {
    broker: Arc<Broker>,
    version: Version,
    client_id: Arc<str>,
    peer: SocketAddr,
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    rbuf: BytesMut,
    /// Bytes reserved for the next read.
    read_chunk: usize,
    wbuf: BytesMut,
    keep_alive: Option<Duration>,
    deadline: Instant,
    session: SessionData,
    /// QoS 2 packet ids sent to the appender whose commit is not yet reported.
    qos2_pending: HashSet<u16>,
    /// QoS 1 and 2 publishes received and not yet fully acknowledged (QoS 2 until PUBCOMP):
    /// what MQTT 5's Receive Maximum counts.
    inflight: usize,
    /// QoS 1 and 2 publishes whose commit is not reported yet: what 3.1.1 read-ahead counts.
    /// A QoS 2 flow past PUBREC only waits for the client's PUBREL, which must still be read.
    awaiting_commit: usize,
    pending: VecDeque<(u64, Vec<PendingAck>)>,
    next_ticket: u64,
    commit_tx: mpsc::UnboundedSender<Committed>,
    commit_rx: mpsc::UnboundedReceiver<Committed>,
    /// 5.0 inbound topic aliases, grown as the client sets them.
    aliases: Vec<Option<Bytes>>,
    req: AppendRequest,
    req_acks: Vec<PendingAck>,
    route_cache: HashMap<Bytes, (TopicId, u32, Bytes)>,
    taken_over: bool,
}

impl Connection {
    async fn run(&mut self, mut control: mpsc::UnboundedReceiver<Control>) -> Result<(), Close> {
        let mut shutdown = self.broker.shutdown.clone();
        self.flush().await?;
        self.touch();
        loop {
            // 3.1.1 has no Receive Maximum: stop reading instead, so memory stays bounded.
            let can_read = self.awaiting_commit < self.broker.config.receive_maximum as usize
                || self.version == Version::V5;
            let deadline = self.deadline;
            let has_deadline = self.keep_alive.is_some();
            let spare = self.prepare_read();
            tokio::select! {
                biased;
                Some(done) = self.commit_rx.recv() => self.on_committed(done)?,
                Some(ctl) = control.recv() => match ctl {
                    Control::TakenOver => {
                        self.taken_over = true;
                        self.drain_pending().await;
                        return Err(Close::new(reason::SESSION_TAKEN_OVER, "another connection took this client id"));
                    }
                },
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                    self.drain_pending().await;
                    return Err(Close::new(reason::SERVER_SHUTTING_DOWN, "the edge is shutting down"));
                }
                read = self.reader.read_buf(&mut self.rbuf), if can_read => {
                    match read {
                        Ok(0) => {
                            self.drain_pending().await;
                            return Ok(());
                        }
                        Ok(n) => {
                            self.touch();
                            // Publishes accepted before the end (or before an offending
                            // packet) are still committed and acknowledged.
                            match self.on_bytes().await {
                                Ok(None) => self.adapt_read_buffer(n, spare),
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
                _ = tokio::time::sleep_until(deadline), if has_deadline => {
                    return Err(Close::new(reason::KEEP_ALIVE_TIMEOUT, "no packet within 1.5 times the keepalive"));
                }
            }
            self.flush().await?;
        }
    }

    fn touch(&mut self) {
        if let Some(ka) = self.keep_alive {
            self.deadline = Instant::now() + ka;
        }
    }

    async fn flush(&mut self) -> Result<(), Close> {
        if !self.wbuf.is_empty() {
            self.writer
                .write_all(&self.wbuf)
                .await
                .map_err(|e| Close::new(reason::UNSPECIFIED, format!("write failed: {e}")))?;
            if self.wbuf.capacity() > WRITE_BUFFER_KEEP {
                self.wbuf = BytesMut::new();
            } else {
                self.wbuf.clear();
            }
        }
        Ok(())
    }

    /// Makes room for the next read; returns the spare capacity offered to it.
    fn prepare_read(&mut self) -> usize {
        if self.rbuf.capacity() - self.rbuf.len() < self.read_chunk / 2 {
            self.rbuf.reserve(self.read_chunk);
        }
        self.rbuf.capacity() - self.rbuf.len()
    }

    /// Grows the read size while reads fill the buffer; after a small read that left nothing
    /// buffered, goes back to the minimum and gives a large buffer back.
    fn adapt_read_buffer(&mut self, read: usize, offered: usize) {
        if read >= offered {
            self.read_chunk = (self.read_chunk * 2).min(READ_CHUNK_MAX);
        } else if read < READ_CHUNK_MIN / 2 && self.rbuf.is_empty() {
            self.read_chunk = READ_CHUNK_MIN;
            if self.rbuf.capacity() > 4 * READ_CHUNK_MIN {
                self.rbuf = BytesMut::new();
            }
        }
    }

    /// Decodes everything buffered. `Some(end)`: the client ended the connection.
    async fn on_bytes(&mut self) -> Result<Option<Result<(), Close>>, Close> {
        let max_packet = self.broker.config.max_packet_size.0 as usize;
        let now = now_ms();
        loop {
            let packet = match codec::decode(self.version, &mut self.rbuf, max_packet) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(codec::DecodeError::TooLarge(n)) => {
                    self.send_request().await?;
                    return Err(Close::new(
                        reason::PACKET_TOO_LARGE,
                        format!("packet of {n} bytes exceeds the maximum of {max_packet}"),
                    ));
                }
                Err(e) => {
                    self.send_request().await?;
                    return Err(Close::new(reason::MALFORMED, e.to_string()));
                }
            };
            match packet {
                Inbound::Publish(p) => {
                    if let Err(close) = self.on_publish(p, now) {
                        // What was accepted before the offending packet is still logged.
                        self.send_request().await?;
                        return Err(close);
                    }
                }
                Inbound::PubRel(pkid) => self.on_pubrel(pkid),
                Inbound::PingReq => codec::write_pingresp(&mut self.wbuf),
                Inbound::Subscribe(pkid, n) => {
                    codec::write_suback_refused(self.version, pkid, n, &mut self.wbuf)
                }
                Inbound::Unsubscribe(pkid, n) => {
                    codec::write_unsuback(self.version, pkid, n, &mut self.wbuf)
                }
                // No outbound QoS flows exist yet, so there is nothing to match these to.
                Inbound::PubAck(_) | Inbound::PubRec(_) | Inbound::PubComp(_) => {}
                Inbound::Disconnect {
                    reason: code,
                    session_expiry,
                } => {
                    self.send_request().await?;
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
                    return Ok(Some(Ok(())));
                }
                Inbound::Connect(_) => {
                    self.send_request().await?;
                    return Err(Close::new(
                        reason::PROTOCOL_ERROR,
                        "a second CONNECT on one connection",
                    ));
                }
                Inbound::Auth => {
                    self.send_request().await?;
                    return Err(Close::new(
                        reason::PROTOCOL_ERROR,
                        "AUTH without an authentication method",
                    ));
                }
                Inbound::ServerOnly(name) => {
                    self.send_request().await?;
                    return Err(Close::new(
                        reason::PROTOCOL_ERROR,
                        format!("{name} is sent by servers only"),
                    ));
                }
            }
            if self.req.buf.len() >= MAX_REQUEST_BYTES {
                self.send_request().await?;
            }
        }
        self.send_request().await?;
        Ok(None)
    }

    fn on_publish(&mut self, p: PublishIn, now: u64) -> Result<(), Close> {
        let cfg = &self.broker.config;
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
        // A topic in the route cache was validated when it was routed.
        let (topic_id, partition, key) = match self.route_cache.get(&topic) {
            Some(hit) => hit.clone(),
            None => {
                let text = validate_topic(&topic, cfg)?;
                let d = self.broker.router.route(text, &self.client_id);
                if self.route_cache.len() >= ROUTE_CACHE_ENTRIES {
                    self.route_cache.clear();
                }
                let route = (d.topic, d.partition, Bytes::from(d.key));
                self.route_cache.insert(topic.clone(), route.clone());
                route
            }
        };

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
                self.req_acks.push(PendingAck {
                    kind: AckKind::PubRec,
                    pkid: p.pkid,
                    code: reason::SUCCESS,
                    logged: false,
                });
                return Ok(());
            }
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
            let kind = match p.qos {
                QoS::AtMostOnce => return Ok(()),
                QoS::AtLeastOnce => AckKind::PubAck,
                QoS::ExactlyOnce => AckKind::PubRec,
            };
            self.req_acks.push(PendingAck {
                kind,
                pkid: p.pkid,
                code: reason::QUOTA_EXCEEDED,
                logged: false,
            });
            return Ok(());
        }

        let start = self.req.buf.len();
        NewRecord {
            timestamp_ms: now,
            key: &key,
            mqtt_topic: &topic,
            qos: p.qos as u8,
            retain: p.retain,
            client_id: &self.client_id,
            content_type: p.content_type.as_deref(),
            user_properties: &p.user_properties,
            payload: &p.payload,
        }
        .encode_into(&mut self.req.buf);
        self.req.records.push(PendingRecord {
            topic: topic_id,
            partition,
            start: start as u32,
            len: (self.req.buf.len() - start) as u32,
            timestamp_ms: now,
        });
        if p.qos != QoS::AtMostOnce {
            self.awaiting_commit += 1;
        }
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.req_acks.push(PendingAck {
                kind: AckKind::PubAck,
                pkid: p.pkid,
                code: reason::SUCCESS,
                logged: true,
            }),
            QoS::ExactlyOnce => {
                if self.session.durable {
                    self.req.state.push(StateOp::Put {
                        key: qos2_key(&self.client_id, p.pkid),
                        value: Vec::new(),
                    });
                }
                self.qos2_pending.insert(p.pkid);
                self.req_acks.push(PendingAck {
                    kind: AckKind::PubRec,
                    pkid: p.pkid,
                    code: reason::SUCCESS,
                    logged: true,
                });
            }
        }
        Ok(())
    }

    fn on_pubrel(&mut self, pkid: u16) {
        let known = self.session.qos2.contains(&pkid) || self.qos2_pending.contains(&pkid);
        if known && self.session.durable {
            self.req.state.push(StateOp::Delete {
                key: qos2_key(&self.client_id, pkid),
            });
        }
        self.req_acks.push(PendingAck {
            kind: AckKind::PubComp,
            pkid,
            code: if known {
                reason::SUCCESS
            } else {
                reason::PACKET_ID_NOT_FOUND
            },
            logged: false,
        });
    }

    /// Sends the request being built to the appender (or, when it holds only acks and nothing
    /// is pending, answers them at once).
    async fn send_request(&mut self) -> Result<(), Close> {
        let acks = std::mem::take(&mut self.req_acks);
        let has_data = !self.req.records.is_empty() || !self.req.state.is_empty();
        if !has_data {
            if acks.is_empty() {
                return Ok(());
            }
            if self.pending.is_empty() {
                for ack in acks {
                    self.apply_ack(ack);
                }
                return Ok(());
            }
        }
        let mut req = std::mem::take(&mut self.req);
        // A request larger than the whole budget takes all of it, so it still goes through.
        let budget = &self.broker.append_budget;
        let want = (req.buf.len().max(1) as u32).min(super::APPEND_BUDGET_BYTES);
        req.permit = Some(
            budget
                .clone()
                .acquire_many_owned(want)
                .await
                .map_err(|_| Close::new(reason::SERVER_SHUTTING_DOWN, "the log is closed"))?,
        );
        if !acks.is_empty() || !req.state.is_empty() {
            let ticket = self.next_ticket;
            self.next_ticket += 1;
            req.reply = Some(ReplyTo {
                tx: self.commit_tx.clone(),
                ticket,
            });
            self.pending.push_back((ticket, acks));
        }
        self.broker
            .appender
            .send(AppenderMsg::Append(req))
            .await
            .map_err(|_| Close::new(reason::SERVER_SHUTTING_DOWN, "the log is closed"))
    }

    fn on_committed(&mut self, done: Committed) -> Result<(), Close> {
        let Some((ticket, acks)) = self.pending.pop_front() else {
            return Ok(());
        };
        debug_assert_eq!(
            ticket, done.ticket,
            "the appender completes requests in order"
        );
        if let Err(why) = done.outcome {
            return Err(Close::new(
                reason::IMPLEMENTATION_SPECIFIC,
                format!("the log failed: {why}"),
            ));
        }
        for ack in acks {
            self.apply_ack(ack);
        }
        Ok(())
    }

    fn apply_ack(&mut self, ack: PendingAck) {
        codec::write_ack(self.version, ack.kind, ack.pkid, ack.code, &mut self.wbuf);
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
        }
    }

    /// Waits for every request already sent to be committed, writing their acks, so the
    /// session state handed on is exact. Stops early if the log fails.
    async fn drain_pending(&mut self) {
        let _ = self.send_request().await;
        while !self.pending.is_empty() {
            match self.commit_rx.recv().await {
                Some(done) => {
                    if self.on_committed(done).is_err() {
                        break;
                    }
                }
                None => break,
            }
        }
        let _ = self.flush().await;
    }

    /// Commits state changes and waits until they are durable.
    async fn commit_state(&mut self, ops: Vec<StateOp>) -> Result<(), String> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let req = AppendRequest {
            state: ops,
            reply: Some(ReplyTo { tx, ticket: 0 }),
            ..Default::default()
        };
        self.broker
            .appender
            .send(AppenderMsg::Append(req))
            .await
            .map_err(|_| "the log is closed".to_string())?;
        match rx.recv().await {
            Some(done) => done.outcome,
            None => Err("the log is closed".into()),
        }
    }

    async fn finish(mut self, conn_id: u64, done: &watch::Sender<bool>) {
        let data = std::mem::take(&mut self.session);
        let ops =
            self.broker
                .sessions
                .detach(&self.client_id, conn_id, data, self.taken_over, now_ms());
        if !ops.is_empty() {
            let _ = self
                .broker
                .appender
                .send(AppenderMsg::Append(AppendRequest {
                    state: ops,
                    ..Default::default()
                }))
                .await;
        }
        let _ = done.send(true);
        tracing::debug!(peer = %self.peer, client_id = %self.client_id, "connection ended");
    }
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
        return Err(Close::new(
            reason::TOPIC_NAME_INVALID,
            format!(
                "topic is {} bytes, the limit is {}",
                text.len(),
                cfg.max_topic_length
            ),
        ));
    }
    if text.split('/').count() > cfg.max_topic_levels {
        return Err(Close::new(
            reason::TOPIC_NAME_INVALID,
            format!("topic has more than {} levels", cfg.max_topic_levels),
        ));
    }
    Ok(text)
}
