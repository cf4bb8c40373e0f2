//! How the log shows to a person or a script: one JSON shape for a record and one for a
//! topic, written by `edge read --json` / `edge topics --json` on a stopped node, by the
//! admin API (`/api/v1/topics`, `.../records`) on a running one, and by `edge read --admin`
//! / `edge topics --admin`, which print what the API answered through the same types. A
//! script reading either sees the same lines for the same records.

pub mod admin_client;
pub mod remote;

use serde::{Deserialize, Serialize};

use crate::log::record::text_or_base64;
use crate::log::{PartitionState, Record, TopicLog};

/// One record, as `edge read --json` prints it and the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordView {
    /// Log topic.
    pub topic: String,
    /// Partition of the log topic.
    pub partition: u32,
    /// Position in its partition.
    pub offset: u64,
    /// When the edge received it (ms since the Unix epoch).
    pub timestamp_ms: u64,
    /// Partition key, as [`Self::key_encoding`] says.
    pub key: String,
    /// `utf8` or `base64`.
    pub key_encoding: String,
    /// MQTT metadata.
    pub headers: HeadersView,
    /// The payload, as [`Self::payload_encoding`] says.
    pub payload: String,
    /// `utf8` (the payload is that text) or `base64`.
    pub payload_encoding: String,
}

/// A record's MQTT metadata (the MQTT 5 properties `null` when the publish had none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadersView {
    /// The topic the device published to.
    pub mqtt_topic: String,
    /// QoS of the publish.
    pub qos: u8,
    /// Retain flag of the publish.
    pub retain: bool,
    /// Publisher's client id.
    pub client_id: String,
    /// MQTT 5 content type.
    pub content_type: Option<String>,
    /// MQTT 5 payload format indicator (0 bytes, 1 UTF-8).
    pub payload_format: Option<u8>,
    /// MQTT 5 message expiry interval in seconds, counted from `timestamp_ms`.
    pub message_expiry: Option<u32>,
    /// MQTT 5 response topic.
    pub response_topic: Option<String>,
    /// MQTT 5 correlation data, as `correlation_data_encoding` says.
    pub correlation_data: Option<String>,
    /// `utf8` or `base64` when there is correlation data.
    pub correlation_data_encoding: Option<String>,
    /// MQTT 5 user properties, in order, as `[name, value]` pairs.
    pub user_properties: Vec<(String, String)>,
}

/// How a payload is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadText {
    /// The text when it is UTF-8, else base64.
    Auto,
    /// Always base64.
    Base64,
}

impl RecordView {
    /// The view of record `r` of `topic`/`partition`.
    pub fn new(topic: &str, partition: u32, r: &Record, payload: PayloadText) -> RecordView {
        let (payload, payload_encoding) = match payload {
            PayloadText::Auto => text_or_base64(&r.payload),
            PayloadText::Base64 => {
                use base64::Engine as _;
                (
                    base64::engine::general_purpose::STANDARD.encode(&r.payload),
                    "base64",
                )
            }
        };
        let (key, key_encoding) = text_or_base64(&r.key);
        let h = &r.headers;
        let correlation = h.correlation_data.as_ref().map(|c| text_or_base64(c));
        RecordView {
            topic: topic.to_string(),
            partition,
            offset: r.offset,
            timestamp_ms: r.timestamp_ms,
            key,
            key_encoding: key_encoding.to_string(),
            headers: HeadersView {
                mqtt_topic: h.mqtt_topic.clone(),
                qos: h.qos,
                retain: h.retain,
                client_id: h.client_id.clone(),
                content_type: h.content_type.clone(),
                payload_format: h.payload_format,
                message_expiry: h.message_expiry,
                response_topic: h.response_topic.clone(),
                correlation_data_encoding: correlation.as_ref().map(|c| c.1.to_string()),
                correlation_data: correlation.map(|c| c.0),
                user_properties: h.user_properties.clone(),
            },
            payload,
            payload_encoding: payload_encoding.to_string(),
        }
    }

