//! Reads the mirror's records back from Kafka for `verify --kafka`.
//!
//! Every partition of the given topics is assigned by hand and read from the beginning with
//! `isolation.level=read_committed`: only records of committed transactions are seen, which is
//! what exactly-once promises, and a partition's end is its last stable offset. Nothing joins a
//! consumer group and nothing is committed, so verify leaves no trace in the cluster (librdkafka
//! wants a `group.id` before it assigns partitions, so a unique one is set and never used).
//!
//! Reading stops as soon as every partition has reported its end and every acknowledged message
//! of the manifest has been seen. While acknowledged messages are missing the mirror may still
//! be catching up, so verify keeps polling for new records until `--kafka-wait` has passed, then
//! stops the next time every partition is at its end. A partition still short of its end after
//! another `--kafka-wait` (at least [`READ_TO_END_MIN`]) is reported as unfinished, which fails
//! the verdict.
//!
//! Each topic gets a consumer of its own because librdkafka's end-of-partition event names the
//! partition but not its topic (rdkafka's `KafkaError::PartitionEOF(partition)`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::error::SimError;
use crate::mirror::{MirrorAudit, MirrorFindings, RecordPosition};
use crate::verify::Verifier;

/// Time allowed to fetch a topic's metadata (and so to reach the cluster).
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a poll blocks once the consumers had nothing to deliver.
const IDLE_POLL: Duration = Duration::from_millis(50);
/// Most events taken from one consumer before turning to the next.
const BATCH: usize = 4096;
/// How many consumer errors are described on stderr before the rest are only counted.
const ERRORS_SHOWN: u64 = 5;
/// How often progress is reported on stderr while waiting for the mirror.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// Least time allowed, after `--kafka-wait`, for reading every partition to its end.
pub const READ_TO_END_MIN: Duration = Duration::from_secs(30);
/// How many of the cluster's topics an error about a missing topic lists.
const TOPICS_LISTED: usize = 20;

/// Security settings, handed to librdkafka as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KafkaSecurity {
    /// `security.protocol`: `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub protocol: Option<String>,
    /// `sasl.mechanism`, e.g. `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`.
    pub sasl_mechanism: Option<String>,
    /// `sasl.username`.
    pub username: Option<String>,
    /// `sasl.password`.
    pub password: Option<String>,
    /// `ssl.ca.location`: CA certificates (PEM) to trust.
    pub ca_file: Option<PathBuf>,
}

/// Where and how long to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSource {
    /// Bootstrap servers, `host:port[,host:port...]`.
    pub bootstrap: String,
    /// Topics to read, every partition of each.
    pub topics: Vec<String>,
    /// How long to wait for acknowledged messages the mirror has not delivered yet.
    pub wait: Duration,
    /// Credentials and TLS.
    pub security: KafkaSecurity,
}

impl KafkaSource {
    /// The librdkafka settings of the consumers; `group` is the unused group id.
    pub fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("client.id", "firmware-sim-verify")
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("allow.auto.create.topics", "false");
        let security = &self.security;
        let settings = [
            ("security.protocol", security.protocol.clone()),
            ("sasl.mechanism", security.sasl_mechanism.clone()),
            ("sasl.username", security.username.clone()),
            ("sasl.password", security.password.clone()),
            (
                "ssl.ca.location",
                security
                    .ca_file
                    .as_ref()
                    .map(|p| p.to_string_lossy().into_owned()),
            ),
        ];
        for (key, value) in settings {
            if let Some(value) = value {
                config.set(key, value);
            }
        }
        config
    }

    fn error(&self, reason: String) -> SimError {
        SimError::Kafka {
            bootstrap: self.bootstrap.clone(),
            reason,
        }
    }

    /// The topics to read, each once, or an error naming the option.
    fn topic_list(&self) -> Result<Vec<String>, SimError> {
        let mut topics: Vec<String> = Vec::new();
        for topic in &self.topics {
            let topic = topic.trim();
            if topic.is_empty() {
                return Err(SimError::invalid(
                    "--kafka-topic",
                    "empty topic name; write e.g. --kafka-topic plant-7.telemetry",
                ));
            }
            // Reading a topic twice would count every record in it as a duplicate.
            if !topics.iter().any(|t| t == topic) {
                topics.push(topic.to_string());
            }
        }
        if topics.is_empty() {
            return Err(SimError::invalid(
                "--kafka-topic",
                "name the mirror's topic(s), {site}.{edge log topic} by default, e.g. \
                 --kafka-topic plant-7.telemetry",
            ));
        }
        Ok(topics)
    }
}

/// A consumer of every partition of one topic.
struct TopicReader {
    index: usize,
    name: String,
    consumer: BaseConsumer,
    /// Per partition: whether it reported its end since its last record.
    at_end: BTreeMap<i32, bool>,
}

