//! `firmware-sim subscribe`: a counting subscriber for benchmarks and tests.
//!
//! It connects over plain TCP, subscribes to its filters, checks the SUBACK, then reads
//! PUBLISH packets as fast as the broker sends them and counts them, acknowledging QoS 1 with
//! PUBACK and QoS 2 with PUBREC, then PUBCOMP on PUBREL. CONNECT, SUBSCRIBE and the
//! acknowledgements are encoded with the simulator's codec ([`wire`], rumqttc's); the receive
//! path is [`scan`], which decodes only the fixed header, the remaining length and, for QoS 1
//! and 2, the packet id to acknowledge (plus the topic and property lengths, to count payload
//! bytes): rumqttc's decoder allocates a topic and a payload per message, which costs more
//! than the counting itself at a million messages a second.
//!
//! The one connection is a blocking socket read in a thread of its own, into one buffer that
//! grows only for a packet larger than itself; the clocks (duration, idle time-out, keep-alive)
//! are looked at after every read, and at least every [`READ_TICK`].
//!
//! # Ending and the summary line
//!
//! Reading stops when `--duration` has passed since the SUBACK, when `--count` messages have
//! arrived, when nothing arrived for `--idle-timeout`, or when the broker closes the
//! connection. One line on stdout sums it up:
//!
//! `received=N rate=R/s bytes=B dup=D disconnect_reason=0x97|none elapsed=S closed=yes|no
//! ended=duration|count|idle|closed`
//!
//! `rate` counts the messages after the first read that held any, over the time from that read
//! to the last one that held any; `bytes` are payload bytes; `dup` counts PUBLISH packets with
//! the DUP flag; `disconnect_reason` is the reason code of an MQTT 5 DISCONNECT from the broker
//! (`0x00` for a 3.1.1 one, which brokers do not send); `elapsed` is seconds from the SUBACK to
//! the end; `closed` tells whether the broker closed the connection.
//!
//! # A deliberately slow subscriber
//!
//! With `--no-read` the subscriber never reads the socket after the SUBACK until `--duration`
//! has passed (it still sends PINGREQs if it has a keep-alive), so the broker's queue for it
//! fills. Then it reads what the socket holds for at most `--idle-timeout` to learn whether the
//! broker closed the connection meanwhile: a broker that gave up on it has its last bytes, then
//! the close, waiting behind the data the socket held. A DISCONNECT the broker wrote last is
//! seen only if it got into the socket; behind a full socket it usually does not. The counts
//! and the rate in its summary are those of that final read.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use serde::Serialize;

use crate::broker::{BrokerUrl, Protocol};
use crate::error::SimError;
use crate::wire::{self, AckKind, ConnectFields, Frame};

/// Longest a blocking read waits before the loop looks at its clocks again.
const READ_TICK: Duration = Duration::from_millis(50);
/// Size of the receive buffer: about 11,000 PUBLISH packets of 64-byte payloads per read.
const READ_BUFFER: usize = 1 << 20;
/// Free space below which the unread tail moves to the front of the buffer before a read.
const READ_MIN_SPACE: usize = 64 * 1024;
/// Longest a write (acknowledgements, PINGREQ) may block before the broker is taken as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest remaining length MQTT can express.
const MAX_REMAINING: usize = 268_435_455;
/// Packet id of the SUBSCRIBE.
const SUBSCRIBE_PKID: u16 = 1;

/// What `subscribe` does.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// The broker (`mqtt://` only).
    pub url: BrokerUrl,
    /// MQTT version.
    pub protocol: Protocol,
    /// Optional user name and password.
    pub credentials: Option<(String, String)>,
    /// Client id.
    pub client_id: String,
    /// Topic filters, all subscribed with `qos`.
    pub filters: Vec<String>,
    /// Requested QoS: 0, 1 or 2.
    pub qos: u8,
    /// Keep-alive asked for in the CONNECT (PINGREQ every half of it); zero turns it off.
    pub keep_alive: Duration,
    /// Time allowed for TCP, CONNACK and SUBACK.
    pub connect_timeout: Duration,
    /// Stop this long after the SUBACK.
    pub duration: Option<Duration>,
    /// Stop after this many messages.
    pub count: Option<u64>,
    /// Stop when nothing arrived for this long; with `no_read`, the longest read at the end.
    pub idle_timeout: Duration,
    /// Do not read the socket until `duration` has passed.
    pub no_read: bool,
    /// Write the report as JSON here.
    pub report_path: Option<PathBuf>,
}

