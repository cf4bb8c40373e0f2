//! `/metrics`: the edge's metric families in the Prometheus text format (version 0.0.4),
//! encoded by `prometheus-client`.
//!
//! The values stay where they are counted (the log's counters, the broker's statistics, the
//! groups, the mirror's status): the collectors here read them at each scrape. The
//! histograms are the library's own and are registered as they are.
//!
//! A counter family is named here without its `_total`: the encoder appends it.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    prometheus_text, DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::AdminState;
use crate::log::Log;
use crate::mqtt::limits::{PacketRefused, Refused};
use crate::mqtt::Broker;

/// The `Content-Type` of `/metrics`.
pub(crate) const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Every family `/metrics` shows, over the state `s` reads.
pub(crate) fn registry(s: &AdminState) -> Registry {
    let mut registry = Registry::default();
    register_log_histograms(&mut registry, &s.broker.log.counters);
    registry.register_collector(Box::new(ProcessMetrics));
    registry.register_collector(Box::new(LogMetrics(s.broker.log.clone())));
    registry.register_collector(Box::new(BrokerMetrics(s.broker.clone())));
    registry.register_collector(Box::new(GroupMetrics {
        groups: s.groups.clone(),
        mirror: s.mirror.clone(),
    }));
    if let Some(mirror) = &s.mirror {
        // `register` ends the help with a full stop.
        registry.register(
            "tributary_mirror_transaction_commit_seconds",
            "Time Kafka took to commit each mirror transaction",
            mirror.commit_latency().clone(),
        );
        registry.register_collector(Box::new(MirrorMetrics(mirror.clone())));
    }
    registry
}

/// The histograms of the log's group commits.
fn register_log_histograms(registry: &mut Registry, log: &crate::log::LogCounters) {
    // `register` ends each help with a full stop.
    registry.register(
        "tributary_group_commit_records",
        "Records written per group commit",
        log.commit_records.clone(),
    );
    registry.register(
        "tributary_group_commit_seconds",
        "Time of a group commit's write and fsync",
        log.commit_seconds.clone(),
    );
}

/// The commit the binary was built from (`git rev-parse` at build time, or the
/// `TRIBUTARY_COMMIT` variable of the build; `"unknown"` outside a git checkout).
const COMMIT: &str = env!("TRIBUTARY_COMMIT");

/// `tributary_build_info` and the standard `process_*` families of the edge's own process
/// (the one exception to the `tributary_` prefix: dashboards and alerts expect these names).
/// Read from `/proc/self` at each scrape; a family whose source cannot be read is left out.
#[derive(Debug)]
struct ProcessMetrics;

impl Collector for ProcessMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        gauges(
            &mut e,
            "tributary_build_info",
            "The edge's version and the commit it was built from; always 1.",
            [(
                [("version", env!("CARGO_PKG_VERSION")), ("commit", COMMIT)],
                1u64,
            )],
        )?;
        let process = super::process::process_stats();
        if let Some(cpu) = process.cpu_seconds {
            ConstCounter::new(cpu).encode(e.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time the edge has used, in seconds.",
                None,
                MetricType::Counter,
            )?)?;
        }
        if let Some(rss) = process.resident_bytes {
            gauge(
                &mut e,
                "process_resident_memory_bytes",
                "Resident memory of the edge process, in bytes.",
                rss,
            )?;
        }
        if let Some(vm) = process.virtual_bytes {
            gauge(
                &mut e,
                "process_virtual_memory_bytes",
                "Virtual memory size of the edge process, in bytes.",
                vm,
            )?;
        }
        if let Some(fds) = process.open_fds {
            gauge(
                &mut e,
                "process_open_fds",
                "Open file descriptors of the edge process (connections included).",
                fds,
            )?;
        }
        if let Some(max) = process.max_fds {
            gauge(
                &mut e,
                "process_max_fds",
                "The edge process's limit on open file descriptors.",
                max,
            )?;
        }
        if let Some(start) = process.start_time_seconds {
            gauge(
                &mut e,
                "process_start_time_seconds",
                "When the edge process started, in seconds since the Unix epoch.",
                start,
            )?;
        }
        Ok(())
    }
}

