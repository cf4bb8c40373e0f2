//! Settings of a mirror. `edge` fills them from its `[cloud]` config section, where each
//! setting is documented for users; this module only checks that they fit together.

#![deny(clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// The checkpoint topic every site shared before each had its own.
pub const LEGACY_CHECKPOINT_TOPIC: &str = "tributary.checkpoints";

/// What a Kafka record adds to the MQTT packet it comes from, at most: the key (a copy of the
/// MQTT topic or a part of it, up to 64 KiB), the client id and the header names, and the
/// record batch's framing.
pub const RECORD_HEADROOM: usize = 256 * 1024;

/// What the mirror does with a record Kafka refuses for itself (not for the link's or the
/// cluster's state): too large for the topic, a timestamp out of the topic's bounds, a record
/// the topic's policy refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnRejected {
    /// Write it to the dead-letter topic with its origin in headers, and go on.
    #[default]
    DeadLetter,
    /// Leave it out (counted and logged), and go on.
    Skip,
    /// Stop mirroring its partition before it (the other partitions go on) until an operator
    /// makes Kafka take it; the mirror tries again every minute.
    Stop,
}

impl OnRejected {
    /// The setting's value in the config file.
    pub fn name(self) -> &'static str {
        match self {
            OnRejected::DeadLetter => "dead-letter",
            OnRejected::Skip => "skip",
            OnRejected::Stop => "stop",
        }
    }

    /// Parses the config file's value.
    pub fn parse(value: &str) -> Option<OnRejected> {
        [OnRejected::DeadLetter, OnRejected::Skip, OnRejected::Stop]
            .into_iter()
            .find(|o| o.name() == value)
    }
}

/// How the mirror authenticates and encrypts its Kafka connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Security {
    /// librdkafka `security.protocol`: `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub protocol: String,
    /// SASL mechanism: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub sasl_mechanism: Option<String>,
    /// SASL user name.
    pub username: Option<String>,
    /// SASL password.
    pub password: Option<String>,
    /// CA bundle (PEM) that signs the brokers' certificates.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    pub key_file: Option<PathBuf>,
}

/// Everything a mirror needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorConfig {
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    pub bootstrap: String,
    /// Name of this edge site: part of the Kafka topic names, checkpoint keys and the
    /// transactional id, so two sites never collide.
    pub site: String,
    /// Kafka topic name of a source topic: `{site}` and `{topic}` are replaced.
    pub topic_format: String,
    /// Source topics to mirror; `None` mirrors all.
    pub topics: Option<Vec<String>>,
    /// Compacted Kafka topic holding this site's checkpoints, written by no other site (a
    /// read_committed reader cannot pass another producer's open transaction).
    pub checkpoint_topic: String,
    /// The topic all sites shared for their checkpoints before each had its own: read once,
    /// while the site's own topic holds none of its checkpoints (the first start after the
    /// upgrade); `None` reads none.
    pub legacy_checkpoint_topic: Option<String>,
    /// Kafka transactional id; one mirror at a time may use it (a newer one fences older).
    pub transactional_id: String,
    /// Replication factor of the topics the mirror creates; `None`: the cluster's default,
    /// except for the checkpoint topic, which gets min(3, brokers).
    pub replication_factor: Option<i32>,
    /// librdkafka `compression.type`: `none`, `gzip`, `snappy`, `lz4` or `zstd`.
    pub compression: String,
    /// librdkafka `batch.size` in bytes.
    pub batch_bytes: usize,
    /// librdkafka `linger.ms`; also how long the mirror waits for more records when idle.
    pub linger: Duration,
    /// Most record bytes in one Kafka transaction (the upper bound of the pacing).
    pub transaction_bytes: usize,
    /// How long a transaction should take: each carries what the link (as measured, or
    /// `bandwidth`) sends in this long; see [`crate::pacing`]. `None`: 5 s, or half of
    /// `request_timeout` when that is shorter ([`MirrorConfig::transaction_duration`]).
    pub transaction_duration: Option<Duration>,
    /// Cap on the record bytes sent per second, on average: the mirror waits between
    /// transactions, never inside one; `None` is uncapped.
    pub bandwidth: Option<u64>,
    /// The producer's `message.max.bytes`: the largest record it sends (and the
    /// `max.message.bytes` of the dead-letter topic it creates). The edge sets it from its
    /// MQTT `max_packet_size` plus [`RECORD_HEADROOM`].
    pub max_message_bytes: usize,
    /// What to do with a record Kafka refuses for itself (too large, invalid timestamp).
    pub on_rejected: OnRejected,
    /// Topic of the records Kafka refused, with `on_rejected = "dead-letter"`; `{site}` is
    /// replaced.
    pub dead_letter_topic: String,
    /// With records to mirror and no transaction committed for this long, the link counts
    /// as down (`tributary_mirror_link_up` 0, `stalled` in the status).
    pub stall_timeout: Duration,
    /// Longest wait between two attempts after a failure (the backoff doubles up to it).
    pub max_backoff: Duration,
    /// How long a Kafka request (transaction init, commit, metadata) may take.
    pub request_timeout: Duration,
    /// Further librdkafka properties, set as they are (they win over the settings above).
    pub kafka_properties: BTreeMap<String, String>,
    /// Security settings.
    pub security: Security,
    /// How often the source's consumer group positions are translated and committed to
    /// Kafka under the same group ids; zero turns group replication off.
    pub group_sync_interval: Duration,
    /// Put before a source group's name to make its Kafka group id (`{site}` is replaced by
    /// the site): `"{site}."` keeps plant-7's `alarms` apart from plant-8's. Empty: the same id.
    pub group_prefix: String,
}