    /// One JSON line.
    pub fn to_json_line(&self) -> String {
        // A struct of strings, numbers and vectors always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The `edge read` line without `--json`.
    pub fn to_text_line(&self) -> String {
        let h = &self.headers;
        let mut line = format!(
            "{}/{}@{} ts={} key={:?} mqtt_topic={:?} qos={} retain={} client_id={:?}",
            self.topic,
            self.partition,
            self.offset,
            self.timestamp_ms,
            self.key,
            h.mqtt_topic,
            h.qos,
            h.retain,
            h.client_id
        );
        if let Some(ct) = &h.content_type {
            line.push_str(&format!(" content_type={ct:?}"));
        }
        if let Some(f) = h.payload_format {
            line.push_str(&format!(" payload_format={f}"));
        }
        if let Some(e) = h.message_expiry {
            line.push_str(&format!(" message_expiry={e}"));
        }
        if let Some(rt) = &h.response_topic {
            line.push_str(&format!(" response_topic={rt:?}"));
        }
        if let Some(cd) = &h.correlation_data {
            line.push_str(&format!(" correlation_data={cd:?}"));
        }
        for (k, v) in &h.user_properties {
            line.push_str(&format!(" prop:{k}={v:?}"));
        }
        line.push_str(&format!(
            " payload({})={:?}",
            self.payload_encoding, self.payload
        ));
        line
    }
}

/// One topic with its partitions, as `edge topics --json` lists it and `/api/v1/topics`
/// answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicView {
    /// Log topic.
    pub topic: String,
    /// Its partitions, in order.
    pub partitions: Vec<PartitionView>,
}

/// One partition's offsets and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionView {
    /// Partition number.
    pub partition: u32,
    /// First offset still held.
    pub start_offset: u64,
    /// Offset the next record gets.
    pub end_offset: u64,
    /// Bytes the records held take.
    pub bytes: u64,
    /// Records removed by retention.
    pub removed_records: u64,
}

impl TopicView {
    /// The view of a topic of the log.
    pub fn new(t: &TopicLog) -> TopicView {
        TopicView {
            topic: t.name.clone(),
            partitions: t
                .partitions
                .iter()
                .enumerate()
                .map(|(i, p)| PartitionView::new(i as u32, p))
                .collect(),
        }
    }
}

impl PartitionView {
    fn new(partition: u32, p: &PartitionState) -> PartitionView {
        PartitionView {
            partition,
            start_offset: p.start(),
            end_offset: p.end(),
            bytes: p.bytes(),
            removed_records: p.removed(),
        }
    }
}

/// The answer of `/api/v1/topics`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopicsAnswer {
    /// Every topic of the log.
    pub topics: Vec<TopicView>,
}

/// The answer of `/api/v1/topics/{topic}/partitions/{p}/records`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordsAnswer {
    /// The log topic asked for.
    pub topic: String,
    /// The partition asked for.
    pub partition: u32,
    /// The records from the offset asked for (durable ones only), in offset order.
    pub records: Vec<RecordView>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::RecordHeaders;

    fn record() -> Record {
        Record {
            offset: 7,
            timestamp_ms: 1_700_000_000_000,
            key: bytes::Bytes::from_static(b"dev-1"),
            headers: RecordHeaders {
                mqtt_topic: "sensors/dev-1".into(),
                qos: 1,
                retain: false,
                client_id: "dev-1".into(),
                content_type: Some("application/json".into()),
                payload_format: Some(1),
                message_expiry: Some(60),
                response_topic: Some("replies/dev-1".into()),
                correlation_data: Some(bytes::Bytes::from_static(&[0xff, 0x00])),
                user_properties: vec![("site".into(), "north".into())],
            },
            payload: bytes::Bytes::from_static(b"{\"c\":21.5}"),
        }
    }

    #[test]
    fn a_record_view_reads_back_as_itself() {
        let view = RecordView::new("telemetry", 2, &record(), PayloadText::Auto);
        let line = view.to_json_line();
        let back: RecordView = serde_json::from_str(&line).unwrap();
        assert_eq!(back, view);
        assert_eq!(back.to_json_line(), line);
    }

    #[test]
    fn binary_correlation_data_says_it_is_base64() {
        let view = RecordView::new("telemetry", 0, &record(), PayloadText::Auto);
        assert_eq!(view.headers.correlation_data.as_deref(), Some("/wA="));
        assert_eq!(
            view.headers.correlation_data_encoding.as_deref(),
            Some("base64")
        );
        assert_eq!(view.headers.payload_format, Some(1));
        assert_eq!(view.headers.message_expiry, Some(60));
        assert_eq!(
            view.headers.response_topic.as_deref(),
            Some("replies/dev-1")
        );
    }

    #[test]
    fn base64_payload_is_asked_for_and_said() {
        let view = RecordView::new("telemetry", 0, &record(), PayloadText::Base64);
        assert_eq!(view.payload, "eyJjIjoyMS41fQ==");
        assert_eq!(view.payload_encoding, "base64");
    }
}