/// The families of `registry` with their current values.
pub(crate) fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 * 1024);
    // Writing to a String never fails, and the collectors fail only when writing fails.
    prometheus_text::encode(&mut out, registry).expect("encoding metrics into a String");
    out
}

/// An unlabelled counter family and its one series.
fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    debug_assert!(
        !name.ends_with("_total"),
        "{name}: the encoder appends _total"
    );
    ConstCounter::new(value).encode(encoder.encode_descriptor(
        name,
        help,
        None,
        MetricType::Counter,
    )?)
}

/// An unlabelled gauge family and its one series.
fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: impl EncodeGaugeValue,
) -> fmt::Result {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// A counter family of one series per label set.
fn counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    debug_assert!(
        !name.ends_with("_total"),
        "{name}: the encoder appends _total"
    );
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge family of one series per label set.
fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in series {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The log: per topic, what was appended and what is held; retention, the disk budget and
/// corrupt entries.
struct LogMetrics(Arc<Log>);

impl fmt::Debug for LogMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LogMetrics")
    }
}

impl Collector for LogMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let log = &self.0;
        let e = &mut encoder;
        counters(
            e,
            "tributary_messages_received",
            "Records appended to each log topic since the log was created.",
            log.topics()
                .iter()
                .map(|t| ([("topic", t.name.as_str())], t.records_appended())),
        )?;
        gauges(
            e,
            "tributary_log_bytes",
            "Bytes each log topic holds on disk now.",
            log.topics().iter().map(|t| {
                let bytes: u64 = t.partitions.iter().map(|p| p.bytes()).sum();
                ([("topic", t.name.as_str())], bytes)
            }),
        )?;
        let c = &log.counters;
        let load = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed);
        for (name, help, value) in [
            (
                "tributary_publishes_rejected",
                "Publishes refused because the disk budget was reached (reject policy) or the disk was below storage.min_free.",
                load(&c.budget_rejected),
            ),
            (
                "tributary_retention_deleted_records",
                "Records deleted by age or byte retention since start.",
                load(&c.retention_removed),
            ),
            (
                "tributary_budget_dropped_records",
                "Records deleted by the drop-oldest disk budget policy since start.",
                load(&c.budget_dropped),
            ),
        ] {
            counter(e, name, help, value)?;
        }
        counters(
            e,
            "tributary_corrupt_entries",
            "Stored entries that did not decode (each counted once): record batches skipped by every reader, meta entries left out at start.",
            [
                ([("kind", "batch")], load(&c.corrupt_batches)),
                ([("kind", "meta")], load(&c.corrupt_meta)),
            ],
        )?;
        gauge(
            e,
            "tributary_disk_bytes",
            "Bytes the log's record batches hold.",
            log.total_bytes(),
        )?;
        gauge(
            e,
            "tributary_state_bytes",
            "Bytes of sessions, subscriptions, queued deliveries, retained messages and group positions; the disk budget counts them with the records.",
            log.state_bytes(),
        )?;
        if let Some(bytes) = log.data_dir_bytes() {
            gauge(
                e,
                "tributary_data_dir_bytes",
                "Bytes the data directory's files occupy on disk (fjall's journals and tables, deleted records not yet compacted away included), summed at most every second.",
                bytes,
            )?;
        }
        if let Some(space) = log.disk_space() {
            gauge(
                e,
                "tributary_disk_free_bytes",
                "Free bytes on the data directory's file system at the last look.",
                space.available,
            )?;
        }
        gauge(
            e,
            "tributary_disk_low",
            "1 while the data directory's file system is below storage.min_free (publishes are refused).",
            u64::from(log.low_disk()),
        )?;
        if let Some(budget) = log.budget() {
            gauge(
                e,
                "tributary_disk_budget_bytes",
                "The configured disk budget.",
                budget.bytes,
            )?;
        }
        Ok(())
    }
}

/// The MQTT side: traffic, deliveries, refusals by the ACL and the client limits, wills,
/// connections, sessions, subscriptions and retained messages.
struct BrokerMetrics(Arc<Broker>);

impl fmt::Debug for BrokerMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BrokerMetrics")
    }
}