impl SubscribeOptions {
    /// Checks what the command line cannot.
    pub fn validate(&self) -> Result<(), SimError> {
        if self.url.tls {
            return Err(SimError::invalid(
                "--broker",
                format!(
                    "{}: subscribe speaks plain TCP only; use an mqtt:// URL",
                    self.url.original
                ),
            ));
        }
        if self.filters.is_empty() {
            return Err(SimError::invalid(
                "--filter",
                "give at least one topic filter, e.g. --filter 'sensors/#'",
            ));
        }
        if self.qos > 2 {
            return Err(SimError::invalid(
                "--qos",
                format!("must be 0, 1 or 2 (got {})", self.qos),
            ));
        }
        if self.keep_alive.as_secs() > u64::from(u16::MAX) {
            return Err(SimError::invalid(
                "--keep-alive",
                format!("at most {}s (got {:?})", u16::MAX, self.keep_alive),
            ));
        }
        if self.no_read && self.duration.is_none() {
            return Err(SimError::invalid(
                "--no-read",
                "needs --duration: how long to leave the socket unread",
            ));
        }
        if self.count == Some(0) {
            return Err(SimError::invalid("--count", "must be at least 1"));
        }
        Ok(())
    }
}

/// Why reading stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ended {
    /// `--duration` passed.
    Duration,
    /// `--count` messages arrived.
    Count,
    /// Nothing arrived for `--idle-timeout`.
    Idle,
    /// The broker closed the connection.
    Closed,
}

impl Ended {
    fn name(self) -> &'static str {
        match self {
            Ended::Duration => "duration",
            Ended::Count => "count",
            Ended::Idle => "idle",
            Ended::Closed => "closed",
        }
    }
}

/// What a subscriber saw.
#[derive(Debug, Clone, Serialize)]
pub struct SubscribeReport {
    /// Broker URL.
    pub broker: String,
    /// `3.1.1` or `5`.
    pub protocol: Protocol,
    /// Client id.
    pub client_id: String,
    /// Topic filters.
    pub filters: Vec<String>,
    /// Requested QoS.
    pub qos: u8,
    /// SUBACK return codes, one per filter (granted QoS, or a refusal >= 0x80).
    pub granted: Vec<u8>,
    /// Whether the socket was left unread until the duration passed.
    pub no_read: bool,
    /// PUBLISH packets received.
    pub received: u64,
    /// Of those, by QoS (0, 1, 2).
    pub received_by_qos: [u64; 3],
    /// Payload bytes received.
    pub bytes: u64,
    /// PUBLISH packets with the DUP flag.
    pub dup: u64,
    /// Messages per second from the first to the last message.
    pub rate_per_s: f64,
    /// Seconds from the first to the last message.
    pub first_to_last_seconds: f64,
    /// Seconds from the SUBACK to the end.
    pub elapsed_seconds: f64,
    /// Reason code of a DISCONNECT from the broker.
    pub disconnect_reason: Option<u8>,
    /// Whether the broker closed the connection.
    pub closed_by_broker: bool,
    /// Why reading stopped.
    pub ended: Ended,
    /// CPU time (user + system) the subscriber used, to show how far it was from being the
    /// bottleneck.
    pub cpu_seconds: f64,
}

impl SubscribeReport {
    /// The one-line summary printed on stdout.
    pub fn summary_line(&self) -> String {
        let reason = match self.disconnect_reason {
            Some(code) => format!("{code:#04x}"),
            None => "none".to_string(),
        };
        format!(
            "received={} rate={:.0}/s bytes={} dup={} disconnect_reason={reason} elapsed={:.3} closed={} ended={}",
            self.received,
            self.rate_per_s,
            self.bytes,
            self.dup,
            self.elapsed_seconds,
            if self.closed_by_broker { "yes" } else { "no" },
            self.ended.name(),
        )
    }
}

/// What [`scan`] has counted so far.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// PUBLISH packets.
    pub publishes: u64,
    /// PUBLISH packets by QoS.
    pub by_qos: [u64; 3],
    /// Payload bytes.
    pub payload_bytes: u64,
    /// PUBLISH packets with the DUP flag.
    pub dup: u64,
    /// PUBREL packets (each answered with PUBCOMP).
    pub pubrels: u64,
    /// Return codes of the SUBACK with the subscriber's packet id, once it arrived.
    pub suback: Option<Vec<u8>>,
    /// Reason code of a DISCONNECT from the broker, once it arrived.
    pub disconnect: Option<u8>,
}

