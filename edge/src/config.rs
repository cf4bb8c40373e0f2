//! The edge's configuration: a TOML file whose every key has a default.
//!
//! The doc comment on each field is the user documentation of that key. Defaults live in the
//! `Default` impls of this module and nowhere else. `Config::load` parses with
//! `deny_unknown_fields` and then validates; every error names the file, the line and the key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};
use toml::Spanned;

use crate::route::{KeyTemplate, TopicFilter, TopicId};

/// A configuration that cannot be used, with the place and the key it comes from.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key or a value of the wrong type.
    #[error("config {origin}:{line}: {message}")]
    Parse {
        /// File name, or `<embedded>`.
        origin: String,
        /// 1-based line of the offending key or value.
        line: usize,
        /// The parser's account, which names the key.
        message: String,
    },
    /// The values parse but do not make sense together.
    #[error("config {origin}:{line}: {key}: {message}")]
    Invalid {
        /// File name, or `<embedded>`.
        origin: String,
        /// 1-based line of the offending value (0 when it has no place in the file).
        line: usize,
        /// Dotted path of the key, `routes[0].key`.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// The whole configuration of an edge node.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The MQTT listener and its protocol limits.
    pub mqtt: MqttConfig,
    /// Where and how the log is stored.
    pub storage: StorageConfig,
    /// Where publishes that match no route go.
    pub default_route: DefaultRoute,
    /// Per-topic settings of the log (partitions, retention), by log topic name.
    pub topics: BTreeMap<String, TopicConfig>,
    /// Routes from MQTT topic filters to log topics, tried in order; the first match wins.
    pub routes: Vec<RouteConfig>,
    /// The uplink to Kafka. Without this section the edge only logs locally.
    pub cloud: Option<CloudConfig>,
    /// The admin HTTP endpoint (health, metrics, JSON API).
    pub admin: AdminConfig,
    /// Who may connect and what they may publish and subscribe to.
    pub auth: AuthConfig,
    /// A TLS listener for MQTT, beside the plain one. Without this section the edge serves
    /// plain TCP only.
    pub tls: Option<TlsConfig>,
    /// Durable consumer groups over log topics, read by MQTT clients through shared
    /// subscriptions.
    pub groups: Vec<GroupConfig>,
}

/// `[auth]`: client authentication (password file) and authorization (ACL file).
///
/// Without this section every client may connect and do anything, and the edge warns at
/// start. Both files are read again on SIGHUP; a file with an error is reported in the log
/// and the rules in force stay.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Password file: `user:hash` lines, written by `edge passwd FILE USER` (argon2id).
    /// Files made by Mosquitto's `mosquitto_passwd` (`$6$` and `$7$` hashes) work as they
    /// are. Once set, clients must log in with a user name and password (5.0: 0x86 Bad user
    /// name or password; 3.1.1: return code 4) unless `allow_anonymous = true`.
    pub password_file: Option<PathBuf>,
    /// ACL file in Mosquitto's `acl_file` syntax: `user NAME` starts a user's block,
    /// `topic [read|write|readwrite|deny] FILTER` grants within it (or to anonymous clients
    /// before the first `user` line), `pattern [read|write|readwrite|deny] FILTER` grants to
    /// every client with `%u` (user name) and `%c` (client id) substituted. `read` allows
    /// subscribing, `write` publishing; a matching `deny` wins over any allow. Once set,
    /// everything not allowed is denied: a publish gets 5.0 PUBACK/PUBREC 0x87 (3.1.1: the
    /// connection is closed), a subscription SUBACK 0x87 (3.1.1: 0x80), a will is refused
    /// at CONNECT. A substituted value holding `+`, `#` or `/` never widens a rule.
    /// `group read NAME` lets the user (or anonymous clients) join durable consumer group
    /// NAME (`[[groups]]`).
    pub acl_file: Option<PathBuf>,
    /// Whether clients without credentials may connect. Default: true without a
    /// `password_file` or `tls.client_ca_file` (the edge warns at start), false with
    /// either. Without a password file a
    /// user name sent in CONNECT is not verified, so it is ignored (the client is anonymous).
    pub allow_anonymous: Option<bool>,
    /// How long a refused CONNECT waits before its CONNACK, for the first failure from an
    /// address; each further failure from that address within a minute doubles it.
    pub failure_delay: HumanDuration,
    /// The most a refused CONNECT waits.
    pub max_failure_delay: HumanDuration,
    /// Which client ids a logged-in user may use: `"any"`; `"username"`, the client id
    /// must equal the user name (from the password file or the client certificate);
    /// `"username-prefix"`, it must start with `{user}-` or `{user}/`. Otherwise CONNACK
    /// 0x85 Client identifier not valid (3.1.1: return code 2). Anonymous clients are not
    /// affected. With `"any"` and an ACL that grants by `%c`, any user can claim any
    /// device's client id and with it that device's rights: `edge check-config` warns.
    /// Whatever this says, a persistent session a user started can only be resumed or taken
    /// over by that same user (0x87 Not authorized; 3.1.1: return code 5).
    pub client_id: ClientIdPolicy,
}

/// `auth.client_id`: how client ids are bound to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientIdPolicy {
    /// Any client id.
    #[default]
    Any,
    /// The client id is the user name.
    Username,
    /// The client id starts with `{user}-` or `{user}/`.
    UsernamePrefix,
}

impl AuthConfig {
    /// Settings that are valid but unsafe, each as a sentence for the operator.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let (ClientIdPolicy::Any, Some(acl)) = (self.client_id, &self.acl_file) {
            let uses_client_id = std::fs::read_to_string(acl).is_ok_and(|text| {
                text.lines()
                    .map(str::trim_start)
                    .any(|l| l.starts_with("pattern") && l.contains("%c"))
            });
            if uses_client_id {
                out.push(format!(
                    "auth.acl_file {} grants by %c (client id) while auth.client_id = \"any\": \
                     any user can connect with a device's client id and get its rights (take \
                     over its session, read its commands, publish as it); set auth.client_id \
                     = \"username\" or \"username-prefix\"",
                    acl.display()
                ));
            }
        }
        out
    }
}

impl ClientIdPolicy {
    /// Whether `user` (`None`: anonymous) may use `client_id`.
    pub fn allows(self, user: Option<&str>, client_id: &str) -> bool {
        let Some(user) = user else { return true };
        match self {
            ClientIdPolicy::Any => true,
            ClientIdPolicy::Username => client_id == user,
            ClientIdPolicy::UsernamePrefix => client_id
                .strip_prefix(user)
                .is_some_and(|rest| rest.starts_with('-') || rest.starts_with('/')),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            password_file: None,
            acl_file: None,
            allow_anonymous: None,
            failure_delay: HumanDuration(Duration::from_millis(500)),
            max_failure_delay: HumanDuration(Duration::from_secs(10)),
            client_id: ClientIdPolicy::Any,
        }
    }
}

