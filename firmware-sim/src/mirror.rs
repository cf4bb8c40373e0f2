//! The records the mirror (cloud-sync) writes to Kafka, and what `verify --kafka` checks on them
//! besides loss and duplicates.
//!
//! # What the mirror writes
//!
//! - topic `{site}.{edge log topic}`; partition = the edge partition; key = the edge's
//!   partition key;
//! - value = the MQTT payload as published, so the simulator's stamp decodes as from the edge;
//! - timestamp = the edge's receive time (ms, CreateTime);
//! - headers `mqtt.topic`, `mqtt.client_id`, `mqtt.qos` (`0`, `1` or `2`), `mqtt.retain`
//!   (`true` or `false`), `mqtt.content_type` (only when set), then each MQTT 5 user property
//!   as a header of its own name and value, in order.
//!
//! # What is checked
//!
//! Every record's value goes to the [`Verifier`], which counts loss, duplicates and records that
//! are not this run's; latency is the record timestamp minus the send time. For each record of
//! this run from a device of the manifest, this module adds:
//!
//! - **order**: within one partition, a device's messages must come in increasing sequence
//!   order, since the edge appends them in the order it accepted them and the mirror must keep
//!   each partition's order. A first copy with a lower sequence number than one before it in the
//!   same partition is *misordered*. (Across partitions there is no order to keep; the
//!   verifier's own `reordered` count, which ignores partitions, is only informative here.)
//! - **headers**: `mqtt.topic` and `mqtt.client_id` must be the device's topic and client id
//!   from the manifest, `mqtt.qos` its QoS and `mqtt.retain` `false`; since the simulator sets
//!   no content type and no user properties, any other header is wrong too. A record lacking one
//!   of the four headers counts as *missing headers*; one with a wrong, malformed or extra header
//!   as *mismatched headers*. Duplicates are checked like first copies.
//!
//! Misordered records and records with missing or mismatched headers fail the verdict, as does
//! a partition that could not be read to its end (what lies past the point reached is
//! unchecked).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;

use serde::Serialize;

use crate::manifest::DeviceRecord;
use crate::payload;
use crate::verify::{Observation, Verifier};

/// Header with the MQTT topic the message was published to.
pub const TOPIC_HEADER: &str = "mqtt.topic";
/// Header with the client id of the publishing connection.
pub const CLIENT_ID_HEADER: &str = "mqtt.client_id";
/// Header with the QoS of the publish: `0`, `1` or `2`.
pub const QOS_HEADER: &str = "mqtt.qos";
/// Header with the retain flag of the publish: `true` or `false`.
pub const RETAIN_HEADER: &str = "mqtt.retain";
/// Header with the MQTT 5 content type, present only when the publisher set one.
pub const CONTENT_TYPE_HEADER: &str = "mqtt.content_type";

/// How many misordered records, and how many records with bad headers, the report describes.
const EXAMPLES: usize = 10;

/// One header of a Kafka record: its name and its value, `None` for a null value.
pub type RecordHeader<'h> = (&'h str, Option<&'h [u8]>);

/// One `mqtt.*` header as read against the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field<T> {
    /// The record has no such header.
    Absent,
    /// The header holds a value the contract allows.
    Valid(T),
    /// The header is there, but its value is not one the contract allows; says why.
    Invalid(&'static str),
}

/// The headers of one record, split into the `mqtt.*` headers of the contract and the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttHeaders<'h> {
    /// `mqtt.topic`.
    pub topic: Field<&'h str>,
    /// `mqtt.client_id`.
    pub client_id: Field<&'h str>,
    /// `mqtt.qos`.
    pub qos: Field<u8>,
    /// `mqtt.retain`.
    pub retain: Field<bool>,
    /// `mqtt.content_type`.
    pub content_type: Field<&'h str>,
    /// Every other header, in order: the MQTT 5 user properties. A second header with an
    /// `mqtt.*` name lands here too, since a user property may have any name.
    pub user_properties: Vec<RecordHeader<'h>>,
}

fn text(value: Option<&[u8]>) -> Field<&str> {
    match value {
        None => Field::Invalid("null"),
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => Field::Valid(text),
            Err(_) => Field::Invalid("not UTF-8"),
        },
    }
}