/// The remaining length at the front of `buf`: `Ok(None)` until all its bytes are there,
/// else the length and how many bytes encode it.
fn variable_int(buf: &[u8]) -> Result<Option<(usize, usize)>, String> {
    let mut value = 0usize;
    for (i, &byte) in buf.iter().enumerate().take(4) {
        value |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= 4 {
        Err("malformed variable byte integer (more than 4 bytes)".into())
    } else {
        Ok(None)
    }
}

fn pkid_at(body: &[u8], at: usize, what: &str) -> Result<u16, String> {
    match body.get(at..at + 2) {
        Some(id) => Ok(u16::from_be_bytes([id[0], id[1]])),
        None => Err(format!("{what} too short for its packet id")),
    }
}

/// Counts the complete packets at the front of `buf` into `tally` and appends the
/// acknowledgements they need to `acks`. Stops at the first incomplete packet, after a
/// DISCONNECT, or before a PUBLISH past `limit` publishes (which stays unread). Returns the
/// bytes consumed.
pub fn scan(
    protocol: Protocol,
    buf: &[u8],
    limit: u64,
    tally: &mut Tally,
    acks: &mut BytesMut,
) -> Result<usize, String> {
    let mut at = 0;
    while at < buf.len() {
        let first = buf[at];
        let Some((remaining, len_bytes)) = variable_int(&buf[at + 1..])? else {
            break;
        };
        let start = at + 1 + len_bytes;
        let end = start + remaining;
        if end > buf.len() {
            break;
        }
        let body = &buf[start..end];
        match first >> 4 {
            3 => {
                if tally.publishes >= limit {
                    break;
                }
                let qos = (first >> 1) & 3;
                if qos == 3 {
                    return Err("PUBLISH with QoS 3".into());
                }
                let topic_len = match body.get(..2) {
                    Some(l) => usize::from(u16::from_be_bytes([l[0], l[1]])),
                    None => return Err("PUBLISH too short for its topic length".into()),
                };
                let mut header = 2 + topic_len;
                if qos > 0 {
                    let pkid = pkid_at(body, header, "PUBLISH")?;
                    header += 2;
                    let kind = if qos == 1 {
                        AckKind::PubAck
                    } else {
                        AckKind::PubRec
                    };
                    wire::write_ack(protocol, kind, pkid, acks);
                }
                if protocol == Protocol::V5 {
                    match variable_int(body.get(header..).unwrap_or_default())? {
                        Some((properties, n)) => header += n + properties,
                        None => return Err("PUBLISH too short for its properties".into()),
                    }
                }
                if header > body.len() {
                    return Err(format!(
                        "PUBLISH of {} bytes with a {header}-byte header",
                        body.len()
                    ));
                }
                tally.publishes += 1;
                tally.by_qos[usize::from(qos)] += 1;
                tally.payload_bytes += (body.len() - header) as u64;
                if first & 0x08 != 0 {
                    tally.dup += 1;
                }
            }
            6 => {
                let pkid = pkid_at(body, 0, "PUBREL")?;
                wire::write_ack(protocol, AckKind::PubComp, pkid, acks);
                tally.pubrels += 1;
            }
            9 if pkid_at(body, 0, "SUBACK")? == SUBSCRIBE_PKID => {
                let mut codes_at = 2;
                if protocol == Protocol::V5 {
                    match variable_int(&body[2..])? {
                        Some((properties, n)) => codes_at += n + properties,
                        None => return Err("SUBACK too short for its properties".into()),
                    }
                }
                let codes = body
                    .get(codes_at..)
                    .ok_or("SUBACK shorter than its properties")?;
                tally.suback = Some(codes.to_vec());
            }
            14 => {
                tally.disconnect = Some(body.first().copied().unwrap_or(0));
                return Ok(end);
            }
            _ => {}
        }
        at = end;
    }
    Ok(at)
}

/// The receive buffer: bytes read and not yet scanned are `buf[start..end]`.
struct Inbox {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Inbox {
    fn new() -> Inbox {
        Inbox {
            buf: vec![0; READ_BUFFER],
            start: 0,
            end: 0,
        }
    }

    /// Makes room for the next read: moves an unread tail to the front when little space is
    /// left, and doubles the buffer when a single packet fills it.
    fn make_room(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < READ_MIN_SPACE {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.end == self.buf.len() {
                let doubled = (self.buf.len() * 2).min(MAX_REMAINING + 5);
                self.buf.resize(doubled, 0);
            }
        }
    }

    fn unread(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
}

/// One read's outcome.
enum ReadOutcome {
    /// Bytes arrived.
    Bytes,
    /// Nothing within [`READ_TICK`].
    Nothing,
    /// The broker closed the connection (or reset it).
    Closed,
}

/// The connection and everything counted on it.
struct Subscriber<'a> {
    options: &'a SubscribeOptions,
    stream: TcpStream,
    inbox: Inbox,
    acks: BytesMut,
    tally: Tally,
    limit: u64,
    closed: bool,
    /// When the first read that held a PUBLISH returned, and how many it held.
    first: Option<(Instant, u64)>,
    /// When the last read that held a PUBLISH returned.
    last: Option<Instant>,
    next_ping: Option<Instant>,
}

/// When reading stops (besides the count and the broker closing).
struct Until {
    deadline: Option<Instant>,
    idle: Duration,
}

impl<'a> Subscriber<'a> {
    fn broker_error(&self, reason: impl Into<String>) -> SimError {
        SimError::Broker {
            url: self.options.url.original.clone(),
            reason: reason.into(),
        }
    }

    fn connect(options: &'a SubscribeOptions) -> Result<Subscriber<'a>, SimError> {
        let url = &options.url;
        let broker_error = |reason: String| SimError::Broker {
            url: url.original.clone(),
            reason,
        };
        let addresses: Vec<SocketAddr> = url
            .socket_address()
            .to_socket_addrs()
            .map_err(|e| broker_error(format!("cannot resolve {}: {e}", url.host)))?
            .collect();
        let mut last_error = format!("{} resolves to no address", url.host);
        let mut stream = None;
        for address in &addresses {
            match TcpStream::connect_timeout(address, options.connect_timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last_error = format!("connect to {address}: {e}"),
            }
        }
        let stream = stream.ok_or_else(|| broker_error(last_error))?;
        let setup = |s: &TcpStream| -> std::io::Result<()> {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(READ_TICK))?;
            s.set_write_timeout(Some(WRITE_TIMEOUT))
        };
        setup(&stream).map_err(|e| broker_error(format!("socket options: {e}")))?;
        let keep_alive = options.keep_alive.as_secs() as u16;
        Ok(Subscriber {
            options,
            stream,
            inbox: Inbox::new(),
            acks: BytesMut::with_capacity(64 * 1024),
            tally: Tally::default(),
            limit: options.count.unwrap_or(u64::MAX),
            closed: false,
            first: None,
            last: None,
            next_ping: (keep_alive > 0)
                .then(|| Instant::now() + Duration::from_secs(u64::from(keep_alive)) / 2),
        })
    }

    /// CONNECT, CONNACK, SUBSCRIBE, SUBACK; a refused filter is an error.
    fn handshake(&mut self) -> Result<Vec<u8>, SimError> {
        let options = self.options;
        let protocol = options.protocol;
        let deadline = Instant::now() + options.connect_timeout;
        let mut out = BytesMut::new();
        wire::write_connect_with(
            protocol,
            ConnectFields {
                client_id: &options.client_id,
                credentials: options.credentials.as_ref(),
                keep_alive_secs: options.keep_alive.as_secs() as u16,
                clean: true,
                session_expiry_secs: None,
            },
            &mut out,
        )
        .map_err(|e| self.broker_error(format!("encoding CONNECT: {e}")))?;
        self.write(&out)?;
        let mut input = BytesMut::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        loop {
            match wire::read(protocol, &mut input).map_err(|e| self.broker_error(e))? {
                Some(Frame::ConnAck { refused: None, .. }) => break,
                Some(Frame::ConnAck {
                    refused: Some(reason),
                    ..
                }) => return Err(self.broker_error(format!("connection refused: {reason}"))),
                Some(other) => {
                    return Err(self.broker_error(format!("expected CONNACK, got {other:?}")))
                }
                None => {}
            }
            let read = read_socket(&mut self.stream, &mut chunk);
            match read.map_err(|e| self.broker_error(format!("read: {e}")))? {
                Some(0) => {
                    return Err(self.broker_error("the broker closed the connection before CONNACK"))
                }
                Some(n) => input.extend_from_slice(&chunk[..n]),
                None if Instant::now() >= deadline => {
                    return Err(self
                        .broker_error(format!("no CONNACK within {:?}", options.connect_timeout)))
                }
                None => {}
            }
        }
        // Whatever followed the CONNACK is the inbox's.
        self.inbox.buf[..input.len()].copy_from_slice(&input);
        self.inbox.end = input.len();

        out.clear();
        encode_subscribe(protocol, &options.filters, options.qos, &mut out)
            .map_err(|e| self.broker_error(format!("encoding SUBSCRIBE: {e}")))?;
        self.write(&out)?;
        loop {
            self.absorb(Instant::now())?;
            if let Some(codes) = self.tally.suback.clone() {
                return self.check_suback(codes);
            }
            if let Some(code) = self.tally.disconnect {
                return Err(self.broker_error(format!(
                    "the broker sent DISCONNECT {code:#04x} instead of a SUBACK"
                )));
            }
            match self.read()? {
                ReadOutcome::Closed => {
                    return Err(self.broker_error("the broker closed the connection before SUBACK"))
                }
                ReadOutcome::Nothing if Instant::now() >= deadline => {
                    return Err(self
                        .broker_error(format!("no SUBACK within {:?}", options.connect_timeout)))
                }
                _ => {}
            }
        }
    }

    fn check_suback(&self, codes: Vec<u8>) -> Result<Vec<u8>, SimError> {
        let filters = &self.options.filters;
        if codes.len() != filters.len() {
            return Err(self.broker_error(format!(
                "SUBACK has {} return codes for {} filters",
                codes.len(),
                filters.len()
            )));
        }
        let refused: Vec<String> = filters
            .iter()
            .zip(&codes)
            .filter(|(_, &code)| code >= 0x80)
            .map(|(filter, &code)| format!("{filter:?} ({code:#04x} {})", suback_reason(code)))
            .collect();
        if !refused.is_empty() {
            return Err(self.broker_error(format!(
                "the subscription was refused: {}",
                refused.join(", ")
            )));
        }
        Ok(codes)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), SimError> {
        match self.stream.write_all(bytes) {
            Ok(()) => Ok(()),
            Err(e) if gone(&e) => {
                self.closed = true;
                Ok(())
            }
            Err(e) => Err(self.broker_error(format!("write: {e}"))),
        }
    }

    fn read(&mut self) -> Result<ReadOutcome, SimError> {
        self.inbox.make_room();
        let end = self.inbox.end;
        match read_socket(&mut self.stream, &mut self.inbox.buf[end..]) {
            Ok(Some(0)) => {
                self.closed = true;
                Ok(ReadOutcome::Closed)
            }
            Ok(Some(n)) => {
                self.inbox.end += n;
                Ok(ReadOutcome::Bytes)
            }
            Ok(None) => Ok(ReadOutcome::Nothing),
            Err(e) => Err(self.broker_error(format!("read: {e}"))),
        }
    }

    /// Scans what the inbox holds and sends the acknowledgements it needs.
    fn absorb(&mut self, now: Instant) -> Result<(), SimError> {
        let before = self.tally.publishes;
        let consumed = scan(
            self.options.protocol,
            self.inbox.unread(),
            self.limit,
            &mut self.tally,
            &mut self.acks,
        )
        .map_err(|e| self.broker_error(format!("bad packet from the broker: {e}")))?;
        self.inbox.start += consumed;
        let got = self.tally.publishes - before;
        if got > 0 {
            self.first.get_or_insert((now, got));
            self.last = Some(now);
        }
        if !self.acks.is_empty() {
            let acks = std::mem::take(&mut self.acks);
            self.write(&acks)?;
            self.acks = acks;
            self.acks.clear();
        }
        Ok(())
    }

    fn ping_if_due(&mut self, now: Instant) -> Result<(), SimError> {
        if let Some(due) = self.next_ping {
            if now >= due {
                let mut out = BytesMut::new();
                wire::write_pingreq(self.options.protocol, &mut out);
                self.write(&out)?;
                self.next_ping = Some(now + self.options.keep_alive / 2);
            }
        }
        Ok(())
    }

    /// Reads and counts until the count, the deadline, the idle time-out or the close.
    fn receive(&mut self, until: Until) -> Result<Ended, SimError> {
        let started = Instant::now();
        loop {
            let now = Instant::now();
            self.absorb(now)?;
            if self.tally.publishes >= self.limit {
                return Ok(Ended::Count);
            }
            if self.closed || self.tally.disconnect.is_some() {
                return Ok(Ended::Closed);
            }
            if until.deadline.is_some_and(|d| now >= d) {
                return Ok(Ended::Duration);
            }
            let quiet_since = self.last.unwrap_or(started).max(started);
            if now.duration_since(quiet_since) >= until.idle {
                return Ok(Ended::Idle);
            }
            self.ping_if_due(now)?;
            self.read()?;
        }
    }

    /// Leaves the socket unread until `until`, sending PINGREQs when due.
    fn stay_unread(&mut self, until: Instant) -> Result<(), SimError> {
        loop {
            let now = Instant::now();
            if now >= until || self.closed {
                return Ok(());
            }
            self.ping_if_due(now)?;
            let wake = self.next_ping.map_or(until, |p| p.min(until));
            std::thread::sleep(wake.saturating_duration_since(now));
        }
    }
}

/// One read into `buf`: `Some(n)` (0 when the broker closed or reset the connection), `None`
/// when nothing came within the read tick.
fn read_socket(stream: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
    match stream.read(buf) {
        Ok(n) => Ok(Some(n)),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(None),
        Err(e) if e.kind() == ErrorKind::Interrupted => Ok(None),
        Err(e) if gone(&e) => Ok(Some(0)),
        Err(e) => Err(e),
    }
}

/// `io::Error`s that mean the broker went away.
fn gone(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::UnexpectedEof
    )
}

fn encode_subscribe(
    protocol: Protocol,
    filters: &[String],
    qos: u8,
    out: &mut BytesMut,
) -> Result<(), String> {
    match protocol {
        Protocol::V311 => {
            let qos = match qos {
                0 => rumqttc::QoS::AtMostOnce,
                1 => rumqttc::QoS::AtLeastOnce,
                _ => rumqttc::QoS::ExactlyOnce,
            };
            v4::Subscribe {
                pkid: SUBSCRIBE_PKID,
                filters: filters
                    .iter()
                    .map(|f| v4::SubscribeFilter::new(f.clone(), qos))
                    .collect(),
            }
            .write(out)
            .map(drop)
            .map_err(|e| e.to_string())
        }
        Protocol::V5 => {
            let qos = match qos {
                0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
            };
            let mut subscribe =
                v5::Subscribe::new_many(filters.iter().map(|f| v5::Filter::new(f, qos)), None);
            subscribe.pkid = SUBSCRIBE_PKID;
            v5::Packet::Subscribe(subscribe)
                .write(out, None)
                .map(drop)
                .map_err(|e| e.to_string())
        }
    }
}

/// CPU time (user + system) of this process so far; 0 if the system does not tell.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct passed by pointer, which is zeroed and ours.
    #[allow(unsafe_code)]
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return 0.0;
        }
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// What a SUBACK refusal code means (3.1.1 knows only 0x80).
fn suback_reason(code: u8) -> &'static str {
    match code {
        0x80 => "unspecified error / failure",
        0x83 => "implementation specific error",
        0x87 => "not authorized",
        0x8F => "topic filter invalid",
        0x91 => "packet identifier in use",
        0x97 => "quota exceeded",
        0x9E => "shared subscriptions not supported",
        0xA1 => "subscription identifiers not supported",
        0xA2 => "wildcard subscriptions not supported",
        _ => "refused",
    }
}