impl AuthConfig {
    /// Whether clients without credentials may connect, after defaults: not once a password
    /// file or client certificates (`mutual_tls`) authenticate clients.
    pub fn anonymous_allowed(&self, mutual_tls: bool) -> bool {
        self.allow_anonymous
            .unwrap_or(self.password_file.is_none() && !mutual_tls)
    }
}

impl Config {
    /// Whether TLS clients must present a certificate (which then authenticates them).
    pub fn mutual_tls(&self) -> bool {
        self.tls
            .as_ref()
            .is_some_and(|t| t.client_ca_file.is_some())
    }
}

/// Serializes a secret as `"<redacted>"` (for `edge check-config`).
fn redact<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("<redacted>"),
        None => s.serialize_none(),
    }
}

/// `[admin]`: the admin HTTP endpoint.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin HTTP listener. Unset: `127.0.0.1:8080`, and when that port is
    /// taken the edge serves MQTT without it (with a warning); set: a bind failure stops the
    /// edge.
    pub listen: Option<SocketAddr>,
    /// `false` turns the admin endpoint off.
    pub enabled: Option<bool>,
    /// Bearer token every request must carry (`Authorization: Bearer <token>`); required
    /// when `listen` is not a loopback address.
    #[serde(serialize_with = "redact")]
    pub token: Option<String>,
    /// File holding the token (first line), instead of `token`.
    pub token_file: Option<PathBuf>,
    /// Host names and addresses (without a port) the endpoint answers to, besides
    /// `localhost`, `127.0.0.1`, `[::1]` and the address of `listen` (unless that is
    /// `0.0.0.0` or `[::]`), which are always answered. A request whose `Host` header names
    /// another host, or none, gets 421 Misdirected Request before the token is checked: this
    /// keeps a web page that points its own name at this machine (DNS rebinding) from reading
    /// the API through a browser. List the names and addresses that people and scrapers use
    /// to reach the endpoint, e.g. `["edge-7.plant.local", "192.0.2.7"]`.
    pub allowed_hosts: Vec<String>,
}

impl AdminConfig {
    /// The default admin address.
    pub const DEFAULT_LISTEN: &'static str = "127.0.0.1:8080";

    /// Where to listen (`None`: turned off) and whether the address was configured.
    pub fn address(&self) -> Option<(SocketAddr, bool)> {
        if self.enabled == Some(false) {
            return None;
        }
        Some(match self.listen {
            Some(a) => (a, true),
            None => (
                Self::DEFAULT_LISTEN.parse().expect("literal address"),
                false,
            ),
        })
    }

    /// The hosts the endpoint answers to.
    pub fn allowed_hosts(
        &self,
    ) -> Result<crate::admin::hosts::AllowedHosts, (&'static str, String)> {
        let listen = self
            .address()
            .map_or(std::net::Ipv4Addr::LOCALHOST.into(), |(addr, _)| addr.ip());
        crate::admin::hosts::AllowedHosts::new(&self.allowed_hosts, listen)
            .map_err(|message| ("allowed_hosts", message))
    }

    /// The token, read from `token_file` when that is set.
    pub fn token(&self) -> Result<Option<String>, (&'static str, String)> {
        match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => Err((
                "token_file",
                "set either token or token_file, not both".into(),
            )),
            (Some(t), None) => Ok(Some(t.clone())),
            (None, Some(f)) => {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| ("token_file", format!("reading {}: {e}", f.display())))?;
                Ok(text.lines().next().map(|l| l.trim().to_string()))
            }
            (None, None) => Ok(None),
        }
        .and_then(|t| match t {
            Some(t) if t.len() < 16 => Err(("token", "must be at least 16 characters".to_string())),
            t => Ok(t),
        })
    }
}

/// `[cloud]`: mirror the log to an Apache Kafka cluster, exactly once.
///
/// Minimal form: `bootstrap = "kafka-1:9092"` and `site = "plant-7"`. Each log topic `T` is
/// mirrored to Kafka topic `{site}.{T}` with the same partition count (created when missing;
/// a Kafka topic with fewer partitions is refused with an error), MQTT metadata as headers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    /// Kafka bootstrap servers, `"host:port"` or `"h1:9092,h2:9092"`.
    pub bootstrap: String,
    /// Name of this edge site, part of every Kafka topic name and of the checkpoint keys.
    /// Letters, digits, '.', '_' and '-'. Two edges must never share a site name.
    pub site: String,
    /// Kafka topic name of a log topic; `{site}` and `{topic}` are replaced.
    #[serde(default = "CloudConfig::default_topic_format")]
    pub topic_format: String,
    /// Log topics to mirror (default: all).
    #[serde(default)]
    pub topics: Option<Vec<String>>,
    /// Compacted Kafka topic where the mirror keeps its checkpoints (shared by sites).
    #[serde(default = "CloudConfig::default_checkpoint_topic")]
    pub checkpoint_topic: String,
    /// Kafka transactional id (default `tributary-mirror-{site}`).
    #[serde(default)]
    pub transactional_id: Option<String>,
    /// Replication factor of the Kafka topics the mirror creates (default: the cluster's).
    #[serde(default)]
    pub replication_factor: Option<i32>,
    /// Compression of record batches: `"none"`, `"gzip"`, `"snappy"`, `"lz4"`, `"zstd"`.
    #[serde(default = "CloudConfig::default_compression")]
    pub compression: String,
    /// Largest Kafka record batch (librdkafka `batch.size`).
    #[serde(default = "CloudConfig::default_batch_size")]
    pub batch_size: ByteSize,
    /// How long the producer waits to fill a batch (librdkafka `linger.ms`).
    #[serde(default = "CloudConfig::default_linger")]
    pub linger: HumanDuration,
    /// Most record bytes in one Kafka transaction; larger transactions drain a backlog with
    /// less overhead, smaller ones make records visible to read_committed readers sooner.
    #[serde(default = "CloudConfig::default_transaction_size")]
    pub transaction_size: ByteSize,
    /// Cap on record bytes sent per second (`"2MiB"`); unset: as fast as the link allows.
    #[serde(default)]
    pub bandwidth: Option<ByteSize>,
    /// Longest wait between attempts while Kafka is unreachable (the backoff doubles).
    #[serde(default = "CloudConfig::default_max_backoff")]
    pub max_backoff: HumanDuration,
    /// How long a Kafka request (transaction start, commit, metadata) may take.
    #[serde(default = "CloudConfig::default_request_timeout")]
    pub request_timeout: HumanDuration,
    /// `"plaintext"` (default), `"ssl"`, `"sasl_plaintext"` or `"sasl_ssl"`.
    #[serde(default = "CloudConfig::default_security_protocol")]
    pub security_protocol: String,
    /// `"PLAIN"`, `"SCRAM-SHA-256"` or `"SCRAM-SHA-512"` (with a sasl_* protocol).
    #[serde(default)]
    pub sasl_mechanism: Option<String>,
    /// SASL user name.
    #[serde(default)]
    pub username: Option<String>,
    /// SASL password (prefer `password_file`).
    #[serde(serialize_with = "redact")]
    #[serde(default)]
    pub password: Option<String>,
    /// File whose first line is the SASL password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// CA certificates (PEM) to verify the brokers with (`ssl`, `sasl_ssl`).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// How often the committed positions of the edge's consumer groups (`[[groups]]`) are
    /// translated into Kafka offsets of the mirrored topics and committed in the cluster
    /// under the same group ids, so that Kafka consumers of a group resume where the edge
    /// group was. A group's offsets are committed only while its Kafka group has no active
    /// members, and never moved backwards. `"0s"` turns this off; otherwise at least `"100ms"`.
    #[serde(default = "CloudConfig::default_group_sync_interval")]
    pub group_sync_interval: HumanDuration,
    /// Further librdkafka properties, passed as they are (`[cloud.kafka]`,
    /// `"socket.keepalive.enable" = "true"`); they win over the settings above.
    #[serde(default)]
    pub kafka: BTreeMap<String, String>,
}