impl Collector for BrokerMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let b = &self.0;
        let e = &mut encoder;
        let load = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed);
        let stats = &b.hub.stats;
        let auth = &b.auth.stats;
        let limits = &b.limits;
        for (name, help, value) in [
            (
                "tributary_mqtt_publishes_received",
                "PUBLISH packets accepted from clients (and wills) since start.",
                load(&stats.messages_received),
            ),
            (
                "tributary_mqtt_acks_sent",
                "PUBACK, PUBREC and PUBCOMP packets sent for received publishes since start.",
                load(&stats.acks_sent),
            ),
            (
                "tributary_mqtt_publishes_sent",
                "PUBLISH packets sent to subscribers since start.",
                load(&stats.messages_sent),
            ),
            (
                "tributary_mqtt_received_bytes",
                "Bytes read from MQTT clients since start (after CONNECT).",
                load(&stats.bytes_received),
            ),
            (
                "tributary_mqtt_sent_bytes",
                "Bytes written to MQTT clients since start.",
                load(&stats.bytes_sent),
            ),
            (
                "tributary_outbound_dropped",
                "Deliveries dropped because a subscriber's queue was full or an offline session's queue bound was reached.",
                load(&stats.dropped),
            ),
            (
                "tributary_queue_read_errors",
                "Queued deliveries of persistent sessions whose record could not be read (kept on disk for the next attempt, never dropped).",
                load(&stats.queue_read_errors),
            ),
            (
                "tributary_outbound_expired",
                "Deliveries not sent because the message expired first.",
                load(&stats.expired),
            ),
            (
                "tributary_outbound_oversize",
                "Deliveries skipped because they exceed the client's Maximum Packet Size.",
                load(&stats.oversize),
            ),
            (
                "tributary_slow_subscriber_disconnects",
                "Subscribers disconnected for staying over their queue bound.",
                load(&stats.slow_disconnects),
            ),
            (
                "tributary_publishes_denied",
                "Publishes and wills refused by the ACL (never logged).",
                load(&auth.publishes_denied),
            ),
            (
                "tributary_subscriptions_denied",
                "Subscription filters refused by the ACL.",
                load(&auth.subscriptions_denied),
            ),
            (
                "tributary_auth_failures",
                "CONNECTs refused for a bad user name or password or for not being authorized.",
                load(&auth.failures),
            ),
        ] {
            counter(e, name, help, value)?;
        }
        counters(
            e,
            "tributary_connections_refused",
            "Connections refused or closed before their session started, by reason.",
            Refused::ALL
                .into_iter()
                .map(|why| ([("reason", why.label())], limits.refused_count(why))),
        )?;
        counters(
            e,
            "tributary_packets_refused",
            "Packets refused for a field over its [mqtt] limit, by the limit.",
            PacketRefused::ALL
                .into_iter()
                .map(|why| ([("reason", why.label())], limits.packet_refused_count(why))),
        )?;
        for (name, help, value) in [
            (
                "tributary_publish_rate_limited",
                "Connections closed for staying over max_publish_rate (5.0: 0x96 Message rate too high).",
                load(&limits.rate_disconnects),
            ),
            (
                "tributary_publish_rate_throttled",
                "Times a connection over max_publish_rate was not read until it was within the rate.",
                load(&limits.rate_throttles),
            ),
            (
                "tributary_subscriptions_refused",
                "Subscriptions refused because the session held max_subscriptions_per_client.",
                load(&limits.subscriptions_refused),
            ),
            (
                "tributary_wills_published_early",
                "Delayed wills published at once because max_pending_wills or max_pending_will_bytes was reached.",
                load(&b.wills.published_early),
            ),
            (
                "tributary_wills_cancelled",
                "Delayed wills not published because a new connection took their session.",
                load(&b.wills.cancelled),
            ),
        ] {
            counter(e, name, help, value)?;
        }
        let (pending_wills, pending_will_bytes) = b.wills.held();
        let (connected, disconnected) = b.sessions.counts();
        for (name, help, value) in [
            (
                "tributary_pending_wills",
                "Wills waiting out their Will Delay Interval.",
                pending_wills as u64,
            ),
            (
                "tributary_pending_will_bytes",
                "Bytes held by wills waiting out their delay.",
                pending_will_bytes as u64,
            ),
            (
                "tributary_connections",
                "Open MQTT connections.",
                b.connections.load(Ordering::Relaxed) as u64,
            ),
            (
                "tributary_sessions_connected",
                "Sessions with a connected client.",
                connected as u64,
            ),
            (
                "tributary_sessions_disconnected",
                "Persistent sessions whose client is not connected.",
                disconnected as u64,
            ),
            (
                "tributary_subscriptions",
                "Subscriptions of all sessions.",
                b.hub.subscription_count(),
            ),
            (
                "tributary_retained_messages",
                "Retained messages held.",
                b.hub.retained_count() as u64,
            ),
            (
                "tributary_retained_bytes",
                "Bytes (topics, payloads, properties) of the retained messages held, against mqtt.max_retained_bytes.",
                b.hub.retained_bytes(),
            ),
        ] {
            gauge(e, name, help, value)?;
        }
        Ok(())
    }
}

