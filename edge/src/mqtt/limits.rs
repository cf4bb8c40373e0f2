//! Limits that protect the edge from clients: connections per source address, refusals by
//! reason, a per-connection publish rate, and a budget for log lines about misbehaving
//! clients (so a flood of bad connections cannot fill the disk with logs).
//!
//! Everything here is touched at accept, at close or once per socket read; nothing runs per
//! message.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Why a connection was refused or closed before it became a session. The label of
/// `tributary_connections_refused_total{reason=...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// At accept: its source address holds `max_connections_per_address` already.
    PerAddress,
    /// At accept or at CONNECT: the edge holds `max_connections`.
    MaxConnections,
    /// No complete CONNECT within `connect_timeout`.
    ConnectTimeout,
    /// The first bytes were not a well-formed CONNECT of a supported protocol.
    Malformed,
    /// The CONNECT exceeds `max_packet_size`.
    PacketTooLarge,
    /// The client identifier is not acceptable.
    ClientId,
    /// The log is failing or the session could not be stored.
    Unavailable,
    /// The CONNECTs being received hold [`CONNECT_BUFFER_BUDGET`] already.
    ConnectMemory,
    /// The login waited too long for a password check, or its source address had
    /// `MAX_LOGINS_PER_ADDRESS` logins in progress (5.0: 0x89, 3.1.1: 3).
    LoginBusy,
    /// Wrong user name or password (5.0: 0x86, 3.1.1: 4).
    BadCredentials,
    /// Not allowed in: anonymous while anonymous access is off, or a will the ACL forbids
    /// (5.0: 0x87, 3.1.1: 5), or an Authentication Method (enhanced authentication, which
    /// the edge does not support: 0x8C).
    NotAuthorized,
    /// The TLS handshake failed: no or a bad client certificate, no common version or
    /// cipher, not TLS at all.
    TlsHandshake,
    /// The WebSocket upgrade of a `ws` or `wss` listener was refused or failed: another
    /// path, no `mqtt` subprotocol, not a WebSocket request.
    WebSocketUpgrade,
    /// A new session past `max_sessions` (5.0: 0x97, 3.1.1: 3).
    MaxSessions,
}

/// Bytes of buffers node-wide that connections may hold for CONNECT packets still being
/// received, beyond the first [`CONNECT_FREE_BYTES`] of each. A CONNECT may be as large as
/// `max_packet_size` (a will with a large payload), and it must be whole before it is
/// decoded: without this cap, a thousand sockets each trickling a 1 MiB CONNECT would hold a
/// GiB.
pub(crate) const CONNECT_BUFFER_BUDGET: usize = 64 << 20;
/// What one connection's CONNECT may take without counting against the budget (an ordinary
/// CONNECT is far smaller).
pub(crate) const CONNECT_FREE_BYTES: usize = 4096;

impl Refused {
    /// Every reason, in the order they are exposed.
    pub const ALL: [Refused; 14] = [
        Refused::PerAddress,
        Refused::MaxConnections,
        Refused::ConnectTimeout,
        Refused::Malformed,
        Refused::PacketTooLarge,
        Refused::ClientId,
        Refused::Unavailable,
        Refused::ConnectMemory,
        Refused::BadCredentials,
        Refused::NotAuthorized,
        Refused::TlsHandshake,
        Refused::WebSocketUpgrade,
        Refused::MaxSessions,
        Refused::LoginBusy,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refused::PerAddress => "per_address",
            Refused::MaxConnections => "max_connections",
            Refused::ConnectTimeout => "connect_timeout",
            Refused::Malformed => "malformed",
            Refused::PacketTooLarge => "packet_too_large",
            Refused::ClientId => "client_id",
            Refused::Unavailable => "unavailable",
            Refused::ConnectMemory => "connect_memory",
            Refused::BadCredentials => "bad_credentials",
            Refused::NotAuthorized => "not_authorized",
            Refused::TlsHandshake => "tls_handshake",
            Refused::WebSocketUpgrade => "websocket_upgrade",
            Refused::MaxSessions => "max_sessions",
            Refused::LoginBusy => "login_busy",
        }
    }
}