impl MirrorConfig {
    /// A mirror of every topic to `bootstrap` under site `site`, with the defaults.
    pub fn new(bootstrap: &str, site: &str) -> MirrorConfig {
        MirrorConfig {
            bootstrap: bootstrap.to_string(),
            site: site.to_string(),
            topic_format: "{site}.{topic}".to_string(),
            topics: None,
            checkpoint_topic: format!("tributary.checkpoints.{site}"),
            legacy_checkpoint_topic: Some(LEGACY_CHECKPOINT_TOPIC.to_string()),
            transactional_id: format!("tributary-mirror-{site}"),
            replication_factor: None,
            compression: "lz4".to_string(),
            batch_bytes: 1024 * 1024,
            linger: Duration::from_millis(5),
            transaction_bytes: 64 * 1024 * 1024,
            transaction_duration: None,
            bandwidth: None,
            max_message_bytes: 1024 * 1024 + RECORD_HEADROOM,
            on_rejected: OnRejected::DeadLetter,
            dead_letter_topic: "tributary.dead-letter.{site}".to_string(),
            stall_timeout: Duration::from_secs(60),
            max_backoff: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            kafka_properties: BTreeMap::new(),
            security: Security {
                protocol: "plaintext".to_string(),
                ..Security::default()
            },
            group_sync_interval: Duration::from_secs(5),
            group_prefix: String::new(),
        }
    }

    /// The Kafka topic that mirrors source topic `topic`.
    pub fn kafka_topic(&self, topic: &str) -> String {
        self.topic_format
            .replace("{site}", &self.site)
            .replace("{topic}", topic)
    }

    /// The Kafka group id of source group `group`.
    pub fn kafka_group(&self, group: &str) -> String {
        format!("{}{group}", self.group_prefix.replace("{site}", &self.site))
    }

    /// The dead-letter topic of this site.
    pub fn dead_letter_topic(&self) -> String {
        self.dead_letter_topic.replace("{site}", &self.site)
    }

    /// How long a transaction should take: the configured duration, else 5 s or half of
    /// `request_timeout` when that is shorter.
    pub fn transaction_duration(&self) -> Duration {
        self.transaction_duration
            .unwrap_or_else(|| Duration::from_secs(5).min(self.request_timeout / 2))
    }