impl CloudConfig {
    fn default_topic_format() -> String {
        "{site}.{topic}".into()
    }
    fn default_checkpoint_topic() -> String {
        "tributary.checkpoints".into()
    }
    fn default_compression() -> String {
        "lz4".into()
    }
    fn default_batch_size() -> ByteSize {
        ByteSize(1024 * 1024)
    }
    fn default_linger() -> HumanDuration {
        HumanDuration(Duration::from_millis(5))
    }
    fn default_transaction_size() -> ByteSize {
        ByteSize(64 * 1024 * 1024)
    }
    fn default_max_backoff() -> HumanDuration {
        HumanDuration(Duration::from_secs(30))
    }
    fn default_request_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(30))
    }
    fn default_security_protocol() -> String {
        "plaintext".into()
    }
    fn default_group_sync_interval() -> HumanDuration {
        HumanDuration(Duration::from_secs(5))
    }

    /// The mirror's settings; reads `password_file`.
    pub fn mirror_config(&self) -> Result<cloud_sync::MirrorConfig, (&'static str, String)> {
        let mut m = cloud_sync::MirrorConfig::new(&self.bootstrap, &self.site);
        m.topic_format = self.topic_format.clone();
        m.topics = self.topics.clone();
        m.checkpoint_topic = self.checkpoint_topic.clone();
        if let Some(id) = &self.transactional_id {
            m.transactional_id = id.clone();
        }
        m.replication_factor = self.replication_factor;
        m.compression = self.compression.clone();
        m.batch_bytes = self.batch_size.0 as usize;
        m.linger = self.linger.0;
        m.transaction_bytes = self.transaction_size.0 as usize;
        m.bandwidth = self.bandwidth.map(|b| b.0);
        m.max_backoff = self.max_backoff.0;
        m.request_timeout = self.request_timeout.0;
        m.group_sync_interval = self.group_sync_interval.0;
        m.kafka_properties = self.kafka.clone();
        let password = match (&self.password, &self.password_file) {
            (Some(_), Some(_)) => {
                return Err((
                    "password_file",
                    "give password or password_file, not both".into(),
                ))
            }
            (Some(p), None) => Some(p.clone()),
            (None, Some(f)) => {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| ("password_file", format!("{}: {e}", f.display())))?;
                Some(text.lines().next().unwrap_or_default().to_string())
            }
            (None, None) => None,
        };
        m.security = cloud_sync::Security {
            protocol: self.security_protocol.clone(),
            sasl_mechanism: self.sasl_mechanism.clone(),
            username: self.username.clone(),
            password,
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
        };
        m.validate()?;
        Ok(m)
    }
}

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
    /// Address and port of the plain-TCP MQTT listener (3.1.1 and 5.0 on the same port).
    pub listen: SocketAddr,
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
            listen: "0.0.0.0:1883".parse().expect("literal address"),
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

/// `[tls]`: MQTT over TLS (1.2 and 1.3, rustls), and mutual TLS when `client_ca_file` is set.
///
/// Minimal form: `cert_file = "server.pem"` and `key_file = "server.key"`. The TLS listener
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

/// `[storage]`: the log on disk.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory of the log. Created if missing; one edge at a time may hold it.
    pub data_dir: PathBuf,
    /// When an acknowledgement is sent relative to the disk:
    /// `"always"` (default): PUBACK/PUBREC only after the group commit is fsynced, so an
    /// acknowledged message survives kill -9 and power loss.
    /// `"interval:<ms>"`: acknowledged once written to the OS, fsynced every <ms>; survives
    /// kill -9, a power cut loses up to <ms> of acknowledged messages.
    /// `"never"`: written to the OS, fsynced only when the OS decides; survives kill -9, a
    /// power cut loses whatever the OS had not written back (typically up to 30 s).
    pub fsync: FsyncMode,
    /// Node-wide cap on the bytes held by the log (record bytes as stored). Unset: no cap.
    pub disk_budget: Option<ByteSize>,
    /// What happens when the log reaches `disk_budget`: `"reject"` refuses new publishes
    /// (5.0: PUBACK 0x97 Quota exceeded; 3.1.1: the connection is closed without an ack), or
    /// `"drop-oldest"` deletes the oldest records of the node, counted and logged.
    pub disk_full_policy: DiskFullPolicy,
    /// Most records stored in one batch value; bigger group commits are split.
    pub max_batch_records: usize,
    /// How often retention (age and bytes) is applied.
    pub retention_check_interval: HumanDuration,
    /// A forward step of the wall clock larger than this between two retention checks is
    /// taken as a correction (NTP fixing a gateway that booted with a wrong clock), not as
    /// time passing: it is logged, and records received before it are aged as that much
    /// younger, so age retention does not delete everything received before the correction.
    /// The byte limits and `disk_budget` still apply.
    pub max_clock_jump: HumanDuration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            fsync: FsyncMode::Always,
            disk_budget: None,
            disk_full_policy: DiskFullPolicy::Reject,
            max_batch_records: 1000,
            retention_check_interval: HumanDuration(Duration::from_secs(10)),
            max_clock_jump: HumanDuration(Duration::from_secs(5 * 60)),
        }
    }
}

/// `[default_route]`: the log topic of publishes that match no route, keyed by MQTT topic.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DefaultRoute {
    /// Log topic name.
    pub topic: String,
    /// Partition count of that topic, unless `[topics.<name>]` sets it.
    pub partitions: Option<u32>,
}

impl Default for DefaultRoute {
    fn default() -> Self {
        Self {
            topic: "mqtt".to_string(),
            partitions: None,
        }
    }
}

/// `[topics.<name>]`: settings of one log topic.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TopicConfig {
    /// Number of partitions (default 1). Partitions can be added later, never removed.
    pub partitions: Option<Spanned<u32>>,
    /// Records older than this are deleted (`"7d"`, `"12h"`). Unset: kept by age forever.
    pub retention: Option<HumanDuration>,
    /// Each partition keeps at most about this many bytes, oldest deleted first, as Kafka's
    /// `retention.bytes`. Unset: no per-partition cap.
    pub retention_bytes: Option<ByteSize>,
}

