//! `[mqtt]` and `[tls]`: the MQTT listeners, and the limits on what a client sends.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ByteSize, HumanDuration, Invalid};

/// The most `mqtt.max_topic_length` and `mqtt.max_filter_length` may be set to.
pub const MAX_TOPIC_LENGTH_CEILING: usize = 32 * 1024;

/// The most `mqtt.max_client_id_length` may be set to. With a topic or filter at its ceiling
/// and a 3-byte tag and length, a stored key stays under fjall's 65535 bytes.
pub const MAX_CLIENT_ID_CEILING: usize = 16 * 1024;

/// `mqtt.session_expiry_default`: `"never"` or a duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionExpiry {
    /// Kept until a clean session of the same client id ends it.
    Never,
    /// Kept this long after the client disconnects.
    After(Duration),
}

impl SessionExpiry {
    /// As an MQTT Session Expiry Interval in seconds (`u32::MAX`: never).
    pub fn as_interval(self) -> u32 {
        match self {
            SessionExpiry::Never => u32::MAX,
            SessionExpiry::After(d) => u32::try_from(d.as_secs())
                .unwrap_or(u32::MAX - 1)
                .clamp(1, u32::MAX - 1),
        }
    }
}

impl Serialize for SessionExpiry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            SessionExpiry::Never => s.serialize_str("never"),
            SessionExpiry::After(d) => HumanDuration(*d).serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for SessionExpiry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == "never" {
            return Ok(SessionExpiry::Never);
        }
        let parsed: HumanDuration = text.parse().map_err(serde::de::Error::custom)?;
        if parsed.0.is_zero() {
            return Err(serde::de::Error::custom(
                "a persistent session must be kept for some time: write a duration above 0s, or \"never\"",
            ));
        }
        Ok(SessionExpiry::After(parsed.0))
    }
}

/// One limit on what a client sends, as the README's limits table lists it.
#[derive(Debug, Clone, Copy)]
pub struct InputLimit {
    /// The config key.
    pub key: &'static str,
    /// What it bounds.
    pub bounds: &'static str,
    /// The most the key may be set to (what the stored encoding holds), if it has a ceiling.
    pub ceiling: Option<u64>,
    /// What a client over it gets.
    pub over: &'static str,
}

