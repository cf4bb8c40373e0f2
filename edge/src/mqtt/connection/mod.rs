//! One client connection: CONNECT, then the inbound publish path and the outbound
//! deliveries, until the connection ends.
//!
//! Every packet read in one socket read is decoded, routed and encoded into one
//! [`AppendRequest`] sent to the appender; the acknowledgements of that request are written
//! when the appender reports its group commit durable. Requests complete in the order they
//! are sent, so PUBACKs and PUBRECs leave in the order their PUBLISHes arrived.
//!
//! This file runs the loop of a `Connection`, which composes the parts, each in a file of
//! its own that depends on none of the others but `types` and `staging`:
//! - `connect`: from a CONNECT to an open session, or a refusal;
//! - `socket`: the stream, its read and write buffers and their sizing (`Socket`);
//! - `inbound`: the request being built, the requests awaiting their commit and the
//!   acknowledgements they carry (`InboundBatch`);
//! - `outbound`: deliveries within the client's in-flight window, replayed from the durable
//!   queue first (`OutboundWindow`);
//! - `subscribe`: SUBSCRIBE and UNSUBSCRIBE;
//! - `last_will`: the will, published or discarded as the connection ends (`LastWill`);
//! - `staging`: a publish staged into an append request; `types`: what they all share.
//!
//! [`AppendRequest`]: crate::log::appender::AppendRequest

mod connect;
mod inbound;
mod last_will;
mod outbound;
mod socket;
mod staging;
mod subscribe;
#[cfg(test)]
mod tests;
mod types;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::codec::{self, reason, ConnectIn, Inbound, SubscribeIn, Version};
use super::limits::{PublishRate, RateVerdict};
use super::session::{Handover, SessionData};
use super::Broker;
use crate::auth::ConnAcl;
use crate::log::appender::{now_ms, AppendRequest, Committed};
use connect::{Accepted, Opening};
use inbound::InboundBatch;
pub(crate) use last_will::restore as restore_wills;
use last_will::{LastWill, Settled};
use outbound::OutboundWindow;
use socket::Socket;
use types::{Client, Close, Deferred, EndsHandover, FINAL_FLUSH};

/// Reads taken without waiting when a takeover ends a connection (see `read_ready`).
const READ_READY_MAX: usize = 16;

/// Where decoding the buffered bytes stopped.
enum Decoded {
    /// No whole packet is left.
    Drained,
    /// The request being built is large enough to send before decoding on.
    RequestFull,
    /// The client sent DISCONNECT.
    Disconnected,
}