/// The durable consumer groups, with what the mirror replicated of them; no family at all
/// while there is no group.
struct GroupMetrics {
    groups: Arc<crate::groups::Groups>,
    mirror: Option<Arc<cloud_sync::Mirror>>,
}

impl fmt::Debug for GroupMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GroupMetrics")
    }
}

impl Collector for GroupMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let groups = super::group_status(&self.groups, self.mirror.as_deref());
        encode_groups(&groups, &mut encoder)
    }
}

fn encode_groups(groups: &[crate::groups::GroupStatus], e: &mut DescriptorEncoder) -> fmt::Result {
    if groups.is_empty() {
        return Ok(());
    }
    type PerGroup = fn(&crate::groups::GroupStatus) -> u64;
    let per_group: [(&str, MetricType, &str, PerGroup); 6] = [
        (
            "tributary_group_members",
            MetricType::Gauge,
            "Online members of each consumer group.",
            |g| g.members.len() as u64,
        ),
        (
            "tributary_group_records_delivered",
            MetricType::Counter,
            "Records each consumer group handed to its members.",
            |g| g.delivered,
        ),
        (
            "tributary_group_records_acknowledged",
            MetricType::Counter,
            "Records each consumer group's members acknowledged.",
            |g| g.acknowledged,
        ),
        (
            "tributary_group_records_lost",
            MetricType::Counter,
            "Records retention deleted before each consumer group read them.",
            |g| g.lost,
        ),
        (
            "tributary_group_records_filtered",
            MetricType::Counter,
            "Records outside each consumer group's filter, skipped by design.",
            |g| g.filtered,
        ),
        (
            "tributary_group_ack_timeouts",
            MetricType::Counter,
            "Members that lost their partitions for acknowledging nothing within the group's ack_timeout.",
            |g| g.ack_timeouts,
        ),
    ];
    for (name, kind, help, value) in per_group {
        let series = groups
            .iter()
            .map(|g| ([("group", g.name.as_str())], value(g)));
        match kind {
            MetricType::Counter => counters(e, name, help, series)?,
            _ => gauges(e, name, help, series)?,
        }
    }
    let partitions = || {
        groups.iter().flat_map(|g| {
            g.partitions.iter().map(move |p| {
                let labels = (
                    [("group", g.name.as_str()), ("topic", p.topic.as_str())],
                    [("partition", p.partition)],
                );
                (labels, p)
            })
        })
    };
    if partitions().any(|(_, p)| p.kafka_offset.is_some()) {
        gauges(
            e,
            "tributary_group_kafka_offset",
            "The Kafka consumer group's committed offset of each mirrored partition, as last replicated from the edge group.",
            partitions().filter_map(|(labels, p)| Some((labels, p.kafka_offset?))),
        )?;
    }
    gauges(
        e,
        "tributary_group_position",
        "Stored position of each consumer group in each partition: every record below it is processed.",
        partitions().map(|(labels, p)| (labels, p.committed)),
    )?;
    gauges(
        e,
        "tributary_group_lag_records",
        "Records of each partition a consumer group has not processed.",
        partitions().map(|(labels, p)| (labels, p.lag)),
    )
}

/// The Kafka mirror: the link, what this process mirrored, and per partition the lag and
/// the records lost before they were mirrored.
struct MirrorMetrics(Arc<cloud_sync::Mirror>);

impl fmt::Debug for MirrorMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MirrorMetrics")
    }
}