impl<'h> MqttHeaders<'h> {
    /// Reads a record's headers; the first header of each `mqtt.*` name counts.
    pub fn parse(headers: impl IntoIterator<Item = RecordHeader<'h>>) -> Self {
        let mut parsed = MqttHeaders {
            topic: Field::Absent,
            client_id: Field::Absent,
            qos: Field::Absent,
            retain: Field::Absent,
            content_type: Field::Absent,
            user_properties: Vec::new(),
        };
        for (name, value) in headers {
            match name {
                TOPIC_HEADER if parsed.topic == Field::Absent => parsed.topic = text(value),
                CLIENT_ID_HEADER if parsed.client_id == Field::Absent => {
                    parsed.client_id = text(value)
                }
                QOS_HEADER if parsed.qos == Field::Absent => {
                    parsed.qos = match value {
                        Some(b"0") => Field::Valid(0),
                        Some(b"1") => Field::Valid(1),
                        Some(b"2") => Field::Valid(2),
                        None => Field::Invalid("null"),
                        Some(_) => Field::Invalid("not 0, 1 or 2"),
                    }
                }
                RETAIN_HEADER if parsed.retain == Field::Absent => {
                    parsed.retain = match value {
                        Some(b"true") => Field::Valid(true),
                        Some(b"false") => Field::Valid(false),
                        None => Field::Invalid("null"),
                        Some(_) => Field::Invalid("not true or false"),
                    }
                }
                CONTENT_TYPE_HEADER if parsed.content_type == Field::Absent => {
                    parsed.content_type = text(value)
                }
                _ => parsed.user_properties.push((name, value)),
            }
        }
        parsed
    }

    /// Checks the headers of a message `device` published: its topic, its client id (when the
    /// manifest has it), its QoS, no retain flag, no content type and no user properties.
    pub fn check(&self, device: &DeviceRecord) -> Result<(), HeaderProblem> {
        let mut problem = HeaderProblem::default();
        problem.expect(TOPIC_HEADER, self.topic, Some(device.topic.as_str()));
        problem.expect(
            CLIENT_ID_HEADER,
            self.client_id,
            device.client_id.as_deref(),
        );
        problem.expect(QOS_HEADER, self.qos, Some(device.qos));
        problem.expect(RETAIN_HEADER, self.retain, Some(false));
        match self.content_type {
            Field::Absent => {}
            Field::Valid(value) => problem.mismatched.push(format!(
                "{CONTENT_TYPE_HEADER} {value:?} although the simulator sets none"
            )),
            Field::Invalid(why) => problem
                .mismatched
                .push(format!("{CONTENT_TYPE_HEADER} is {why}")),
        }
        if !self.user_properties.is_empty() {
            let names: Vec<&str> = self.user_properties.iter().map(|(n, _)| *n).collect();
            problem.mismatched.push(format!(
                "unexpected headers {names:?}: the simulator sends no user properties"
            ));
        }
        if problem.missing.is_empty() && problem.mismatched.is_empty() {
            Ok(())
        } else {
            Err(problem)
        }
    }
}

/// What is wrong with a record's headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderProblem {
    /// Required headers the record lacks.
    pub missing: Vec<&'static str>,
    /// Headers with a wrong or malformed value, and headers that should not be there.
    pub mismatched: Vec<String>,
}

impl HeaderProblem {
    fn expect<T: PartialEq + fmt::Debug>(
        &mut self,
        name: &'static str,
        field: Field<T>,
        expected: Option<T>,
    ) {
        match (field, expected) {
            (Field::Absent, _) => self.missing.push(name),
            (Field::Invalid(why), _) => self.mismatched.push(format!("{name} is {why}")),
            (Field::Valid(value), Some(expected)) if value != expected => self
                .mismatched
                .push(format!("{name} {value:?} where {expected:?} was expected")),
            (Field::Valid(_), _) => {}
        }
    }
}

impl fmt::Display for HeaderProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!("missing {}", self.missing.join(", ")));
        }
        parts.extend(self.mismatched.iter().cloned());
        f.write_str(&parts.join("; "))
    }
}