/// A field of a packet over its `[mqtt]` limit, found on an open connection (CONNECT's own
/// fields are counted by [`Refused`]). The label of `tributary_packets_refused_total{reason}`.
///
/// Every field that reaches storage has such a limit, below what its encoding can hold, so
/// that nothing a client sends can make the log hold a value its decoder rejects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketRefused {
    /// A topic name (PUBLISH, will, response topic) longer than `max_topic_length`.
    TopicLength,
    /// A topic name with more than `max_topic_levels` levels.
    TopicLevels,
    /// A topic filter longer than `max_filter_length`.
    FilterLength,
    /// More user properties than `max_user_properties`.
    UserProperties,
    /// User properties larger in total than `max_user_properties_bytes`.
    UserPropertiesBytes,
    /// A content type longer than `max_content_type_length`.
    ContentType,
    /// Correlation data longer than `max_correlation_data_length`.
    CorrelationData,
    /// A will whose topic or properties are over a limit (the CONNECT is refused).
    Will,
    /// A publish (or will) to a topic starting with `$`, which are the edge's own (5.0:
    /// PUBACK/PUBREC 0x90; 3.1.1: closed).
    ReservedTopic,
    /// A retained publish the retained store has no room for (`max_retained_messages`,
    /// `max_retained_bytes`).
    RetainedQuota,
    /// A field the record encoding cannot hold (the limits above should make this
    /// impossible; counted so that it would be seen).
    Encoding,
}

impl PacketRefused {
    /// Every reason, in the order they are exposed.
    pub const ALL: [PacketRefused; 11] = [
        PacketRefused::TopicLength,
        PacketRefused::TopicLevels,
        PacketRefused::FilterLength,
        PacketRefused::UserProperties,
        PacketRefused::UserPropertiesBytes,
        PacketRefused::ContentType,
        PacketRefused::CorrelationData,
        PacketRefused::Will,
        PacketRefused::ReservedTopic,
        PacketRefused::RetainedQuota,
        PacketRefused::Encoding,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            PacketRefused::TopicLength => "topic_length",
            PacketRefused::TopicLevels => "topic_levels",
            PacketRefused::FilterLength => "filter_length",
            PacketRefused::UserProperties => "user_properties",
            PacketRefused::UserPropertiesBytes => "user_properties_bytes",
            PacketRefused::ContentType => "content_type_length",
            PacketRefused::CorrelationData => "correlation_data_length",
            PacketRefused::Will => "will",
            PacketRefused::ReservedTopic => "reserved_topic",
            PacketRefused::RetainedQuota => "retained_quota",
            PacketRefused::Encoding => "encoding",
        }
    }
}

/// Checks the MQTT 5 properties of a message (PUBLISH or will) against `[mqtt]`'s limits.
/// The response topic is a topic name and gets the topic rules' length limit.
pub(crate) fn check_message_props(
    props: &super::codec::MessageProps,
    cfg: &crate::config::MqttConfig,
) -> Result<(), (PacketRefused, String)> {
    if props.user_properties.len() > cfg.max_user_properties {
        return Err((
            PacketRefused::UserProperties,
            format!(
                "{} user properties, the limit (mqtt.max_user_properties) is {}",
                props.user_properties.len(),
                cfg.max_user_properties
            ),
        ));
    }
    let bytes: usize = props
        .user_properties
        .iter()
        .map(|(k, v)| 4 + k.len() + v.len())
        .sum();
    if bytes as u64 > cfg.max_user_properties_bytes.0 {
        return Err((
            PacketRefused::UserPropertiesBytes,
            format!(
                "user properties of {bytes} bytes, the limit (mqtt.max_user_properties_bytes) is {}",
                cfg.max_user_properties_bytes.0
            ),
        ));
    }
    if let Some(ct) = &props.content_type {
        if ct.len() > cfg.max_content_type_length {
            return Err((
                PacketRefused::ContentType,
                format!(
                    "a content type of {} bytes, the limit (mqtt.max_content_type_length) is {}",
                    ct.len(),
                    cfg.max_content_type_length
                ),
            ));
        }
    }
    if let Some(rt) = &props.response_topic {
        if rt.len() > cfg.max_topic_length {
            return Err((
                PacketRefused::TopicLength,
                format!(
                    "a response topic of {} bytes, the limit (mqtt.max_topic_length) is {}",
                    rt.len(),
                    cfg.max_topic_length
                ),
            ));
        }
    }
    if let Some(cd) = &props.correlation_data {
        if cd.len() > cfg.max_correlation_data_length {
            return Err((
                PacketRefused::CorrelationData,
                format!(
                    "correlation data of {} bytes, the limit (mqtt.max_correlation_data_length) is {}",
                    cd.len(),
                    cfg.max_correlation_data_length
                ),
            ));
        }
    }
    Ok(())
}