impl Collector for MirrorMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let st = self.0.status();
        let e = &mut encoder;
        let up = matches!(st.state, cloud_sync::LinkState::Mirroring) && !st.stalled;
        gauge(
            e,
            "tributary_mirror_link_up",
            "1 while the mirror is mirroring to Kafka; 0 while Kafka is unreachable or failing, or while records wait and no transaction committed for cloud.stall_timeout.",
            u64::from(up),
        )?;
        encode_last_error(&st, e)?;
        encode_refused(&st, e)?;
        for (name, help, value) in [
            (
                "tributary_mirror_records",
                "Records committed to Kafka by this process.",
                st.records_mirrored,
            ),
            (
                "tributary_mirror_bytes",
                "Bytes committed to Kafka by this process.",
                st.bytes_mirrored,
            ),
            (
                "tributary_mirror_transactions",
                "Kafka transactions committed by this process.",
                st.transactions,
            ),
        ] {
            counter(e, name, help, value)?;
        }
        counters(
            e,
            "tributary_mirror_records_rejected",
            "Records Kafka refused for themselves, dead-lettered or skipped (per cloud.on_rejected) by this process, by reason: too_large, invalid_timestamp, invalid_record.",
            cloud_sync::rejection::Reason::ALL.iter().map(|r| {
                let n = st.records_rejected.get(r.label()).copied().unwrap_or(0);
                ([("reason", r.label())], n)
            }),
        )?;
        gauges(
            e,
            "tributary_mirror_lag_records",
            "Records of each partition not yet in Kafka.",
            st.partitions
                .iter()
                .map(|p| (partition_labels(p), p.lag_records)),
        )?;
        counters(
            e,
            "tributary_mirror_lost_before_mirror",
            "Records deleted at the edge (retention, disk budget) before they were mirrored.",
            st.partitions
                .iter()
                .map(|p| (partition_labels(p), p.lost_before_mirror)),
        )
    }
}

type PartitionLabels<'a> = ([(&'static str, &'a str); 1], [(&'static str, u32); 1]);

fn partition_labels(p: &cloud_sync::PartitionStatus) -> PartitionLabels<'_> {
    ([("topic", p.topic.as_str())], [("partition", p.partition)])
}

/// Whether the mirror refuses to mirror, one series per reason.
fn encode_refused(st: &cloud_sync::MirrorStatus, e: &mut DescriptorEncoder) -> fmt::Result {
    gauges(
        e,
        "tributary_mirror_refused",
        "1 while the mirror refuses to mirror, by reason: foreign_log (Kafka's checkpoints of the site were written by another log: the data directory was reset or replaced, or another edge uses the site; edge mirror-adopt) or duplicate_site (another edge uses the site); ingest goes on.",
        cloud_sync::RefusalReason::ALL.iter().map(|r| {
            let on = st.state == cloud_sync::LinkState::Refused
                && st.refusal.as_ref().is_some_and(|x| x.reason == *r);
            ([("reason", r.label())], u64::from(on))
        }),
    )
}