/// Connects, subscribes and counts until one of the ends in the module docs; writes the JSON
/// report if asked. Blocks the calling thread.
pub fn subscribe(options: &SubscribeOptions) -> Result<SubscribeReport, SimError> {
    options.validate()?;
    let mut subscriber = Subscriber::connect(options)?;
    let granted = subscriber.handshake()?;
    let subscribed = Instant::now();
    let deadline = options.duration.map(|d| subscribed + d);
    let ended = if options.no_read {
        let until = deadline.expect("validated: --no-read has a duration");
        subscriber.stay_unread(until)?;
        // Whatever arrives now only tells whether the broker is still there.
        match subscriber.receive(Until {
            deadline: Some(Instant::now() + options.idle_timeout),
            idle: options.idle_timeout,
        })? {
            Ended::Closed => Ended::Closed,
            Ended::Count => Ended::Count,
            Ended::Duration | Ended::Idle => Ended::Duration,
        }
    } else {
        subscriber.receive(Until {
            deadline,
            idle: options.idle_timeout,
        })?
    };
    let elapsed = subscribed.elapsed();
    if !subscriber.closed && subscriber.tally.disconnect.is_none() {
        let mut bye = BytesMut::new();
        wire::write_disconnect(options.protocol, &mut bye);
        // Leaving anyway: a broker that is gone by now changes nothing.
        let _ = subscriber.stream.write_all(&bye);
    }
    let tally = &subscriber.tally;
    let (rate, span) = match (subscriber.first, subscriber.last) {
        (Some((first, in_first)), Some(last)) if last > first => {
            let span = last.duration_since(first).as_secs_f64();
            ((tally.publishes - in_first) as f64 / span, span)
        }
        _ => (0.0, 0.0),
    };
    let report = SubscribeReport {
        broker: options.url.original.clone(),
        protocol: options.protocol,
        client_id: options.client_id.clone(),
        filters: options.filters.clone(),
        qos: options.qos,
        granted,
        no_read: options.no_read,
        received: tally.publishes,
        received_by_qos: tally.by_qos,
        bytes: tally.payload_bytes,
        dup: tally.dup,
        rate_per_s: rate,
        first_to_last_seconds: span,
        elapsed_seconds: elapsed.as_secs_f64(),
        disconnect_reason: tally.disconnect,
        closed_by_broker: subscriber.closed || tally.disconnect.is_some(),
        ended,
        cpu_seconds: cpu_seconds(),
    };
    if let Some(path) = &options.report_path {
        crate::report::write_json(path, &report)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn publishes(protocol: Protocol, sizes: &[(u8, usize)]) -> Vec<u8> {
        let mut out = BytesMut::new();
        for (i, &(qos, size)) in sizes.iter().enumerate() {
            let pkid = if qos > 0 { i as u16 + 1 } else { 0 };
            let payload = Bytes::from(vec![b'x'; size]);
            wire::write_publish(protocol, "sensors/dev-1/t", qos, pkid, payload, &mut out).unwrap();
        }
        out.to_vec()
    }

    /// Feeds `stream` in reads of the given lengths, as the receive loop does.
    fn scan_in_reads(protocol: Protocol, stream: &[u8], reads: &[usize]) -> (Tally, Vec<u8>) {
        let mut tally = Tally::default();
        let mut acks = BytesMut::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut at = 0;
        for &n in reads.iter().chain(std::iter::once(&usize::MAX)) {
            let end = at + n.min(stream.len() - at);
            pending.extend_from_slice(&stream[at..end]);
            at = end;
            let consumed = scan(protocol, &pending, u64::MAX, &mut tally, &mut acks).unwrap();
            pending.drain(..consumed);
        }
        assert!(pending.is_empty(), "{} bytes left unscanned", pending.len());
        (tally, acks.to_vec())
    }

    #[test]
    fn publishes_split_at_every_byte_are_counted_once() {
        for protocol in [Protocol::V311, Protocol::V5] {
            let stream = publishes(protocol, &[(0, 64), (1, 64), (2, 200), (1, 0)]);
            let (whole, whole_acks) = scan_in_reads(protocol, &stream, &[stream.len()]);
            assert_eq!(whole.publishes, 4);
            assert_eq!(whole.by_qos, [1, 2, 1]);
            assert_eq!(whole.payload_bytes, 64 + 64 + 200);
            for split in 1..stream.len() {
                let (tally, acks) = scan_in_reads(protocol, &stream, &[split]);
                assert_eq!(tally, whole, "{protocol:?} split at {split}");
                assert_eq!(acks, whole_acks, "{protocol:?} split at {split}");
            }
            // And byte by byte.
            let (tally, _) = scan_in_reads(protocol, &stream, &vec![1; stream.len()]);
            assert_eq!(tally, whole);
        }
    }

    #[test]
    fn multi_byte_remaining_lengths_are_decoded() {
        // Payloads whose PUBLISH needs a remaining length of 1, 2, 3 and 4 bytes.
        let sizes = [(1, 100), (1, 300), (1, 20_000), (1, 2_100_000)];
        for protocol in [Protocol::V311, Protocol::V5] {
            let stream = publishes(protocol, &sizes);
            let (tally, acks) = scan_in_reads(protocol, &stream, &[7, 129, 16_385, 65_536]);
            assert_eq!(tally.publishes, 4);
            assert_eq!(
                tally.payload_bytes,
                sizes.iter().map(|&(_, s)| s as u64).sum::<u64>()
            );
            let mut expected = BytesMut::new();
            for pkid in 1..=4 {
                wire::write_ack(protocol, AckKind::PubAck, pkid, &mut expected);
            }
            assert_eq!(acks, expected.to_vec(), "{protocol:?}");
        }
    }

    #[test]
    fn variable_ints_of_one_to_four_bytes_and_their_limit() {
        assert_eq!(variable_int(&[0x00]).unwrap(), Some((0, 1)));
        assert_eq!(variable_int(&[0x7F]).unwrap(), Some((127, 1)));
        assert_eq!(variable_int(&[0x80, 0x01]).unwrap(), Some((128, 2)));
        assert_eq!(variable_int(&[0xFF, 0x7F]).unwrap(), Some((16_383, 2)));
        assert_eq!(
            variable_int(&[0x80, 0x80, 0x01]).unwrap(),
            Some((16_384, 3))
        );
        assert_eq!(
            variable_int(&[0xFF, 0xFF, 0xFF, 0x7F]).unwrap(),
            Some((MAX_REMAINING, 4))
        );
        assert_eq!(variable_int(&[0x80, 0x80]).unwrap(), None);
        assert!(variable_int(&[0x80, 0x80, 0x80, 0x80, 0x01]).is_err());
    }

    #[test]
    fn qos2_gets_pubrec_and_pubrel_gets_pubcomp() {
        for protocol in [Protocol::V311, Protocol::V5] {
            let mut stream = BytesMut::from(&publishes(protocol, &[(2, 10)])[..]);
            wire::write_pubrel(protocol, 1, &mut stream);
            let (tally, acks) = scan_in_reads(protocol, &stream, &[stream.len()]);
            assert_eq!((tally.publishes, tally.pubrels), (1, 1));
            let mut expected = BytesMut::new();
            wire::write_ack(protocol, AckKind::PubRec, 1, &mut expected);
            wire::write_ack(protocol, AckKind::PubComp, 1, &mut expected);
            assert_eq!(acks, expected.to_vec());
        }
    }

    #[test]
    fn dup_flag_is_counted() {
        let mut stream = publishes(Protocol::V5, &[(1, 8), (1, 8)]);
        stream[0] |= 0x08;
        let (tally, _) = scan_in_reads(Protocol::V5, &stream, &[stream.len()]);
        assert_eq!((tally.publishes, tally.dup), (2, 1));
    }

    #[test]
    fn count_limit_leaves_later_publishes_unread() {
        let stream = publishes(Protocol::V311, &[(0, 8), (0, 8), (0, 8)]);
        let one = stream.len() / 3;
        let mut tally = Tally::default();
        let consumed = scan(Protocol::V311, &stream, 2, &mut tally, &mut BytesMut::new()).unwrap();
        assert_eq!((tally.publishes, consumed), (2, 2 * one));
    }

    #[test]
    fn disconnect_reason_ends_the_scan() {
        let mut stream = BytesMut::from(&publishes(Protocol::V5, &[(0, 8)])[..]);
        stream.extend_from_slice(&[0xE0, 0x01, 0x97]);
        stream.extend_from_slice(&publishes(Protocol::V5, &[(0, 8)]));
        let mut tally = Tally::default();
        let consumed = scan(
            Protocol::V5,
            &stream,
            u64::MAX,
            &mut tally,
            &mut BytesMut::new(),
        )
        .unwrap();
        assert_eq!(tally.disconnect, Some(0x97));
        assert_eq!(tally.publishes, 1);
        assert!(consumed < stream.len());
    }

    #[test]
    fn suback_codes_are_read_for_both_versions() {
        let mut v4_suback = BytesMut::new();
        v4::SubAck::new(
            SUBSCRIBE_PKID,
            vec![
                v4::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce),
                v4::SubscribeReasonCode::Failure,
            ],
        )
        .write(&mut v4_suback)
        .unwrap();
        let mut tally = Tally::default();
        scan(
            Protocol::V311,
            &v4_suback,
            u64::MAX,
            &mut tally,
            &mut BytesMut::new(),
        )
        .unwrap();
        assert_eq!(tally.suback, Some(vec![1, 0x80]));

        let mut v5_suback = BytesMut::new();
        v5::Packet::SubAck(v5::SubAck {
            pkid: SUBSCRIBE_PKID,
            return_codes: vec![
                v5::SubscribeReasonCode::Success(rumqttc::v5::mqttbytes::QoS::ExactlyOnce),
                v5::SubscribeReasonCode::TopicFilterInvalid,
            ],
            properties: Some(v5::SubAckProperties {
                reason_string: Some("no".into()),
                user_properties: Vec::new(),
            }),
        })
        .write(&mut v5_suback, None)
        .unwrap();
        let mut tally = Tally::default();
        scan(
            Protocol::V5,
            &v5_suback,
            u64::MAX,
            &mut tally,
            &mut BytesMut::new(),
        )
        .unwrap();
        assert_eq!(tally.suback, Some(vec![2, 0x8F]));
    }

    #[test]
    fn truncated_publish_header_is_an_error() {
        // Remaining length 1: not even the topic length fits.
        let mut tally = Tally::default();
        let err = scan(
            Protocol::V311,
            &[0x30, 0x01, 0x00],
            u64::MAX,
            &mut tally,
            &mut BytesMut::new(),
        )
        .unwrap_err();
        assert!(err.contains("topic length"), "{err}");
        // A topic longer than the packet.
        let err = scan(
            Protocol::V311,
            &[0x30, 0x03, 0x00, 0x09, b'a'],
            u64::MAX,
            &mut tally,
            &mut BytesMut::new(),
        )
        .unwrap_err();
        assert!(err.contains("header"), "{err}");
    }
}