/// Every limit on client input that reaches storage or memory, for the README (generated
/// by edge/tests/config_reference.rs, which also checks each ceiling against the config's
/// validation).
pub const INPUT_LIMITS: &[InputLimit] = &[
    InputLimit {
        key: "mqtt.max_packet_size",
        bounds: "every packet: payloads, wills, CONNECTs",
        ceiling: Some(256 * 1024 * 1024 - 1),
        over: "5.0: DISCONNECT 0x95 (a CONNECT: CONNACK 0x95); 3.1.1: closed",
    },
    InputLimit {
        key: "mqtt.max_topic_length",
        bounds: "topic names: PUBLISH, will, response topic",
        ceiling: Some(MAX_TOPIC_LENGTH_CEILING as u64),
        over: "5.0: DISCONNECT 0x90 (response topic: 0x95; a will: CONNACK 0x90); 3.1.1: closed",
    },
    InputLimit {
        key: "mqtt.max_topic_levels",
        bounds: "levels of a topic name or filter",
        ceiling: None,
        over: "as for the topic's or filter's length",
    },
    InputLimit {
        key: "mqtt.max_filter_length",
        bounds: "topic filters of SUBSCRIBE, `$share/{name}/` included",
        ceiling: Some(MAX_TOPIC_LENGTH_CEILING as u64),
        over: "that filter refused: SUBACK 0x8F (3.1.1: 0x80); the connection stays",
    },
    InputLimit {
        key: "mqtt.max_client_id_length",
        bounds: "client identifiers",
        ceiling: Some(MAX_CLIENT_ID_CEILING as u64),
        over: "CONNACK 0x85 (3.1.1: return code 2)",
    },
    InputLimit {
        key: "mqtt.max_user_properties",
        bounds: "user properties of one PUBLISH or will",
        ceiling: Some(65_535),
        over: "DISCONNECT 0x95 (a will: CONNACK 0x95)",
    },
    InputLimit {
        key: "mqtt.max_user_properties_bytes",
        bounds: "total size of one message's user properties",
        ceiling: None,
        over: "DISCONNECT 0x95 (a will: CONNACK 0x95)",
    },
    InputLimit {
        key: "mqtt.max_content_type_length",
        bounds: "Content Type",
        ceiling: Some(65_535),
        over: "DISCONNECT 0x95 (a will: CONNACK 0x95)",
    },
    InputLimit {
        key: "mqtt.max_correlation_data_length",
        bounds: "Correlation Data",
        ceiling: Some(65_535),
        over: "DISCONNECT 0x95 (a will: CONNACK 0x95)",
    },
    InputLimit {
        key: "mqtt.max_subscriptions_per_client",
        bounds: "subscriptions one session holds",
        ceiling: None,
        over: "that filter refused: SUBACK 0x97 (3.1.1: 0x80)",
    },
    InputLimit {
        key: "mqtt.receive_maximum",
        bounds: "unacknowledged QoS 1/2 publishes of one client",
        ceiling: Some(65_535),
        over: "DISCONNECT 0x93 (3.1.1: the socket is not read)",
    },
    InputLimit {
        key: "mqtt.max_sessions",
        bounds: "sessions held, connected or not",
        ceiling: None,
        over: "CONNACK 0x97 (3.1.1: return code 3)",
    },
    InputLimit {
        key: "mqtt.session_expiry_default",
        bounds: "how long a 3.1.1 persistent session outlives its connection",
        ceiling: None,
        over: "the session and its queue are deleted",
    },
    InputLimit {
        key: "mqtt.max_retained_messages",
        bounds: "retained messages held",
        ceiling: None,
        over: "the retained publish is refused: 5.0 0x97; 3.1.1: closed",
    },
    InputLimit {
        key: "mqtt.max_retained_bytes",
        bounds: "bytes of retained messages held",
        ceiling: None,
        over: "as `max_retained_messages`",
    },
    InputLimit {
        key: "mqtt.max_will_delay",
        bounds: "how long a delayed will is held",
        ceiling: None,
        over: "published when it runs out",
    },
    InputLimit {
        key: "mqtt.max_pending_wills",
        bounds: "wills waiting out their delay, node-wide",
        ceiling: None,
        over: "the next will is published at once",
    },
    InputLimit {
        key: "mqtt.max_pending_will_bytes",
        bounds: "bytes of wills waiting out their delay, node-wide",
        ceiling: None,
        over: "the next will is published at once",
    },
    InputLimit {
        key: "mqtt.max_offline_messages",
        bounds: "messages stored for one disconnected persistent session",
        ceiling: None,
        over: "later ones are not queued, and counted",
    },
    InputLimit {
        key: "mqtt.max_queued_messages",
        bounds: "messages in memory for one connected subscriber",
        ceiling: None,
        over: "QoS 0 dropped and counted; a subscriber over it too long is disconnected",
    },
    InputLimit {
        key: "mqtt.max_queued_bytes",
        bounds: "bytes in memory for one connected subscriber",
        ceiling: None,
        over: "as `max_queued_messages`",
    },
    InputLimit {
        key: "mqtt.max_connections",
        bounds: "connections of the node",
        ceiling: None,
        over: "CONNACK 0x89 (3.1.1: 3); far past it, closed at accept",
    },
    InputLimit {
        key: "mqtt.max_connections_per_address",
        bounds: "connections from one IP address",
        ceiling: None,
        over: "closed at accept",
    },
];

