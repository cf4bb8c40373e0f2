//! The lightweight driver: a device of normal mode played over a TcpStream with rumqttc's
//! codec ([`crate::wire`]) instead of rumqttc's event loop, so that a fleet of idle or slow
//! devices fits in memory.
//!
//! rumqttc's event loop costs about 31 KiB per connection even when idle (a 10 KiB read buffer,
//! in-flight tables, a request channel), so 100,000 idle devices would need about 3 GiB. Here a
//! device is one task owning its socket; its read and write buffers start empty, grow only while
//! bytes are in them and are released as soon as they are empty again. It waits on socket
//! readiness, not on a read into a buffer, so an idle device holds no buffer at all.
//!
//! It plays the same device as [`crate::device`]: same payloads and schedule, same [`Ledger`],
//! latency recording and counters, keep-alive (PINGREQ when nothing was written for a keep-alive
//! interval; no PINGRESP within another interval drops the connection), QoS 0, 1 (PUBACK) and
//! 2 (PUBREC, PUBREL, PUBCOMP) with at most `inflight` unacknowledged publishes, scenario events
//! and reconnects with backoff. Differences from the rumqttc driver:
//!
//! - plain TCP only: `mqtts://` brokers are refused (TLS state per connection would cost more
//!   than the rest of the device; use the rumqttc driver for them);
//! - messages queued but not yet written survive a reconnect and are written after it, whatever
//!   the session; written but unacknowledged ones are resent (with DUP) only when the broker
//!   resumes the session, as rumqttc does;
//! - it can bind each socket to one of several local addresses (`--source-ips`), because one
//!   source address gives only ~28,000 ephemeral ports towards one broker address.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rand::rngs::SmallRng;
use rand::RngExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{broadcast, watch};
use tokio::time::{sleep_until, Instant};

use crate::broker::SessionKind;
use crate::device::{
    advance_tick, next_message, DeviceStart, FleetContext, INITIAL_BACKOFF, MAX_BACKOFF,
};
use crate::ledger::{Ledger, Outcome};
use crate::payload::Telemetry;
use crate::plan::{ClassPlan, DeviceIdentity, FleetAction};
use crate::stats::{bump, FleetStats};
use crate::wire::{self, ConnectFields, Frame};

/// Fixed header flag of a PUBLISH sent again.
const DUP: u8 = 0x08;

/// A PUBLISH written and not yet finished.
struct InFlight {
    pkid: u16,
    /// Kept for a resend until PUBACK / PUBREC; `None` while a QoS 2 exchange waits for PUBCOMP.
    payload: Option<Bytes>,
}

/// Why a connected session ended.
enum Ended {
    /// The socket failed or the broker misbehaved.
    Lost(String),
    /// A scenario event dropped the connection, maybe for a while.
    Dropped(Option<Duration>),
    /// The device stopped: DISCONNECT written or the drain time is over.
    Finished,
}

/// One device's state across connections.
struct Device<'a> {
    ctx: &'a FleetContext,
    class: &'a ClassPlan,
    identity: &'a DeviceIdentity,
    ledger: &'a mut Ledger,
    rng: SmallRng,
    telemetry: Telemetry,
    /// Payloads handed to the device and not yet written, oldest first.
    queued: VecDeque<Bytes>,
    inflight: Vec<InFlight>,
    last_pkid: u16,
    stopping: bool,
    drain_deadline: Option<Instant>,
    commands_open: bool,
}