/// Node-wide state of the client limits.
#[derive(Debug, Default)]
pub struct Limits {
    /// Open connections by source address (only while a per-address limit is set).
    per_address: Mutex<HashMap<IpAddr, u32>>,
    refused: [AtomicU64; Refused::ALL.len()],
    packets_refused: [AtomicU64; PacketRefused::ALL.len()],
    /// Connections closed with 0x96 Message rate too high.
    pub rate_disconnects: AtomicU64,
    /// Times a connection stopped being read because it was over its publish rate.
    pub rate_throttles: AtomicU64,
    /// Subscriptions refused because the client had `max_subscriptions_per_client`.
    pub subscriptions_refused: AtomicU64,
    /// Log lines about misbehaving clients.
    pub log_budget: LogBudget,
    /// Bytes counted against [`CONNECT_BUFFER_BUDGET`] now.
    connect_bytes: AtomicUsize,
}

impl Limits {
    /// Takes a connection slot for `ip` unless it already holds `max` (0: no limit).
    /// Returns false when refused. A taken slot is given back with [`Limits::release`].
    pub fn try_take(&self, ip: IpAddr, max: u32) -> bool {
        if max == 0 {
            return true;
        }
        let mut map = self.per_address.lock().expect("per-address lock");
        let n = map.entry(ip.to_canonical()).or_insert(0);
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    /// Gives back a slot taken by [`Limits::try_take`] with a non-zero limit.
    pub fn release(&self, ip: IpAddr) {
        let ip = ip.to_canonical();
        let mut map = self.per_address.lock().expect("per-address lock");
        if let Some(n) = map.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&ip);
            }
        }
    }

    /// Open connections counted for `ip`.
    pub fn connections_from(&self, ip: IpAddr) -> u32 {
        let map = self.per_address.lock().expect("per-address lock");
        map.get(&ip.to_canonical()).copied().unwrap_or(0)
    }

    /// Counts a refusal.
    pub fn refused(&self, why: Refused) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a packet refused for a field over its limit.
    pub fn packet_refused(&self, why: PacketRefused) {
        self.packets_refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Packets refused so far for one reason.
    pub fn packet_refused_count(&self, why: PacketRefused) -> u64 {
        self.packets_refused[why as usize].load(Ordering::Relaxed)
    }

    /// Refusals so far for one reason.
    pub fn refused_count(&self, why: Refused) -> u64 {
        self.refused[why as usize].load(Ordering::Relaxed)
    }

    /// A share that already holds `held` bytes (from [`ConnectBuffer::keep`]).
    pub fn connect_buffer_held(&self, budget: usize, held: usize) -> ConnectBuffer<'_> {
        ConnectBuffer {
            limits: self,
            budget,
            held,
        }
    }

    /// The share of `budget` one connection's CONNECT buffer holds; nothing until it grows.
    pub fn connect_buffer(&self, budget: usize) -> ConnectBuffer<'_> {
        ConnectBuffer {
            limits: self,
            budget,
            held: 0,
        }
    }
}

/// A connection's share of the node-wide budget for CONNECT buffers, given back when dropped.
#[derive(Debug)]
pub struct ConnectBuffer<'a> {
    limits: &'a Limits,
    budget: usize,
    held: usize,
}

impl<'a> ConnectBuffer<'a> {
    /// Ends this share without giving back what it holds, and returns that: the decoded
    /// CONNECT keeps the buffer's bytes until the login is decided, and
    /// [`Limits::connect_buffer_held`] takes the same share up again there.
    pub fn keep(mut self) -> usize {
        std::mem::take(&mut self.held)
    }
}

