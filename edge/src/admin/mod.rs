//! The admin HTTP endpoint: `/health`, `/ready`, `/metrics` (Prometheus text format) and a
//! JSON API under `/api/v1/`. A request whose `Host` is not an allowed host is refused before
//! anything else (see [`hosts`]); with a token configured every request must carry
//! `Authorization: Bearer <token>`.

pub(crate) mod hosts;
pub(crate) mod metrics;
pub(crate) mod process;

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

use crate::inspect::{PayloadText, RecordView, RecordsAnswer, TopicView, TopicsAnswer};
use crate::mqtt::Broker;

/// What the admin endpoint reads.
pub(crate) struct AdminState {
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
pub(crate) fn router(state: Arc<AdminState>) -> Router {
    // Built once: its collectors read the live state at each scrape.
    let metrics = Arc::new(metrics::registry(&state));
    Router::new()
        .route("/", get(dashboard))
        .route("/health", get(|| async { "ok\n" }))
        .route("/api/v1/overview", get(overview))
        .route("/ready", get(ready))
        .route(
            "/metrics",
            get(move || std::future::ready(metrics_response(&metrics))),
        )
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
pub(crate) async fn serve(listener: TcpListener, state: Arc<AdminState>) {
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

fn metrics_response(registry: &prometheus_client::registry::Registry) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::render(registry),
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
pub(crate) fn overview_json(s: &AdminState) -> serde_json::Value {
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
            "refusal": m.refusal.as_ref().filter(|_| m.state == cloud_sync::LinkState::Refused).map(|r| serde_json::json!({
                "reason": r.reason,
                "message": r.message,
            })),
        })),
        "groups": group_status(&s.groups, s.mirror.as_deref()).iter().map(|g| serde_json::json!({
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

async fn topics(State(s): State<Arc<AdminState>>) -> Json<TopicsAnswer> {
    Json(TopicsAnswer {
        topics: s.broker.log.topics().iter().map(TopicView::new).collect(),
    })
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
    let payload = match q.payload.as_deref() {
        None | Some("auto") => PayloadText::Auto,
        Some("base64") => PayloadText::Base64,
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
    let read =
        tokio::task::spawn_blocking(move || log.read_durable(id, partition, from, limit)).await;
    match read {
        Ok(Ok(records)) => Json(RecordsAnswer {
            records: records
                .iter()
                .map(|r| RecordView::new(&topic, partition, r, payload))
                .collect(),
            topic,
            partition,
        })
        .into_response(),
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
    let read =
        tokio::task::spawn_blocking(move || log.read_durable(id, partition, offset, 1)).await;
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
    Json(serde_json::json!({ "groups": group_status(&s.groups, s.mirror.as_deref()) }))
}

/// The groups, with what the mirror replicated of them.
fn group_status(
    groups: &crate::groups::Groups,
    mirror: Option<&cloud_sync::Mirror>,
) -> Vec<crate::groups::GroupStatus> {
    let mut status = groups.status();
    if let Some(m) = mirror {
        crate::groups::add_replication(&mut status, &m.status());
    }
    status
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
}
