//! The admin HTTP endpoint of a running edge: health and readiness, Prometheus metrics and
//! the JSON API report known traffic exactly; a token is enforced (also percent-encoded in
//! `?token=`), and required beyond loopback; requests naming a host that is not allowed are
//! refused before anything else; a device's raw payload is served so that a browser neither
//! renders nor runs it; an explicitly configured admin address that cannot be bound stops the
//! edge.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use tributary_tests::{
    binary, free_port, http_get, http_get_raw, http_request, metric, ConnectOpts, Edge, Got, Proto,
    RawClient,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_json_api_report_known_traffic() {
    let edge = Edge::start("");
    assert_eq!(http_get(edge.admin, "/health", None).unwrap().0, 200);
    assert_eq!(http_get(edge.admin, "/ready", None).unwrap().0, 200);

    let (mut sub, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("dashboard"))
        .await
        .unwrap();
    assert_eq!(
        sub.subscribe(1, &[("sensors/#", 1)]).await.unwrap(),
        vec![1]
    );
    let (mut p, _) = RawClient::connect(edge.addr, Proto::V311, &ConnectOpts::new("press-4"))
        .await
        .unwrap();
    for i in 1..=25u16 {
        p.publish("sensors/press-4/temp", 1, i, format!("t{i}").as_bytes())
            .await
            .unwrap();
        assert_eq!(p.recv().await.unwrap(), Got::PubAck(i, 0));
    }
    // The subscriber has them all once it has read 25 publishes.
    for _ in 0..25 {
        match sub.recv().await.unwrap() {
            Got::Publish { pkid, .. } => sub.ack(0x40, pkid).await.unwrap(),
            other => panic!("{other:?}"),
        }
    }

    let (status, text) = http_get(edge.admin, "/metrics", None).unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        metric(&text, "tributary_messages_received_total{topic=\"mqtt\"}"),
        25.0
    );
    assert_eq!(
        metric(&text, "tributary_mqtt_publishes_received_total"),
        25.0
    );
    assert_eq!(metric(&text, "tributary_mqtt_publishes_sent_total"), 25.0);
    assert_eq!(
        metric(&text, "tributary_mqtt_acks_sent_total"),
        25.0,
        "one PUBACK per publish received (the subscriber's PUBACKs are received, not sent)"
    );
    assert_eq!(metric(&text, "tributary_subscriptions"), 1.0);
    assert_eq!(metric(&text, "tributary_connections"), 2.0);
    assert_eq!(metric(&text, "tributary_sessions_connected"), 2.0);
    assert_eq!(metric(&text, "tributary_outbound_dropped_total"), 0.0);
    for why in [
        "per_address",
        "max_connections",
        "connect_timeout",
        "malformed",
        "packet_too_large",
        "client_id",
        "unavailable",
        "connect_memory",
    ] {
        let series = format!("tributary_connections_refused_total{{reason=\"{why}\"}}");
        assert_eq!(metric(&text, &series), 0.0, "{series}");
    }
    assert_eq!(metric(&text, "tributary_publish_rate_limited_total"), 0.0);
    assert_eq!(metric(&text, "tributary_publish_rate_throttled_total"), 0.0);
    assert_eq!(metric(&text, "tributary_subscriptions_refused_total"), 0.0);
    assert!(metric(&text, "tributary_log_bytes{topic=\"mqtt\"}") > 0.0);
    // Every commit is in the histograms; 25 acknowledged publishes took at least one.
    let commits = metric(&text, "tributary_group_commit_seconds_count");
    assert!(commits >= 1.0, "{text}");
    assert_eq!(
        metric(&text, "tributary_group_commit_records_bucket{le=\"+Inf\"}"),
        commits
    );
    assert!(metric(&text, "tributary_group_commit_records_sum") >= 25.0);
    assert!(text.contains("# TYPE tributary_group_commit_seconds histogram"));
    tributary_tests::assert_readme_names_metrics(&text);
    assert!(
        !text.contains("tributary_mirror_"),
        "no [cloud], no mirror series"
    );

    let (status, body) = http_get(edge.admin, "/api/v1/topics", None).unwrap();
    assert_eq!(status, 200);
    let topics: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mqtt = &topics["topics"][0];
    assert_eq!(mqtt["topic"], "mqtt");
    assert_eq!(mqtt["partitions"][0]["end_offset"], 25);

    let (status, body) = http_get(
        edge.admin,
        "/api/v1/topics/mqtt/partitions/0/records?from=20&limit=3",
        None,
    )
    .unwrap();
    assert_eq!(status, 200);
    let records: serde_json::Value = serde_json::from_str(&body).unwrap();
    let got: Vec<(u64, String, String)> = records["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["offset"].as_u64().unwrap(),
                r["payload"].as_str().unwrap().to_string(),
                r["headers"]["client_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (20, "t21".to_string(), "press-4".to_string()),
            (21, "t22".to_string(), "press-4".to_string()),
            (22, "t23".to_string(), "press-4".to_string()),
        ]
    );
    let (_, body) = http_get(
        edge.admin,
        "/api/v1/topics/mqtt/partitions/0/records?from=20&limit=1&payload=base64",
        None,
    )
    .unwrap();
    let records: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(records["records"][0]["payload"], "dDIx", "base64 of t21");
    assert_eq!(records["records"][0]["payload_encoding"], "base64");
    let (status, body) = http_get(
        edge.admin,
        "/api/v1/topics/mqtt/partitions/0/records?payload=hex",
        None,
    )
    .unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("auto or base64"), "{body}");

    // One record's payload as raw bytes.
    let (status, head, body) = http_get_raw(
        edge.admin,
        "/api/v1/topics/mqtt/partitions/0/records/20/payload",
        None,
    )
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, b"t21");
    assert!(
        head.contains("content-type: application/octet-stream"),
        "{head}"
    );
    assert!(
        head.contains("x-tributary-mqtt-topic: sensors/press-4/temp"),
        "{head}"
    );
    let (status, _, _) = http_get_raw(
        edge.admin,
        "/api/v1/topics/mqtt/partitions/0/records/25/payload",
        None,
    )
    .unwrap();
    assert_eq!(status, 404, "offset 25 is not written yet");

    let (status, _) =
        http_get(edge.admin, "/api/v1/topics/nope/partitions/0/records", None).unwrap();
    assert_eq!(status, 404);
    let (status, _) =
        http_get(edge.admin, "/api/v1/topics/mqtt/partitions/9/records", None).unwrap();
    assert_eq!(status, 400, "a partition that does not exist");

    let (_, body) = http_get(edge.admin, "/api/v1/clients", None).unwrap();
    let clients: serde_json::Value = serde_json::from_str(&body).unwrap();
    let dashboard = clients["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["client_id"] == "dashboard")
        .expect("the subscriber is listed");
    assert_eq!(dashboard["connected"], true);
    assert_eq!(dashboard["subscriptions"][0]["filter"], "sensors/#");
    assert_eq!(dashboard["subscriptions"][0]["qos"], 1);

    assert_eq!(http_get(edge.admin, "/api/v1/mirror", None).unwrap().0, 404);
}

