//! The admin HTTP endpoint: `/health`, `/ready`, `/metrics` (Prometheus text format) and a
//! JSON API under `/api/v1/`. A request whose `Host` is not an allowed host is refused before
//! anything else (see [`hosts`]); with a token configured every request must carry
//! `Authorization: Bearer <token>`.

pub mod hosts;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::log::record::text_or_base64;
use crate::mqtt::limits::{Limits, PacketRefused, Refused};
use crate::mqtt::Broker;

/// What the admin endpoint reads.
pub struct AdminState {
    /// The broker (log, sessions, hub).
    pub broker: Arc<Broker>,
    /// The Kafka mirror, when configured.
    pub mirror: Option<Arc<cloud_sync::Mirror>>,
    /// The durable consumer groups.
    pub groups: Arc<crate::groups::Groups>,
    /// Set once the MQTT listener is bound and serving.
    pub ready: AtomicBool,
    /// Bearer token required on every request, if any.
    pub token: Option<String>,
    /// The `Host` header values answered (`admin.allowed_hosts`).
    pub allowed_hosts: hosts::AllowedHosts,
}

/// The admin routes.
pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/health", get(|| async { "ok\n" }))
        .route("/api/v1/overview", get(overview))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/v1/topics", get(topics))
        .route(
            "/api/v1/topics/{topic}/partitions/{partition}/records",
            get(records),
        )
        .route(
            "/api/v1/topics/{topic}/partitions/{partition}/records/{offset}/payload",
            get(payload),
        )
        .route("/api/v1/clients", get(clients))
        .route("/api/v1/mirror", get(mirror))
        .route("/api/v1/groups", get(groups))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        // The outer layer runs first: a misdirected request learns nothing, not even
        // whether a token is needed.
        .layer(middleware::from_fn_with_state(state.clone(), check_host))
        .with_state(state)
}

/// Serves the admin routes on a bound listener until the task is aborted.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    if let Err(e) = axum::serve(listener, router(state)).await {
        tracing::error!("admin endpoint failed: {e}");
    }
}

/// Refuses a request whose `Host` (or absolute request URI) names a host not in
/// `admin.allowed_hosts`, and one that names none (HTTP/1.0 without `Host`).
async fn check_host(State(s): State<Arc<AdminState>>, req: Request, next: Next) -> Response {
    match misdirected(&s.allowed_hosts, &req) {
        None => next.run(req).await,
        Some(refusal) => refusal,
    }
}

/// The refusal of a request to a host that is not allowed, if it is one.
fn misdirected(allowed: &hosts::AllowedHosts, req: &Request) -> Option<Response> {
    let mut named = req
        .headers()
        .get_all(header::HOST)
        .iter()
        .map(|v| v.to_str().ok())
        .chain(req.uri().authority().map(|a| Some(a.as_str())));
    let mut any = false;
    let refused = named.find(|h| {
        any = true;
        !h.is_some_and(|h| allowed.allows(h))
    });
    let host = match refused {
        None if any => return None,
        None => "a request without a Host header".to_string(),
        // Printable ASCII (`to_str`), so cutting at any byte is cutting at a character.
        Some(Some(h)) => format!("the host {:?}", &h[..h.len().min(260)]),
        Some(None) => "a Host header that is not text".to_string(),
    };
    Some(
        (
            StatusCode::MISDIRECTED_REQUEST,
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            format!(
                "this admin endpoint does not answer {host}: add the name this edge is reached by to admin.allowed_hosts in the edge's config (localhost, 127.0.0.1, [::1] and the listen address are always allowed)\n"
            ),
        )
            .into_response(),
    )
}

/// The `token` query parameter, decoded as the dashboard's `URLSearchParams` decodes it
/// (`%XX` escapes, `+` for a space), so that the page is let in with the same token it then
/// sends to the API.
fn query_token(uri: &axum::http::Uri) -> Option<String> {
    #[derive(Deserialize)]
    struct TokenQuery {
        token: Option<String>,
    }
    Query::<TokenQuery>::try_from_uri(uri).ok()?.0.token
}