impl TopicReader {
    fn open(source: &KafkaSource, index: usize, name: &str, group: &str) -> Result<Self, SimError> {
        let consumer: BaseConsumer = source
            .consumer_config(group)
            .create()
            .map_err(|e| source.error(format!("cannot create a consumer: {e}")))?;
        let partitions = partitions_of(source, &consumer, name)?;
        let mut assignment = TopicPartitionList::new();
        for &partition in &partitions {
            assignment
                .add_partition_offset(name, partition, Offset::Beginning)
                .map_err(|e| source.error(format!("topic {name:?}: {e}")))?;
        }
        consumer
            .assign(&assignment)
            .map_err(|e| source.error(format!("cannot assign topic {name:?}: {e}")))?;
        Ok(TopicReader {
            index,
            name: name.to_string(),
            consumer,
            at_end: partitions.into_iter().map(|p| (p, false)).collect(),
        })
    }

    fn all_at_end(&self) -> bool {
        self.at_end.values().all(|&end| end)
    }

    fn unfinished(&self) -> impl Iterator<Item = String> + '_ {
        self.at_end
            .iter()
            .filter(|(_, &end)| !end)
            .map(|(partition, _)| format!("{}/{partition}", self.name))
    }
}

/// The partition numbers of `topic`, or an error that says whether the topic is missing (and
/// which topics exist) or the cluster unreachable.
fn partitions_of(
    source: &KafkaSource,
    consumer: &BaseConsumer,
    topic: &str,
) -> Result<Vec<i32>, SimError> {
    let unreachable = |e: &dyn std::fmt::Display| {
        source.error(format!(
            "cannot read the metadata of topic {topic:?} within {METADATA_TIMEOUT:?}: {e}; is the \
             cluster running and --kafka right?"
        ))
    };
    let metadata = match consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT) {
        Ok(metadata) => metadata,
        Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::UnknownTopicOrPartition) => {
            return Err(missing_topic(source, consumer, topic));
        }
        Err(e) => return Err(unreachable(&e)),
    };
    let Some(entry) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Err(missing_topic(source, consumer, topic));
    };
    match entry.error().map(RDKafkaErrorCode::from) {
        None => {}
        Some(RDKafkaErrorCode::UnknownTopicOrPartition) => {
            return Err(missing_topic(source, consumer, topic));
        }
        Some(code) => {
            return Err(source.error(format!("topic {topic:?}: {code}")));
        }
    }
    let partitions: Vec<i32> = entry.partitions().iter().map(|p| p.id()).collect();
    if partitions.is_empty() {
        return Err(missing_topic(source, consumer, topic));
    }
    Ok(partitions)
}

fn missing_topic(source: &KafkaSource, consumer: &BaseConsumer, topic: &str) -> SimError {
    let existing = match consumer.fetch_metadata(None, METADATA_TIMEOUT) {
        Ok(metadata) => {
            let mut names: Vec<&str> = metadata
                .topics()
                .iter()
                .map(|t| t.name())
                .filter(|name| !name.starts_with("__"))
                .collect();
            names.sort_unstable();
            match names.len() {
                0 => "the cluster has no topics".to_string(),
                n if n > TOPICS_LISTED => format!(
                    "topics there: {}, ... ({n} in all)",
                    names[..TOPICS_LISTED].join(", ")
                ),
                _ => format!("topics there: {}", names.join(", ")),
            }
        }
        Err(e) => format!("listing the topics failed too: {e}"),
    };
    source.error(format!(
        "topic {topic:?} does not exist ({existing}); pass the topic the mirror writes, \
         {{site}}.{{edge log topic}} by default, to --kafka-topic"
    ))
}