    /// Checks the settings; the error names the setting and what to do (without the
    /// `[cloud].` prefix, which the caller adds).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.bootstrap.trim().is_empty() {
            return Err(("bootstrap", "give at least one host:port".into()));
        }
        for server in self.bootstrap.split(',') {
            let server = server.trim();
            let port = server.rsplit_once(':').map(|(_, p)| p);
            if port.and_then(|p| p.parse::<u16>().ok()).is_none() {
                return Err((
                    "bootstrap",
                    format!("\"{server}\" is not host:port (for example \"10.0.0.5:9092\")"),
                ));
            }
        }
        check_kafka_name(&self.site).map_err(|m| ("site", m))?;
        if !self.topic_format.contains("{topic}") {
            return Err((
                "topic_format",
                format!(
                    "\"{}\" has no {{topic}}: every edge topic would land in the same Kafka topic",
                    self.topic_format
                ),
            ));
        }
        check_kafka_name(&self.kafka_topic("x")).map_err(|m| ("topic_format", m))?;
        check_kafka_name(&self.checkpoint_topic).map_err(|m| ("checkpoint_topic", m))?;
        if self.transactional_id.is_empty() {
            return Err(("transactional_id", "must not be empty".into()));
        }
        if let Some(rf) = self.replication_factor {
            if rf < 1 {
                return Err(("replication_factor", format!("{rf} is not at least 1")));
            }
        }
        if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&self.compression.as_str()) {
            return Err((
                "compression",
                format!(
                    "\"{}\" is not one of none, gzip, snappy, lz4, zstd",
                    self.compression
                ),
            ));
        }
        if self.transaction_bytes < 1024 {
            return Err(("transaction_bytes", "must be at least 1KiB".into()));
        }
        if self.transaction_duration() < Duration::from_millis(100)
            || self.transaction_duration() > self.request_timeout
        {
            return Err((
                "transaction_duration",
                format!(
                    "{:?} is not between 100ms and request_timeout ({:?}): a transaction must \
                     be acknowledged within request_timeout",
                    self.transaction_duration(),
                    self.request_timeout
                ),
            ));
        }
        check_kafka_name(&self.dead_letter_topic()).map_err(|m| ("dead_letter_topic", m))?;
        if self.stall_timeout < Duration::from_secs(1) {
            return Err(("stall_timeout", "must be at least 1s".into()));
        }
        if self.bandwidth == Some(0) {
            return Err(("bandwidth", "0 would never send; leave it unset".into()));
        }
        if !self.group_sync_interval.is_zero()
            && self.group_sync_interval < Duration::from_millis(100)
        {
            return Err((
                "group_sync_interval",
                format!(
                    "{:?} would query Kafka's group coordinator nonstop: give at least 100ms, \
                     or 0s to turn group replication off",
                    self.group_sync_interval
                ),
            ));
        }
        let protocol = self.security.protocol.to_ascii_lowercase();
        if !["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"].contains(&protocol.as_str()) {
            return Err((
                "security_protocol",
                format!(
                    "\"{}\" is not one of plaintext, ssl, sasl_plaintext, sasl_ssl",
                    self.security.protocol
                ),
            ));
        }
        let sasl = protocol.starts_with("sasl");
        match (&self.security.sasl_mechanism, sasl) {
            (Some(m), true) => {
                if !["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"].contains(&m.as_str()) {
                    return Err((
                        "sasl_mechanism",
                        format!("\"{m}\" is not one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"),
                    ));
                }
                if self.security.username.is_none() || self.security.password.is_none() {
                    return Err((
                        "username",
                        format!("SASL {m} needs both username and password"),
                    ));
                }
            }
            (None, true) => {
                return Err((
                    "sasl_mechanism",
                    format!("security_protocol \"{protocol}\" needs a sasl_mechanism"),
                ))
            }
            (Some(_), false) => {
                return Err((
                    "sasl_mechanism",
                    format!(
                        "SASL is not used with security_protocol \"{protocol}\" \
                         (use sasl_plaintext or sasl_ssl)"
                    ),
                ))
            }
            (None, false) => {}
        }
        if self.security.cert_file.is_some() != self.security.key_file.is_some() {
            return Err((
                "cert_file",
                "mutual TLS needs both cert_file and key_file".into(),
            ));
        }
        for (key, path) in [
            ("ca_file", &self.security.ca_file),
            ("cert_file", &self.security.cert_file),
            ("key_file", &self.security.key_file),
        ] {
            if let Some(path) = path {
                if !path.is_file() {
                    return Err((key, format!("{} is not a readable file", path.display())));
                }
            }
        }
        Ok(())
    }
}