impl ConnectBuffer<'_> {
    /// Accounts a buffer grown to `capacity` bytes; false (and nothing taken) when the budget
    /// has no room for it.
    pub fn hold(&mut self, capacity: usize) -> bool {
        let want = capacity.saturating_sub(CONNECT_FREE_BYTES);
        if want <= self.held {
            return true;
        }
        let more = want - self.held;
        let counted = &self.limits.connect_bytes;
        if counted.fetch_add(more, Ordering::Relaxed) + more > self.budget {
            counted.fetch_sub(more, Ordering::Relaxed);
            return false;
        }
        self.held = want;
        true
    }
}

impl Drop for ConnectBuffer<'_> {
    fn drop(&mut self) {
        self.limits
            .connect_bytes
            .fetch_sub(self.held, Ordering::Relaxed);
    }
}

/// Log lines about misbehaving clients allowed per window.
const LOG_LINES_PER_WINDOW: u64 = 20;
/// The window of [`LOG_LINES_PER_WINDOW`].
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// A budget of log lines: at most [`LOG_LINES_PER_WINDOW`] per [`LOG_WINDOW`]; the first line
/// allowed after some were held back says how many.
#[derive(Debug)]
pub struct LogBudget {
    origin: Instant,
    /// Index of the current window since `origin`.
    window: AtomicU64,
    used: AtomicU64,
    held_back: AtomicU64,
}