/// Where a record was read: index of its topic in the audit's topic list, partition, offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordPosition {
    /// Index of the topic in the list given to [`MirrorAudit::new`].
    pub topic: usize,
    /// Partition number.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
}

/// Records read from one Kafka topic.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TopicRead {
    /// Topic name.
    pub topic: String,
    /// Number of partitions read.
    pub partitions: u32,
    /// Records read, whatever they hold.
    pub records: u64,
}

/// What reading from Kafka found besides loss and duplicates.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MirrorFindings {
    /// Records read, per topic.
    pub topics: Vec<TopicRead>,
    /// Records read from all topics.
    pub records: u64,
    /// First copies with a lower sequence number than an earlier record of the same device in
    /// the same partition.
    pub misordered: u64,
    /// The first few misordered records.
    pub order_examples: Vec<String>,
    /// Records of this run lacking `mqtt.topic`, `mqtt.client_id`, `mqtt.qos` or `mqtt.retain`.
    pub header_missing: u64,
    /// Other records of this run whose headers disagree with the device that sent them.
    pub header_mismatched: u64,
    /// The first few records with missing or mismatched headers.
    pub header_examples: Vec<String>,
    /// Partitions (`topic/partition`) not read to their end before giving up.
    pub unfinished: Vec<String>,
    /// Seconds spent reading.
    pub read_seconds: f64,
}

impl MirrorFindings {
    /// Whether nothing is misordered, every record has its headers and every partition was
    /// read to its end.
    pub fn passed(&self) -> bool {
        self.misordered == 0
            && self.header_missing == 0
            && self.header_mismatched == 0
            && self.unfinished.is_empty()
    }

    /// `key=value` fields appended to the verify summary line.
    pub fn summary_fields(&self) -> String {
        format!(
            "kafka_records={} misordered={} missing_headers={} mismatched_headers={}",
            self.records, self.misordered, self.header_missing, self.header_mismatched
        )
    }

    /// Rows appended to the verify table.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(out, "  {:<26} {}", "Kafka records read", self.records);
        for topic in &self.topics {
            let _ = writeln!(
                out,
                "    {:<24} {} ({} partitions)",
                topic.topic, topic.records, topic.partitions
            );
        }
        let rows = [
            ("misordered in partition", self.misordered),
            ("missing headers", self.header_missing),
            ("mismatched headers", self.header_mismatched),
        ];
        for (name, value) in rows {
            let _ = writeln!(out, "  {name:<26} {value}");
        }
        if !self.unfinished.is_empty() {
            let _ = writeln!(
                out,
                "  {:<26} {}",
                "not read to the end",
                self.unfinished.join(", ")
            );
        }
        let _ = writeln!(
            out,
            "  {:<26} {:.2} s",
            "Kafka read time", self.read_seconds
        );
        for example in self.order_examples.iter().chain(&self.header_examples) {
            let _ = writeln!(out, "  {example}");
        }
        out
    }
}

/// Accumulates the order and header checks over the records read from Kafka.
pub struct MirrorAudit {
    topics: Vec<TopicRead>,
    /// Highest sequence number so far per (topic index, partition, device index).
    highest: HashMap<(usize, i32, u32), u64>,
    misordered: u64,
    order_examples: Vec<String>,
    header_missing: u64,
    header_mismatched: u64,
    header_examples: Vec<String>,
}

impl MirrorAudit {
    /// An audit of `topics`, given as (name, number of partitions); records name their topic
    /// by its index in this list.
    pub fn new(topics: &[(String, u32)]) -> Self {
        MirrorAudit {
            topics: topics
                .iter()
                .map(|(topic, partitions)| TopicRead {
                    topic: topic.clone(),
                    partitions: *partitions,
                    records: 0,
                })
                .collect(),
            highest: HashMap::new(),
            misordered: 0,
            order_examples: Vec::new(),
            header_missing: 0,
            header_mismatched: 0,
            header_examples: Vec::new(),
        }
    }