/// Kafka's rule for topic names: 1 to 249 characters of `[a-zA-Z0-9._-]`.
fn check_kafka_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 249 {
        return Err(format!(
            "\"{name}\" must have 1 to 249 characters to be part of a Kafka topic name"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "\"{name}\" has {c:?}; Kafka topic names allow only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        MirrorConfig::new("127.0.0.1:9092", "plant-7")
            .validate()
            .unwrap();
    }

    #[test]
    fn kafka_topic_follows_the_format() {
        let mut c = MirrorConfig::new("k:9092", "plant-7");
        assert_eq!(c.kafka_topic("telemetry"), "plant-7.telemetry");
        c.topic_format = "edge-{topic}".into();
        assert_eq!(c.kafka_topic("telemetry"), "edge-telemetry");
    }

    #[test]
    fn site_with_a_slash_is_refused() {
        let err = MirrorConfig::new("k:9092", "plant/7")
            .validate()
            .unwrap_err();
        assert_eq!(err.0, "site");
        assert!(err.1.contains("'/'"), "{}", err.1);
    }

    #[test]
    fn bootstrap_without_port_is_refused() {
        let err = MirrorConfig::new("kafka.local", "p")
            .validate()
            .unwrap_err();
        assert_eq!(err.0, "bootstrap");
    }

    #[test]
    fn sasl_needs_credentials() {
        let mut c = MirrorConfig::new("k:9092", "p");
        c.security.protocol = "sasl_plaintext".into();
        assert_eq!(c.validate().unwrap_err().0, "sasl_mechanism");
        c.security.sasl_mechanism = Some("SCRAM-SHA-256".into());
        assert_eq!(c.validate().unwrap_err().0, "username");
        c.security.username = Some("u".into());
        c.security.password = Some("p".into());
        c.validate().unwrap();
    }

    #[test]
    fn group_sync_interval_is_off_or_at_least_100ms() {
        let mut c = MirrorConfig::new("k:9092", "p");
        c.group_sync_interval = Duration::ZERO;
        c.validate().unwrap();
        c.group_sync_interval = Duration::from_millis(10);
        let err = c.validate().unwrap_err();
        assert_eq!(err.0, "group_sync_interval");
        assert!(
            err.1.contains("0s to turn group replication off"),
            "{}",
            err.1
        );
        c.group_sync_interval = Duration::from_millis(100);
        c.validate().unwrap();
    }

    #[test]
    fn kafka_group_ids_carry_the_prefix() {
        let mut c = MirrorConfig::new("k:9092", "plant-7");
        assert_eq!(c.kafka_group("alarms"), "alarms");
        c.group_prefix = "{site}.".into();
        assert_eq!(c.kafka_group("alarms"), "plant-7.alarms");
        c.group_prefix = "edge-".into();
        assert_eq!(c.kafka_group("alarms"), "edge-alarms");
    }

    #[test]
    fn dead_letter_topic_names_the_site() {
        let c = MirrorConfig::new("k:9092", "plant-7");
        assert_eq!(c.dead_letter_topic(), "tributary.dead-letter.plant-7");
        let mut c = c;
        c.dead_letter_topic = "dlq/{site}".into();
        assert_eq!(c.validate().unwrap_err().0, "dead_letter_topic");
    }

    #[test]
    fn on_rejected_values_round_trip() {
        for o in [OnRejected::DeadLetter, OnRejected::Skip, OnRejected::Stop] {
            assert_eq!(OnRejected::parse(o.name()), Some(o));
        }
        assert_eq!(OnRejected::parse("drop"), None);
    }

    #[test]
    fn transaction_duration_fits_within_the_request_timeout() {
        let mut c = MirrorConfig::new("k:9092", "p");
        c.transaction_duration = Some(Duration::from_secs(31));
        assert_eq!(c.validate().unwrap_err().0, "transaction_duration");
        c.transaction_duration = Some(Duration::from_millis(10));
        assert_eq!(c.validate().unwrap_err().0, "transaction_duration");
        c.transaction_duration = Some(Duration::from_secs(30));
        c.validate().unwrap();
        // Unset, it follows a short request timeout instead of refusing it.
        c.transaction_duration = None;
        c.request_timeout = Duration::from_secs(2);
        c.validate().unwrap();
        assert_eq!(c.transaction_duration(), Duration::from_secs(1));
    }

    #[test]
    fn format_without_topic_is_refused() {
        let mut c = MirrorConfig::new("k:9092", "p");
        c.topic_format = "{site}.all".into();
        assert_eq!(c.validate().unwrap_err().0, "topic_format");
    }
}