impl Default for LogBudget {
    fn default() -> Self {
        LogBudget {
            origin: Instant::now(),
            window: AtomicU64::new(0),
            used: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }
}

impl LogBudget {
    /// Whether a line may be logged now; `Some(n)`: yes, and `n` lines were held back since
    /// the last one logged.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let window = (now.duration_since(self.origin).as_millis() / LOG_WINDOW.as_millis()) as u64;
        let current = self.window.load(Ordering::Relaxed);
        if window > current
            && self
                .window
                .compare_exchange(current, window, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < LOG_LINES_PER_WINDOW {
            Some(self.held_back.swap(0, Ordering::Relaxed))
        } else {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// What a connection's publish rate limiter says after a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RateVerdict {
    /// Within the rate: keep reading.
    Within,
    /// Over the rate: do not read the socket again before this instant (TCP flow control
    /// then slows the client down).
    PauseUntil(Instant),
    /// Over the rate for longer than the grace period: disconnect (0x96).
    Exceeded,
}

/// A token bucket of publishes for one connection, charged once per socket read with the
/// number of publishes that read held (the bucket may go into debt: those publishes are
/// already read and are accepted; the debt is paid by not reading for a while).
#[derive(Debug)]
pub(crate) struct PublishRate {
    /// Publishes per second.
    rate: f64,
    /// Bucket size: the burst allowed above the rate.
    burst: f64,
    /// How long a client may stay over the rate.
    grace: Duration,
    tokens: f64,
    refilled: Instant,
    /// Since when every read found the client over its rate.
    over_since: Option<Instant>,
}

impl PublishRate {
    /// A full bucket for `rate` publishes per second with room for `burst`.
    pub(crate) fn new(rate: u32, burst: u32, grace: Duration, now: Instant) -> PublishRate {
        let burst = f64::from(burst.max(1));
        PublishRate {
            rate: f64::from(rate.max(1)),
            burst,
            grace,
            tokens: burst,
            refilled: now,
            over_since: None,
        }
    }

    /// Charges `publishes` read at `now`.
    pub(crate) fn charge(&mut self, publishes: u32, now: Instant) -> RateVerdict {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= self.burst {
            // The client was quiet long enough to fill the bucket: whatever it did before is
            // forgiven.
            self.over_since = None;
        }
        self.tokens -= f64::from(publishes);
        if self.tokens >= 0.0 {
            self.over_since = None;
            return RateVerdict::Within;
        }
        let since = *self.over_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= self.grace {
            return RateVerdict::Exceeded;
        }
        RateVerdict::PauseUntil(now + Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn message_props_are_checked_at_and_past_each_limit() {
        use crate::config::{ByteSize, MqttConfig};
        use crate::mqtt::codec::MessageProps;
        let cfg = MqttConfig {
            max_user_properties: 3,
            max_user_properties_bytes: ByteSize(4 * (4 + 2)),
            max_content_type_length: 5,
            max_correlation_data_length: 6,
            max_topic_length: 7,
            ..MqttConfig::default()
        };
        let prop = ("a".to_string(), "b".to_string());
        let at = MessageProps {
            user_properties: vec![prop.clone(); 3],
            content_type: Some("c".repeat(5)),
            correlation_data: Some(bytes::Bytes::from(vec![0; 6])),
            response_topic: Some("r".repeat(7)),
            ..MessageProps::default()
        };
        assert_eq!(check_message_props(&at, &cfg), Ok(()));
        let past = |f: &dyn Fn(&mut MessageProps)| {
            let mut p = at.clone();
            f(&mut p);
            check_message_props(&p, &cfg).unwrap_err().0
        };
        assert_eq!(
            past(&|p| p.user_properties.push(prop.clone())),
            PacketRefused::UserProperties
        );
        assert_eq!(
            past(&|p| p.user_properties[0].1 = "b".repeat(8)),
            PacketRefused::UserPropertiesBytes
        );
        assert_eq!(
            past(&|p| p.content_type = Some("c".repeat(6))),
            PacketRefused::ContentType
        );
        assert_eq!(
            past(&|p| p.correlation_data = Some(bytes::Bytes::from(vec![0; 7]))),
            PacketRefused::CorrelationData
        );
        assert_eq!(
            past(&|p| p.response_topic = Some("r".repeat(8))),
            PacketRefused::TopicLength
        );
    }

    #[test]
    fn per_address_slots_are_limited_and_released() {
        let limits = Limits::default();
        let a = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let b = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
        assert!(limits.try_take(a, 2));
        assert!(limits.try_take(a, 2));
        assert!(
            !limits.try_take(a, 2),
            "a third connection from one address"
        );
        assert!(limits.try_take(b, 2), "other addresses are not affected");
        assert_eq!(limits.connections_from(a), 2);
        limits.release(a);
        assert_eq!(limits.connections_from(a), 1);
        assert!(limits.try_take(a, 2), "a released slot can be taken again");
        limits.release(a);
        limits.release(a);
        limits.release(b);
        assert_eq!(limits.connections_from(a), 0);
        assert!(
            limits.per_address.lock().unwrap().is_empty(),
            "addresses without connections are forgotten"
        );
    }

    #[test]
    fn ipv4_mapped_ipv6_counts_as_its_ipv4_address() {
        let limits = Limits::default();
        let v4 = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 9));
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 168, 1, 9).to_ipv6_mapped());
        assert!(limits.try_take(v4, 1));
        assert!(!limits.try_take(mapped, 1));
        limits.release(mapped);
        assert_eq!(limits.connections_from(v4), 0);
    }

    #[test]
    fn no_per_address_limit_tracks_nothing() {
        let limits = Limits::default();
        let a = IpAddr::V4(Ipv4Addr::LOCALHOST);
        for _ in 0..10 {
            assert!(limits.try_take(a, 0));
        }
        assert_eq!(limits.connections_from(a), 0);
    }