/// Starts an edge whose `[admin]` section is `admin`, expecting it to refuse to start;
/// returns its stderr.
fn refused_start(admin: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "[mqtt]\nlisten = \"127.0.0.1:{}\"\n[storage]\ndata_dir = \"{}\"\n[admin]\n{admin}\n",
            free_port(),
            dir.path().join("data").display(),
        ),
    )
    .unwrap();
    let out = Command::new(binary("edge"))
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_token_is_enforced_and_required_beyond_loopback() {
    // Without a token the edge refuses to expose the endpoint beyond loopback.
    let stderr = refused_start(&format!("listen = \"0.0.0.0:{}\"", free_port()));
    assert!(stderr.contains("admin.token"), "{stderr}");

    // With one, every request must carry it.
    let token = "plant-7-admin-token-0123456789";
    let edge = Edge::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:{}\"\ntoken = \"{token}\"\n",
        free_port()
    ));
    let admin = admin_addr(&edge);
    assert_eq!(http_get(admin, "/metrics", None).unwrap().0, 401);
    assert_eq!(
        http_get(admin, "/api/v1/topics", Some("wrong")).unwrap().0,
        401
    );
    assert_eq!(http_get(admin, "/metrics", Some(token)).unwrap().0, 200);
    assert_eq!(http_get(admin, "/ready", Some(token)).unwrap().0, 200);
}