/// Reads every record of `source`'s topics into `verifier` and returns what the order and
/// header checks of [`crate::mirror`] found. Blocks the calling thread.
pub fn read_kafka(
    source: &KafkaSource,
    verifier: &mut Verifier<'_>,
) -> Result<MirrorFindings, SimError> {
    let topics = source.topic_list()?;
    let group = format!("firmware-sim-verify-{}", crate::run::new_run_id());
    let mut readers = Vec::with_capacity(topics.len());
    for (index, name) in topics.iter().enumerate() {
        readers.push(TopicReader::open(source, index, name, &group)?);
    }
    let mut audit = MirrorAudit::new(
        &readers
            .iter()
            .map(|r| (r.name.clone(), r.at_end.len() as u32))
            .collect::<Vec<_>>(),
    );
    let started = Instant::now();
    let give_up = source.wait.saturating_add(source.wait.max(READ_TO_END_MIN));
    let mut errors = 0u64;
    let mut idle = false;
    // Whether records arrived since the manifest was last compared with what was seen.
    let mut unchecked = true;
    let mut next_progress = started + PROGRESS_EVERY;
    let unfinished = loop {
        let mut progressed = false;
        for reader in &mut readers {
            let mut timeout = if idle { IDLE_POLL } else { Duration::ZERO };
            for _ in 0..BATCH {
                let Some(event) = reader.consumer.poll(timeout) else {
                    break;
                };
                timeout = Duration::ZERO;
                progressed = true;
                match event {
                    Ok(message) => {
                        reader.at_end.insert(message.partition(), false);
                        unchecked = true;
                        let headers = message
                            .headers()
                            .into_iter()
                            .flat_map(|h| h.iter())
                            .map(|h| (h.key, h.value));
                        audit.observe(
                            verifier,
                            RecordPosition {
                                topic: reader.index,
                                partition: message.partition(),
                                offset: message.offset(),
                            },
                            message.timestamp().to_millis(),
                            message.payload(),
                            headers,
                        );
                    }
                    Err(KafkaError::PartitionEOF(partition)) => {
                        reader.at_end.insert(partition, true);
                    }
                    Err(KafkaError::MessageConsumptionFatal(code)) => {
                        return Err(
                            source.error(format!("reading topic {:?} failed: {code}", reader.name))
                        );
                    }
                    Err(e) => {
                        errors += 1;
                        if errors <= ERRORS_SHOWN {
                            eprintln!(
                                "warning: Kafka {} topic {:?}: {e}",
                                source.bootstrap, reader.name
                            );
                        }
                    }
                }
            }
        }
        idle = !progressed;
        let elapsed = started.elapsed();
        if readers.iter().all(TopicReader::all_at_end) {
            if elapsed >= source.wait {
                break Vec::new();
            }
            if unchecked {
                unchecked = false;
                if verifier.all_acked_received() {
                    break Vec::new();
                }
            }
        } else if elapsed >= give_up {
            break readers
                .iter()
                .flat_map(TopicReader::unfinished)
                .collect::<Vec<_>>();
        }
        if Instant::now() >= next_progress {
            next_progress += PROGRESS_EVERY;
            eprintln!(
                "verify: {} Kafka records read in {:.0}s, {} acknowledged messages not seen yet; \
                 waiting up to {:?}",
                audit.records(),
                elapsed.as_secs_f64(),
                verifier.acked_missing(),
                source.wait
            );
        }
    };
    if errors > ERRORS_SHOWN {
        eprintln!(
            "warning: {} more Kafka consumer errors",
            errors - ERRORS_SHOWN
        );
    }
    if !unfinished.is_empty() {
        eprintln!(
            "warning: gave up after {give_up:?} with partitions not read to their end: {}",
            unfinished.join(", ")
        );
    }
    Ok(audit.finish(unfinished, started.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> KafkaSource {
        KafkaSource {
            bootstrap: "127.0.0.1:9092".into(),
            topics: vec!["plant-7.telemetry".into()],
            wait: Duration::from_secs(60),
            security: KafkaSecurity::default(),
        }
    }

    #[test]
    fn consumer_reads_committed_records_without_a_group() {
        let config = source().consumer_config("g");
        assert_eq!(config.get("bootstrap.servers"), Some("127.0.0.1:9092"));
        assert_eq!(config.get("isolation.level"), Some("read_committed"));
        assert_eq!(config.get("enable.auto.commit"), Some("false"));
        assert_eq!(config.get("enable.partition.eof"), Some("true"));
        assert_eq!(config.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(config.get("security.protocol"), None);
    }

    #[test]
    fn security_options_map_to_librdkafka_settings() {
        let mut source = source();
        source.security = KafkaSecurity {
            protocol: Some("SASL_SSL".into()),
            sasl_mechanism: Some("SCRAM-SHA-512".into()),
            username: Some("verify".into()),
            password: Some("secret".into()),
            ca_file: Some(PathBuf::from("/etc/kafka/ca.pem")),
        };
        let config = source.consumer_config("g");
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(config.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(config.get("sasl.username"), Some("verify"));
        assert_eq!(config.get("sasl.password"), Some("secret"));
        assert_eq!(config.get("ssl.ca.location"), Some("/etc/kafka/ca.pem"));
    }

    #[test]
    fn a_topic_named_twice_is_read_once() {
        let mut source = source();
        source.topics = vec!["a".into(), " b".into(), "a".into()];
        assert_eq!(source.topic_list().unwrap(), vec!["a", "b"]);
    }

    #[test]
    fn an_empty_topic_name_is_refused() {
        let mut source = source();
        source.topics = vec!["a".into(), "".into()];
        let err = source.topic_list().unwrap_err().to_string();
        assert!(err.starts_with("--kafka-topic: empty topic name"), "{err}");
        source.topics.clear();
        assert!(source.topic_list().is_err());
    }
}