    #[test]
    fn connect_buffers_share_one_budget_and_give_it_back() {
        let limits = Limits::default();
        let budget = 10_000;
        let mut a = limits.connect_buffer(budget);
        assert!(a.hold(CONNECT_FREE_BYTES), "the first bytes are free");
        assert_eq!(limits.connect_bytes.load(Ordering::Relaxed), 0);
        assert!(a.hold(CONNECT_FREE_BYTES + 6_000));
        let mut b = limits.connect_buffer(budget);
        assert!(b.hold(CONNECT_FREE_BYTES + 4_000));
        assert!(
            !b.hold(CONNECT_FREE_BYTES + 4_001),
            "the budget is shared by all connections"
        );
        assert_eq!(limits.connect_bytes.load(Ordering::Relaxed), 10_000);
        drop(a);
        assert!(b.hold(CONNECT_FREE_BYTES + 9_000), "freed by the first one");
        drop(b);
        assert_eq!(limits.connect_bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn refusals_are_counted_by_reason() {
        let limits = Limits::default();
        limits.refused(Refused::PerAddress);
        limits.refused(Refused::PerAddress);
        limits.refused(Refused::ConnectTimeout);
        assert_eq!(limits.refused_count(Refused::PerAddress), 2);
        assert_eq!(limits.refused_count(Refused::ConnectTimeout), 1);
        assert_eq!(limits.refused_count(Refused::Malformed), 0);
    }

    #[test]
    fn log_budget_holds_back_a_flood_and_reports_it() {
        let budget = LogBudget::default();
        let t0 = budget.origin;
        for _ in 0..LOG_LINES_PER_WINDOW {
            assert_eq!(budget.admit_at(t0), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(budget.admit_at(t0 + ms(1)), None);
        }
        assert_eq!(
            budget.admit_at(t0 + LOG_WINDOW),
            Some(1000),
            "the next window's first line says how many were held back"
        );
        assert_eq!(budget.admit_at(t0 + LOG_WINDOW), Some(0));
    }

    #[test]
    fn publishes_within_the_rate_are_never_paused() {
        let t0 = Instant::now();
        let mut r = PublishRate::new(100, 100, Duration::from_secs(5), t0);
        // 10 publishes every 100 ms is exactly 100/s.
        for i in 1..=100 {
            assert_eq!(r.charge(10, t0 + ms(100 * i)), RateVerdict::Within);
        }
    }

    #[test]
    fn a_burst_up_to_the_bucket_passes_and_beyond_it_pauses_for_the_debt() {
        let t0 = Instant::now();
        let mut r = PublishRate::new(100, 50, Duration::from_secs(5), t0);
        assert_eq!(r.charge(50, t0), RateVerdict::Within);
        // 20 more at once: 20 in debt at 100/s is 200 ms of not reading.
        match r.charge(20, t0) {
            RateVerdict::PauseUntil(until) => {
                let pause = until - t0;
                assert!(pause >= ms(199) && pause <= ms(201), "{pause:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn staying_over_the_rate_past_the_grace_exceeds_it() {
        let t0 = Instant::now();
        let mut r = PublishRate::new(100, 100, Duration::from_secs(2), t0);
        // 200/s, read every 100 ms after each pause: over the rate at every read.
        let mut verdict = RateVerdict::Within;
        let mut t = t0;
        for _ in 0..100 {
            verdict = r.charge(20, t);
            if verdict == RateVerdict::Exceeded {
                break;
            }
            t += ms(100);
        }
        assert_eq!(verdict, RateVerdict::Exceeded);
        let over = t - t0;
        assert!(
            over >= Duration::from_secs(2),
            "not before the grace: {over:?}"
        );
    }

    #[test]
    fn a_client_back_under_the_rate_is_forgiven() {
        let t0 = Instant::now();
        let mut r = PublishRate::new(100, 100, Duration::from_secs(2), t0);
        assert!(matches!(r.charge(150, t0), RateVerdict::PauseUntil(_)));
        // Under the rate afterwards: the debt is paid and the grace starts over.
        assert_eq!(r.charge(10, t0 + ms(1000)), RateVerdict::Within);
        assert!(matches!(
            r.charge(150, t0 + ms(2500)),
            RateVerdict::PauseUntil(_)
        ));
        assert!(matches!(
            r.charge(150, t0 + ms(4000)),
            RateVerdict::PauseUntil(_)
        ));
    }

    #[test]
    fn a_quiet_spell_that_refills_the_bucket_resets_the_grace() {
        let t0 = Instant::now();
        let mut r = PublishRate::new(10, 10, Duration::from_secs(3), t0);
        assert!(matches!(r.charge(30, t0), RateVerdict::PauseUntil(_)));
        // Quiet for 10 s: the bucket is full again, and a new burst over it only pauses.
        assert!(matches!(
            r.charge(30, t0 + Duration::from_secs(10)),
            RateVerdict::PauseUntil(_)
        ));
    }
}