/// `[[routes]]`: one mapping from MQTT topics to a log topic.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// MQTT topic filter (`+` and `#` wildcards) that selects the publishes of this route.
    #[serde(rename = "match")]
    pub filter: Spanned<String>,
    /// Log topic the publishes go to.
    pub topic: Spanned<String>,
    /// Partition key template: `{N}` is level N of the MQTT topic (0-based), `{topic}` the
    /// whole MQTT topic, `{client_id}` the publisher's client id; other text is literal.
    /// Default `{topic}`.
    #[serde(default)]
    pub key: Option<Spanned<String>>,
    /// Partition count of the log topic (may instead be set in `[topics.<name>]`).
    #[serde(default)]
    pub partitions: Option<Spanned<u32>>,
}

/// `[[groups]]`: a durable consumer group. MQTT clients that subscribe to
/// `$share/{name}/{filter}` (with the group's own `filter`) become its members: the group's
/// partitions are shared out among the online members, each partition to one member, and
/// each member receives its partitions' records from the log, in offset order, from the
/// group's committed position (those whose MQTT topic matches the group's filter). The
/// position advances past records the member acknowledged, is kept in the data directory,
/// and is replicated to the Kafka consumer group of the same name when `[cloud]` is set.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Group name: the share name members subscribe with, and the Kafka consumer group id.
    pub name: String,
    /// Log topics the group reads.
    pub topics: Vec<String>,
    /// Where a new group (or a partition it has no position in yet) starts: `"earliest"`,
    /// the first record held, or `"latest"`, the records appended from then on.
    #[serde(default)]
    pub start: GroupStart,
    /// The MQTT topic filter of the records the group reads (default `"#"`, all). Members
    /// join with exactly `$share/{name}/{filter}`; any other filter, or (with an ACL) a
    /// member without read rights on all of it or without `group read {name}`, is refused
    /// (SUBACK 0x87; 3.1.1: 0x80). Records outside it are skipped and counted, so no
    /// record the group should see is ever committed unseen.
    #[serde(default = "GroupConfig::all")]
    pub filter: String,
    /// A member that holds records and acknowledges none of them for this long loses its
    /// partitions: what it held goes to another member (DUP set), and it gets partitions
    /// again only after it reconnects.
    #[serde(default = "GroupConfig::default_ack_timeout")]
    pub ack_timeout: HumanDuration,
}

impl GroupConfig {
    fn all() -> String {
        "#".into()
    }

    fn default_ack_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(60))
    }
}

/// Where a group without a stored position starts; see `GroupConfig::start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupStart {
    /// At the first record the partition holds.
    #[default]
    Earliest,
    /// At the partition's end.
    Latest,
}

/// How acknowledgements relate to fsync; see `StorageConfig::fsync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncMode {
    /// fsync every group commit before acknowledging it.
    Always,
    /// Write to the OS before acknowledging, fsync on a timer.
    Interval(Duration),
    /// Write to the OS before acknowledging, never fsync explicitly.
    Never,
}

impl fmt::Display for FsyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncMode::Always => write!(f, "always"),
            FsyncMode::Interval(d) => write!(f, "interval:{}", d.as_millis()),
            FsyncMode::Never => write!(f, "never"),
        }
    }
}

impl std::str::FromStr for FsyncMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(FsyncMode::Always),
            "never" => Ok(FsyncMode::Never),
            other => {
                let ms = other.strip_prefix("interval:").ok_or_else(|| {
                    format!("\"{other}\" is not a fsync mode: use \"always\", \"interval:<ms>\" or \"never\"")
                })?;
                let ms: u64 = ms.parse().map_err(|_| {
                    format!(
                        "\"{other}\": the interval must be whole milliseconds, as \"interval:10\""
                    )
                })?;
                if ms == 0 {
                    return Err("\"interval:0\": the interval must be at least 1 ms".into());
                }
                Ok(FsyncMode::Interval(Duration::from_millis(ms)))
            }
        }
    }
}

impl Serialize for FsyncMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FsyncMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// What to do when the disk budget is reached; see `StorageConfig::disk_full_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskFullPolicy {
    /// Refuse new publishes.
    Reject,
    /// Delete the oldest records of the node.
    DropOldest,
}