async fn authorize(State(s): State<Arc<AdminState>>, req: Request, next: Next) -> Response {
    if let Some(token) = &s.token {
        // A browser opening the dashboard cannot set a header: the page may carry the token
        // as `?token=` and passes it on as a header to the API.
        let from_query = (req.uri().path() == "/")
            .then(|| query_token(req.uri()))
            .flatten();
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string)
            .or(from_query);
        if given.is_none_or(|g| !constant_time_eq(g.as_bytes(), token.as_bytes())) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "a valid bearer token is required\n",
            )
                .into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn ready(State(s): State<Arc<AdminState>>) -> Response {
    if let Some(why) = s.broker.log.poisoned() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the log is failing: {why}\n"),
        )
            .into_response();
    }
    if !s.ready.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response();
    }
    "ready\n".into_response()
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Unlabelled series of one kind, each with its family header: (name, help, value).
fn series(out: &mut String, kind: &str, list: &[(&str, &str, u64)]) {
    for (name, help, v) in list {
        family(out, name, kind, help);
        let _ = writeln!(out, "{name} {v}");
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The counters of the client limits (`[mqtt]` max_connections*, max_publish_rate, ...).
fn render_limit_metrics(limits: &Limits, out: &mut String) {
    family(
        out,
        "tributary_connections_refused_total",
        "counter",
        "Connections refused or closed before their session started, by reason.",
    );
    for why in Refused::ALL {
        let _ = writeln!(
            out,
            "tributary_connections_refused_total{{reason=\"{}\"}} {}",
            why.label(),
            limits.refused_count(why)
        );
    }
    family(
        out,
        "tributary_packets_refused_total",
        "counter",
        "Packets refused for a field over its [mqtt] limit, by the limit.",
    );
    for why in PacketRefused::ALL {
        let _ = writeln!(
            out,
            "tributary_packets_refused_total{{reason=\"{}\"}} {}",
            why.label(),
            limits.packet_refused_count(why)
        );
    }
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let counters = [
        (
            "tributary_publish_rate_limited_total",
            "Connections closed for staying over max_publish_rate (5.0: 0x96 Message rate too high).",
            load(&limits.rate_disconnects),
        ),
        (
            "tributary_publish_rate_throttled_total",
            "Times a connection over max_publish_rate was not read until it was within the rate.",
            load(&limits.rate_throttles),
        ),
        (
            "tributary_subscriptions_refused_total",
            "Subscriptions refused because the session held max_subscriptions_per_client.",
            load(&limits.subscriptions_refused),
        ),
    ];
    series(out, "counter", &counters);
}

/// The metrics in Prometheus text format.
pub fn render_metrics(s: &AdminState) -> String {
    let b = &s.broker;
    let log = &b.log;
    let stats = &b.hub.stats;
    let mut out = String::with_capacity(8192);

    family(
        &mut out,
        "tributary_messages_received_total",
        "counter",
        "Records appended to each log topic since the log was created.",
    );
    for t in log.topics() {
        let _ = writeln!(
            out,
            "tributary_messages_received_total{{topic=\"{}\"}} {}",
            label(&t.name),
            t.records_appended()
        );
    }
    family(
        &mut out,
        "tributary_log_bytes",
        "gauge",
        "Bytes each log topic holds on disk now.",
    );
    for t in log.topics() {
        let n: u64 = t
            .partitions
            .iter()
            .map(|p| p.bytes.load(Ordering::Relaxed))
            .sum();
        let _ = writeln!(
            out,
            "tributary_log_bytes{{topic=\"{}\"}} {n}",
            label(&t.name)
        );
    }
    let counters: &[(&str, &str, u64)] = &[
        (
            "tributary_mqtt_publishes_received_total",
            "PUBLISH packets accepted from clients (and wills) since start.",
            stats.messages_received.load(Ordering::Relaxed),
        ),
        (
            "tributary_mqtt_acks_sent_total",
            "PUBACK, PUBREC and PUBCOMP packets sent for received publishes since start.",
            stats.acks_sent.load(Ordering::Relaxed),
        ),
        (
            "tributary_mqtt_publishes_sent_total",
            "PUBLISH packets sent to subscribers since start.",
            stats.messages_sent.load(Ordering::Relaxed),
        ),
        (
            "tributary_mqtt_received_bytes_total",
            "Bytes read from MQTT clients since start (after CONNECT).",
            stats.bytes_received.load(Ordering::Relaxed),
        ),
        (
            "tributary_mqtt_sent_bytes_total",
            "Bytes written to MQTT clients since start.",
            stats.bytes_sent.load(Ordering::Relaxed),
        ),
        (
            "tributary_outbound_dropped_total",
            "Deliveries dropped because a subscriber's queue was full or an offline session's queue bound was reached.",
            stats.dropped.load(Ordering::Relaxed),
        ),
        (
            "tributary_queue_read_errors_total",
            "Queued deliveries of persistent sessions whose record could not be read (kept on disk for the next attempt, never dropped).",
            stats.queue_read_errors.load(Ordering::Relaxed),
        ),
        (
            "tributary_outbound_expired_total",
            "Deliveries not sent because the message expired first.",
            stats.expired.load(Ordering::Relaxed),
        ),
        (
            "tributary_outbound_oversize_total",
            "Deliveries skipped because they exceed the client's Maximum Packet Size.",
            stats.oversize.load(Ordering::Relaxed),
        ),
        (
            "tributary_slow_subscriber_disconnects_total",
            "Subscribers disconnected for staying over their queue bound.",
            stats.slow_disconnects.load(Ordering::Relaxed),
        ),
        (
            "tributary_publishes_rejected_total",
            "Publishes refused because the disk budget was reached (reject policy).",
            log.counters.budget_rejected.load(Ordering::Relaxed),
        ),
        (
            "tributary_retention_deleted_records_total",
            "Records deleted by age or byte retention since start.",
            log.counters.retention_removed.load(Ordering::Relaxed),
        ),
        (
            "tributary_budget_dropped_records_total",
            "Records deleted by the drop-oldest disk budget policy since start.",
            log.counters.budget_dropped.load(Ordering::Relaxed),
        ),
        (
            "tributary_publishes_denied_total",
            "Publishes and wills refused by the ACL (never logged).",
            b.auth.stats.publishes_denied.load(Ordering::Relaxed),
        ),
        (
            "tributary_subscriptions_denied_total",
            "Subscription filters refused by the ACL.",
            b.auth.stats.subscriptions_denied.load(Ordering::Relaxed),
        ),
        (
            "tributary_auth_failures_total",
            "CONNECTs refused for a bad user name or password or for not being authorized.",
            b.auth.stats.failures.load(Ordering::Relaxed),
        ),
    ];
    series(&mut out, "counter", counters);
    family(
        &mut out,
        "tributary_corrupt_entries_total",
        "counter",
        "Stored entries that did not decode (each counted once): record batches skipped by every reader, meta entries left out at start.",
    );
    for (kind, n) in [
        ("batch", &log.counters.corrupt_batches),
        ("meta", &log.counters.corrupt_meta),
    ] {
        let _ = writeln!(
            out,
            "tributary_corrupt_entries_total{{kind=\"{kind}\"}} {}",
            n.load(Ordering::Relaxed)
        );
    }
    render_limit_metrics(&b.limits, &mut out);
    let (pending_wills, pending_will_bytes) = b.wills.held();
    series(
        &mut out,
        "counter",
        &[
            (
                "tributary_wills_published_early_total",
                "Delayed wills published at once because max_pending_wills or max_pending_will_bytes was reached.",
                b.wills.published_early.load(Ordering::Relaxed),
            ),
            (
                "tributary_wills_cancelled_total",
                "Delayed wills not published because a new connection took their session.",
                b.wills.cancelled.load(Ordering::Relaxed),
            ),
        ],
    );
    series(
        &mut out,
        "gauge",
        &[
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
        ],
    );
    render_group_metrics(&group_status(s), &mut out);
    let (connected, disconnected) = b.sessions.counts();
    let gauges: [(&str, &str, u64); 6] = [
        (
            "tributary_connections",
            "Open MQTT connections.",
            b.connections.load(Ordering::Relaxed) as u64,
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
        (
            "tributary_disk_bytes",
            "Bytes the log holds (what the disk budget counts).",
            log.total_bytes(),
        ),
    ];
    series(&mut out, "gauge", &gauges);
    family(
        &mut out,
        "tributary_sessions_connected",
        "gauge",
        "Sessions with a connected client.",
    );
    let _ = writeln!(out, "tributary_sessions_connected {connected}");
    if let Some(budget) = log.budget() {
        family(
            &mut out,
            "tributary_disk_budget_bytes",
            "gauge",
            "The configured disk budget.",
        );
        let _ = writeln!(out, "tributary_disk_budget_bytes {}", budget.bytes);
    }
    family(
        &mut out,
        "tributary_group_commit_records",
        "histogram",
        "Records written per group commit.",
    );
    log.counters
        .commit_records
        .render("tributary_group_commit_records", &mut out);
    family(
        &mut out,
        "tributary_group_commit_seconds",
        "histogram",
        "Time of a group commit's write and fsync.",
    );
    log.counters
        .commit_seconds
        .render("tributary_group_commit_seconds", &mut out);

    if let Some(m) = &s.mirror {
        let st = m.status();
        family(
            &mut out,
            "tributary_mirror_link_up",
            "gauge",
            "1 while the mirror is mirroring to Kafka, 0 otherwise.",
        );
        let up = matches!(st.state, cloud_sync::LinkState::Mirroring);
        let _ = writeln!(out, "tributary_mirror_link_up {}", u8::from(up));
        render_mirror_last_error(&st, &mut out);
        let mirrored = [
            (
                "tributary_mirror_records_total",
                "Records committed to Kafka by this process.",
                st.records_mirrored,
            ),
            (
                "tributary_mirror_bytes_total",
                "Bytes committed to Kafka by this process.",
                st.bytes_mirrored,
            ),
            (
                "tributary_mirror_transactions_total",
                "Kafka transactions committed by this process.",
                st.transactions,
            ),
        ];
        series(&mut out, "counter", &mirrored);
        family(
            &mut out,
            "tributary_mirror_transaction_commit_seconds",
            "histogram",
            "Time Kafka took to commit each mirror transaction.",
        );
        m.commit_latency()
            .render("tributary_mirror_transaction_commit_seconds", &mut out);
        family(
            &mut out,
            "tributary_mirror_lag_records",
            "gauge",
            "Records of each partition not yet in Kafka.",
        );
        for p in &st.partitions {
            let _ = writeln!(
                out,
                "tributary_mirror_lag_records{{topic=\"{}\",partition=\"{}\"}} {}",
                label(&p.topic),
                p.partition,
                p.lag_records
            );
        }
        family(
            &mut out,
            "tributary_mirror_lost_before_mirror_total",
            "counter",
            "Records deleted at the edge (retention, disk budget) before they were mirrored.",
        );
        for p in &st.partitions {
            let _ = writeln!(
                out,
                "tributary_mirror_lost_before_mirror_total{{topic=\"{}\",partition=\"{}\"}} {}",
                label(&p.topic),
                p.partition,
                p.lost_before_mirror
            );
        }
    }
    out
}

/// When the mirror last failed, labelled with the step that failed. The message stays out of
/// the label: it is free text (from Kafka, the network, a broker's name), and every distinct
/// text would be a new series for Prometheus to keep; `/api/v1/mirror` has it.
fn render_mirror_last_error(st: &cloud_sync::MirrorStatus, out: &mut String) {
    let (Some(kind), Some(at)) = (st.last_error_kind, st.last_error_at_ms) else {
        return;
    };
    family(
        out,
        "tributary_mirror_last_error_timestamp_seconds",
        "gauge",
        "When the mirror last failed (Unix time), by the step that failed: connect, topics, checkpoint, produce, transaction, fenced, source or other; the message is in /api/v1/mirror.",
    );
    let _ = writeln!(
        out,
        "tributary_mirror_last_error_timestamp_seconds{{kind=\"{}\"}} {}",
        kind.label(),
        at as f64 / 1000.0
    );
}

/// The consumer groups' series.
fn render_group_metrics(groups: &[crate::groups::GroupStatus], out: &mut String) {
    if groups.is_empty() {
        return;
    }
    type PerGroup = fn(&crate::groups::GroupStatus) -> u64;
    let per_group: [(&str, &str, &str, PerGroup); 6] = [
        (
            "tributary_group_members",
            "gauge",
            "Online members of each consumer group.",
            |g| g.members.len() as u64,
        ),
        (
            "tributary_group_records_delivered_total",
            "counter",
            "Records each consumer group handed to its members.",
            |g| g.delivered,
        ),
        (
            "tributary_group_records_acknowledged_total",
            "counter",
            "Records each consumer group's members acknowledged.",
            |g| g.acknowledged,
        ),
        (
            "tributary_group_records_lost_total",
            "counter",
            "Records retention deleted before each consumer group read them.",
            |g| g.lost,
        ),
        (
            "tributary_group_records_filtered_total",
            "counter",
            "Records outside each consumer group's filter, skipped by design.",
            |g| g.filtered,
        ),
        (
            "tributary_group_ack_timeouts_total",
            "counter",
            "Members that lost their partitions for acknowledging nothing within the group's ack_timeout.",
            |g| g.ack_timeouts,
        ),
    ];
    for (name, kind, help, value) in per_group {
        family(out, name, kind, help);
        for g in groups {
            let _ = writeln!(out, "{name}{{group=\"{}\"}} {}", label(&g.name), value(g));
        }
    }
    type PerPartition = fn(&crate::groups::PartitionPosition) -> u64;
    let per_partition: [(&str, &str, PerPartition); 2] = [
        (
            "tributary_group_position",
            "Stored position of each consumer group in each partition: every record below it is processed.",
            |p| p.committed,
        ),
        (
            "tributary_group_lag_records",
            "Records of each partition a consumer group has not processed.",
            |p| p.lag,
        ),
    ];
    if groups
        .iter()
        .any(|g| g.partitions.iter().any(|p| p.kafka_offset.is_some()))
    {
        family(
            out,
            "tributary_group_kafka_offset",
            "gauge",
            "The Kafka consumer group's committed offset of each mirrored partition, as last replicated from the edge group.",
        );
        for g in groups {
            for p in &g.partitions {
                if let Some(o) = p.kafka_offset {
                    let _ = writeln!(
                        out,
                        "tributary_group_kafka_offset{{group=\"{}\",topic=\"{}\",partition=\"{}\"}} {o}",
                        label(&g.name),
                        label(&p.topic),
                        p.partition
                    );
                }
            }
        }
    }
    for (name, help, value) in per_partition {
        family(out, name, "gauge", help);
        for g in groups {
            for p in &g.partitions {
                let _ = writeln!(
                    out,
                    "{name}{{group=\"{}\",topic=\"{}\",partition=\"{}\"}} {}",
                    label(&g.name),
                    label(&p.topic),
                    p.partition,
                    value(p)
                );
            }
        }
    }
}

async fn metrics(State(s): State<Arc<AdminState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render_metrics(&s),
    )
        .into_response()
}

async fn dashboard() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("dashboard.html"),
    )
        .into_response()
}