/// The admin address a test wrote into its own `[admin]` section.
fn admin_addr(edge: &Edge) -> std::net::SocketAddr {
    let text = std::fs::read_to_string(edge.config_path()).unwrap();
    let section = &text[text.find("[admin]").unwrap()..];
    let line = section
        .lines()
        .find_map(|l| l.strip_prefix("listen = \""))
        .unwrap();
    line.trim_end_matches('"').parse().unwrap()
}

#[test]
fn a_configured_admin_address_that_cannot_be_bound_stops_the_edge() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let stderr = refused_start(&format!("listen = \"127.0.0.1:{port}\""));
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
}

/// GET `path` with `Host: {host}` (none when `host` is `None`, over HTTP/1.0) and a token:
/// status and body.
fn get_as(admin: SocketAddr, host: Option<&str>, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = match host {
        Some(h) => format!("GET {path} HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n{auth}\r\n"),
        None => format!("GET {path} HTTP/1.0\r\n{auth}\r\n"),
    };
    let (status, _, body) = http_request(admin, &request).unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn requests_naming_another_host_are_refused_before_the_token_is_checked() {
    let token = "plant-7-admin-token-0123456789";
    let port = free_port();
    let edge = Edge::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{token}\"\n"
    ));
    let admin = admin_addr(&edge);

    // A DNS-rebinding page names its own host: refused, with or without the token, whatever
    // the path, and the answer says which key to set.
    for (host, path, with) in [
        ("evil.example", "/metrics", Some(token)),
        ("evil.example:{port}", "/metrics", Some(token)),
        ("evil.example:{port}", "/metrics", None),
        ("evil.example:{port}", "/api/v1/topics", Some(token)),
        ("evil.example:{port}", "/no-such-path", Some(token)),
        ("localhost.evil.example:{port}", "/health", Some(token)),
        ("127.0.0.2:{port}", "/health", Some(token)),
    ] {
        let host = host.replace("{port}", &port.to_string());
        let (status, body) = get_as(admin, Some(&host), path, with);
        assert_eq!(status, 421, "Host: {host} {path}: {body}");
        assert!(body.contains("admin.allowed_hosts"), "{body}");
    }
    // HTTP/1.0 without a Host header names no host: refused the same way.
    let (status, body) = get_as(admin, None, "/metrics", Some(token));
    assert_eq!(status, 421, "{body}");
    assert!(body.contains("admin.allowed_hosts"), "{body}");
    // An absolute request URI naming another host is refused even with an allowed Host.
    let (status, _, body) = http_request(
        admin,
        &format!(
            "GET http://evil.example:{port}/metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\r\n"
        ),
    )
    .unwrap();
    assert_eq!(status, 421, "{}", String::from_utf8_lossy(&body));

    // The loopback names, with or without the port, in any case, are served; the token is
    // still checked after the host.
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("LocalHost:{port}"),
        "localhost".to_string(),
        format!("[::1]:{port}"),
    ] {
        assert_eq!(
            get_as(admin, Some(&host), "/metrics", Some(token)).0,
            200,
            "Host: {host}"
        );
        assert_eq!(
            get_as(admin, Some(&host), "/metrics", None).0,
            401,
            "Host: {host}"
        );
    }
}