/// A duration written as `"500ms"`, `"10s"`, `"5m"`, `"12h"` or `"7d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl std::str::FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let bad = || {
            format!("\"{s}\" is not a duration: write a whole number and a unit, as \"500ms\", \"10s\", \"5m\", \"12h\" or \"7d\"")
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let ms_per_unit = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        let ms = n.checked_mul(ms_per_unit).ok_or_else(bad)?;
        Ok(HumanDuration(Duration::from_millis(ms)))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        for (unit, per) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1000),
        ] {
            if ms >= per && ms.is_multiple_of(per) {
                return write!(f, "{}{unit}", ms / per);
            }
        }
        if ms == 0 {
            return write!(f, "0s");
        }
        write!(f, "{ms}ms")
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// A byte count written as a number or as `"64KiB"`, `"512MiB"`, `"10GiB"`, `"1GB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let bad = || {
            format!("\"{s}\" is not a size: write a number of bytes or a number with a unit (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl std::fmt::Display for ByteSize {
    /// The largest binary unit that divides the size exactly (`"16MiB"`), else bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
            if self.0 != 0 && self.0.trailing_zeros() >= shift {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 != 0 && self.0.trailing_zeros() >= 10 {
            s.serialize_str(&self.to_string())
        } else {
            s.serialize_u64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

/// The validated routing table derived from the config, ready for the router.
#[derive(Debug, Clone)]
pub struct RoutePlan {
    /// Routes in match order.
    pub routes: Vec<PlannedRoute>,
    /// The default topic's name.
    pub default_topic: String,
    /// Every log topic with its partition count and retention, in a stable order.
    pub topics: Vec<PlannedTopic>,
}

/// One validated route.
#[derive(Debug, Clone)]
pub struct PlannedRoute {
    /// Parsed filter.
    pub filter: TopicFilter,
    /// Log topic name.
    pub topic: String,
    /// Parsed key template.
    pub key: KeyTemplate,
}

/// One log topic as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTopic {
    /// Name.
    pub name: String,
    /// Partition count.
    pub partitions: u32,
    /// Age retention.
    pub retention: Option<Duration>,
    /// Per-partition byte retention.
    pub retention_bytes: Option<u64>,
}

impl RoutePlan {
    /// Resolves a topic name to the id a new, empty log gives it (plan order) and its
    /// partition count: for a router without a log, in tests and benchmarks.
    pub fn ids_in_plan_order(&self) -> impl Fn(&str) -> (TopicId, u32) + '_ {
        move |name| {
            let i = self
                .topics
                .iter()
                .position(|t| t.name == name)
                .expect("the plan names every topic its routes use");
            (i as u32, self.topics[i].partitions)
        }
    }
}

const EMBEDDED: &str = "<embedded>";

/// The line (1-based) where `section.key` is set in `text`, or 0 when it is not written there
/// (a default, or a command-line override).
fn key_line(text: &str, dotted: &str) -> usize {
    let Some((section, leaf)) = dotted.rsplit_once('.') else {
        return 0;
    };
    let mut in_section = false;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            in_section = t.trim_matches(|c| c == '[' || c == ']').trim() == section;
            continue;
        }
        if in_section {
            if let Some(rest) = t.strip_prefix(leaf) {
                if rest.trim_start().starts_with('=') {
                    return i + 1;
                }
            }
        }
    }
    0
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|span| line_of(text, span.start)).unwrap_or(0);
            ConfigError::Parse {
                origin: origin.to_string(),
                line,
                message: e.message().trim().to_string(),
            }
        })?;
        config.plan(text, origin)?;
        Ok(config)
    }

    /// The embedded defaults, as `edge` with no arguments uses them.
    pub fn embedded() -> Config {
        Config::default()
    }

    /// Validates routes and topics and derives the routing table.
    /// `text` and `origin` let errors point at the line; pass "" and "<embedded>" otherwise.
    pub fn plan(&self, text: &str, origin: &str) -> Result<RoutePlan, ConfigError> {
        let invalid = |span: Option<std::ops::Range<usize>>, key: String, message: String| {
            let line = match span {
                Some(s) => line_of(text, s.start),
                None => key_line(text, &key),
            };
            ConfigError::Invalid {
                origin: origin.to_string(),
                line,
                key,
                message,
            }
        };
        let m = &self.mqtt;
        if m.max_packet_size.0 < 64 || m.max_packet_size.0 > 268_435_455 {
            return Err(invalid(
                None,
                "mqtt.max_packet_size".into(),
                format!(
                    "{} bytes is out of range: MQTT allows 64 B to 256 MiB",
                    m.max_packet_size.0
                ),
            ));
        }
        if m.receive_maximum == 0 {
            return Err(invalid(
                None,
                "mqtt.receive_maximum".into(),
                "must be at least 1".into(),
            ));
        }
        // Stored keys hold a topic or filter after a client id (`u | len | client | filter`)
        // and fjall keys hold at most 65535 bytes: these ceilings keep every key below it.
        if m.max_topic_length == 0 || m.max_topic_length > MAX_TOPIC_LENGTH_CEILING {
            return Err(invalid(
                None,
                "mqtt.max_topic_length".into(),
                format!("must be between 1 and {MAX_TOPIC_LENGTH_CEILING} bytes"),
            ));
        }
        if m.max_filter_length == 0 || m.max_filter_length > MAX_TOPIC_LENGTH_CEILING {
            return Err(invalid(
                None,
                "mqtt.max_filter_length".into(),
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
                return Err(invalid(
                    None,
                    key.into(),
                    format!("{value} is more than the 65535 the record encoding holds"),
                ));
            }
        }
        if m.max_topic_levels == 0 {
            return Err(invalid(
                None,
                "mqtt.max_topic_levels".into(),
                "must be at least 1".into(),
            ));
        }
        if m.max_client_id_length < 23 || m.max_client_id_length > MAX_CLIENT_ID_CEILING {
            return Err(invalid(
                None,
                "mqtt.max_client_id_length".into(),
                format!("must be between 23 (the MQTT minimum) and {MAX_CLIENT_ID_CEILING}"),
            ));
        }
        if m.max_keepalive.0.as_secs() > u16::MAX as u64 {
            return Err(invalid(
                None,
                "mqtt.max_keepalive".into(),
                "must be at most 65535s".into(),
            ));
        }
        if m.max_connections == 0 {
            return Err(invalid(
                None,
                "mqtt.max_connections".into(),
                "must be at least 1".into(),
            ));
        }
        if m.max_publish_rate > 0 && m.publish_rate_grace.0.is_zero() {
            return Err(invalid(
                None,
                "mqtt.publish_rate_grace".into(),
                "0s would disconnect a client at its first burst over max_publish_rate: give it time to slow down (e.g. \"10s\")".into(),
            ));
        }
        if m.max_publish_rate == 0 && m.publish_burst > 0 {
            return Err(invalid(
                None,
                "mqtt.publish_burst".into(),
                "a burst needs a rate: set mqtt.max_publish_rate too, or remove publish_burst"
                    .into(),
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
                return Err(invalid(None, key.into(), "must be at least 1".into()));
            }
        }
        if let Some(v) = m.allow_anonymous {
            return Err(invalid(
                None,
                "mqtt.allow_anonymous".into(),
                format!("moved to the [auth] section: remove it here and write `allow_anonymous = {v}` under [auth]"),
            ));
        }
        let a = &self.auth;
        if a.password_file.is_none() && a.allow_anonymous == Some(false) && !self.mutual_tls() {
            return Err(invalid(
                None,
                "auth.allow_anonymous".into(),
                "false without auth.password_file or tls.client_ca_file would refuse every client: set one of them"
                    .into(),
            ));
        }
        if a.failure_delay.0 > a.max_failure_delay.0 {
            return Err(invalid(
                None,
                "auth.failure_delay".into(),
                format!(
                    "{} is longer than auth.max_failure_delay ({})",
                    a.failure_delay, a.max_failure_delay
                ),
            ));
        }
        if let Some(p) = &a.password_file {
            crate::auth::passwords::PasswordFile::load(p)
                .map_err(|e| invalid(None, "auth.password_file".into(), e.to_string()))?;
        }
        if let Some(p) = &a.acl_file {
            crate::auth::acl::AclFile::load(p)
                .map_err(|e| invalid(None, "auth.acl_file".into(), e.to_string()))?;
        }
        let s = &self.storage;
        if s.max_batch_records == 0 || s.max_batch_records > 1_000_000 {
            return Err(invalid(
                None,
                "storage.max_batch_records".into(),
                "must be between 1 and 1000000".into(),
            ));
        }
        if s.retention_check_interval.0.is_zero() {
            return Err(invalid(
                None,
                "storage.retention_check_interval".into(),
                "must be longer than 0".into(),
            ));
        }
        if let Some(b) = s.disk_budget {
            if b.0 == 0 {
                return Err(invalid(
                    None,
                    "storage.disk_budget".into(),
                    "0 would refuse every publish: remove the key for no budget".into(),
                ));
            }
        }

        // Partition counts: from [topics.X], from routes to X, from [default_route]; all
        // that are given must agree.
        let mut partitions: BTreeMap<String, (u32, String)> = BTreeMap::new();
        let mut set_partitions = |topic: &str,
                                  n: u32,
                                  span: Option<std::ops::Range<usize>>,
                                  key: String|
         -> Result<(), ConfigError> {
            if n == 0 || n > 100_000 {
                return Err(invalid(
                    span,
                    key,
                    format!("{n} partitions: a topic has 1 to 100000"),
                ));
            }
            match partitions.get(topic) {
                Some((existing, from)) if *existing != n => Err(invalid(
                    span,
                    key,
                    format!("topic \"{topic}\" gets {n} partitions here but {existing} from {from}: make them agree"),
                )),
                Some(_) => Ok(()),
                None => {
                    partitions.insert(topic.to_string(), (n, key));
                    Ok(())
                }
            }
        };
        for (name, t) in &self.topics {
            validate_topic_name(name)
                .map_err(|msg| invalid(None, format!("topics.{name}"), msg))?;
            if let Some(p) = &t.partitions {
                set_partitions(
                    name,
                    *p.get_ref(),
                    Some(p.span()),
                    format!("topics.{name}.partitions"),
                )?;
            }
            if let Some(r) = t.retention {
                if r.0.is_zero() {
                    return Err(invalid(
                        None,
                        format!("topics.{name}.retention"),
                        "0 would delete everything at once: remove the key to keep records by age forever".into(),
                    ));
                }
            }
        }
        validate_topic_name(&self.default_route.topic)
            .map_err(|msg| invalid(None, "default_route.topic".into(), msg))?;
        if let Some(p) = self.default_route.partitions {
            set_partitions(
                &self.default_route.topic,
                p,
                None,
                "default_route.partitions".into(),
            )?;
        }

        let mut routes = Vec::with_capacity(self.routes.len());
        for (i, r) in self.routes.iter().enumerate() {
            let filter = TopicFilter::parse(r.filter.get_ref())
                .map_err(|msg| invalid(Some(r.filter.span()), format!("routes[{i}].match"), msg))?;
            validate_topic_name(r.topic.get_ref())
                .map_err(|msg| invalid(Some(r.topic.span()), format!("routes[{i}].topic"), msg))?;
            let key = match &r.key {
                None => {
                    KeyTemplate::parse("{topic}", &filter).expect("the default template is valid")
                }
                Some(k) => KeyTemplate::parse(k.get_ref(), &filter).map_err(|msg| {
                    invalid(
                        Some(k.span()),
                        format!("routes[{i}].key \"{}\"", k.get_ref()),
                        msg,
                    )
                })?,
            };
            if let Some(p) = &r.partitions {
                set_partitions(
                    r.topic.get_ref(),
                    *p.get_ref(),
                    Some(p.span()),
                    format!("routes[{i}].partitions"),
                )?;
            }
            routes.push(PlannedRoute {
                filter,
                topic: r.topic.get_ref().clone(),
                key,
            });
        }

        let mut names: Vec<String> = Vec::new();
        let mut push = |n: &str| {
            if !names.iter().any(|x| x == n) {
                names.push(n.to_string());
            }
        };
        push(&self.default_route.topic);
        for r in &routes {
            push(&r.topic);
        }
        for n in self.topics.keys() {
            push(n);
        }
        let topics: Vec<PlannedTopic> = names
            .into_iter()
            .map(|name| {
                let tc = self.topics.get(&name);
                PlannedTopic {
                    partitions: partitions.get(&name).map(|p| p.0).unwrap_or(1),
                    retention: tc.and_then(|t| t.retention).map(|d| d.0),
                    retention_bytes: tc.and_then(|t| t.retention_bytes).map(|b| b.0),
                    name,
                }
            })
            .collect();
        if let Some((addr, _)) = self.admin.address() {
            self.admin
                .allowed_hosts()
                .map_err(|(key, message)| invalid(None, format!("admin.{key}"), message))?;
            let token = self
                .admin
                .token()
                .map_err(|(key, message)| invalid(None, format!("admin.{key}"), message))?;
            if token.is_none() && !addr.ip().is_loopback() {
                return Err(invalid(
                    None,
                    "admin.token".into(),
                    format!(
                        "the admin endpoint listens on {addr}, beyond loopback: set admin.token (or admin.token_file)"
                    ),
                ));
            }
        }
        if let Some(tls) = &self.tls {
            // Reads the files and builds the TLS settings once, so that a missing file, bad
            // PEM or a key that does not match the certificate stops the edge at start.
            crate::mqtt::tls::server_config(tls)
                .map_err(|e| invalid(None, format!("tls.{}", e.key), e.message))?;
        }
        if let Some(cloud) = &self.cloud {
            let key_line = |key: &str| -> Option<std::ops::Range<usize>> {
                let section = text.find("[cloud]")?;
                let at = text[section..]
                    .match_indices(key)
                    .map(|(i, _)| section + i)
                    .find(|&i| i == 0 || text.as_bytes()[i - 1] == b'\n')?;
                Some(at..at)
            };
            cloud.mirror_config().map_err(|(key, message)| {
                invalid(key_line(key), format!("cloud.{key}"), message)
            })?;
            for t in cloud.topics.iter().flatten() {
                if !topics.iter().any(|p| &p.name == t) {
                    return Err(invalid(
                        key_line("topics"),
                        "cloud.topics".into(),
                        format!("\"{t}\" is not a topic of this edge (a route, [topics.*] or the default route names its topics)"),
                    ));
                }
            }
        }
        for (i, g) in self.groups.iter().enumerate() {
            let at = |field: &str| {
                let key = format!("groups[{i}].{field}");
                let line = text
                    .match_indices(&format!("\"{}\"", g.name))
                    .next()
                    .map(|(b, _)| b..b);
                (line, key)
            };
            if let Err(why) = validate_group_name(&g.name) {
                let (line, key) = at("name");
                return Err(invalid(line, key, why));
            }
            if self.groups[..i].iter().any(|o| o.name == g.name) {
                let (line, key) = at("name");
                return Err(invalid(
                    line,
                    key,
                    format!(
                        "the group \"{}\" is declared twice: give each group its own name",
                        g.name
                    ),
                ));
            }
            if let Err(why) = crate::mqtt::subs::validate_filter(&g.filter, usize::MAX) {
                let (line, key) = at("filter");
                return Err(invalid(line, key, why));
            }
            if g.filter.starts_with("$share/") {
                let (line, key) = at("filter");
                return Err(invalid(
                    line,
                    key,
                    "the filter of the records the group reads, without $share/: members add it"
                        .into(),
                ));
            }
            if g.ack_timeout.0.is_zero() {
                let (line, key) = at("ack_timeout");
                return Err(invalid(line, key, "must be above 0s".into()));
            }
            if g.topics.is_empty() {
                let (line, key) = at("topics");
                return Err(invalid(
                    line,
                    key,
                    "a group reads at least one log topic: list them, e.g. topics = [\"telemetry\"]".into(),
                ));
            }
            for t in &g.topics {
                if !topics.iter().any(|p| &p.name == t) {
                    let (line, key) = at("topics");
                    return Err(invalid(
                        line,
                        key,
                        format!("\"{t}\" is not a topic of this edge (a route, [topics.*] or the default route names its topics)"),
                    ));
                }
            }
        }
        Ok(RoutePlan {
            routes,
            default_topic: self.default_route.topic.clone(),
            topics,
        })
    }

    /// The plan of a config that was already validated by `parse` or built in code.
    pub fn route_plan(&self) -> Result<RoutePlan, ConfigError> {
        self.plan("", EMBEDDED)
    }
}

/// A group name is an MQTT share name (no `/`, `+` or `#`) and a Kafka group id.
fn validate_group_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 200 {
        return Err(format!(
            "group name \"{name}\" must have 1 to 200 characters"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| matches!(c, '/' | '+' | '#') || c.is_control() || c.is_whitespace())
    {
        return Err(format!(
            "group name \"{name}\" has {c:?}: members subscribe to $share/{{name}}/{{filter}}, where the name may not hold '/', '+', '#', spaces or control characters"
        ));
    }
    Ok(())
}

/// Log topic names follow Kafka's rules, so that `{site}.{topic}` is a valid Kafka topic.
fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 200 {
        return Err(format!(
            "topic name \"{name}\" must have 1 to 200 characters"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("topic name \"{name}\" is not allowed"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name \"{name}\" has '{c}': use letters, digits, '.', '_' and '-' as Kafka topic names do"
        ));
    }
    Ok(())
}

fn line_of(text: &str, byte: usize) -> usize {
    text.as_bytes()[..byte.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_embedded_defaults() {
        let c = Config::parse("", "t.toml").unwrap();
        assert_eq!(c.mqtt.listen.to_string(), "0.0.0.0:1883");
        assert_eq!(c.storage.data_dir, PathBuf::from("./data"));
        assert_eq!(c.storage.fsync, FsyncMode::Always);
        let plan = c.route_plan().unwrap();
        assert_eq!(plan.default_topic, "mqtt");
        assert_eq!(plan.topics.len(), 1);
    }

    #[test]
    fn minimal_cloud_section_mirrors_everything_with_defaults() {
        let c = Config::parse(
            "[cloud]\nbootstrap = \"127.0.0.1:19092\"\nsite = \"plant-7\"\n",
            "c.toml",
        )
        .unwrap();
        let m = c.cloud.unwrap().mirror_config().unwrap();
        assert_eq!(m.kafka_topic("telemetry"), "plant-7.telemetry");
        assert_eq!(m.transactional_id, "tributary-mirror-plant-7");
        assert_eq!(m.topics, None);
    }

    #[test]
    fn bad_cloud_setting_is_named_with_its_line() {
        let err = Config::parse(
            "[cloud]\nbootstrap = \"127.0.0.1:19092\"\nsite = \"plant 7\"\n",
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("config c.toml:3: cloud.site:"), "{err}");
        let err = Config::parse("[cloud]\nbootstrap = \"kafka\"\nsite = \"p\"\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("config c.toml:2: cloud.bootstrap:"),
            "{err}"
        );
    }

    #[test]
    fn cloud_topics_must_exist() {
        let err = Config::parse(
            "[cloud]\nbootstrap = \"k:9092\"\nsite = \"p\"\ntopics = [\"nope\"]\n",
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("cloud.topics") && err.contains("\"nope\""),
            "{err}"
        );
    }

    #[test]
    fn group_sync_interval_defaults_to_5s_and_is_checked() {
        let cloud = "[cloud]\nbootstrap = \"k:9092\"\nsite = \"p\"\n";
        let m = Config::parse(cloud, "c.toml")
            .unwrap()
            .cloud
            .unwrap()
            .mirror_config()
            .unwrap();
        assert_eq!(m.group_sync_interval, Duration::from_secs(5));
        let off = format!("{cloud}group_sync_interval = \"0s\"\n");
        let m = Config::parse(&off, "c.toml").unwrap().cloud.unwrap();
        assert!(m.mirror_config().unwrap().group_sync_interval.is_zero());
        let err = Config::parse(
            &format!("{cloud}group_sync_interval = \"10ms\"\n"),
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("config c.toml:4: cloud.group_sync_interval:"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = Config::parse(
            "[mqtt]\nlisten = \"127.0.0.1:1\"\nlisten_port = 3\n",
            "e.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("config e.toml:3:"), "{err}");
        assert!(err.contains("listen_port"), "{err}");
    }

    #[test]
    fn bad_fsync_mode_is_explained() {
        let err = Config::parse("[storage]\nfsync = \"sometimes\"\n", "e.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("e.toml:2"), "{err}");
        assert!(err.contains("interval:<ms>"), "{err}");
    }

    #[test]
    fn fsync_interval_parses() {
        let c = Config::parse("[storage]\nfsync = \"interval:25\"\n", "t").unwrap();
        assert_eq!(
            c.storage.fsync,
            FsyncMode::Interval(Duration::from_millis(25))
        );
    }

    #[test]
    fn key_level_beyond_filter_names_route_and_line() {
        let text = "\n[[routes]]\nmatch = \"sensors/+\"\ntopic = \"telemetry\"\nkey = \"{9}\"\n";
        let err = Config::parse(text, "edge.toml").unwrap_err().to_string();
        assert!(
            err.starts_with("config edge.toml:5: routes[0].key \"{9}\""),
            "{err}"
        );
        assert!(err.contains("2 levels"), "{err}");
    }

    #[test]
    fn disagreeing_partition_counts_are_rejected() {
        let text = "[topics.telemetry]\npartitions = 8\n[[routes]]\nmatch = \"a/#\"\ntopic = \"telemetry\"\npartitions = 4\n";
        let err = Config::parse(text, "e.toml").unwrap_err().to_string();
        assert!(err.contains("routes[0].partitions"), "{err}");
        assert!(err.contains("8"), "{err}");
    }

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!("64KiB".parse::<ByteSize>().unwrap(), ByteSize(65536));
        assert_eq!("1GB".parse::<ByteSize>().unwrap(), ByteSize(1_000_000_000));
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert_eq!(
            "7d".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(7 * 86400)
        );
        assert!("10".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn sizes_print_in_the_largest_exact_unit_and_read_back() {
        for (n, text) in [
            (16 << 20, "16MiB"),
            (3 << 10, "3KiB"),
            (1536, "1536"),
            (1000, "1000"),
            (0, "0"),
        ] {
            assert_eq!(ByteSize(n).to_string(), text);
            assert_eq!(text.parse::<ByteSize>().unwrap(), ByteSize(n));
        }
    }

    #[test]
    fn client_id_policy_binds_ids_to_users_and_leaves_anonymous_alone() {
        use ClientIdPolicy::*;
        assert!(Any.allows(Some("alice"), "bob"));
        assert!(Username.allows(Some("alice"), "alice"));
        assert!(!Username.allows(Some("alice"), "alice-1"));
        assert!(UsernamePrefix.allows(Some("alice"), "alice-1"));
        assert!(UsernamePrefix.allows(Some("alice"), "alice/pump"));
        assert!(!UsernamePrefix.allows(Some("alice"), "alicex"));
        assert!(!UsernamePrefix.allows(Some("alice"), "alice"));
        assert!(!UsernamePrefix.allows(Some("al"), "alice-1"));
        assert!(
            Username.allows(None, "anything"),
            "anonymous clients are not affected"
        );
        let c = Config::parse("[auth]\nclient_id = \"username-prefix\"\n", "e.toml").unwrap();
        assert_eq!(c.auth.client_id, UsernamePrefix);
        assert!(Config::parse("[auth]\nclient_id = \"user\"\n", "e.toml").is_err());
    }

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
    fn invalid_log_topic_name_is_rejected() {
        let text = "[[routes]]\nmatch = \"a/#\"\ntopic = \"bad topic\"\n";
        let err = Config::parse(text, "e.toml").unwrap_err().to_string();
        assert!(err.contains("routes[0].topic"), "{err}");
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
    fn anonymous_access_follows_the_password_file() {
        let c = Config::parse("", "t.toml").unwrap();
        assert!(c.auth.anonymous_allowed(false));
        let c = Config::parse("[auth]\nallow_anonymous = true\n", "t.toml").unwrap();
        assert!(c.auth.anonymous_allowed(false));
        let err = Config::parse("[auth]\nallow_anonymous = false\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("config t.toml:2: auth.allow_anonymous:")
                && err.contains("password_file"),
            "{err}"
        );
    }

    /// A `[tls]` section naming a self-signed certificate (`s.pem`) and its key (`s.key`),
    /// written to `dir`.
    fn tls_section(dir: &std::path::Path) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("s.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("s.key"), key.serialize_pem()).unwrap();
        format!(
            "[tls]\ncert_file = \"{0}/s.pem\"\nkey_file = \"{0}/s.key\"\n",
            dir.display()
        )
    }

    #[test]
    fn client_certificates_turn_anonymous_access_off() {
        let dir = tempfile::tempdir().unwrap();
        let tls = tls_section(dir.path());
        let c = Config::parse(&tls, "t.toml").unwrap();
        assert!(!c.mutual_tls());
        assert!(
            c.auth.anonymous_allowed(c.mutual_tls()),
            "TLS alone does not authenticate"
        );
        let mutual = format!("{tls}client_ca_file = \"{}/s.pem\"\n", dir.path().display());
        let c = Config::parse(&mutual, "t.toml").unwrap();
        assert!(c.mutual_tls());
        assert!(!c.auth.anonymous_allowed(c.mutual_tls()));
        let c = Config::parse(
            &format!("{mutual}[auth]\nallow_anonymous = false\n"),
            "t.toml",
        )
        .expect("client certificates let clients in without a password file");
        assert!(!c.auth.anonymous_allowed(c.mutual_tls()));
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
    fn auth_files_are_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        let acl = dir.path().join("acl");
        std::fs::write(
            &pw,
            format!(
                "bob:{}\n",
                crate::auth::passwords::hash_password(b"x").unwrap()
            ),
        )
        .unwrap();
        std::fs::write(&acl, "user bob\ntopic readwrite bob/#\n").unwrap();
        let text = format!(
            "[auth]\npassword_file = {:?}\nacl_file = {:?}\n",
            pw.to_str().unwrap(),
            acl.to_str().unwrap()
        );
        let c = Config::parse(&text, "t.toml").unwrap();
        assert!(!c.auth.anonymous_allowed(false));

        std::fs::write(&acl, "user bob\ntopic readwrite bob/#/x\n").unwrap();
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(
            err.starts_with("config t.toml:3: auth.acl_file: ") && err.contains("acl:2: filter"),
            "{err}"
        );
        std::fs::remove_file(&pw).unwrap();
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(
            err.starts_with("config t.toml:2: auth.password_file: "),
            "{err}"
        );
    }

    #[test]
    fn failure_delay_must_not_exceed_its_cap() {
        let err = Config::parse(
            "[auth]\nfailure_delay = \"20s\"\nmax_failure_delay = \"10s\"\n",
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("config t.toml:2: auth.failure_delay:"),
            "{err}"
        );
    }

    #[test]
    fn tls_section_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let text = tls_section(dir.path());
        let c = Config::parse(&text, "t.toml").unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.listen.to_string(), "0.0.0.0:8883");
        assert_eq!(tls.client_ca_file, None);
        assert_eq!(tls.identity, CertIdentity::Cn);
        assert_eq!(tls.min_version, TlsVersion::Tls12);
        assert!(Config::parse("", "t.toml").unwrap().tls.is_none());
    }

    #[test]
    fn missing_tls_file_is_named_with_its_line() {
        let text = "[mqtt]\nlisten = \"127.0.0.1:1883\"\n[tls]\ncert_file = \"/nonexistent/s.pem\"\nkey_file = \"/nonexistent/s.key\"\n";
        let err = Config::parse(text, "e.toml").unwrap_err().to_string();
        assert!(err.starts_with("config e.toml:4: tls.cert_file:"), "{err}");
        assert!(err.contains("/nonexistent/s.pem"), "{err}");
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

    #[test]
    fn readme_example_configs_load() {
        let readme = include_str!("../../README.md");
        let examples: Vec<&str> = readme
            .split("```toml\n")
            .skip(1)
            .map(|rest| &rest[..rest.find("```").unwrap()])
            .collect();
        assert!(
            examples.len() >= 2,
            "the README shows the main and [cloud] examples"
        );
        let main = Config::parse(examples[0], "README.md").unwrap();
        assert!(!main.routes.is_empty());
        let cloud = Config::parse(examples[1], "README.md").unwrap();
        let m = cloud.cloud.unwrap().mirror_config().unwrap();
        assert_eq!(m.kafka_topic("telemetry"), "plant-7.telemetry");
    }

    #[test]
    fn groups_are_checked_at_load() {
        let base = "[[routes]]\nmatch = \"sensors/+/#\"\ntopic = \"telemetry\"\n";
        let ok = Config::parse(
            &format!("{base}[[groups]]\nname = \"alarms\"\ntopics = [\"telemetry\"]\nstart = \"latest\"\n"),
            "g.toml",
        )
        .unwrap();
        assert_eq!(ok.groups[0].start, GroupStart::Latest);
        let err = |text: &str| {
            Config::parse(&format!("{base}{text}"), "g.toml")
                .unwrap_err()
                .to_string()
        };
        let e = err("[[groups]]\nname = \"alarms\"\ntopics = [\"nope\"]\n");
        assert!(
            e.contains("groups[0].topics") && e.contains("\"nope\" is not a topic"),
            "{e}"
        );
        let e = err("[[groups]]\nname = \"a/b\"\ntopics = [\"telemetry\"]\n");
        assert!(e.contains("groups[0].name") && e.contains("'/'"), "{e}");
        let e = err("[[groups]]\nname = \"a\"\ntopics = []\n");
        assert!(e.contains("at least one log topic"), "{e}");
        let e = err("[[groups]]\nname = \"a\"\ntopics = [\"telemetry\"]\n[[groups]]\nname = \"a\"\ntopics = [\"telemetry\"]\n");
        assert!(
            e.contains("groups[1].name") && e.contains("declared twice"),
            "{e}"
        );
        let e = err("[[groups]]\nname = \"a\"\ntopics = [\"telemetry\"]\nstart = \"middle\"\n");
        assert!(e.contains("middle"), "{e}");
    }
}