/// Serves one connection to its end: the two halves of a TCP stream, or of a TLS stream
/// over one. `cert_user` is the client's identity from its certificate (mutual TLS).
pub(crate) async fn serve<R, W>(
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
        Box::pin(connect::accept_connect(&broker, reader, writer, peer)).await
    else {
        return;
    };
    let Some(opened) = Box::pin(open(
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

/// From a CONNECT to a connection ready to serve, or to nothing (refused, or abandoned once
/// its session could not be opened).
async fn open<R, W>(
    broker: Arc<Broker>,
    reader: R,
    writer: W,
    rbuf: BytesMut,
    peer: SocketAddr,
    connect: (Box<ConnectIn>, usize),
    cert_user: Option<Arc<str>>,
) -> Option<Box<Opened<R, W>>>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    match connect::open_session(broker, reader, writer, rbuf, peer, connect, cert_user).await {
        Opening::Refused => None,
        Opening::Abandoned(accepted) => {
            Box::pin(abandon(accepted)).await;
            None
        }
        Opening::Open(accepted) => Some(Opened::open(*accepted)),
    }
}

/// A connection with its session open and its CONNACK written, ready to serve.
struct Opened<R, W> {
    conn: Connection<R, W>,
    /// This connection's id in the session store.
    conn_id: u64,
    handover: EndsHandover,
}

impl<R, W> Opened<R, W> {
    /// The connection of an open session, with its CONNACK (and, continuing a durable
    /// session, the PUBRELs it resends) to write.
    fn open(accepted: Accepted<R, W>) -> Box<Opened<R, W>> {
        let resume = accepted.resume;
        let mut opened = Box::new(Opened::new(accepted));
        if resume {
            let conn = &mut opened.conn;
            conn.outbound.resume(&conn.client, &mut conn.socket.wbuf);
            conn.receives = true;
        }
        opened
    }

    /// The connection built from `accepted`, as it is before it resumes anything.
    fn new(accepted: Accepted<R, W>) -> Opened<R, W> {
        let Accepted {
            client,
            reader,
            writer,
            rbuf,
            wbuf,
            session,
            acl,
            keep_alive,
            will,
            will_id,
            username,
            rate,
            receive_limits,
            resume: _,
            conn_id,
            handover,
            at,
        } = accepted;
        Opened {
            conn: Connection {
                client,
                socket: Socket::new(reader, writer, rbuf, wbuf, at),
                keep_alive,
                deadline: at,
                inbound: InboundBatch::new(session.qos2.len()),
                session,
                acl,
                receives: false,
                rate,
                read_publishes: 0,
                paused_until: None,
                outbound: OutboundWindow::new(receive_limits),
                will: LastWill::new(will, will_id, username),
            },
            conn_id,
            handover,
        }
    }
}

/// Hands back a session that was taken over but could not be opened, without its will.
async fn abandon<R, W>(accepted: Box<Accepted<R, W>>)
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let Opened {
        mut conn,
        conn_id,
        handover,
    } = Opened::new(*accepted);
    conn.will.cancel();
    let mut socket = Box::pin(conn.finish(conn_id, &handover.0)).await;
    // Its refusing CONNACK was written: it must not be lost to a reset.
    Box::pin(socket.linger()).await;
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
    let (version, peer, client_id) = (
        conn.client.version,
        conn.client.peer,
        conn.client.client_id.clone(),
    );
    let broker = conn.client.broker.clone();
    let limits = &broker.limits;
    let end = conn.run(&opened.handover.0).await;
    if let Some(kind) = end.as_ref().err().and_then(|c| c.refused) {
        limits.packet_refused(kind);
    }
    if let Err(close) = &end {
        codec::write_disconnect(
            version,
            close.code,
            &close.why,
            conn.client.max_packet as usize,
            &mut conn.socket.wbuf,
        );
        let level_info = close.code != reason::SESSION_TAKEN_OVER;
        if let Some(held_back) = level_info.then(|| limits.log_budget.admit()).flatten() {
            tracing::info!(held_back, %peer, client_id = %client_id, code = format!("{:#04x}", close.code), reason = %close.why, "closing connection");
        }
    }
    if let Err(close) = &end {
        // The edge closes the connection without the client's DISCONNECT: the will is due
        // (MQTT 5 3.1.2.5), and one with a delay waits it out across the restart.
        if close.code == reason::SERVER_SHUTTING_DOWN {
            conn.will.on_shutdown();
        }
    }
    let _ = tokio::time::timeout(FINAL_FLUSH, conn.flush()).await;
    if let Some(delete) = conn.will.discarded_entry(&client_id) {
        // Before the socket closes: a client that saw the close after its DISCONNECT knows
        // that no restart of the edge publishes its will.
        let _ = broker.appender.commit_state(vec![delete]).await;
    }
    let _ = tokio::time::timeout(FINAL_FLUSH, conn.socket.shutdown()).await;
    let Opened {
        conn,
        conn_id,
        handover,
    } = *opened;
    let mut socket = Box::pin(conn.finish(conn_id, &handover.0)).await;
    // The edge ended it, maybe while the client was still sending: the DISCONNECT must not
    // be lost to a reset. (The session is already handed back: a connection taking it over
    // does not wait for this.)
    if end.is_err() {
        Box::pin(socket.linger()).await;
    }
}

/// A client connection with its session open: the socket and its buffers, the session, and
/// the parts that handle what goes in and what comes out.
struct Connection<R, W> {
    client: Client,
    socket: Socket<R, W>,
    keep_alive: Option<Duration>,
    deadline: Instant,
    session: SessionData,
    /// This client's ACL rules, when an ACL file is configured.
    acl: Option<Box<ConnAcl>>,
    /// The session has subscribed (or continues a session): its outbox is watched.
    receives: bool,
    /// The publish rate limit (`max_publish_rate`), if one is set.
    rate: Option<Box<PublishRate>>,
    /// PUBLISH packets decoded from the latest socket read.
    read_publishes: u32,
    /// Over its publish rate: the socket is not read again before this.
    paused_until: Option<Instant>,
    inbound: InboundBatch,
    outbound: OutboundWindow,
    will: LastWill,
}

impl<R, W> Connection<R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    async fn run(&mut self, handover: &Handover) -> Result<(), Close> {
        let mut shutdown = self.client.broker.shutdown.clone();
        let mut buffer_full = self.pump();
        self.try_flush()?;
        self.touch();
        // A client need not wait for the CONNACK: packets it wrote right behind its CONNECT
        // were read with it and wait in the buffer; handle them before reading any more.
        if !self.socket.rbuf.is_empty() {
            let handled = match self.on_bytes().await {
                Ok(None) => self.charge_rate(),
                Ok(Some(end)) => {
                    self.drain_pending().await;
                    return end;
                }
                Err(close) => Err(close),
            };
            if let Err(close) = handled {
                self.drain_pending().await;
                return Err(close);
            }
            buffer_full = self.pump();
            self.inbound.report_counts(&self.client);
            self.try_flush()?;
        }
        // Only a session that receives is checked for being slow (an interval allocates).
        let mut slow_check = None;
        loop {
            if self.receives && slow_check.is_none() {
                let mut every = tokio::time::interval(Duration::from_millis(500));
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                slow_check = Some(every);
            }
            // 3.1.1 has no Receive Maximum: stop reading instead, so memory stays bounded.
            let can_read = (self.inbound.awaiting_commit()
                < self.client.broker.config.receive_maximum as usize
                || self.client.version == Version::V5)
                && self.paused_until.is_none();
            let deadline = self.deadline;
            let paused = self.paused_until;
            // Not while the edge itself holds off reading (publish rate).
            let has_deadline = self.keep_alive.is_some() && self.paused_until.is_none();
            let spare = self.socket.prepare_read();
            let unwritten = self.socket.unwritten();
            // The pump stopped at a full write buffer and the flush wrote it all: deliveries
            // may still wait, and no wake-up would come for them (a publisher's connection
            // wakes this one only when it adds to the outbox, and a full outbox takes nothing).
            let pump_again = buffer_full && !unwritten;
            let (read, write) = self.socket.read_and_write();
            tokio::select! {
                biased;
                Some(done) = self.inbound.committed() => self.on_committed(done)?,
                _ = handover.taken_over() => {
                    self.read_ready().await;
                    self.drain_pending().await;
                    return Err(Close::new(reason::SESSION_TAKEN_OVER, "another connection took this client id"));
                }
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                    self.drain_pending().await;
                    return Err(Close::new(reason::SERVER_SHUTTING_DOWN, "the edge is shutting down"));
                }
                written = write, if unwritten => {
                    match written {
                        Ok(n) => self.socket.wrote(n, &self.client.broker.hub.stats)?,
                        Err(e) => return Err(Close::new(reason::UNSPECIFIED, format!("write failed: {e}"))),
                    }
                }
                read = read, if can_read => {
                    match read {
                        Ok(0) => {
                            self.drain_pending().await;
                            return Ok(());
                        }
                        Ok(n) => {
                            let quiet = self.socket.read_arrived(Instant::now());
                            self.touch();
                            self.client.broker.hub.stats.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
                            // Publishes accepted before the end (or before an offending
                            // packet) are still committed and acknowledged.
                            match self.on_bytes().await {
                                Ok(None) => {
                                    self.socket.adapt_read_buffer(n, spare, quiet);
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
                _ = self.client.sub.notify.notified() => {
                    // Woken by a publisher's connection that just delivered: tokio would run
                    // this task next on that worker, ahead of the other publishers whose
                    // commits completed and whose acknowledgements wait to be written. While
                    // the outbox has room, step aside once, so acknowledgements go out first
                    // and a subscriber does not slow the ingest it reads (tests/bench/fanout:
                    // about 0.78 of ingest alone without this, 0.83 with it). A filling outbox is
                    // written at once: it would drop QoS 0 deliveries.
                    if self.client.sub.has_room(&self.client.broker.hub.limits) {
                        tokio::task::yield_now().await;
                    }
                }
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
                    let limit = self.client.broker.config.slow_subscriber_timeout.0;
                    if self.client.sub.over_for().is_some_and(|d| d >= limit) {
                        self.client.broker.hub.stats.slow_disconnects.fetch_add(1, Ordering::Relaxed);
                        self.drain_pending().await;
                        return Err(Close::new(
                            reason::QUOTA_EXCEEDED,
                            format!(
                                "this subscriber stayed over its queue bound ({} messages / {} bytes) for {limit:?}",
                                self.client.broker.config.max_queued_messages,
                                self.client.broker.config.max_queued_bytes.0
                            ),
                        ));
                    }
                }
                // After the other tasks on this worker had their turn: a subscriber that always
                // has more to write does not hold its worker.
                _ = tokio::task::yield_now(), if pump_again => {}
            }
            buffer_full = self.pump();
            self.inbound.report_counts(&self.client);
            self.try_flush()?;
        }
    }

    /// Before a takeover ends this connection: handles what the client sent and the edge has
    /// not read yet, as far as it can be read without waiting. A client that acknowledged
    /// its last deliveries and went (PUBACK and DISCONNECT in one write, then a new
    /// connection) would otherwise have those acknowledgements lost and the messages sent
    /// again to the session's next connection [MQTT-4.4.0-1]. Bounded: a client that keeps
    /// sending does not hold the takeover up.
    async fn read_ready(&mut self) {
        for _ in 0..READ_READY_MAX {
            self.socket.prepare_read();
            let (read, _) = self.socket.read_and_write();
            // A zero timeout polls the read once: only bytes already there are taken.
            let n = match tokio::time::timeout(Duration::ZERO, read).await {
                Ok(Ok(n)) if n > 0 => n,
                _ => return,
            };
            self.client
                .broker
                .hub
                .stats
                .bytes_received
                .fetch_add(n as u64, Ordering::Relaxed);
            if !matches!(self.on_bytes().await, Ok(None)) {
                return;
            }
        }
    }

    /// Charges the publishes of the latest read to the rate limit: pauses reading while the
    /// client is over its rate, disconnects it once it has stayed over for the grace period.
    fn charge_rate(&mut self) -> Result<(), Close> {
        let publishes = std::mem::take(&mut self.read_publishes);
        let Some(rate) = self.rate.as_mut().filter(|_| publishes > 0) else {
            return Ok(());
        };
        let limits = &self.client.broker.limits;
        match rate.charge(publishes, Instant::now()) {
            RateVerdict::Within => Ok(()),
            RateVerdict::PauseUntil(until) => {
                limits.rate_throttles.fetch_add(1, Ordering::Relaxed);
                self.paused_until = Some(until);
                Ok(())
            }
            RateVerdict::Exceeded => {
                limits.rate_disconnects.fetch_add(1, Ordering::Relaxed);
                let cfg = &self.client.broker.config;
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

    /// Writes (and flushes) what the writer takes without waiting.
    fn try_flush(&mut self) -> Result<(), Close> {
        let stats = &self.client.broker.hub.stats;
        if self.socket.try_flush(stats, !self.inbound.has_pending())? {
            // No request is pending: what only requests on their way need is given back.
            self.inbound.release_when_idle();
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Close> {
        let stats = &self.client.broker.hub.stats;
        if self
            .socket
            .flush(stats, !self.inbound.has_pending())
            .await?
        {
            self.inbound.release_when_idle();
        }
        Ok(())
    }

    fn touch(&mut self) {
        if let Some(ka) = self.keep_alive {
            self.deadline = Instant::now() + ka;
        }
    }

    /// Decodes everything buffered. `Some(end)`: the client ended the connection.
    async fn on_bytes(&mut self) -> Result<Option<Result<(), Close>>, Close> {
        loop {
            let step = self.decode_buffered();
            // Publishes accepted before the end (or before an offending packet) are still
            // committed and acknowledged. Awaited here, with no packet held, so that this
            // wait adds little to the future every connection keeps.
            self.inbound
                .send_request(&self.client, &mut self.session, &mut self.socket.wbuf)
                .await?;
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
        let max_packet = self.client.broker.config.max_packet_size.0 as usize;
        let now = now_ms();
        loop {
            let packet = match codec::decode(self.client.version, &mut self.socket.rbuf, max_packet)
            {
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
                    self.inbound
                        .on_publish(&self.client, &mut self.acl, &self.session, p, now)?;
                }
                Inbound::PubRel(pkid) => {
                    self.inbound
                        .on_pubrel(&self.client.client_id, &self.session, pkid);
                }
                Inbound::PingReq => codec::write_pingresp(&mut self.socket.wbuf),
                Inbound::Subscribe(sub) => self.on_subscribe(sub, now)?,
                Inbound::Unsubscribe(pkid, filters) => self.on_unsubscribe(pkid, filters),
                Inbound::PubAck(pkid) => {
                    self.outbound
                        .on_puback(&self.client.client_id, pkid, self.inbound.state_ops())
                }
                Inbound::PubRec(pkid, code) => self.on_pubrec(pkid, code),
                Inbound::PubComp(pkid) => {
                    self.outbound
                        .on_pubcomp(&self.client.client_id, pkid, self.inbound.state_ops())
                }
                Inbound::Disconnect {
                    reason: code,
                    session_expiry,
                } => {
                    // A normal DISCONNECT discards the will; 0x04 asks for it.
                    self.will.on_disconnect(code);
                    if let Some(e) = session_expiry {
                        if self.session.expiry == 0 && e != 0 {
                            return Err(Close::new(
                                reason::PROTOCOL_ERROR,
                                "DISCONNECT may not set a session expiry when CONNECT had 0",
                            ));
                        }
                        self.session.expiry = e;
                    }
                    tracing::debug!(client_id = %self.client.client_id, code, "client disconnected");
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
            if self.inbound.is_full() {
                return Ok(Decoded::RequestFull);
            }
        }
    }

    fn on_committed(&mut self, done: Committed) -> Result<(), Close> {
        self.inbound
            .on_committed(&self.client, &mut self.session, &mut self.socket.wbuf, done)
    }

    fn on_subscribe(&mut self, s: SubscribeIn, now: u64) -> Result<(), Close> {
        self.receives = true;
        let subscribed = subscribe::on_subscribe(
            &self.client,
            &mut self.acl,
            self.session.durable,
            s,
            now,
            self.inbound.state_ops(),
        )?;
        self.inbound.defer(Deferred::Packet(subscribed.suback));
        if !subscribed.retained.is_empty() {
            self.inbound.defer(Deferred::Deliver(subscribed.retained));
        }
        Ok(())
    }

    fn on_unsubscribe(&mut self, pkid: u16, filters: Vec<String>) {
        let unsuback = subscribe::on_unsubscribe(
            &self.client,
            self.session.durable,
            pkid,
            filters,
            self.inbound.state_ops(),
        );
        self.inbound.defer(Deferred::Packet(unsuback));
    }

    fn on_pubrec(&mut self, pkid: u16, code: u8) {
        let after_commit = self.outbound.on_pubrec(
            &self.client,
            pkid,
            code,
            self.inbound.state_ops(),
            &mut self.socket.wbuf,
        );
        if let Some(pubrel) = after_commit {
            self.inbound.defer(Deferred::Ack(pubrel));
        }
    }

    /// Writes deliveries while the in-flight window and the write buffer have room. True
    /// when it stopped because the write buffer is full.
    fn pump(&mut self) -> bool {
        self.outbound.pump(
            &self.client,
            &mut self.acl,
            &mut self.socket.wbuf,
            self.inbound.state_ops(),
        )
    }

    /// Waits for every request already sent to be committed, writing their acks, so the
    /// session state handed on is exact. Stops early if the log fails.
    /// Boxed: it runs once, when the connection ends; inline it would make every
    /// connection's task larger by its size.
    fn drain_pending(&mut self) -> Pin<Box<impl std::future::Future<Output = ()> + '_>> {
        Box::pin(async move {
            self.inbound
                .drain(&self.client, &mut self.session, &mut self.socket.wbuf)
                .await;
            let _ = tokio::time::timeout(FINAL_FLUSH, self.flush()).await;
        })
    }

    /// Hands the session back and settles the will: what becomes of it is committed (or
    /// queued to the appender) before a connection taking the client id over goes on, so
    /// that its own commit comes after. Returns the socket, to close. Callers box it, as
    /// `drain_pending`.
    async fn finish(mut self, conn_id: u64, handover: &Handover) -> Socket<R, W> {
        self.inbound.report_counts(&self.client);
        let lost = self.outbound.close(&self.client);
        let client = &self.client;
        let hub = &client.broker.hub;
        hub.stats.dropped.fetch_add(lost as u64, Ordering::Relaxed);
        let mut will_ops = Vec::new();
        let settled = self.will.settle(
            client,
            &mut self.acl,
            conn_id,
            self.session.expiry,
            handover.is_taken_over(),
            &mut will_ops,
        );
        let data = std::mem::take(&mut self.session);
        let (mut ops, ended) =
            client
                .broker
                .sessions
                .detach(&client.client_id, conn_id, data, now_ms());
        ops.extend(will_ops);
        if let Some(sub) = ended {
            hub.remove_session(&sub);
        }
        if !ops.is_empty() {
            let _ = client
                .broker
                .appender
                .append(AppendRequest {
                    state: ops,
                    ..Default::default()
                })
                .await;
        }
        match settled {
            Settled::Done => {}
            Settled::PublishNow(will, stored) => {
                last_will::publish_will(&client.broker, &client.client_id, *will, stored).await;
            }
            Settled::Wait(waiting) => {
                last_will::wait_then_publish(&client.broker, &client.client_id, conn_id, waiting);
            }
        }
        handover.end();
        tracing::debug!(peer = %client.peer, client_id = %client.client_id, "connection ended");
        self.socket
    }
}
