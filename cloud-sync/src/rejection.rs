//! Records Kafka refuses for themselves, and what the mirror makes of them.
//!
//! Kafka refuses some records whatever the state of the link or the cluster: one larger than
//! the topic's `max.message.bytes`, one whose timestamp is further from the broker's clock
//! than the topic allows (an edge clock running fast), one the topic's policy refuses. Sent
//! again, such a record is refused again, and in a transaction it takes every other record of
//! the transaction with it. So the mirror finds it and takes it out of the stream:
//!
//! 1. A transaction fails with records refused for one of the [`Reason`]s. A record refused
//!    alone in its partition's share of the transaction is *certain*; when several of a
//!    partition were refused together (Kafka refuses a whole batch that is too large), each
//!    is a *suspect*. Records refused only because another record of their batch was
//!    (librdkafka's `INVALID_DIFFERENT_RECORD`) are neither.
//! 2. The transaction is aborted and its records are read again at once. A suspect is now
//!    sent alone (everything before it acknowledged first, nothing after it until it is), so
//!    its verdict is certain.
//! 3. A certain record is never sent to its topic again in this session: per `on_rejected`
//!    it goes to the dead-letter topic (with its origin in headers: [`HEADER_TOPIC`] ...),
//!    is left out, or stops its partition. What the transaction that carries it commits is
//!    counted per reason and logged, once.
//!
//! A record the producer itself refuses before sending (larger than its `message.max.bytes`)
//! is certain at once, without an aborted transaction.

#![deny(clippy::expect_used, clippy::indexing_slicing)]

#[cfg(feature = "kafka")]
use rdkafka::error::RDKafkaErrorCode;

/// Header: the edge log topic of a dead-lettered record.
pub const HEADER_TOPIC: &str = "tributary.edge.topic";
/// Header: its edge partition (decimal).
pub const HEADER_PARTITION: &str = "tributary.edge.partition";
/// Header: its edge offset (decimal).
pub const HEADER_OFFSET: &str = "tributary.edge.offset";
/// Header: the edge's timestamp of it (ms since the Unix epoch, decimal); the dead-letter
/// record itself carries the broker's time.
pub const HEADER_TIMESTAMP: &str = "tributary.edge.timestamp";
/// Header: the Kafka topic that refused it.
pub const HEADER_KAFKA_TOPIC: &str = "tributary.kafka.topic";
/// Header: why: a [`Reason`] label.
pub const HEADER_REASON: &str = "tributary.reason";
/// Header: Kafka's words for it.
pub const HEADER_ERROR: &str = "tributary.error";
/// Header, present when the record was too large for the dead-letter topic as well: its
/// payload's size in bytes, and the dead-letter record has no value.
pub const HEADER_PAYLOAD_OMITTED: &str = "tributary.payload.omitted";

/// Why Kafka refused a record for itself: a closed set, the label of
/// `tributary_mirror_records_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// Larger than the topic's `max.message.bytes` (or the producer's `message.max.bytes`).
    TooLarge,
    /// A timestamp out of the topic's bounds (`message.timestamp.after.max.ms`,
    /// `...before.max.ms`).
    InvalidTimestamp,
    /// A record the topic refuses otherwise (no key on a compacted topic, a policy).
    InvalidRecord,
}

impl Reason {
    /// Every reason, in a fixed order.
    pub const ALL: [Reason; 3] = [
        Reason::TooLarge,
        Reason::InvalidTimestamp,
        Reason::InvalidRecord,
    ];

    /// The name in metric labels, headers and JSON.
    pub fn label(self) -> &'static str {
        match self {
            Reason::TooLarge => "too_large",
            Reason::InvalidTimestamp => "invalid_timestamp",
            Reason::InvalidRecord => "invalid_record",
        }
    }

    /// The reason of a delivery error, when it is about the record itself.
    #[cfg(feature = "kafka")]
    pub(crate) fn of(code: RDKafkaErrorCode) -> Option<Reason> {
        match code {
            RDKafkaErrorCode::MessageSizeTooLarge => Some(Reason::TooLarge),
            RDKafkaErrorCode::InvalidTimestamp => Some(Reason::InvalidTimestamp),
            RDKafkaErrorCode::InvalidRecord => Some(Reason::InvalidRecord),
            _ => None,
        }
    }
}

/// What the session knows of one record that was refused.
#[cfg(feature = "kafka")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Refused together with others of its partition: sent alone next time.
    Suspect,
    /// Refused alone: taken out of the stream, for this reason, with Kafka's words.
    Rejected(Reason, String),
    /// Refused by its topic and then by the dead-letter topic too (Kafka's words are the
    /// dead-letter topic's): left out.
    Unwritable(Reason, String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "kafka")]
    #[test]
    fn only_errors_about_the_record_itself_are_rejections() {
        assert_eq!(
            Reason::of(RDKafkaErrorCode::MessageSizeTooLarge),
            Some(Reason::TooLarge)
        );
        assert_eq!(
            Reason::of(RDKafkaErrorCode::InvalidTimestamp),
            Some(Reason::InvalidTimestamp)
        );
        assert_eq!(
            Reason::of(RDKafkaErrorCode::InvalidRecord),
            Some(Reason::InvalidRecord)
        );
        for code in [
            RDKafkaErrorCode::InvalidDifferentRecord,
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::InvalidProducerEpoch,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::InvalidMessage,
        ] {
            assert_eq!(Reason::of(code), None, "{code:?}");
        }
    }

    #[test]
    fn labels_are_distinct_snake_case() {
        let labels: std::collections::BTreeSet<_> = Reason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), Reason::ALL.len());
        for l in labels {
            assert!(
                l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{l}"
            );
        }
    }
}
