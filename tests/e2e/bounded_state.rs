//! State a client can make the edge hold is bounded, and identities are bound to users.
//!
//! Delayed wills, retained messages, sessions and 3.1.1 persistent sessions each have a
//! limit; a session belongs to the user who started it; `auth.client_id` binds client ids to
//! user names. Each limit is tested at its edge with real connections.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::process::Command;
use std::time::{Duration, Instant};

use tributary_tests::raw::{v5_connect, v5_publish, will_delay, Will};
use tributary_tests::{
    http_get, metric, mosquitto_passwd, payloads, ConnectOpts, Edge, Got, Proto, RawClient,
};

fn metric_of(edge: &Edge, series: &str) -> f64 {
    let (status, text) = http_get(edge.admin, "/metrics", None).unwrap();
    assert_eq!(status, 200);
    metric(&text, series)
}

/// Waits (generously) until `series` reads `value`.
fn wait_metric(edge: &Edge, series: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = metric_of(edge, series);
        if now == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {now}, expected {value}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Connects with a delayed will (Session Expiry and Will Delay one hour), then drops the
/// socket without DISCONNECT, so the will is due after its delay.
async fn leave_delayed_will(edge: &Edge, id: &str, payload: &[u8]) {
    let mut c = RawClient::open(edge.addr, Proto::V5).await.unwrap();
    let will = Will {
        topic: &format!("wills/{id}"),
        payload,
        props: &will_delay(3600),
        qos: 1,
    };
    c.send_raw(&v5_connect(id, Some(3600), Some(&will)))
        .await
        .unwrap();
    assert_eq!(c.recv().await.unwrap().connack(), Some((0, false)));
}

/// Waits for the next message of `watcher`: a will on `expected`.
async fn expect_will(watcher: &mut RawClient, expected: &str) {
    match watcher.recv_within(Duration::from_secs(60)).await.unwrap() {
        Got::Publish { topic, .. } => assert_eq!(topic, expected),
        other => panic!("expected the will on {expected}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_wills_are_bounded_in_count_and_bytes_and_cancelled_by_a_reconnect() {
    let mut edge = Edge::start_with(
        "max_pending_wills = 3\nmax_pending_will_bytes = \"4KiB\"\n",
        "",
        "",
    );
    let pending = "tributary_pending_wills";
    let early = "tributary_wills_published_early_total";
    // Sees the wills that are published.
    let (mut watcher, _) = RawClient::connect(edge.addr, Proto::V311, &ConnectOpts::new("watcher"))
        .await
        .unwrap();
    assert_eq!(
        watcher.subscribe(1, &[("wills/#", 0)]).await.unwrap(),
        vec![0]
    );

    for id in ["w-a", "w-b", "w-c"] {
        leave_delayed_will(&edge, id, id.as_bytes()).await;
    }
    wait_metric(&edge, pending, 3.0);
    assert_eq!(metric_of(&edge, early), 0.0);

    // A fourth finds no room: published at once instead of after an hour.
    leave_delayed_will(&edge, "w-d", b"w-d").await;
    expect_will(&mut watcher, "wills/w-d").await;
    wait_metric(&edge, early, 1.0);
    assert_eq!(metric_of(&edge, pending), 3.0);

    // A reconnect takes the session up again: its will is cancelled and its place freed.
    let (c, ack) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("w-c"))
        .await
        .unwrap();
    assert_eq!(ack.connack(), Some((0, false)));
    wait_metric(&edge, pending, 2.0);
    assert_eq!(metric_of(&edge, "tributary_wills_cancelled_total"), 1.0);
    drop(c);

    // A will larger than the bytes left is published at once too.
    leave_delayed_will(&edge, "w-e", &[b'x'; 5000]).await;
    expect_will(&mut watcher, "wills/w-e").await;
    wait_metric(&edge, early, 2.0);
    assert_eq!(metric_of(&edge, pending), 2.0);
    assert!(metric_of(&edge, "tributary_pending_will_bytes") <= 4096.0);

    // What was published early is in the log; the waiting and the cancelled ones are not.
    assert!(edge.stop().success());
    let log = edge.read_log();
    let wills: Vec<&str> = log
        .iter()
        .filter(|r| {
            r["headers"]["mqtt_topic"]
                .as_str()
                .is_some_and(|t| t.starts_with("wills/"))
        })
        .filter_map(|r| r["headers"]["mqtt_topic"].as_str())
        .collect();
    assert_eq!(wills, vec!["wills/w-d", "wills/w-e"], "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_retained_store_refuses_without_evicting_and_survives_a_restart() {
    let mut edge = Edge::start_with("max_retained_messages = 3\n", "", "");
    let (mut c, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("r5"))
        .await
        .unwrap();
    for (i, topic) in ["r/1", "r/2", "r/3"].iter().enumerate() {
        let pkid = i as u16 + 1;
        c.send_raw(&v5_publish(topic, 1, pkid, true, &[], topic.as_bytes()))
            .await
            .unwrap();
        assert_eq!(c.recv().await.unwrap(), Got::PubAck(pkid, 0));
    }
    // A fourth topic: 0x97 Quota exceeded, and the connection stays.
    c.send_raw(&v5_publish("r/4", 1, 4, true, &[], b"r/4"))
        .await
        .unwrap();
    assert_eq!(c.recv().await.unwrap(), Got::PubAck(4, 0x97));
    // Replacing a held topic's message is within the limit.
    c.send_raw(&v5_publish("r/1", 1, 5, true, &[], b"r/1-new"))
        .await
        .unwrap();
    assert_eq!(c.recv().await.unwrap(), Got::PubAck(5, 0));
    // A plain publish is not affected.
    c.send_raw(&v5_publish("r/4", 1, 6, false, &[], b"not retained"))
        .await
        .unwrap();
    assert_eq!(c.recv().await.unwrap(), Got::PubAck(6, 0));
    drop(c);
    assert_eq!(
        metric_of(
            &edge,
            "tributary_packets_refused_total{reason=\"retained_quota\"}"
        ),
        1.0
    );

    // 3.1.1 cannot say no: the connection closes.
    let (mut c, _) = RawClient::connect(edge.addr, Proto::V311, &ConnectOpts::new("r3"))
        .await
        .unwrap();
    let mut out = bytes::BytesMut::new();
    RawClient::encode_publish(
        Proto::V311,
        &tributary_tests::Pub {
            topic: b"r/5",
            qos: 1,
            pkid: 1,
            dup: false,
            payload: b"r/5",
            alias: None,
        },
        &mut out,
    );
    out[0] |= 1; // RETAIN
    c.send_raw(&out).await.unwrap();
    assert_eq!(c.until_closed().await.unwrap(), vec![]);

    // After a restart, a subscriber gets the three retained messages, none evicted.
    edge.kill9();
    edge.restart();
    let (mut s, _) = RawClient::connect(edge.addr, Proto::V311, &ConnectOpts::new("reader"))
        .await
        .unwrap();
    assert_eq!(s.subscribe(1, &[("r/#", 0)]).await.unwrap(), vec![0]);
    let mut got = Vec::new();
    for _ in 0..3 {
        match s.recv_within(Duration::from_secs(30)).await.unwrap() {
            Got::Publish { payload, .. } => got.push(String::from_utf8(payload).unwrap()),
            other => panic!("{other:?}"),
        }
    }
    got.sort();
    assert_eq!(got, vec!["r/1-new", "r/2", "r/3"]);
    drop(s);
    assert!(edge.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_bounded_and_311_persistent_sessions_expire_by_the_default() {
    let edge = Edge::start_with(
        "max_sessions = 2\nsession_expiry_default = \"1s\"\n",
        "",
        "",
    );
    let persistent = |id: &str| {
        let mut o = ConnectOpts::new(id);
        o.clean = false;
        o
    };
    for id in ["p-1", "p-2"] {
        let (c, ack) = RawClient::connect(edge.addr, Proto::V311, &persistent(id))
            .await
            .unwrap();
        assert_eq!(ack.connack(), Some((0, false)));
        drop(c);
    }
    // Both are held (disconnected, not expired yet): a third client id is refused...
    let (_, ack) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("p-3"))
        .await
        .unwrap();
    assert_eq!(ack.connack().map(|a| a.0), Some(0x97), "{ack:?}");
    let (_, ack) = RawClient::connect(edge.addr, Proto::V311, &ConnectOpts::new("p-3"))
        .await
        .unwrap();
    assert_eq!(ack.connack().map(|a| a.0), Some(3), "{ack:?}");
    assert_eq!(
        metric_of(
            &edge,
            "tributary_connections_refused_total{reason=\"max_sessions\"}"
        ),
        2.0
    );
    // ...while a client holding one comes back to it.
    let (c, ack) = RawClient::connect(edge.addr, Proto::V311, &persistent("p-1"))
        .await
        .unwrap();
    assert_eq!(ack.connack(), Some((0, true)));
    drop(c);

    // 3.1.1 has no expiry of its own: session_expiry_default = 1s ends the session once
    // its client has been away that long. Wait until the edge has seen it go, and then
    // until more than that second has passed since.
    let deadline = Instant::now() + Duration::from_secs(60);
    let gone_at = loop {
        let (_, body) = http_get(edge.admin, "/api/v1/clients", None).unwrap();
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        let p1 = doc["clients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["client_id"] == "p-1")
            .cloned();
        if let Some(at) = p1.and_then(|c| c["disconnected_at_ms"].as_u64()) {
            break at;
        }
        assert!(
            Instant::now() < deadline,
            "the edge never saw p-1 go: {doc}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    while tributary_tests::now_ms() < gone_at + 1500 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (c, ack) = RawClient::connect(edge.addr, Proto::V311, &persistent("p-1"))
        .await
        .unwrap();
    assert_eq!(ack.connack(), Some((0, false)), "the session expired");
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ids_are_bound_to_users_and_sessions_to_their_owner() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    for user in ["alice", "bob"] {
        mosquitto_passwd(&passwd, user, &format!("{user}-pw"));
    }
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "pattern readwrite devices/%c/#\n").unwrap();
    let auth = |policy: &str| {
        format!(
            "[auth]\npassword_file = {:?}\nacl_file = {:?}\nclient_id = \"{policy}\"\n",
            passwd.display().to_string(),
            acl.display().to_string()
        )
    };

    // With "any", check-config warns: an ACL by %c lets any user claim any device.
    let mut edge = Edge::start(&auth("any"));
    let out = Command::new(tributary_tests::binary("edge"))
        .args(["check-config"])
        .arg(edge.config_path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.contains("warning") && stderr.contains("%c"),
        "{stderr}"
    );

    // A session alice started is hers: bob cannot resume or take it over, with either
    // protocol, even with a clean start; alice can, also after a restart.
    let mut opts = ConnectOpts::new("dev-1");
    opts.clean = false;
    let (c, ack) = RawClient::connect_as(edge.addr, Proto::V311, &opts, "alice", "alice-pw")
        .await
        .unwrap();
    assert_eq!(ack.connack(), Some((0, false)));
    let (_, ack) = RawClient::connect_as(edge.addr, Proto::V5, &opts, "bob", "bob-pw")
        .await
        .unwrap();
    assert_eq!(
        ack.connack().map(|a| a.0),
        Some(0x87),
        "bob cannot take it over"
    );
    drop(c);
    let (_, ack) = RawClient::connect_as(
        edge.addr,
        Proto::V311,
        &ConnectOpts::new("dev-1"),
        "bob",
        "bob-pw",
    )
    .await
    .unwrap();
    assert_eq!(
        ack.connack().map(|a| a.0),
        Some(5),
        "nor end it with a clean session"
    );
    assert!(edge.stop().success());
    edge.restart();
    let (_, ack) = RawClient::connect_as(edge.addr, Proto::V311, &opts, "bob", "bob-pw")
        .await
        .unwrap();
    assert_eq!(ack.connack().map(|a| a.0), Some(5), "the owner is stored");
    let (c, ack) = RawClient::connect_as(edge.addr, Proto::V311, &opts, "alice", "alice-pw")
        .await
        .unwrap();
    assert_eq!(ack.connack(), Some((0, true)));
    drop(c);
    assert!(edge.stop().success());

    // "username": the client id must be the user name.
    std::fs::write(edge.config_path(), {
        let text = std::fs::read_to_string(edge.config_path()).unwrap();
        text.replace("client_id = \"any\"", "client_id = \"username\"")
    })
    .unwrap();
    edge.restart();
    let (_, ack) = RawClient::connect_as(
        edge.addr,
        Proto::V5,
        &ConnectOpts::new("bob"),
        "alice",
        "alice-pw",
    )
    .await
    .unwrap();
    assert_eq!(ack.connack().map(|a| a.0), Some(0x85));
    let (_, ack) = RawClient::connect_as(
        edge.addr,
        Proto::V311,
        &ConnectOpts::new("alice-x"),
        "alice",
        "alice-pw",
    )
    .await
    .unwrap();
    assert_eq!(ack.connack().map(|a| a.0), Some(2));
    let (mut c, ack) = RawClient::connect_as(
        edge.addr,
        Proto::V311,
        &ConnectOpts::new("alice"),
        "alice",
        "alice-pw",
    )
    .await
    .unwrap();
    assert_eq!(ack.connack(), Some((0, false)));
    c.publish("devices/alice/t", 1, 1, b"as-alice")
        .await
        .unwrap();
    assert_eq!(c.recv().await.unwrap(), Got::PubAck(1, 0));
    drop(c);
    assert!(edge.stop().success());

    // "username-prefix": alice-1 and alice/2 are alice's; alicex is not.
    std::fs::write(edge.config_path(), {
        let text = std::fs::read_to_string(edge.config_path()).unwrap();
        text.replace(
            "client_id = \"username\"",
            "client_id = \"username-prefix\"",
        )
    })
    .unwrap();
    edge.restart();
    for (id, code) in [
        ("alice-1", 0),
        ("alice/2", 0),
        ("alicex", 0x85),
        ("bob-1", 0x85),
    ] {
        let (_, ack) = RawClient::connect_as(
            edge.addr,
            Proto::V5,
            &ConnectOpts::new(id),
            "alice",
            "alice-pw",
        )
        .await
        .unwrap();
        assert_eq!(ack.connack().map(|a| a.0), Some(code), "{id}");
    }
    assert!(edge.stop().success());
    assert!(payloads(&edge.read_log()).contains(&"as-alice".to_string()));
}