/// `[mqtt]`: the MQTT listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Address and port of the plain-TCP MQTT listener (3.1.1 and 5.0 on the same port): a
    /// shorthand for a `[[listeners]]` entry with `protocol = "mqtt"`. Unset: `0.0.0.0:1883`
    /// when the config has no `[[listeners]]`, none when it has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Moved to `[auth] allow_anonymous`; setting it here is an error that says so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_anonymous: Option<bool>,
    /// Largest MQTT packet accepted, in bytes (`"1MiB"` or a number). Larger packets close the
    /// connection (MQTT 5: DISCONNECT 0x95 Packet too large). Announced to v5 clients.
    pub max_packet_size: ByteSize,
    /// MQTT 5 Receive Maximum announced to clients: QoS 1 and 2 publishes a client may have
    /// unacknowledged at once. Exceeding it closes the connection with 0x93. For 3.1.1 clients
    /// the same number bounds what the edge reads ahead before it stops reading the socket.
    pub receive_maximum: u16,
    /// MQTT 5 Topic Alias Maximum announced to clients (0 disables inbound aliases).
    pub topic_alias_maximum: u16,
    /// Longest topic name accepted, in bytes: in a PUBLISH, a will and a response topic.
    /// Longer ones close the connection (5.0: 0x90 Topic name invalid; a will's: CONNACK
    /// 0x90). At most 32768, so that every stored key that holds a topic fits its encoding.
    pub max_topic_length: usize,
    /// Most levels (`/`-separated parts) a published topic may have.
    pub max_topic_levels: usize,
    /// Longest topic filter accepted in a SUBSCRIBE, in bytes, `$share/{name}/` included.
    /// A longer filter is refused alone (SUBACK 0x8F Topic filter invalid; 3.1.1: 0x80).
    /// At most 32768.
    pub max_filter_length: usize,
    /// Longest client identifier accepted, in bytes (23 to 16384).
    pub max_client_id_length: usize,
    /// Most MQTT 5 user properties one PUBLISH or will may carry (0 to 65535). More close the
    /// connection with 0x95 Packet too large (a will's: CONNACK 0x95).
    pub max_user_properties: usize,
    /// Largest total size of one message's user properties (names, values and their 2-byte
    /// length prefixes), with the same refusal.
    pub max_user_properties_bytes: ByteSize,
    /// Longest MQTT 5 Content Type accepted, in bytes (at most 65535), with the same refusal.
    pub max_content_type_length: usize,
    /// Longest MQTT 5 Correlation Data accepted, in bytes (at most 65535), with the same
    /// refusal.
    pub max_correlation_data_length: usize,
    /// Time allowed between TCP accept and a complete CONNECT packet. It is one deadline for
    /// the whole packet, so a client trickling its CONNECT a byte at a time is cut too. On
    /// the TLS listener the handshake gets this long too, before the CONNECT's own time
    /// starts.
    pub connect_timeout: HumanDuration,
    /// Largest keepalive granted; a client asking for more (or for 0) gets this value as the
    /// MQTT 5 Server Keep Alive. `"0s"` grants whatever the client asks.
    pub max_keepalive: HumanDuration,
    /// Most simultaneous client connections; further connections are refused
    /// (3.1.1: return code 3, 5.0: 0x89 Server busy). Sockets beyond it by more than 64 are
    /// closed at accept, before anything is read, so connections that never send CONNECT
    /// cannot use up the edge's file descriptors.
    pub max_connections: usize,
    /// Most simultaneous connections from one source IP address (counted from TCP accept,
    /// CONNECT or not); further sockets from that address are closed at once. Devices
    /// behind one NAT gateway share its address: raise this to the size of the largest such
    /// fleet. `0`: no per-address limit.
    pub max_connections_per_address: u32,
    /// Most subscriptions one session may hold; further filters of a SUBSCRIBE get
    /// 0x97 Quota exceeded (3.1.1: 0x80 Failure) while the others are granted.
    pub max_subscriptions_per_client: usize,
    /// Publishes per second one connection may send on average (all QoS). A client over it
    /// is first slowed down: the edge stops reading its socket until it is back within the
    /// rate, so TCP flow control holds the client back. One that stays over it for
    /// `publish_rate_grace` is disconnected (5.0: DISCONNECT 0x96 Message rate too high;
    /// 3.1.1: closed). `0` (default): no rate limit; the edge's own throughput and the
    /// in-flight limits bound what a client can do.
    pub max_publish_rate: u32,
    /// Publishes a connection may send at once above `max_publish_rate` (the token bucket's
    /// size). `0`: one second's worth, `max_publish_rate`.
    pub publish_burst: u32,
    /// How long a connection may stay over `max_publish_rate` (being slowed down) before it
    /// is disconnected with 0x96.
    pub publish_rate_grace: HumanDuration,
    /// QoS 1 and 2 messages the edge sends a subscriber before it waits for acknowledgements
    /// (a 5.0 client's smaller Receive Maximum wins).
    pub max_inflight_messages: u16,
    /// Messages queued in memory for one connected subscriber. Past it QoS 0 messages are
    /// dropped (and counted); QoS 1 and 2 are kept up to twice the bound.
    pub max_queued_messages: usize,
    /// Bytes queued in memory for one connected subscriber, with the same rules.
    pub max_queued_bytes: ByteSize,
    /// A subscriber whose queue stays over its bound this long is disconnected (5.0: 0x97
    /// Quota exceeded); a persistent session keeps its queued QoS 1 and 2 messages.
    pub slow_subscriber_timeout: HumanDuration,
    /// How long a 3.1.1 persistent session (clean session 0) is kept after its client
    /// disconnects, like Mosquitto's `persistent_client_expiration`: a duration, or
    /// `"never"`. 3.1.1 has no session expiry of its own, so without this every client id
    /// that ever connected with clean session 0 keeps its subscriptions and queue forever.
    pub session_expiry_default: SessionExpiry,
    /// Most sessions held, connected or not (a persistent session stays after its client
    /// disconnects, until it expires). A CONNECT that would start one more is refused
    /// (5.0: CONNACK 0x97 Quota exceeded; 3.1.1: return code 3); clients that hold a
    /// session keep reconnecting to it.
    pub max_sessions: usize,
    /// Most retained messages held (all in memory, and on disk). A retained publish that
    /// would make one more is refused and nothing of it is stored (5.0: PUBACK/PUBREC 0x97
    /// Quota exceeded, a QoS 0 one DISCONNECT 0x97; 3.1.1: the connection closes); replacing
    /// or clearing a topic's retained message is always possible within the byte limit.
    /// Nothing is ever evicted to make room.
    pub max_retained_messages: usize,
    /// Most bytes (topics, payloads, properties) of retained messages held, with the same
    /// rule.
    pub max_retained_bytes: ByteSize,
    /// Longest MQTT 5 Will Delay Interval honoured: a will asking for more is published
    /// this long after its client went away (if its session has not been taken up again).
    pub max_will_delay: HumanDuration,
    /// Most wills waiting out their delay node-wide. A will that finds no room is published
    /// at once instead of after its delay (counted in `tributary_wills_published_early_total`).
    pub max_pending_wills: usize,
    /// Most bytes (topics, payloads, properties) of wills waiting out their delay, with the
    /// same rule.
    pub max_pending_will_bytes: ByteSize,
    /// QoS 1 and 2 messages kept on disk for one disconnected persistent session; later
    /// ones are dropped (and counted).
    pub max_offline_messages: u64,
    /// How often the `$SYS/broker/...` topics are updated; `"0s"` turns them off.
    pub sys_interval: HumanDuration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            listen: None,
            allow_anonymous: None,
            max_packet_size: ByteSize(1024 * 1024),
            receive_maximum: 1024,
            topic_alias_maximum: 64,
            max_topic_length: 1024,
            max_topic_levels: 32,
            max_filter_length: 1024,
            max_client_id_length: 256,
            max_user_properties: 128,
            max_user_properties_bytes: ByteSize(64 * 1024),
            max_content_type_length: 256,
            max_correlation_data_length: 4096,
            connect_timeout: HumanDuration(Duration::from_secs(10)),
            max_keepalive: HumanDuration(Duration::ZERO),
            max_connections: 100_000,
            max_connections_per_address: 1000,
            max_subscriptions_per_client: 1000,
            max_publish_rate: 0,
            publish_burst: 0,
            publish_rate_grace: HumanDuration(Duration::from_secs(10)),
            max_inflight_messages: 1024,
            max_queued_messages: 1000,
            max_queued_bytes: ByteSize(16 * 1024 * 1024),
            slow_subscriber_timeout: HumanDuration(Duration::from_secs(10)),
            session_expiry_default: SessionExpiry::Never,
            max_sessions: 200_000,
            max_retained_messages: 100_000,
            max_retained_bytes: ByteSize(128 * 1024 * 1024),
            max_will_delay: HumanDuration(Duration::from_secs(24 * 3600)),
            max_pending_wills: 10_000,
            max_pending_will_bytes: ByteSize(64 * 1024 * 1024),
            max_offline_messages: 100_000,
            sys_interval: HumanDuration(Duration::from_secs(5)),
        }
    }
}

