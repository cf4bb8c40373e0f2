//! The admin HTTP endpoint of a running edge: health and readiness, Prometheus metrics and
//! the JSON API report known traffic exactly; a token is enforced, and required beyond
//! loopback; an explicitly configured admin address that cannot be bound stops the edge.

use std::process::{Command, Stdio};

use tributary_tests::{
    binary, free_port, http_get, http_get_raw, metric, ConnectOpts, Edge, Got, Proto, RawClient,
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
    assert_eq!(mqtt["name"], "mqtt");
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
                r["client_id"].as_str().unwrap().to_string(),
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