/// Everything the dashboard shows, in one document.
pub fn overview_json(s: &AdminState) -> serde_json::Value {
    let b = &s.broker;
    let log = &b.log;
    let stats = &b.hub.stats;
    let mirror = s.mirror.as_ref().map(|m| m.status());
    let topics: Vec<serde_json::Value> = log
        .topics()
        .iter()
        .map(|t| {
            let end = t.records_appended();
            let bytes = t.bytes();
            let mirrored = mirror.as_ref().map(|m| {
                let parts: Vec<_> = m.partitions.iter().filter(|p| p.topic == t.name).collect();
                (
                    parts
                        .iter()
                        .map(|p| p.mirrored_offset.unwrap_or(p.edge_start_offset))
                        .sum::<u64>(),
                    parts.iter().map(|p| p.lag_records).sum::<u64>(),
                    !parts.is_empty(),
                )
            });
            let mirrored = mirrored.filter(|m| m.2);
            serde_json::json!({
                "name": t.name,
                "partitions": t.partitions.len(),
                "end_offsets": end,
                "bytes": bytes,
                "mirrored": mirrored.map(|m| m.0),
                "lag_records": mirrored.map(|m| m.1),
            })
        })
        .collect();
    let (connected, disconnected) = b.sessions.counts();
    let errors = crate::recent::entries();
    let errors = &errors[errors.len().saturating_sub(10)..];
    serde_json::json!({
        "now_ms": crate::log::appender::now_ms(),
        "uptime_s": stats.started.elapsed().as_secs(),
        "messages_received_total": topics.iter().map(|t| t["end_offsets"].as_u64().unwrap_or(0)).sum::<u64>(),
        "log_bytes": log.total_bytes(),
        "disk_budget_bytes": log.budget().map(|b| b.bytes),
        "mqtt": {
            "connections": b.connections.load(Ordering::Relaxed),
            "sessions_connected": connected,
            "sessions_disconnected": disconnected,
            "subscriptions": b.hub.subscription_count(),
            "retained": b.hub.retained_count(),
            "publishes_received": stats.messages_received.load(Ordering::Relaxed),
            "publishes_sent": stats.messages_sent.load(Ordering::Relaxed),
            "bytes_received": stats.bytes_received.load(Ordering::Relaxed),
            "dropped": stats.dropped.load(Ordering::Relaxed),
        },
        "topics": topics,
        "mirror": mirror.as_ref().map(|m| serde_json::json!({
            "state": m.state,
            "last_error": m.last_error,
            "last_healthy_at_ms": m.last_healthy_at_ms,
            "records_mirrored": m.records_mirrored,
        })),
        "groups": group_status(s).iter().map(|g| serde_json::json!({
            "name": g.name,
            "topics": g.topics,
            "members": g.members.len(),
            "lag_records": g.partitions.iter().map(|p| p.lag).sum::<u64>(),
            "in_flight": g.partitions.iter().map(|p| p.in_flight).sum::<u64>(),
            "lost": g.lost,
            "kafka_state": g.kafka_state,
        })).collect::<Vec<_>>(),
        "errors": errors,
    })
}