impl MqttConfig {
    /// Checks the limits against what MQTT and the stored encodings allow.
    pub fn validate(&self) -> Result<(), Invalid> {
        let m = self;
        if m.max_packet_size.0 < 64 || m.max_packet_size.0 > 268_435_455 {
            return Err(Invalid::new(
                "mqtt.max_packet_size",
                format!(
                    "{} bytes is out of range: MQTT allows 64 B to 256 MiB",
                    m.max_packet_size.0
                ),
            ));
        }
        if m.receive_maximum == 0 {
            return Err(Invalid::new("mqtt.receive_maximum", "must be at least 1"));
        }
        // Stored keys hold a topic or filter after a client id (`u | len | client | filter`)
        // and fjall keys hold at most 65535 bytes: these ceilings keep every key below it.
        if m.max_topic_length == 0 || m.max_topic_length > MAX_TOPIC_LENGTH_CEILING {
            return Err(Invalid::new(
                "mqtt.max_topic_length",
                format!("must be between 1 and {MAX_TOPIC_LENGTH_CEILING} bytes"),
            ));
        }
        if m.max_filter_length == 0 || m.max_filter_length > MAX_TOPIC_LENGTH_CEILING {
            return Err(Invalid::new(
                "mqtt.max_filter_length",
                format!("must be between 1 and {MAX_TOPIC_LENGTH_CEILING} bytes"),
            ));
        }
        for (key, value) in [
            ("mqtt.max_user_properties", m.max_user_properties),
            ("mqtt.max_content_type_length", m.max_content_type_length),
            (
                "mqtt.max_correlation_data_length",
                m.max_correlation_data_length,
            ),
        ] {
            if value > 65_535 {
                return Err(Invalid::new(
                    key,
                    format!("{value} is more than the 65535 the record encoding holds"),
                ));
            }
        }
        if m.max_topic_levels == 0 {
            return Err(Invalid::new("mqtt.max_topic_levels", "must be at least 1"));
        }
        if m.max_client_id_length < 23 || m.max_client_id_length > MAX_CLIENT_ID_CEILING {
            return Err(Invalid::new(
                "mqtt.max_client_id_length",
                format!("must be between 23 (the MQTT minimum) and {MAX_CLIENT_ID_CEILING}"),
            ));
        }
        if m.max_keepalive.0.as_secs() > u16::MAX as u64 {
            return Err(Invalid::new("mqtt.max_keepalive", "must be at most 65535s"));
        }
        if m.max_connections == 0 {
            return Err(Invalid::new("mqtt.max_connections", "must be at least 1"));
        }
        if m.max_publish_rate > 0 && m.publish_rate_grace.0.is_zero() {
            return Err(Invalid::new(
                "mqtt.publish_rate_grace",
                "0s would disconnect a client at its first burst over max_publish_rate: give it time to slow down (e.g. \"10s\")",
            ));
        }
        if m.max_publish_rate == 0 && m.publish_burst > 0 {
            return Err(Invalid::new(
                "mqtt.publish_burst",
                "a burst needs a rate: set mqtt.max_publish_rate too, or remove publish_burst",
            ));
        }
        for (key, zero) in [
            (
                "mqtt.max_subscriptions_per_client",
                m.max_subscriptions_per_client == 0,
            ),
            ("mqtt.max_inflight_messages", m.max_inflight_messages == 0),
            ("mqtt.max_queued_messages", m.max_queued_messages == 0),
            ("mqtt.max_queued_bytes", m.max_queued_bytes.0 == 0),
            ("mqtt.max_offline_messages", m.max_offline_messages == 0),
        ] {
            if zero {
                return Err(Invalid::new(key, "must be at least 1"));
            }
        }
        if let Some(v) = m.allow_anonymous {
            return Err(Invalid::new(
                "mqtt.allow_anonymous",
                format!("moved to the [auth] section: remove it here and write `allow_anonymous = {v}` under [auth]"),
            ));
        }
        Ok(())
    }
}

