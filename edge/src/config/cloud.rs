//! `[cloud]`: the mirror to Kafka, and its translation into `cloud_sync::MirrorConfig`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{redact, ByteSize, HumanDuration};

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
    /// Compacted Kafka topic where the mirror keeps this site's checkpoints (`{site}` is
    /// replaced); no other site may write to it. Created with replication factor
    /// min(3, brokers) (or `replication_factor`) and `min.insync.replicas` 2 (1 below 3
    /// replicas). Checkpoints of the site in the topic all sites shared before,
    /// `tributary.checkpoints`, are read (and copied here) at the first start that finds none
    /// here.
    #[serde(default = "CloudConfig::default_checkpoint_topic")]
    pub checkpoint_topic: String,
    /// Kafka transactional id (default `tributary-mirror-{site}`).
    #[serde(default)]
    pub transactional_id: Option<String>,
    /// Replication factor of the Kafka topics the mirror creates (default: the cluster's,
    /// and min(3, brokers) for the checkpoint topic).
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
    /// Most record bytes in one Kafka transaction: the upper bound of what
    /// `transaction_duration` makes of the link's speed.
    #[serde(default = "CloudConfig::default_transaction_size")]
    pub transaction_size: ByteSize,
    /// How long one transaction should take: each carries what the link (as measured on
    /// earlier transactions, and within `bandwidth`) sends in this long, at least 64 KiB and
    /// at most `transaction_size`; a transaction that fails makes the next one a quarter of
    /// its size. From 100ms up to `request_timeout`. Unset: 5s, or half of
    /// `request_timeout` when that is shorter.
    #[serde(default)]
    pub transaction_duration: Option<HumanDuration>,
    /// Cap on record bytes sent per second, on average (`"2MiB"`): the mirror waits between
    /// transactions, never inside one; unset: as fast as the link allows.
    #[serde(default)]
    pub bandwidth: Option<ByteSize>,
    /// What to do with a record Kafka refuses for itself (larger than the topic's
    /// `max.message.bytes`, a timestamp out of the topic's bounds, ...): `"dead-letter"`
    /// writes it to `dead_letter_topic` with its origin in headers, `"skip"` leaves it out,
    /// `"stop"` holds its partition before it (the others go on); each is counted in
    /// `tributary_mirror_records_rejected_total{reason}` and logged.
    #[serde(default = "CloudConfig::default_on_rejected")]
    pub on_rejected: String,
    /// Kafka topic of the records Kafka refused (`{site}` is replaced); created with one
    /// partition, broker timestamps and room for the largest MQTT packet.
    #[serde(default = "CloudConfig::default_dead_letter_topic")]
    pub dead_letter_topic: String,
    /// With records waiting and no transaction committed for this long, the link counts as
    /// down (`tributary_mirror_link_up` 0, `stalled` in `mirror-status`).
    #[serde(default = "CloudConfig::default_stall_timeout")]
    pub stall_timeout: HumanDuration,
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
    /// Put before each group's name to make its Kafka group id; `{site}` is replaced by the
    /// site: `"{site}."` replicates group `alarms` as `plant-7.alarms`, so that sites sharing
    /// a cluster never share a Kafka group. Unset: the Kafka group id is the group's name.
    #[serde(default)]
    pub group_prefix: Option<String>,
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
        "tributary.checkpoints.{site}".into()
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
    fn default_on_rejected() -> String {
        "dead-letter".into()
    }
    fn default_dead_letter_topic() -> String {
        "tributary.dead-letter.{site}".into()
    }
    fn default_stall_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(60))
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

    /// The mirror's settings for an edge whose largest MQTT packet is `max_packet_size`
    /// bytes (the producer sends records that large); reads `password_file`.
    pub fn mirror_config(
        &self,
        max_packet_size: u64,
    ) -> Result<cloud_sync::MirrorConfig, (&'static str, String)> {
        let mut m = cloud_sync::MirrorConfig::new(&self.bootstrap, &self.site);
        m.topic_format = self.topic_format.clone();
        m.topics = self.topics.clone();
        m.checkpoint_topic = self.checkpoint_topic.replace("{site}", &self.site);
        if let Some(id) = &self.transactional_id {
            m.transactional_id = id.clone();
        }
        m.replication_factor = self.replication_factor;
        m.compression = self.compression.clone();
        m.batch_bytes = self.batch_size.0 as usize;
        m.linger = self.linger.0;
        m.transaction_bytes = self.transaction_size.0 as usize;
        m.transaction_duration = self.transaction_duration.map(|d| d.0);
        m.bandwidth = self.bandwidth.map(|b| b.0);
        m.on_rejected = cloud_sync::OnRejected::parse(&self.on_rejected).ok_or_else(|| {
            (
                "on_rejected",
                format!(
                    "\"{}\" is not one of \"dead-letter\", \"skip\", \"stop\"",
                    self.on_rejected
                ),
            )
        })?;
        m.dead_letter_topic = self.dead_letter_topic.clone();
        m.stall_timeout = self.stall_timeout.0;
        m.max_message_bytes = max_packet_size as usize + cloud_sync::RECORD_HEADROOM;
        if let Some(set) = self.kafka.get("message.max.bytes") {
            match set.trim().parse::<u64>() {
                Ok(bytes) if bytes >= max_packet_size => m.max_message_bytes = bytes as usize,
                _ => {
                    return Err((
                        "kafka",
                        format!(
                            "\"message.max.bytes\" = \"{set}\" is smaller than \
                             mqtt.max_packet_size ({max_packet_size}): the mirror could not \
                             send records the edge accepts; raise it or leave it unset (it \
                             follows max_packet_size)"
                        ),
                    ))
                }
            }
        }
        m.max_backoff = self.max_backoff.0;
        m.request_timeout = self.request_timeout.0;
        m.group_sync_interval = self.group_sync_interval.0;
        m.group_prefix = self.group_prefix.clone().unwrap_or_default();
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

#[cfg(test)]
mod tests {
    use super::super::Config;

    #[test]
    fn minimal_cloud_section_mirrors_everything_with_defaults() {
        let c = Config::parse(
            "[cloud]\nbootstrap = \"127.0.0.1:19092\"\nsite = \"plant-7\"\n",
            "c.toml",
        )
        .unwrap();
        let m = c.cloud.unwrap().mirror_config(1024 * 1024).unwrap();
        assert_eq!(m.kafka_topic("telemetry"), "plant-7.telemetry");
        assert_eq!(m.transactional_id, "tributary-mirror-plant-7");
        assert_eq!(m.topics, None);
        assert_eq!(m.on_rejected, cloud_sync::OnRejected::DeadLetter);
        assert_eq!(m.dead_letter_topic(), "tributary.dead-letter.plant-7");
        assert_eq!(
            m.max_message_bytes,
            1024 * 1024 + cloud_sync::RECORD_HEADROOM,
            "the producer sends records as large as the largest MQTT packet"
        );
    }

    fn cloud(extra: &str) -> super::CloudConfig {
        Config::parse(
            &format!("[cloud]\nbootstrap = \"k:9092\"\nsite = \"p\"\n{extra}"),
            "c.toml",
        )
        .unwrap()
        .cloud
        .unwrap()
    }

    #[test]
    fn a_producer_message_max_bytes_below_max_packet_size_is_refused() {
        let err = cloud("[cloud.kafka]\n\"message.max.bytes\" = \"1000000\"\n")
            .mirror_config(1024 * 1024)
            .unwrap_err();
        assert_eq!(err.0, "kafka");
        assert!(
            err.1
                .contains("smaller than mqtt.max_packet_size (1048576)"),
            "{}",
            err.1
        );
        let m = cloud("[cloud.kafka]\n\"message.max.bytes\" = \"2000000\"\n")
            .mirror_config(1024 * 1024)
            .unwrap();
        assert_eq!(m.max_message_bytes, 2_000_000);
    }

    #[test]
    fn on_rejected_takes_its_three_values_only() {
        for (value, want) in [
            ("dead-letter", cloud_sync::OnRejected::DeadLetter),
            ("skip", cloud_sync::OnRejected::Skip),
            ("stop", cloud_sync::OnRejected::Stop),
        ] {
            let m = cloud(&format!("on_rejected = \"{value}\"\n"))
                .mirror_config(1024)
                .unwrap();
            assert_eq!(m.on_rejected, want);
        }
        let err = cloud("on_rejected = \"drop\"\n")
            .mirror_config(1024)
            .unwrap_err();
        assert_eq!(err.0, "on_rejected");
    }
}
