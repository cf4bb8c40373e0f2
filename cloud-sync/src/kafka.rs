//! The Kafka clients' common ground, shared by the mirror and the group replicator: their
//! settings, their threads' priority, and what a Kafka error means for the mirror's status.

#![deny(clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tracing::warn;

use crate::config::MirrorConfig;
use crate::shared::Shared;
use crate::status::ErrorKind;

/// The settings every client of the mirror starts from: the cluster, the client id and the
/// security settings.
pub(crate) fn client_config(config: &MirrorConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.bootstrap)
        .set("client.id", format!("tributary-{}", config.site))
        .set(
            "security.protocol",
            config.security.protocol.to_ascii_lowercase(),
        )
        .set(
            "socket.timeout.ms",
            config.request_timeout.as_millis().to_string(),
        )
        .set_log_level(RDKafkaLogLevel::Warning);
    let s = &config.security;
    if let Some(m) = &s.sasl_mechanism {
        c.set("sasl.mechanism", m);
    }
    if let Some(u) = &s.username {
        c.set("sasl.username", u);
    }
    if let Some(p) = &s.password {
        c.set("sasl.password", p);
    }
    if let Some(f) = &s.ca_file {
        c.set("ssl.ca.location", f.display().to_string());
    }
    if let Some(f) = &s.cert_file {
        c.set("ssl.certificate.location", f.display().to_string());
    }
    if let Some(f) = &s.key_file {
        c.set("ssl.key.location", f.display().to_string());
    }
    c
}

/// `c` with the user's further librdkafka properties (`[cloud.kafka]`), which win.
pub(crate) fn with_extra(mut c: ClientConfig, config: &MirrorConfig) -> ClientConfig {
    for (k, v) in &config.kafka_properties {
        c.set(k, v);
    }
    c
}

/// Lowers the calling thread's CPU priority (nice 15), so that on a busy node ingest wins over
/// the mirror; threads it starts (librdkafka's) inherit the priority. An idle node still
/// gives the mirror all it wants. Measured on 2 cores with Kafka on the same cores, a flood
/// of QoS 1 publishes while the mirror drained at full speed: nice 5 left ingest at 67 % of
/// its rate without the mirror, nice 15 at 75 %, the mirror's rate unchanged.
pub(crate) fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread's own id.
    #[allow(unsafe_code)]
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 15);
    }
}

/// `step`, unless `e` says that another producer with this transactional id took over: that
/// one has its own remedy (two edges must not share a site name), whatever step met it.
pub(crate) fn kind_of(step: ErrorKind, e: &KafkaError) -> ErrorKind {
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::Fenced,
        ) => ErrorKind::Fenced,
        _ => step,
    }
}

/// The kind of an error librdkafka reported on its own. Those are transport, name resolution,
/// TLS and authentication failures, which librdkafka retries; a fatal one (the producer
/// cannot go on) is not a connection problem, and what it was comes with the failed request
/// that follows.
pub(crate) fn client_failure_kind(error: &KafkaError) -> ErrorKind {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::Fatal) => ErrorKind::Other,
        _ => kind_of(ErrorKind::Connect, error),
    }
}

/// Reports an error librdkafka raised on its own (not as the answer to a request) to the
/// mirror's status.
pub(crate) fn report_client_error(shared: &Shared, error: &KafkaError, reason: &str) {
    warn!("kafka: {reason} ({error})");
    shared.client_failure(client_failure_kind(error), format!("kafka: {reason}"));
}

/// Global errors of the admin and consumer clients go to the status as well.
pub(crate) struct ReportingContext {
    pub(crate) shared: Arc<Shared>,
}

impl ClientContext for ReportingContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error, KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF)
        {
            // The checkpoint reader's end of partition is news, not an error.
            return;
        }
        report_client_error(&self.shared, &error, reason);
    }
}

impl rdkafka::consumer::ConsumerContext for ReportingContext {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fenced_producer_is_fenced_whatever_step_met_it() {
        for code in [
            RDKafkaErrorCode::ProducerFenced,
            RDKafkaErrorCode::InvalidProducerEpoch,
            RDKafkaErrorCode::Fenced,
        ] {
            for step in [
                ErrorKind::Produce,
                ErrorKind::Transaction,
                ErrorKind::Connect,
            ] {
                assert_eq!(
                    kind_of(step, &KafkaError::MessageProduction(code)),
                    ErrorKind::Fenced,
                    "{code:?} in {step:?}"
                );
            }
        }
    }

    #[test]
    fn errors_librdkafka_reports_on_its_own_are_connect_unless_fatal() {
        for code in [
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::Authentication,
            RDKafkaErrorCode::Resolve,
        ] {
            assert_eq!(
                client_failure_kind(&KafkaError::Global(code)),
                ErrorKind::Connect,
                "{code:?}"
            );
        }
        assert_eq!(
            client_failure_kind(&KafkaError::Global(RDKafkaErrorCode::Fatal)),
            ErrorKind::Other
        );
        assert_eq!(
            client_failure_kind(&KafkaError::Global(RDKafkaErrorCode::ProducerFenced)),
            ErrorKind::Fenced
        );
    }
}