async fn overview(State(s): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    Json(overview_json(&s))
}

async fn topics(State(s): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    let topics: Vec<serde_json::Value> = s
        .broker
        .log
        .topics()
        .iter()
        .map(|t| {
            serde_json::json!({
                "name": t.name,
                "partitions": t.partitions.iter().enumerate().map(|(i, p)| serde_json::json!({
                    "partition": i,
                    "start_offset": p.start.load(Ordering::Relaxed),
                    "end_offset": p.end.load(Ordering::Relaxed),
                    "bytes": p.bytes.load(Ordering::Relaxed),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(serde_json::json!({ "topics": topics }))
}

#[derive(Deserialize)]
struct RecordsQuery {
    from: Option<u64>,
    limit: Option<usize>,
    /// `auto` (default: text when UTF-8, else base64) or `base64` (always).
    payload: Option<String>,
}

/// The answer to a request naming a log topic that does not exist.
fn no_topic(topic: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({ "error": format!("no topic {topic:?}") })),
    )
        .into_response()
}

/// Largest `limit` of one records request.
const MAX_RECORDS: usize = 1000;

async fn records(
    State(s): State<Arc<AdminState>>,
    Path((topic, partition)): Path<(String, u32)>,
    Query(q): Query<RecordsQuery>,
) -> Response {
    let log = &s.broker.log;
    let Some(t) = log.topic(&topic) else {
        return no_topic(&topic);
    };
    let always_base64 = match q.payload.as_deref() {
        None | Some("auto") => false,
        Some("base64") => true,
        Some(other) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({
                    "error": format!("payload={other:?}: use auto or base64 (or .../records/{{offset}}/payload for the raw bytes)")
                })),
            )
                .into_response()
        }
    };
    let limit = q.limit.unwrap_or(100).min(MAX_RECORDS);
    let id = t.id;
    let log = log.clone();
    let from = q.from.unwrap_or(0);
    let read = tokio::task::spawn_blocking(move || log.read(id, partition, from, limit)).await;
    match read {
        Ok(Ok(records)) => {
            let list: Vec<serde_json::Value> = records
                .iter()
                .map(|r| record_json(r, always_base64))
                .collect();
            Json(serde_json::json!({ "topic": topic, "partition": partition, "records": list }))
                .into_response()
        }
        Ok(Err(e)) => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": e.to_string() })),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({ "error": e.to_string() })),
        )
            .into_response(),
    }
}

fn record_json(r: &crate::log::Record, always_base64: bool) -> serde_json::Value {
    let (payload, encoding) = if always_base64 {
        use base64::Engine as _;
        (
            base64::engine::general_purpose::STANDARD.encode(&r.payload),
            "base64",
        )
    } else {
        text_or_base64(&r.payload)
    };
    let (key, key_encoding) = text_or_base64(&r.key);
    let h = &r.headers;
    serde_json::json!({
        "offset": r.offset,
        "timestamp_ms": r.timestamp_ms,
        "key": key,
        "key_encoding": key_encoding,
        "mqtt_topic": h.mqtt_topic,
        "qos": h.qos,
        "retain": h.retain,
        "client_id": h.client_id,
        "content_type": h.content_type,
        "user_properties": h.user_properties,
        "payload": payload,
        "payload_encoding": encoding,
    })
}

/// One record's payload, as stored: the body is the bytes, typed by the record's MQTT 5
/// content type when it has one.
async fn payload(
    State(s): State<Arc<AdminState>>,
    Path((topic, partition, offset)): Path<(String, u32, u64)>,
) -> Response {
    let log = &s.broker.log;
    let Some(t) = log.topic(&topic) else {
        return no_topic(&topic);
    };
    let id = t.id;
    let log = log.clone();
    let read = tokio::task::spawn_blocking(move || log.read(id, partition, offset, 1)).await;
    let failed = |status: StatusCode, error: String| {
        (status, Json(serde_json::json!({ "error": error }))).into_response()
    };
    match read {
        Ok(Ok(records)) => match records.into_iter().next() {
            Some(r) if r.offset == offset => {
                let mut headers = header::HeaderMap::new();
                let content_type = r
                    .headers
                    .content_type
                    .as_deref()
                    .and_then(|ct| header::HeaderValue::from_str(ct).ok())
                    .unwrap_or(header::HeaderValue::from_static(
                        "application/octet-stream",
                    ));
                headers.insert(header::CONTENT_TYPE, content_type);
                // A topic with control characters cannot be a header value; the JSON
                // listing has it either way.
                if let Ok(v) = header::HeaderValue::from_bytes(r.headers.mqtt_topic.as_bytes()) {
                    headers.insert("x-tributary-mqtt-topic", v);
                }
                // A device chooses both the bytes and their content type: a `text/html`
                // payload opened in a browser would run its scripts in the admin origin, with
                // the API at hand. The browser must not sniff a type, must run the document
                // (if it shows it at all) in an opaque origin, and should save it instead.
                headers.insert(
                    header::X_CONTENT_TYPE_OPTIONS,
                    header::HeaderValue::from_static("nosniff"),
                );
                headers.insert(
                    header::CONTENT_SECURITY_POLICY,
                    header::HeaderValue::from_static("sandbox"),
                );
                headers.insert(
                    header::CONTENT_DISPOSITION,
                    header::HeaderValue::from_static("attachment"),
                );
                (headers, r.payload).into_response()
            }
            _ => failed(
                StatusCode::NOT_FOUND,
                format!(
                    "no record at offset {offset} of {topic}/{partition} (deleted by retention, or not written yet)"
                ),
            ),
        },
        Ok(Err(e)) => failed(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => failed(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn clients(State(s): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    let hub = &s.broker.hub;
    let list = s.broker.sessions.list();
    let clients: Vec<serde_json::Value> = list
        .into_iter()
        .map(|c| {
            let subscriptions: Vec<serde_json::Value> = c
                .sub
                .as_ref()
                .map(|sub| hub.subscriptions_of(sub))
                .unwrap_or_default()
                .into_iter()
                .map(|(filter, o)| serde_json::json!({ "filter": filter, "qos": o.qos }))
                .collect();
            serde_json::json!({
                "client_id": c.client_id,
                "username": c.username.as_deref(),
                "connected": c.connected,
                "persistent": c.persistent,
                "session_expiry_secs": c.expiry,
                "disconnected_at_ms": c.disconnected_at_ms,
                "subscriptions": subscriptions,
                "queued_in_memory": c.sub.as_ref().map(|s| s.queued()).unwrap_or(0),
            })
        })
        .collect();
    Json(serde_json::json!({ "clients": clients }))
}

async fn groups(State(s): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "groups": group_status(&s) }))
}

/// The groups, with what the mirror replicated of them.
fn group_status(s: &AdminState) -> Vec<crate::groups::GroupStatus> {
    let mut groups = s.groups.status();
    if let Some(m) = &s.mirror {
        crate::groups::add_replication(&mut groups, &m.status());
    }
    groups
}

async fn mirror(State(s): State<Arc<AdminState>>) -> Response {
    match &s.mirror {
        Some(m) => Json(m.status()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": "no [cloud] section: this edge does not mirror" })),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_of(path_and_query: &str) -> Option<String> {
        query_token(&path_and_query.parse().unwrap())
    }

    #[test]
    fn query_token_is_percent_decoded() {
        assert_eq!(
            token_of("/?token=a%2Bb%2Fc%3D%3Dd%25e").as_deref(),
            Some("a+b/c==d%e")
        );
        assert_eq!(
            token_of("/?x=1&token=plain-token-0123456789&y=2").as_deref(),
            Some("plain-token-0123456789")
        );
    }

    #[test]
    fn query_token_reads_a_plus_as_a_space_like_the_dashboard() {
        // The page reads the token with URLSearchParams, which takes `+` for a space; the
        // server must let the page in with the token the page then sends.
        assert_eq!(token_of("/?token=a+b").as_deref(), Some("a b"));
    }

    #[test]
    fn query_without_a_token_gives_none() {
        assert_eq!(token_of("/"), None);
        assert_eq!(token_of("/?tokens=x"), None);
        assert_eq!(token_of("/?token=a&token=b"), None, "ambiguous");
    }

    fn request(uri: &str, hosts: &[&str]) -> Request {
        let mut req = Request::builder().uri(uri);
        for h in hosts {
            req = req.header(header::HOST, *h);
        }
        req.body(axum::body::Body::empty()).unwrap()
    }

    fn loopback() -> hosts::AllowedHosts {
        hosts::AllowedHosts::new(&[], std::net::Ipv4Addr::LOCALHOST.into()).unwrap()
    }

    #[test]
    fn a_request_naming_an_allowed_host_passes() {
        assert!(misdirected(&loopback(), &request("/metrics", &["127.0.0.1:8080"])).is_none());
        assert!(misdirected(&loopback(), &request("/", &["localhost"])).is_none());
    }

    #[test]
    fn a_request_naming_another_host_or_none_is_misdirected() {
        let allowed = loopback();
        for req in [
            request("/metrics", &["evil.example:8080"]),
            request("/metrics", &[]),
            request("/metrics", &["127.0.0.1:8080", "evil.example"]),
            request("http://evil.example:8080/metrics", &["127.0.0.1:8080"]),
        ] {
            let uri = req.uri().clone();
            let refused = misdirected(&allowed, &req).expect("refused");
            assert_eq!(refused.status(), StatusCode::MISDIRECTED_REQUEST, "{uri}");
        }
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
            partitions: Vec::new(),
            groups: Vec::new(),
        }
    }

    #[test]
    fn mirror_error_metric_is_labelled_by_kind_not_message() {
        let message = "connecting to kafka.invalid:9092: \"resolve\" failed\n{error=\"x\"}";
        for kind in cloud_sync::ErrorKind::ALL {
            let mut out = String::new();
            render_mirror_last_error(&failed_status(kind, message), &mut out);
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
        let mut out = String::new();
        render_mirror_last_error(&status, &mut out);
        assert_eq!(out, "");
    }
}