/// When the mirror last failed, labelled with the step that failed. The message stays out of
/// the label: it is free text (from Kafka, the network, a broker's name), and every distinct
/// text would be a new series for Prometheus to keep; `/api/v1/mirror` has it.
fn encode_last_error(st: &cloud_sync::MirrorStatus, e: &mut DescriptorEncoder) -> fmt::Result {
    let (Some(kind), Some(at)) = (st.last_error_kind, st.last_error_at_ms) else {
        return Ok(());
    };
    gauges(
        e,
        "tributary_mirror_last_error_timestamp_seconds",
        "When the mirror last failed (Unix time), by the step that failed: connect, topics, checkpoint, produce, transaction, fenced, source or other; the message is in /api/v1/mirror.",
        [([("kind", kind.label())], at as f64 / 1000.0)],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `encode` as the only collector of a registry, rendered.
    fn rendered(
        encode: impl Fn(&mut DescriptorEncoder) -> fmt::Result + Send + Sync + 'static,
    ) -> String {
        struct Only<F>(F);
        impl<F> fmt::Debug for Only<F> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("Only")
            }
        }
        impl<F: Fn(&mut DescriptorEncoder) -> fmt::Result + Send + Sync + 'static> Collector for Only<F> {
            fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
                (self.0)(&mut encoder)
            }
        }
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Only(encode)));
        render(&registry)
    }

    fn failed_status(kind: cloud_sync::ErrorKind, message: &str) -> cloud_sync::MirrorStatus {
        cloud_sync::MirrorStatus {
            site: "plant-7".into(),
            bootstrap: "kafka-1:9092".into(),
            state: cloud_sync::LinkState::Retrying,
            last_error: Some(message.into()),
            last_error_kind: Some(kind),
            last_error_at_ms: Some(1_764_143_421_337),
            last_healthy_at_ms: None,
            updated_at_ms: 1_764_143_421_400,
            transactions: 0,
            records_mirrored: 0,
            bytes_mirrored: 0,
            records_rejected: Default::default(),
            progress_at_ms: None,
            stalled: false,
            partitions: Vec::new(),
            groups: Vec::new(),
            log_id: None,
            refusal: None,
        }
    }

    #[test]
    fn refusal_metric_is_one_for_the_reason_only_while_refused() {
        let mut status = failed_status(cloud_sync::ErrorKind::Checkpoint, "x");
        status.refusal = Some(cloud_sync::Refusal {
            reason: cloud_sync::RefusalReason::DuplicateSite,
            message: "another edge uses site plant-7".into(),
            foreign_log: None,
            checkpoints: Vec::new(),
            at_ms: 1,
        });
        let refused = status.clone();
        let series = |out: String| -> Vec<String> {
            out.lines()
                .filter(|l| !l.starts_with('#'))
                .map(String::from)
                .collect()
        };
        // Decided by an earlier run, not yet by this one: not refused (yet).
        let out = rendered(move |e| encode_refused(&refused, e));
        assert_eq!(
            series(out),
            [
                "tributary_mirror_refused{reason=\"foreign_log\"} 0",
                "tributary_mirror_refused{reason=\"duplicate_site\"} 0"
            ]
        );
        status.state = cloud_sync::LinkState::Refused;
        let out = rendered(move |e| encode_refused(&status, e));
        assert_eq!(
            series(out),
            [
                "tributary_mirror_refused{reason=\"foreign_log\"} 0",
                "tributary_mirror_refused{reason=\"duplicate_site\"} 1"
            ]
        );
    }

    #[test]
    fn mirror_error_metric_is_labelled_by_kind_not_message() {
        let message = "connecting to kafka.invalid:9092: \"resolve\" failed\n{error=\"x\"}";
        for kind in cloud_sync::ErrorKind::ALL {
            let status = failed_status(kind, message);
            let out = rendered(move |e| encode_last_error(&status, e));
            let series: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
            assert_eq!(
                series,
                [format!(
                    "tributary_mirror_last_error_timestamp_seconds{{kind=\"{}\"}} 1764143421.337",
                    kind.label()
                )],
                "{out}"
            );
            assert!(!out.contains("kafka.invalid"), "{out}");
            let help = out.lines().next().unwrap_or_default();
            assert!(
                help.contains(kind.label()),
                "the help names every kind: {help}"
            );
        }
    }

    #[test]
    fn mirror_error_metric_is_absent_until_the_mirror_fails() {
        let mut status = failed_status(cloud_sync::ErrorKind::Connect, "x");
        status.last_error = None;
        status.last_error_kind = None;
        status.last_error_at_ms = None;
        assert_eq!(rendered(move |e| encode_last_error(&status, e)), "");
    }

    #[test]
    fn a_counter_is_exposed_with_one_total_suffix() {
        let out = rendered(|e| counter(e, "tributary_x", "Xs since start.", 3));
        assert_eq!(
            out,
            "# HELP tributary_x_total Xs since start.\n\
             # TYPE tributary_x_total counter\n\
             tributary_x_total 3\n"
        );
    }

    #[test]
    fn group_commit_histograms_keep_their_buckets() {
        let log = crate::log::LogCounters::default();
        for records in [1.0, 3.0, 150_000.0] {
            log.commit_records.observe(records);
        }
        log.commit_seconds.observe(0.0003);
        let mut registry = Registry::default();
        register_log_histograms(&mut registry, &log);
        let out = render(&registry);
        let bounds = |name: &str| -> Vec<String> {
            out.lines()
                .filter_map(|l| l.strip_prefix(name)?.strip_prefix("_bucket{le=\""))
                .map(|l| l.split('"').next().unwrap_or_default().to_string())
                .collect()
        };
        assert_eq!(
            bounds("tributary_group_commit_records"),
            [
                "1", "2", "5", "10", "20", "50", "100", "200", "500", "1000", "2000", "5000",
                "10000", "100000", "+Inf"
            ]
        );
        assert_eq!(
            bounds("tributary_group_commit_seconds"),
            [
                "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05",
                "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf"
            ]
        );
        for line in [
            "# HELP tributary_group_commit_records Records written per group commit.",
            "# TYPE tributary_group_commit_records histogram",
            "tributary_group_commit_records_bucket{le=\"2\"} 1",
            "tributary_group_commit_records_bucket{le=\"5\"} 2",
            "tributary_group_commit_records_bucket{le=\"100000\"} 2",
            "tributary_group_commit_records_bucket{le=\"+Inf\"} 3",
            "tributary_group_commit_records_count 3",
            "# HELP tributary_group_commit_seconds Time of a group commit's write and fsync.",
            "# TYPE tributary_group_commit_seconds histogram",
            "tributary_group_commit_seconds_bucket{le=\"0.00025\"} 0",
            "tributary_group_commit_seconds_bucket{le=\"0.0005\"} 1",
            "tributary_group_commit_seconds_count 1",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} in\n{out}");
        }
    }

    fn group(name: &str, kafka_offset: Option<i64>) -> crate::groups::GroupStatus {
        let partition = |partition, committed, lag| crate::groups::PartitionPosition {
            topic: "telemetry".into(),
            partition,
            committed,
            lag,
            kafka_offset: kafka_offset.filter(|_| partition == 0),
            ..Default::default()
        };
        crate::groups::GroupStatus {
            name: name.into(),
            members: vec![Default::default()],
            partitions: vec![partition(0, 5, 2), partition(1, 1, 0)],
            delivered: 7,
            acknowledged: 6,
            lost: 1,
            filtered: 2,
            ack_timeouts: 3,
            ..Default::default()
        }
    }

    #[test]
    fn group_families_are_labelled_by_group_topic_and_partition() {
        let groups = [group("alarms", Some(9)), group("audit \"x\"", None)];
        let out = rendered(move |e| encode_groups(&groups, e));
        let types: Vec<&str> = out
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(
            types,
            [
                "tributary_group_members gauge",
                "tributary_group_records_delivered_total counter",
                "tributary_group_records_acknowledged_total counter",
                "tributary_group_records_lost_total counter",
                "tributary_group_records_filtered_total counter",
                "tributary_group_ack_timeouts_total counter",
                "tributary_group_kafka_offset gauge",
                "tributary_group_position gauge",
                "tributary_group_lag_records gauge",
            ]
        );
        for line in [
            "tributary_group_members{group=\"alarms\"} 1",
            "tributary_group_records_delivered_total{group=\"alarms\"} 7",
            "tributary_group_records_acknowledged_total{group=\"alarms\"} 6",
            "tributary_group_records_lost_total{group=\"alarms\"} 1",
            "tributary_group_records_filtered_total{group=\"alarms\"} 2",
            "tributary_group_ack_timeouts_total{group=\"alarms\"} 3",
            "tributary_group_ack_timeouts_total{group=\"audit \\\"x\\\"\"} 3",
            "tributary_group_kafka_offset{group=\"alarms\",topic=\"telemetry\",partition=\"0\"} 9",
            "tributary_group_position{group=\"alarms\",topic=\"telemetry\",partition=\"0\"} 5",
            "tributary_group_position{group=\"alarms\",topic=\"telemetry\",partition=\"1\"} 1",
            "tributary_group_lag_records{group=\"alarms\",topic=\"telemetry\",partition=\"0\"} 2",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} in\n{out}");
        }
        assert_eq!(
            out.matches("tributary_group_kafka_offset{").count(),
            1,
            "only partitions Kafka holds an offset of: {out}"
        );
    }

    #[test]
    fn group_families_are_absent_without_groups_and_kafka_offsets_without_replication() {
        assert_eq!(rendered(|e| encode_groups(&[], e)), "");
        let groups = [group("alarms", None)];
        let out = rendered(move |e| encode_groups(&groups, e));
        assert!(out.contains("tributary_group_position{"), "{out}");
        assert!(!out.contains("tributary_group_kafka_offset"), "{out}");
    }
}