/// The plain listener's address when neither `mqtt.listen` nor `[[listeners]]` is written.
pub(super) fn default_mqtt_listen() -> SocketAddr {
    "0.0.0.0:1883".parse().expect("literal address")
}

/// `[tls]`: MQTT over TLS (1.2 and 1.3, rustls), and mutual TLS when `client_ca_file` is set.
///
/// With `client_ca_file`, client certificates are required. Minimal form: `cert_file = "server.pem"` and
/// `key_file = "server.key"`. The TLS listener
/// shares everything else with the plain one (`[mqtt]` limits, `max_connections`,
/// `connect_timeout`, which also bounds the TLS handshake). On SIGHUP the edge reads the
/// certificate, key and client CA files again: new handshakes use them, open connections
/// stay up; a reload that fails is logged and the previous files stay in use.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Address and port of the TLS listener.
    #[serde(default = "TlsConfig::default_listen")]
    pub listen: SocketAddr,
    /// The server's certificate chain (PEM): its own certificate first, then any
    /// intermediates.
    pub cert_file: PathBuf,
    /// The private key of that certificate (PEM: PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub key_file: PathBuf,
    /// CA certificates (PEM) that sign client certificates. When set, every TLS client must
    /// present a certificate that chains to one of them and is within its validity period
    /// (mutual TLS); `identity` names the part of it that becomes the client's username.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// With mutual TLS, which part of the client certificate is the client's username (for
    /// ACLs and the admin API): `"cn"` the subject's Common Name; `"san_dns"`, `"san_email"`
    /// or `"san_uri"` the first Subject Alternative Name of that kind. A connection whose
    /// certificate lacks it is closed after the handshake, and the reason logged.
    #[serde(default)]
    pub identity: CertIdentity,
    /// Oldest TLS version offered: `"1.2"` (1.2 and 1.3) or `"1.3"` (1.3 only).
    #[serde(default)]
    pub min_version: TlsVersion,
}