    /// Observes one record: `timestamp_ms` is its timestamp, `value` its value (`None` for a
    /// null value), `headers` its headers in order.
    pub fn observe<'h>(
        &mut self,
        verifier: &mut Verifier<'_>,
        position: RecordPosition,
        timestamp_ms: Option<i64>,
        value: Option<&[u8]>,
        headers: impl IntoIterator<Item = RecordHeader<'h>>,
    ) {
        self.topics[position.topic].records += 1;
        let Some(stamp) = value.and_then(payload::decode) else {
            verifier.observe_foreign();
            return;
        };
        // The timestamp is whole milliseconds; take the middle of the millisecond, as for the
        // edge log.
        let received_at_us = timestamp_ms
            .and_then(|ms| u64::try_from(ms).ok())
            .map(|ms| ms * 1000 + 500);
        let (device, first) = match verifier.observe_stamp(&stamp, received_at_us) {
            Observation::First { device } => (device, true),
            Observation::Repeat { device } => (device, false),
            Observation::OtherRun | Observation::Foreign | Observation::UnknownDevice => return,
        };
        let record = &verifier.manifest().devices[device as usize];
        if first {
            match self
                .highest
                .entry((position.topic, position.partition, device))
            {
                Entry::Vacant(entry) => {
                    entry.insert(stamp.seq);
                }
                Entry::Occupied(mut entry) => {
                    let highest = *entry.get();
                    if stamp.seq < highest {
                        self.misordered += 1;
                        if self.order_examples.len() < EXAMPLES {
                            let at = self.describe(position, record, stamp.seq);
                            self.order_examples
                                .push(format!("{at}: after seq {highest} in this partition"));
                        }
                    } else {
                        entry.insert(stamp.seq);
                    }
                }
            }
        }
        if let Err(problem) = MqttHeaders::parse(headers).check(record) {
            if problem.missing.is_empty() {
                self.header_mismatched += 1;
            } else {
                self.header_missing += 1;
            }
            if self.header_examples.len() < EXAMPLES {
                let at = self.describe(position, record, stamp.seq);
                self.header_examples.push(format!("{at}: {problem}"));
            }
        }
    }

    /// Records observed so far, from all topics.
    pub fn records(&self) -> u64 {
        self.topics.iter().map(|t| t.records).sum()
    }

    fn describe(&self, position: RecordPosition, device: &DeviceRecord, seq: u64) -> String {
        format!(
            "{}/{}@{} {} seq {}",
            self.topics[position.topic].topic,
            position.partition,
            position.offset,
            device.name,
            seq
        )
    }

    /// The findings; `unfinished` lists the partitions not read to their end.
    pub fn finish(self, unfinished: Vec<String>, read_seconds: f64) -> MirrorFindings {
        MirrorFindings {
            records: self.records(),
            topics: self.topics,
            misordered: self.misordered,
            order_examples: self.order_examples,
            header_missing: self.header_missing,
            header_mismatched: self.header_mismatched,
            header_examples: self.header_examples,
            unfinished,
            read_seconds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{DeviceRecord, Manifest};
    use crate::payload::{write_header, RunId, HEADER_LEN};
    use crate::ranges::SeqRanges;

    const RUN: RunId = RunId(0x5eed_0001);

    fn device(index: u32, qos: u8, sent: u64, acked: u64) -> DeviceRecord {
        let mut sent_set = SeqRanges::new();
        if sent > 0 {
            sent_set.insert_range(0, sent - 1);
        }
        let mut acked_set = SeqRanges::new();
        if acked > 0 {
            acked_set.insert_range(0, acked - 1);
        }
        DeviceRecord {
            index,
            name: format!("dev-{}", index + 1),
            class: 0,
            qos,
            topic: format!("sensors/dev-{}/temperature", index + 1),
            client_id: Some(format!("sim-dev-{}", index + 1)),
            sent: sent_set,
            acked: acked_set,
            refused: SeqRanges::new(),
        }
    }

    fn manifest(devices: Vec<DeviceRecord>) -> Manifest {
        Manifest::for_tests(RUN, devices)
    }

    fn value(device: u32, seq: u64) -> Vec<u8> {
        let mut payload = vec![0u8; HEADER_LEN];
        write_header(&mut payload, RUN, 0, device, seq, 1_000);
        payload
    }

    /// The headers the mirror writes for a message of `device`, as owned strings.
    fn good_headers(device: &DeviceRecord) -> Vec<(String, Vec<u8>)> {
        vec![
            (TOPIC_HEADER.into(), device.topic.clone().into_bytes()),
            (
                CLIENT_ID_HEADER.into(),
                device.client_id.clone().unwrap().into_bytes(),
            ),
            (QOS_HEADER.into(), device.qos.to_string().into_bytes()),
            (RETAIN_HEADER.into(), b"false".to_vec()),
        ]
    }

    fn borrowed(headers: &[(String, Vec<u8>)]) -> Vec<RecordHeader<'_>> {
        headers
            .iter()
            .map(|(n, v)| (n.as_str(), Some(v.as_slice())))
            .collect()
    }

    /// A verifier and an audit fed with synthetic records of one topic.
    struct Feed<'m> {
        verifier: Verifier<'m>,
        audit: MirrorAudit,
    }

    impl<'m> Feed<'m> {
        fn new(manifest: &'m Manifest, partitions: u32) -> Self {
            Feed {
                verifier: Verifier::new(manifest),
                audit: MirrorAudit::new(&[("plant-7.telemetry".into(), partitions)]),
            }
        }

        fn record(&mut self, partition: i32, offset: i64, device: u32, seq: u64) {
            let headers = good_headers(&self.verifier.manifest().devices[device as usize]);
            self.record_with(partition, offset, device, seq, &headers);
        }

        fn record_with(
            &mut self,
            partition: i32,
            offset: i64,
            device: u32,
            seq: u64,
            headers: &[(String, Vec<u8>)],
        ) {
            let position = RecordPosition {
                topic: 0,
                partition,
                offset,
            };
            self.audit.observe(
                &mut self.verifier,
                position,
                Some(2),
                Some(&value(device, seq)),
                borrowed(headers),
            );
        }

        fn finish(self) -> crate::verify::VerifyReport {
            self.verifier
                .finish("kafka test")
                .with_mirror(self.audit.finish(Vec::new(), 0.0))
        }
    }

    #[test]
    fn contract_headers_parse() {
        let parsed = MqttHeaders::parse([
            ("mqtt.topic", Some(&b"a/b"[..])),
            ("mqtt.client_id", Some(&b"c"[..])),
            ("mqtt.qos", Some(&b"2"[..])),
            ("mqtt.retain", Some(&b"true"[..])),
            ("mqtt.content_type", Some(&b"application/json"[..])),
            ("site", Some(&b"plant-7"[..])),
            ("mqtt.topic", Some(&b"x"[..])),
        ]);
        assert_eq!(parsed.topic, Field::Valid("a/b"));
        assert_eq!(parsed.client_id, Field::Valid("c"));
        assert_eq!(parsed.qos, Field::Valid(2));
        assert_eq!(parsed.retain, Field::Valid(true));
        assert_eq!(parsed.content_type, Field::Valid("application/json"));
        assert_eq!(
            parsed.user_properties,
            vec![
                ("site", Some(&b"plant-7"[..])),
                ("mqtt.topic", Some(&b"x"[..]))
            ],
            "user properties keep their order, an mqtt.* name included"
        );
    }

    #[test]
    fn malformed_header_values_are_invalid() {
        let parsed = MqttHeaders::parse([
            ("mqtt.topic", Some(&b"\xff\xfe"[..])),
            ("mqtt.client_id", None),
            ("mqtt.qos", Some(&b"1 "[..])),
            ("mqtt.retain", Some(&b"no"[..])),
        ]);
        assert_eq!(parsed.topic, Field::Invalid("not UTF-8"));
        assert_eq!(parsed.client_id, Field::Invalid("null"));
        assert_eq!(parsed.qos, Field::Invalid("not 0, 1 or 2"));
        assert_eq!(parsed.retain, Field::Invalid("not true or false"));
    }

    #[test]
    fn headers_of_the_device_pass() {
        let d = device(0, 1, 1, 1);
        let headers = good_headers(&d);
        assert_eq!(MqttHeaders::parse(borrowed(&headers)).check(&d), Ok(()));
    }

    #[test]
    fn missing_client_id_is_reported_as_missing() {
        let d = device(0, 1, 1, 1);
        let mut headers = good_headers(&d);
        headers.remove(1);
        let problem = MqttHeaders::parse(borrowed(&headers))
            .check(&d)
            .unwrap_err();
        assert_eq!(problem.missing, vec![CLIENT_ID_HEADER]);
        assert!(problem.mismatched.is_empty());
        assert_eq!(problem.to_string(), "missing mqtt.client_id");
    }

    #[test]
    fn another_devices_topic_is_a_mismatch() {
        let d = device(0, 1, 1, 1);
        let other = device(1, 1, 1, 1);
        let headers = good_headers(&other);
        let problem = MqttHeaders::parse(borrowed(&headers))
            .check(&d)
            .unwrap_err();
        assert!(problem.missing.is_empty());
        assert_eq!(
            problem.to_string(),
            "mqtt.topic \"sensors/dev-2/temperature\" where \"sensors/dev-1/temperature\" \
             was expected; mqtt.client_id \"sim-dev-2\" where \"sim-dev-1\" was expected"
        );
    }

    #[test]
    fn wrong_qos_retain_and_extra_headers_are_mismatches() {
        let d = device(0, 1, 1, 1);
        let mut headers = good_headers(&d);
        headers[2].1 = b"0".to_vec();
        headers[3].1 = b"true".to_vec();
        headers.push(("mqtt.content_type".into(), b"text/plain".to_vec()));
        headers.push(("origin".into(), b"x".to_vec()));
        let problem = MqttHeaders::parse(borrowed(&headers))
            .check(&d)
            .unwrap_err();
        assert_eq!(problem.mismatched.len(), 4, "{problem}");
    }

    #[test]
    fn manifest_without_client_id_checks_presence_only() {
        let mut d = device(0, 1, 1, 1);
        let headers = good_headers(&d);
        d.client_id = None;
        assert_eq!(MqttHeaders::parse(borrowed(&headers)).check(&d), Ok(()));
        let problem = MqttHeaders::parse(borrowed(&headers[..1]))
            .check(&d)
            .unwrap_err();
        assert_eq!(
            problem.missing,
            vec![CLIENT_ID_HEADER, QOS_HEADER, RETAIN_HEADER]
        );
    }

    #[test]
    fn in_order_partitions_pass() {
        let m = manifest(vec![device(0, 1, 3, 3), device(1, 1, 3, 3)]);
        let mut feed = Feed::new(&m, 2);
        // Partitions are read interleaved; each keeps its own order.
        for seq in 0..3 {
            feed.record(0, seq as i64, 0, seq);
            feed.record(1, seq as i64, 1, seq);
        }
        let report = feed.finish();
        assert!(report.passed, "{}", report.table());
        let mirror = report.mirror.as_ref().unwrap();
        assert_eq!(mirror.records, 6);
        assert_eq!(mirror.topics[0].records, 6);
        assert!(report
            .summary_line()
            .ends_with("kafka_records=6 misordered=0 missing_headers=0 mismatched_headers=0"));
    }

    #[test]
    fn lower_seq_later_in_a_partition_is_misordered_and_fails() {
        let m = manifest(vec![device(0, 1, 3, 3)]);
        let mut feed = Feed::new(&m, 1);
        for (offset, seq) in [0, 2, 1].into_iter().enumerate() {
            feed.record(0, offset as i64, 0, seq);
        }
        let report = feed.finish();
        assert!(!report.passed);
        assert_eq!((report.lost, report.duplicates), (0, 0));
        let mirror = report.mirror.unwrap();
        assert_eq!(mirror.misordered, 1);
        assert_eq!(
            mirror.order_examples,
            vec!["plant-7.telemetry/0@2 dev-1 seq 1: after seq 2 in this partition"]
        );
    }

    #[test]
    fn order_is_kept_per_partition_not_across_partitions() {
        let m = manifest(vec![device(0, 1, 4, 4)]);
        let mut feed = Feed::new(&m, 2);
        // A device split over two partitions, the second partition read first.
        feed.record(1, 0, 0, 2);
        feed.record(1, 1, 0, 3);
        feed.record(0, 0, 0, 0);
        feed.record(0, 1, 0, 1);
        let report = feed.finish();
        assert!(report.passed, "{}", report.table());
        assert_eq!(report.mirror.unwrap().misordered, 0);
    }

    #[test]
    fn a_second_copy_is_a_duplicate_not_a_misorder() {
        let m = manifest(vec![device(0, 1, 3, 3)]);
        let mut feed = Feed::new(&m, 1);
        for (offset, seq) in [0, 1, 2, 1].into_iter().enumerate() {
            feed.record(0, offset as i64, 0, seq);
        }
        let report = feed.finish();
        assert!(!report.passed);
        assert_eq!(report.duplicates, 1);
        assert_eq!(report.mirror.unwrap().misordered, 0);
    }

    #[test]
    fn missing_acknowledged_record_fails_as_loss() {
        let m = manifest(vec![device(0, 1, 3, 3)]);
        let mut feed = Feed::new(&m, 1);
        feed.record(0, 0, 0, 0);
        feed.record(0, 1, 0, 2);
        let report = feed.finish();
        assert!(!report.passed);
        assert_eq!(report.lost, 1);
    }

    #[test]
    fn unacknowledged_and_qos0_records_may_be_missing() {
        let m = manifest(vec![device(0, 1, 5, 3), device(1, 0, 5, 0)]);
        let mut feed = Feed::new(&m, 1);
        for seq in 0..3 {
            feed.record(0, seq as i64, 0, seq);
        }
        feed.record(0, 3, 1, 4);
        let report = feed.finish();
        assert!(report.passed, "{}", report.table());
        assert_eq!((report.expected, report.qos0_lost), (3, 4));
    }

    #[test]
    fn bad_headers_are_counted_once_per_record_and_fail() {
        let m = manifest(vec![device(0, 1, 3, 3), device(1, 1, 3, 3)]);
        let mut feed = Feed::new(&m, 1);
        let good = good_headers(&m.devices[0]);
        feed.record_with(0, 0, 0, 0, &good[1..]);
        let mut mixed = good[1..].to_vec();
        mixed.push((RETAIN_HEADER.into(), b"true".to_vec()));
        feed.record_with(0, 1, 0, 1, &mixed);
        feed.record_with(0, 2, 0, 2, &good_headers(&m.devices[1]));
        let report = feed.finish();
        assert!(!report.passed);
        assert_eq!(report.lost, 3, "device 2 sent nothing that arrived");
        let mirror = report.mirror.unwrap();
        assert_eq!((mirror.header_missing, mirror.header_mismatched), (2, 1));
        assert_eq!(
            mirror.header_examples[0],
            "plant-7.telemetry/0@0 dev-1 seq 0: missing mqtt.topic"
        );
    }

    #[test]
    fn foreign_and_null_values_are_counted_but_not_checked() {
        let m = manifest(vec![device(0, 1, 1, 1)]);
        let mut feed = Feed::new(&m, 1);
        let position = RecordPosition {
            topic: 0,
            partition: 0,
            offset: 0,
        };
        feed.audit
            .observe(&mut feed.verifier, position, None, None, []);
        feed.audit.observe(
            &mut feed.verifier,
            position,
            None,
            Some(b"{\"temp\":1}"),
            [],
        );
        feed.record(0, 2, 0, 0);
        let report = feed.finish();
        assert!(report.passed, "{}", report.table());
        assert_eq!(report.foreign, 2);
        assert_eq!(report.mirror.unwrap().records, 3);
    }

    #[test]
    fn unfinished_partition_fails() {
        let m = manifest(vec![device(0, 1, 1, 1)]);
        let mut feed = Feed::new(&m, 2);
        feed.record(0, 0, 0, 0);
        let findings = feed.audit.finish(vec!["plant-7.telemetry/1".into()], 1.0);
        assert!(!findings.passed());
        assert!(findings.table().contains("plant-7.telemetry/1"));
    }
}