impl Device<'_> {
    fn stats(&self) -> &FleetStats {
        &self.ctx.stats
    }

    fn publish(&mut self) {
        if self.ledger.queued_len() >= self.ctx.max_queue {
            bump(&self.stats().skipped);
            return;
        }
        let (body, created_us) = next_message(
            self.ctx,
            self.class,
            self.identity,
            self.ledger.next_seq(),
            &mut self.telemetry,
            &mut self.rng,
        );
        self.ledger.queue(created_us);
        self.queued.push_back(Bytes::from(body));
    }

    fn stop(&mut self) {
        if !self.stopping {
            self.stopping = true;
            self.drain_deadline = Some(Instant::now() + self.ctx.drain);
        }
    }

    fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.checked_add(1).unwrap_or(1);
            let id = self.last_pkid;
            if !self.inflight.iter().any(|f| f.pkid == id) {
                return id;
            }
        }
    }

    /// Encodes queued messages while the in-flight window has room.
    fn write_queued(&mut self, window: usize, out: &mut BytesMut) -> Result<(), String> {
        let protocol = self.ctx.settings.protocol;
        let qos = self.class.qos;
        while !self.queued.is_empty() && (qos == 0 || self.inflight.len() < window) {
            let payload = self.queued.pop_front().expect("checked non-empty");
            let pkid = if qos > 0 { self.next_pkid() } else { 0 };
            wire::write_publish(
                protocol,
                &self.identity.topic,
                qos,
                pkid,
                payload.clone(),
                out,
            )?;
            match self.ledger.written(pkid) {
                Outcome::Sent => bump(&self.stats().sent),
                _ => {
                    bump(&self.stats().errors);
                    self.stats()
                        .note_error("a PUBLISH was written that the simulator cannot match");
                }
            }
            if qos > 0 {
                self.inflight.push(InFlight {
                    pkid,
                    payload: Some(payload),
                });
            }
        }
        Ok(())
    }

    /// Acts on one packet from the broker; `Err` ends the connection.
    fn absorb(&mut self, frame: Frame, out: &mut BytesMut) -> Result<(), String> {
        let protocol = self.ctx.settings.protocol;
        match frame {
            Frame::Ack { pkid, refused } => {
                let Some(at) = self
                    .inflight
                    .iter()
                    .position(|f| f.pkid == pkid && f.payload.is_some())
                else {
                    bump(&self.stats().errors);
                    self.stats()
                        .note_error("acknowledgement for an unknown packet id");
                    return Ok(());
                };
                if self.class.qos == 2 && !refused {
                    self.inflight[at].payload = None;
                    wire::write_pubrel(protocol, pkid, out);
                } else {
                    self.inflight.swap_remove(at);
                }
                match self.ledger.acked(pkid, refused, self.ctx.clock.now_us()) {
                    Outcome::Acked { latency_us } => {
                        bump(&self.stats().acked);
                        self.stats().record_latencies(&[latency_us]);
                    }
                    Outcome::Refused => {
                        bump(&self.stats().refused);
                        self.stats()
                            .note_error("refused by the broker: PUBACK/PUBREC reason >= 0x80");
                    }
                    _ => {
                        bump(&self.stats().errors);
                        self.stats()
                            .note_error("acknowledgement for an unknown packet id");
                    }
                }
            }
            Frame::PubComp { pkid } => {
                self.inflight
                    .retain(|f| f.pkid != pkid || f.payload.is_some());
                self.ledger.completed(pkid);
            }
            Frame::Disconnect => return Err("the broker sent DISCONNECT".into()),
            _ => {}
        }
        Ok(())
    }

    /// Plays the scenario events that arrived while the device had no connection (they are
    /// read only while connected): bursts are skipped, as the rumqttc driver skips them, and an
    /// offline event sends the device away again; returns how long.
    fn missed_commands(&mut self, commands: &mut broadcast::Receiver<usize>) -> Option<Duration> {
        let mut offline = None;
        loop {
            match commands.try_recv() {
                Ok(i) => {
                    let event = &self.ctx.events[i];
                    if !event.selects(self.identity.index, self.identity.class, i as u64) {
                        continue;
                    }
                    match event.action {
                        FleetAction::Burst(n) => {
                            self.stats()
                                .skipped
                                .fetch_add(u64::from(n), Ordering::Relaxed);
                        }
                        FleetAction::Offline(d) => offline = Some(d),
                        // Already disconnected: the reconnect has happened.
                        FleetAction::ReconnectStorm => {}
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(broadcast::error::TryRecvError::Empty) => return offline,
                Err(broadcast::error::TryRecvError::Closed) => {
                    self.commands_open = false;
                    return offline;
                }
            }
        }
    }

    /// Connection lost: what is in flight is resent only if the broker resumes the session.
    fn connection_lost(&mut self) {
        let resend = self
            .inflight
            .iter()
            .filter(|f| f.payload.is_some())
            .map(|f| f.pkid)
            .collect();
        self.ledger.connection_lost(resend);
    }

    /// CONNACK arrived: resends what a resumed session still expects, or forgets it.
    fn connected(&mut self, session_present: bool, out: &mut BytesMut) -> Result<(), String> {
        // Queued messages stay with this driver, so the ledger never reports any as dropped.
        let _ = self.ledger.connected(session_present);
        if !session_present {
            self.inflight.clear();
            return Ok(());
        }
        let protocol = self.ctx.settings.protocol;
        for flight in &self.inflight {
            match &flight.payload {
                Some(payload) => {
                    let at = out.len();
                    wire::write_publish(
                        protocol,
                        &self.identity.topic,
                        self.class.qos,
                        flight.pkid,
                        payload.clone(),
                        out,
                    )?;
                    out[at] |= DUP;
                    if self.ledger.written(flight.pkid) == Outcome::Unmatched {
                        bump(&self.ctx.stats.errors);
                    }
                }
                None => wire::write_pubrel(protocol, flight.pkid, out),
            }
        }
        Ok(())
    }
}

/// A fresh connection and what its CONNACK said.
struct Opened {
    stream: TcpStream,
    session_present: bool,
    receive_max: Option<u16>,
}

async fn open(
    ctx: &FleetContext,
    identity: &DeviceIdentity,
    class: &ClassPlan,
) -> Result<Opened, String> {
    let settings = &ctx.settings;
    let address: SocketAddr = tokio::net::lookup_host(settings.url.socket_address())
        .await
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("the broker host has no address")?;
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {e}"))?;
    if !ctx.source_ips.is_empty() {
        let source: IpAddr = ctx.source_ips[identity.index as usize % ctx.source_ips.len()];
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(|e| format!("bind {source}: {e}"))?;
    }
    let mut stream = socket.connect(address).await.map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut out = BytesMut::new();
    let persistent = class.session == SessionKind::Persistent;
    wire::write_connect_with(
        settings.protocol,
        ConnectFields {
            client_id: &identity.client_id,
            credentials: settings.credentials.as_ref(),
            keep_alive_secs: u16::try_from(settings.keep_alive.as_secs()).unwrap_or(u16::MAX),
            clean: !persistent,
            session_expiry_secs: persistent
                .then(|| u32::try_from(settings.session_expiry.as_secs()).unwrap_or(u32::MAX)),
        },
        &mut out,
    )?;
    stream.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut input = BytesMut::with_capacity(64);
    loop {
        if let Some(frame) = wire::read(settings.protocol, &mut input)? {
            return match frame {
                Frame::ConnAck {
                    refused: None,
                    session_present,
                    receive_max,
                } => Ok(Opened {
                    stream,
                    session_present,
                    receive_max,
                }),
                Frame::ConnAck {
                    refused: Some(reason),
                    ..
                } => Err(format!("connection refused: {reason}")),
                other => Err(format!("expected CONNACK, got {other:?}")),
            };
        }
        stream.readable().await.map_err(|e| e.to_string())?;
        match stream.try_read_buf(&mut input) {
            Ok(0) => return Err("the broker closed the connection before CONNACK".into()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Plays one device until it stops; the lightweight counterpart of the rumqttc driver.
pub(crate) async fn drive(
    identity: &DeviceIdentity,
    class: &ClassPlan,
    ctx: &FleetContext,
    ledger: &mut Ledger,
    commands: &mut broadcast::Receiver<usize>,
    stop: &mut watch::Receiver<bool>,
) {
    let DeviceStart {
        rng,
        telemetry,
        interval,
        mut next_tick,
    } = DeviceStart::new(ctx, class, identity);
    let mut device = Device {
        ctx,
        class,
        identity,
        ledger,
        rng,
        telemetry,
        queued: VecDeque::new(),
        inflight: Vec::new(),
        last_pkid: 0,
        stopping: false,
        drain_deadline: None,
        commands_open: true,
    };
    let stats = &ctx.stats;
    let mut backoff = INITIAL_BACKOFF;
    let mut offline_until: Option<Instant> = None;

    while !device.stopping {
        if let Some(until) = offline_until.take() {
            tokio::select! {
                _ = sleep_until(until) => {}
                _ = stop.changed() => break,
            }
            next_tick = Instant::now() + interval;
        }
        let permit = tokio::select! {
            acquired = ctx.connect_gate.clone().acquire_owned() => acquired.ok(),
            _ = stop.changed() => break,
        };
        let opened = tokio::select! {
            opened = tokio::time::timeout(ctx.settings.connect_timeout, open(ctx, identity, class)) => {
                opened.unwrap_or_else(|_| Err(format!("no CONNACK within {:?}", ctx.settings.connect_timeout)))
            }
            _ = stop.changed() => break,
        };
        drop(permit);
        let opened = match opened {
            Ok(opened) => opened,
            Err(error) => {
                bump(&stats.connect_failures);
                stats.note_error(&format!(
                    "connect to {}: {error}",
                    ctx.settings.url.original
                ));
                let wait = backoff.mul_f64(device.rng.random_range(0.5..1.0));
                backoff = (backoff * 2).min(MAX_BACKOFF);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => break,
                }
                continue;
            }
        };
        backoff = INITIAL_BACKOFF;
        if let Some(offline) = device.missed_commands(commands) {
            // The new connection closes unused: the device went offline while connecting.
            drop(opened);
            offline_until = Some(Instant::now() + offline);
            continue;
        }
        stats.connected.fetch_add(1, Ordering::Relaxed);
        bump(&stats.connects);
        next_tick = next_tick.max(Instant::now());
        let ended = session(
            &mut device,
            opened,
            &mut next_tick,
            interval,
            commands,
            stop,
        )
        .await;
        stats.connected.fetch_sub(1, Ordering::Relaxed);
        match ended {
            Ended::Lost(error) => {
                bump(&stats.disconnects);
                stats.note_error(&format!("connection lost: {error}"));
                device.connection_lost();
            }
            Ended::Dropped(offline) => {
                device.connection_lost();
                offline_until = offline.map(|d| Instant::now() + d);
            }
            Ended::Finished => break,
        }
    }
}

/// Runs one connection until it ends.
async fn session(
    device: &mut Device<'_>,
    opened: Opened,
    next_tick: &mut Instant,
    interval: Duration,
    commands: &mut broadcast::Receiver<usize>,
    stop: &mut watch::Receiver<bool>,
) -> Ended {
    let ctx = device.ctx;
    let protocol = ctx.settings.protocol;
    let keep_alive = ctx.settings.keep_alive;
    let mut stream = opened.stream;
    // The broker's Receive Maximum caps the window; exceeding it is a protocol error.
    let window = usize::from(
        opened
            .receive_max
            .map_or(device.class.inflight, |max| max.min(device.class.inflight))
            .max(1),
    );
    let mut input = BytesMut::new();
    let mut out = BytesMut::new();
    if let Err(e) = device.connected(opened.session_present, &mut out) {
        return Ended::Lost(e);
    }
    let mut last_write = Instant::now();
    let mut ping_sent_at: Option<Instant> = None;
    let mut disconnect_sent = false;

    loop {
        if let Err(e) = device.write_queued(window, &mut out) {
            return Ended::Lost(e);
        }
        if device.stopping && device.ledger.is_settled() && !disconnect_sent {
            wire::write_disconnect(protocol, &mut out);
            disconnect_sent = true;
        }
        if !out.is_empty() {
            if let Err(e) = stream.write_all(&out).await {
                return Ended::Lost(format!("write: {e}"));
            }
            // Released rather than cleared: most devices write a few bytes now and then.
            out = BytesMut::new();
            last_write = Instant::now();
        }
        if disconnect_sent {
            let _ = stream.shutdown().await;
            return Ended::Finished;
        }
        let keep_alive_due = match ping_sent_at {
            Some(at) => at + keep_alive,
            None => last_write + keep_alive,
        };
        tokio::select! {
            biased;
            ready = stream.readable() => {
                if let Err(e) = ready {
                    return Ended::Lost(format!("read: {e}"));
                }
                loop {
                    input.reserve(256);
                    match stream.try_read_buf(&mut input) {
                        Ok(0) => return Ended::Lost("the broker closed the connection".into()),
                        Ok(_) => continue,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => return Ended::Lost(format!("read: {e}")),
                    }
                }
                loop {
                    match wire::read(protocol, &mut input) {
                        Ok(Some(Frame::PingResp)) => ping_sent_at = None,
                        Ok(Some(frame)) => {
                            if let Err(e) = device.absorb(frame, &mut out) {
                                return Ended::Lost(e);
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return Ended::Lost(format!("malformed packet: {e}")),
                    }
                }
                if input.is_empty() {
                    input = BytesMut::new();
                }
            }
            _ = sleep_until(device.drain_deadline.unwrap_or(*next_tick)), if device.drain_deadline.is_some() => {
                wire::write_disconnect(protocol, &mut out);
                let _ = stream.write_all(&out).await;
                return Ended::Finished;
            }
            _ = stop.changed(), if !device.stopping => device.stop(),
            command = commands.recv(), if device.commands_open => match command {
                Ok(i) => {
                    let event = &ctx.events[i];
                    if event.selects(device.identity.index, device.identity.class, i as u64) {
                        match event.action {
                            FleetAction::ReconnectStorm => return Ended::Dropped(None),
                            FleetAction::Offline(d) => return Ended::Dropped(Some(d)),
                            FleetAction::Burst(n) if !device.stopping => {
                                for _ in 0..n {
                                    device.publish();
                                }
                            }
                            FleetAction::Burst(n) => {
                                ctx.stats.skipped.fetch_add(u64::from(n), Ordering::Relaxed);
                            }
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => device.commands_open = false,
            },
            _ = sleep_until(*next_tick), if !device.stopping => {
                if device.class.count.is_some_and(|count| device.ledger.next_seq() >= count) {
                    device.stop();
                    continue;
                }
                device.publish();
                *next_tick = advance_tick(*next_tick, interval, device.class.jitter, &mut device.rng);
            }
            _ = sleep_until(keep_alive_due), if !keep_alive.is_zero() => {
                if ping_sent_at.is_some() {
                    return Ended::Lost(format!("no PINGRESP within {keep_alive:?}"));
                }
                wire::write_pingreq(protocol, &mut out);
                ping_sent_at = Some(Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio::sync::Semaphore;

    use super::*;
    use crate::broker::{BrokerUrl, ConnectSettings, Protocol};
    use crate::device::run_device;
    use crate::manifest::DeviceRecord;
    use crate::payload::{PayloadKind, RunId};
    use crate::plan::{ClassDefaults, FleetPlan};
    use crate::stats::{Clock, FleetStats};
    use crate::wire::AckKind;

    /// How long a test may take before it counts as hung.
    const TEST_LIMIT: Duration = Duration::from_secs(20);

    struct Fleet {
        ctx: Arc<FleetContext>,
        identity: DeviceIdentity,
        stop: watch::Sender<bool>,
    }

    fn fleet(
        port: u16,
        protocol: Protocol,
        keep_alive: Duration,
        change: impl FnOnce(&mut ClassDefaults),
    ) -> Fleet {
        let mut defaults = ClassDefaults {
            devices: 1,
            rate: 100.0,
            jitter: 0.0,
            qos: 1,
            payload: PayloadKind::Json,
            size: None,
            topic: "sensors/{device}/t".into(),
            device_id: "dev-{n}".into(),
            client_id: "sim-{device}".into(),
            session: SessionKind::Clean,
            inflight: 16,
            count: None,
        };
        change(&mut defaults);
        let plan = FleetPlan::from_options(RunId(7), &defaults, None).unwrap();
        let identity = plan.devices().next().unwrap();
        let settings = ConnectSettings {
            url: BrokerUrl::parse("--broker", &format!("mqtt://127.0.0.1:{port}")).unwrap(),
            tls: None,
            protocol,
            credentials: None,
            keep_alive,
            connect_timeout: Duration::from_secs(5),
            session_expiry: Duration::from_secs(60),
        };
        let ctx = Arc::new(FleetContext {
            settings,
            classes: plan.classes.clone(),
            events: plan.events.clone(),
            stats: Arc::new(FleetStats::default()),
            clock: Clock::start(),
            run: plan.run,
            connect_gate: Arc::new(Semaphore::new(1)),
            max_queue: 1000,
            drain: Duration::from_secs(5),
            lightweight: true,
            source_ips: Vec::new(),
        });
        let (stop, _) = watch::channel(false);
        Fleet {
            ctx,
            identity,
            stop,
        }
    }

    fn start(fleet: &Fleet) -> tokio::task::JoinHandle<DeviceRecord> {
        let (commands, _) = broadcast::channel(4);
        tokio::spawn(run_device(
            fleet.identity.clone(),
            Instant::now(),
            fleet.ctx.clone(),
            commands.subscribe(),
            fleet.stop.subscribe(),
        ))
    }

    /// One client connection as the test broker sees it.
    struct Peer {
        stream: TcpStream,
        input: BytesMut,
        protocol: Protocol,
    }

    impl Peer {
        /// Accepts a connection and answers its CONNECT.
        async fn accept(listener: &TcpListener, protocol: Protocol, session_present: bool) -> Peer {
            let (stream, _) = listener.accept().await.unwrap();
            let mut peer = Peer {
                stream,
                input: BytesMut::new(),
                protocol,
            };
            assert!(matches!(peer.next().await, Some(Frame::Connect { .. })));
            let mut out = BytesMut::new();
            wire::write_connack_with(protocol, session_present, &mut out);
            peer.send(&out).await;
            peer
        }

        /// The next packet, `None` at end of stream.
        async fn next(&mut self) -> Option<Frame> {
            loop {
                if let Some(frame) = wire::read(self.protocol, &mut self.input).unwrap() {
                    return Some(frame);
                }
                if self.stream.read_buf(&mut self.input).await.ok()? == 0 {
                    return None;
                }
            }
        }

        /// Whether the next buffered packet is a PUBLISH with the DUP flag.
        async fn next_is_dup_publish(&mut self) -> bool {
            while self.input.is_empty() {
                assert_ne!(self.stream.read_buf(&mut self.input).await.unwrap(), 0);
            }
            self.input[0] & 0xF8 == 0x30 | DUP
        }

        async fn send(&mut self, bytes: &[u8]) {
            self.stream.write_all(bytes).await.unwrap();
        }

        async fn ack(&mut self, kind: AckKind, pkid: u16) {
            let mut out = BytesMut::new();
            wire::write_ack(self.protocol, kind, pkid, &mut out);
            self.send(&out).await;
        }
    }

    #[tokio::test]
    async fn qos2_publishes_complete_through_pubrec_pubrel_pubcomp() {
        for protocol in [Protocol::V311, Protocol::V5] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let fleet = fleet(port, protocol, Duration::from_secs(30), |d| {
                d.qos = 2;
                d.count = Some(3);
            });
            let device = start(&fleet);
            let mut peer = Peer::accept(&listener, protocol, false).await;
            let (mut published, mut released) = (Vec::new(), Vec::new());
            let broker = async {
                while let Some(frame) = peer.next().await {
                    match frame {
                        Frame::Publish { qos: 2, pkid, .. } => {
                            published.push(pkid);
                            peer.ack(AckKind::PubRec, pkid).await;
                        }
                        Frame::PubRel { pkid } => {
                            released.push(pkid);
                            peer.ack(AckKind::PubComp, pkid).await;
                        }
                        Frame::Disconnect => break,
                        other => panic!("unexpected {other:?}"),
                    }
                }
            };
            tokio::time::timeout(TEST_LIMIT, broker).await.unwrap();
            let record = tokio::time::timeout(TEST_LIMIT, device)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(published.len(), 3, "{protocol:?}");
            assert_eq!(published, released, "{protocol:?}");
            assert_eq!(
                (record.sent.len(), record.acked.len()),
                (3, 3),
                "{protocol:?}"
            );
            assert_eq!(fleet.ctx.stats.errors.load(Ordering::Relaxed), 0);
        }
    }

    #[tokio::test]
    async fn idle_device_pings_every_keep_alive_interval() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let fleet = fleet(port, Protocol::V5, Duration::from_secs(1), |d| {
            d.rate = 0.0001;
        });
        let device = start(&fleet);
        let mut peer = Peer::accept(&listener, Protocol::V5, false).await;
        let mut pings = 0;
        let broker = async {
            while let Some(frame) = peer.next().await {
                match frame {
                    Frame::PingReq => {
                        pings += 1;
                        let mut out = BytesMut::new();
                        wire::write_pingresp(Protocol::V5, &mut out);
                        peer.send(&out).await;
                        if pings == 2 {
                            fleet.stop.send(true).unwrap();
                        }
                    }
                    Frame::Publish { pkid, .. } => peer.ack(AckKind::PubAck, pkid).await,
                    Frame::Disconnect => break,
                    other => panic!("unexpected {other:?}"),
                }
            }
        };
        tokio::time::timeout(TEST_LIMIT, broker).await.unwrap();
        tokio::time::timeout(TEST_LIMIT, device)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(pings, 2);
        assert_eq!(fleet.ctx.stats.disconnects.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn unanswered_ping_drops_the_connection_and_reconnects() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let fleet = fleet(port, Protocol::V311, Duration::from_secs(1), |d| {
            d.rate = 0.0001;
        });
        let device = start(&fleet);
        let mut silent = Peer::accept(&listener, Protocol::V311, false).await;
        let ignore_pings = async {
            while let Some(frame) = silent.next().await {
                assert!(
                    matches!(frame, Frame::PingReq | Frame::Publish { .. }),
                    "{frame:?}"
                );
            }
        };
        let second = async {
            let peer = Peer::accept(&listener, Protocol::V311, false).await;
            // Stopping before the device has read the CONNACK would end the attempt uncounted.
            while fleet.ctx.stats.connects.load(Ordering::Relaxed) < 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            fleet.stop.send(true).unwrap();
            peer
        };
        let (_, mut peer) =
            tokio::time::timeout(TEST_LIMIT, async { tokio::join!(ignore_pings, second) })
                .await
                .unwrap();
        tokio::time::timeout(TEST_LIMIT, async { while peer.next().await.is_some() {} })
            .await
            .unwrap();
        tokio::time::timeout(TEST_LIMIT, device)
            .await
            .unwrap()
            .unwrap();
        let stats = &fleet.ctx.stats;
        assert_eq!(stats.disconnects.load(Ordering::Relaxed), 1);
        assert_eq!(stats.connects.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn unacknowledged_publish_is_resent_with_dup_when_the_session_resumes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let fleet = fleet(port, Protocol::V5, Duration::from_secs(30), |d| {
            d.session = SessionKind::Persistent;
            d.count = Some(1);
        });
        let device = start(&fleet);
        let exchange = async {
            let mut first = Peer::accept(&listener, Protocol::V5, false).await;
            let Some(Frame::Publish { pkid, .. }) = first.next().await else {
                panic!("expected PUBLISH");
            };
            drop(first);
            let mut second = Peer::accept(&listener, Protocol::V5, true).await;
            assert!(second.next_is_dup_publish().await);
            let Some(Frame::Publish { pkid: resent, .. }) = second.next().await else {
                panic!("expected PUBLISH");
            };
            assert_eq!(resent, pkid);
            second.ack(AckKind::PubAck, pkid).await;
            assert_eq!(second.next().await, Some(Frame::Disconnect));
        };
        tokio::time::timeout(TEST_LIMIT, exchange).await.unwrap();
        let record = tokio::time::timeout(TEST_LIMIT, device)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((record.sent.len(), record.acked.len()), (1, 1));
        assert_eq!(fleet.ctx.stats.sent.load(Ordering::Relaxed), 1);
        assert_eq!(fleet.ctx.stats.errors.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn inflight_window_holds_publishes_until_acknowledged() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let fleet = fleet(port, Protocol::V5, Duration::from_secs(30), |d| {
            d.rate = 1000.0;
            d.inflight = 2;
            d.count = Some(5);
        });
        let device = start(&fleet);
        let mut peer = Peer::accept(&listener, Protocol::V5, false).await;
        let mut outstanding = Vec::new();
        let mut most_outstanding = 0;
        let broker = async {
            loop {
                match tokio::time::timeout(Duration::from_millis(300), peer.next()).await {
                    Ok(Some(Frame::Publish { pkid, .. })) => {
                        outstanding.push(pkid);
                        most_outstanding = most_outstanding.max(outstanding.len());
                    }
                    Ok(Some(Frame::Disconnect)) | Ok(None) => break,
                    Ok(Some(other)) => panic!("unexpected {other:?}"),
                    // The device waits for acknowledgements: release the window.
                    Err(_) => {
                        for pkid in std::mem::take(&mut outstanding) {
                            peer.ack(AckKind::PubAck, pkid).await;
                        }
                    }
                }
            }
        };
        tokio::time::timeout(TEST_LIMIT, broker).await.unwrap();
        let record = tokio::time::timeout(TEST_LIMIT, device)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(most_outstanding, 2);
        assert_eq!((record.sent.len(), record.acked.len()), (5, 5));
    }
}