#[test]
fn a_configured_allowed_host_is_served_and_others_still_refused() {
    let port = free_port();
    let edge = Edge::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:{port}\"\nallowed_hosts = [\"edge.plant.local\", \"192.0.2.7\"]\n"
    ));
    let admin = admin_addr(&edge);
    for host in [
        format!("edge.plant.local:{port}"),
        "Edge.Plant.Local".to_string(),
        format!("192.0.2.7:{port}"),
        format!("127.0.0.1:{port}"),
    ] {
        let (status, body) = get_as(admin, Some(&host), "/health", None);
        assert_eq!((status, body.as_str()), (200, "ok\n"), "Host: {host}");
    }
    for host in [
        format!("evil.example:{port}"),
        format!("edge.plant.local.evil.example:{port}"),
        format!("192.0.2.8:{port}"),
    ] {
        assert_eq!(
            get_as(admin, Some(&host), "/health", None).0,
            421,
            "Host: {host}"
        );
    }

    // An entry that is not a host (here with a port) stops the edge at start, naming the key.
    let stderr = refused_start(&format!(
        "listen = \"127.0.0.1:{}\"\nallowed_hosts = [\"edge.plant.local:8080\"]",
        free_port()
    ));
    assert!(stderr.contains("admin.allowed_hosts"), "{stderr}");
    assert!(stderr.contains("without a port"), "{stderr}");
}

/// An MQTT 5 QoS 1 PUBLISH carrying a Content Type property.
fn v5_publish_typed(topic: &str, pkid: u16, content_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut props = vec![0x03];
    props.extend_from_slice(&(content_type.len() as u16).to_be_bytes());
    props.extend_from_slice(content_type.as_bytes());
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&pkid.to_be_bytes());
    assert!(props.len() < 128, "one-byte property length");
    body.push(props.len() as u8);
    body.extend_from_slice(&props);
    body.extend_from_slice(payload);
    assert!(body.len() < 128, "one-byte remaining length");
    let mut packet = vec![0x32, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_payload_is_served_so_that_no_browser_renders_it() {
    let edge = Edge::start("");
    let (mut device, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("mallory"))
        .await
        .unwrap();
    let html = b"<script>fetch('/api/v1/clients')</script>";
    device
        .send_raw(&v5_publish_typed("sensors/mallory/t", 1, "text/html", html))
        .await
        .unwrap();
    assert_eq!(device.recv().await.unwrap(), Got::PubAck(1, 0));

    let (status, head, body) = http_get_raw(
        edge.admin,
        "/api/v1/topics/mqtt/partitions/0/records/0/payload",
        None,
    )
    .unwrap();
    assert_eq!(status, 200, "{head}");
    assert_eq!(body, html, "the bytes as stored");
    // The device's content type is kept (it is what the device said), but the browser may
    // not sniff, must run any document sandboxed in an opaque origin, and should download it.
    for line in [
        "content-type: text/html",
        "x-content-type-options: nosniff",
        "content-security-policy: sandbox",
        "content-disposition: attachment",
    ] {
        assert!(
            head.lines().any(|l| l.trim() == line),
            "no {line:?} in\n{head}"
        );
    }
}

#[test]
fn a_percent_encoded_query_token_is_accepted_and_a_wrong_one_refused() {
    let token = "plant+7/admin=token%41z";
    let edge = Edge::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:{}\"\ntoken = \"{token}\"\n",
        free_port()
    ));
    let admin = admin_addr(&edge);
    let encoded = "plant%2B7%2Fadmin%3Dtoken%2541z";
    let (status, body) = http_get(admin, &format!("/?token={encoded}"), None).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("<html"), "the dashboard");
    // The token as written, undecoded: `+` reads as a space and `%41` as `A`.
    assert_eq!(
        http_get(admin, &format!("/?token={token}"), None)
            .unwrap()
            .0,
        401
    );
    // One character off, encoded the same way.
    assert_eq!(
        http_get(admin, "/?token=plant%2B7%2Fadmin%3Dtoken%2541y", None)
            .unwrap()
            .0,
        401
    );
    // The header carries the token as it is.
    assert_eq!(http_get(admin, "/metrics", Some(token)).unwrap().0, 200);
}