impl TlsConfig {
    /// The default TLS listen address.
    pub const DEFAULT_LISTEN: &'static str = "0.0.0.0:8883";

    fn default_listen() -> SocketAddr {
        Self::DEFAULT_LISTEN.parse().expect("literal address")
    }
}

/// The part of a client certificate that names the client; see `TlsConfig::identity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CertIdentity {
    /// The subject's Common Name.
    #[default]
    Cn,
    /// The first DNS name among the Subject Alternative Names.
    SanDns,
    /// The first e-mail address (rfc822Name) among the Subject Alternative Names.
    SanEmail,
    /// The first URI among the Subject Alternative Names.
    SanUri,
}

/// Oldest TLS version the listener accepts; see `TlsConfig::min_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    #[test]
    fn session_expiry_default_takes_never_or_a_positive_duration() {
        let c = Config::parse("[mqtt]\nsession_expiry_default = \"2h\"\n", "e.toml").unwrap();
        assert_eq!(c.mqtt.session_expiry_default.as_interval(), 7200);
        let c = Config::parse("[mqtt]\nsession_expiry_default = \"never\"\n", "e.toml").unwrap();
        assert_eq!(c.mqtt.session_expiry_default.as_interval(), u32::MAX);
        let err = Config::parse("[mqtt]\nsession_expiry_default = \"0s\"\n", "e.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("never"), "{err}");
    }

    #[test]
    fn length_limits_stop_at_what_stored_keys_hold() {
        for (key, at, past) in [
            (
                "max_topic_length",
                MAX_TOPIC_LENGTH_CEILING,
                MAX_TOPIC_LENGTH_CEILING + 1,
            ),
            (
                "max_filter_length",
                MAX_TOPIC_LENGTH_CEILING,
                MAX_TOPIC_LENGTH_CEILING + 1,
            ),
            (
                "max_client_id_length",
                MAX_CLIENT_ID_CEILING,
                MAX_CLIENT_ID_CEILING + 1,
            ),
            ("max_user_properties", 65_535, 65_536),
            ("max_content_type_length", 65_535, 65_536),
            ("max_correlation_data_length", 65_535, 65_536),
        ] {
            let ok = format!("[mqtt]\n{key} = {at}\n");
            assert!(Config::parse(&ok, "e.toml").is_ok(), "{key} = {at}");
            let bad = format!("[mqtt]\n{key} = {past}\n");
            let err = Config::parse(&bad, "e.toml").unwrap_err().to_string();
            assert!(
                err.contains(&format!("mqtt.{key}")),
                "{key} = {past}: {err}"
            );
        }
        // The longest key the limits allow: tag, length, client id, filter.
        assert!(3 + MAX_CLIENT_ID_CEILING + MAX_TOPIC_LENGTH_CEILING <= u16::MAX as usize);
    }

    #[test]
    fn client_limits_have_safe_defaults() {
        let m = Config::parse("", "t.toml").unwrap().mqtt;
        assert_eq!(m.max_connections_per_address, 1000);
        assert_eq!(m.max_subscriptions_per_client, 1000);
        assert_eq!(m.max_publish_rate, 0, "no publish rate limit unless asked");
        assert_eq!(m.publish_rate_grace.0, Duration::from_secs(10));
    }

    #[test]
    fn publish_rate_settings_are_checked_together() {
        let text = "[mqtt]\nmax_publish_rate = 50\npublish_rate_grace = \"0s\"\n";
        let err = Config::parse(text, "r.toml").unwrap_err().to_string();
        assert!(err.contains("r.toml:3: mqtt.publish_rate_grace"), "{err}");
        let text = "[mqtt]\npublish_burst = 10\n";
        let err = Config::parse(text, "r.toml").unwrap_err().to_string();
        assert!(err.contains("r.toml:2: mqtt.publish_burst"), "{err}");
        assert!(err.contains("max_publish_rate"), "{err}");
        let text = "[mqtt]\nmax_subscriptions_per_client = 0\n";
        let err = Config::parse(text, "r.toml").unwrap_err().to_string();
        assert!(
            err.contains("mqtt.max_subscriptions_per_client: must be at least 1"),
            "{err}"
        );
        let ok = "[mqtt]\nmax_publish_rate = 50\npublish_burst = 200\npublish_rate_grace = \"3s\"\nmax_connections_per_address = 0\n";
        let m = Config::parse(ok, "r.toml").unwrap().mqtt;
        assert_eq!((m.max_publish_rate, m.publish_burst), (50, 200));
        assert_eq!(m.max_connections_per_address, 0);
    }

    #[test]
    fn old_allow_anonymous_key_says_where_it_moved() {
        let err = Config::parse("[mqtt]\nallow_anonymous = true\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("config t.toml:2: mqtt.allow_anonymous: moved to the [auth] section"),
            "{err}"
        );
    }

    #[test]
    fn unknown_tls_identity_is_named_with_its_line() {
        let text = "[tls]\ncert_file = \"a\"\nkey_file = \"b\"\nidentity = \"serial\"\n";
        let err = Config::parse(text, "e.toml").unwrap_err().to_string();
        assert!(err.starts_with("config e.toml:4:"), "{err}");
        assert!(err.contains("san_dns"), "{err}");
        let text = "[tls]\ncert_file = \"a\"\nkey_file = \"b\"\nmin_version = \"1.1\"\n";
        let err = Config::parse(text, "e.toml").unwrap_err().to_string();
        assert!(err.starts_with("config e.toml:4:"), "{err}");
    }
}
