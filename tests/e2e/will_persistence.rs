//! Wills are session state: stored before the CONNACK, they survive kill -9 and SIGTERM and
//! are published once after the restart, unless a normal DISCONNECT discarded them or the
//! client takes its session up again within the Will Delay Interval.
//!
//! A persistent subscriber (QoS 1, session expiry one hour) watches `wills/#`; what it gets
//! before a marker published after the restart is everything the restart published.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::time::{Duration, Instant};

use tributary_tests::raw::{v5_connect, will_delay, Will};
use tributary_tests::{http_get, metric, ConnectOpts, Edge, Got, Proto, RawClient};

const WATCHER: &str = "will-watcher";

fn persistent(id: &str, expiry: u32) -> ConnectOpts {
    ConnectOpts {
        client_id: id.to_string(),
        clean: false,
        keep_alive: 60,
        session_expiry: Some(expiry),
    }
}

/// The watcher's session, subscribed to `wills/#` at QoS 1 (a new one the first time).
async fn watcher(edge: &Edge, present: bool) -> RawClient {
    let (mut w, ack) = RawClient::connect(edge.addr, Proto::V5, &persistent(WATCHER, 3600))
        .await
        .unwrap();
    assert_eq!(ack.connack(), Some((0, present)));
    if !present {
        assert_eq!(w.subscribe(1, &[("wills/#", 1)]).await.unwrap(), vec![1]);
    }
    w
}

/// Connects `id` with a QoS 1 will on `wills/{id}` (payload `{id} is gone`), its Will Delay
/// Interval and Session Expiry Interval when given; returns the open connection.
async fn connect_with_will(
    edge: &Edge,
    id: &str,
    delay: Option<u32>,
    expiry: Option<u32>,
) -> RawClient {
    let mut c = RawClient::open(edge.addr, Proto::V5).await.unwrap();
    let props = delay.map(will_delay).unwrap_or_default();
    let topic = format!("wills/{id}");
    let payload = format!("{id} is gone");
    let will = Will {
        topic: &topic,
        payload: payload.as_bytes(),
        props: &props,
        qos: 1,
    };
    c.send_raw(&v5_connect(id, expiry, Some(&will)))
        .await
        .unwrap();
    assert_eq!(c.recv().await.unwrap().connack(), Some((0, false)));
    c
}

/// Publishes `marker` on `wills/marker` (QoS 1, acknowledged).
async fn publish_marker(edge: &Edge, marker: &str) {
    let (mut p, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("marker-pub"))
        .await
        .unwrap();
    p.publish("wills/marker", 1, 1, marker.as_bytes())
        .await
        .unwrap();
    assert_eq!(p.recv().await.unwrap(), Got::PubAck(1, 0));
}

/// Receives (and acknowledges) publishes until one on `topic` (with `payload`, when given);
/// returns the topics and payloads of those before it. The deadline is generous: it guards
/// against a hang only.
async fn receive_until(
    w: &mut RawClient,
    topic: &str,
    payload: Option<&str>,
) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut before = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match w.recv_within(left).await.unwrap() {
            Got::Publish {
                topic: t,
                payload: body,
                qos,
                pkid,
                ..
            } => {
                if qos > 0 {
                    w.ack(0x40, pkid).await.unwrap();
                }
                let text = String::from_utf8_lossy(&body).into_owned();
                if t == topic && payload.is_none_or(|p| p == text) {
                    return before;
                }
                before.push((t, text));
            }
            Got::PingResp => {}
            other => panic!("expected publishes until {topic}, got {other:?}"),
        }
    }
}

/// Publishes the marker `marker` and returns what the watcher gets before it: everything
/// published on `wills/#` since what it received last.
async fn published_before_marker(
    edge: &Edge,
    w: &mut RawClient,
    marker: &str,
) -> Vec<(String, String)> {
    publish_marker(edge, marker).await;
    receive_until(w, "wills/marker", Some(marker)).await
}

/// The watcher receives the will of `id` with nothing before it, then the marker `marker`
/// with nothing between: that will alone was published.
async fn only_this_will(edge: &Edge, w: &mut RawClient, id: &str, marker: &str) {
    let topic = format!("wills/{id}");
    assert_eq!(
        receive_until(w, &topic, None).await,
        vec![],
        "before {topic}"
    );
    assert_eq!(
        published_before_marker(edge, w, marker).await,
        vec![],
        "after {topic}"
    );
}

/// Disconnects the watcher normally and waits for the edge to close: its acknowledgements
/// are committed then (a kill right after an unfinished PUBACK would have the edge deliver
/// again, as QoS 1 allows).
async fn leave(mut w: RawClient) {
    w.send_raw(&[0xE0, 0x00]).await.unwrap();
    assert_eq!(w.until_closed().await.unwrap(), vec![]);
}

fn metric_of(edge: &Edge, series: &str) -> f64 {
    let (status, text) = http_get(edge.admin, "/metrics", None).unwrap();
    assert_eq!(status, 200);
    metric(&text, series)
}

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

/// The records the log holds on `topic` (the edge must be stopped).
fn logged_on(edge: &Edge, topic: &str) -> usize {
    edge.read_log()
        .iter()
        .filter(|r| r["headers"]["mqtt_topic"].as_str() == Some(topic))
        .count()
}

fn will_of(id: &str) -> (String, String) {
    (format!("wills/{id}"), format!("{id} is gone"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_whose_connection_was_open_at_kill9_is_published_once_after_restart() {
    let mut edge = Edge::start("");
    drop(watcher(&edge, false).await);
    // No delay, no session expiry: due as soon as the connection is gone.
    let client = connect_with_will(&edge, "dev-a", None, None).await;
    edge.kill9();
    drop(client);
    edge.restart();

    // Published at start, queued for the offline watcher, delivered when it is back.
    let mut w = watcher(&edge, true).await;
    assert_eq!(
        published_before_marker(&edge, &mut w, "after-restart").await,
        vec![will_of("dev-a")]
    );
    // Once: another kill -9 and restart bring nothing back.
    leave(w).await;
    edge.kill9();
    edge.restart();
    let mut w = watcher(&edge, true).await;
    assert_eq!(
        published_before_marker(&edge, &mut w, "after-second-restart").await,
        vec![]
    );
    assert!(edge.stop().success());
    assert_eq!(logged_on(&edge, "wills/dev-a"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_will_waits_across_sigterm_and_is_published_once() {
    let mut edge = Edge::start("");
    let mut w = watcher(&edge, false).await;
    // Will Delay 10 s, session expiry 10 min; the socket is dropped without DISCONNECT.
    drop(connect_with_will(&edge, "dev-b", Some(10), Some(600)).await);
    wait_metric(&edge, "tributary_pending_wills", 1.0);
    assert!(edge.stop().success(), "SIGTERM during the delay");
    assert_eq!(
        logged_on(&edge, "wills/dev-b"),
        0,
        "not published before the stop"
    );
    drop(w);

    edge.restart();
    w = watcher(&edge, true).await;
    // Published once its delay (counted from the socket's close) is over.
    only_this_will(&edge, &mut w, "dev-b", "after-the-will").await;

    // Once: a second restart brings nothing back.
    leave(w).await;
    assert!(edge.stop().success());
    edge.restart();
    let mut w = watcher(&edge, true).await;
    assert_eq!(
        published_before_marker(&edge, &mut w, "after-second-restart").await,
        vec![]
    );
    assert!(edge.stop().success());
    assert_eq!(logged_on(&edge, "wills/dev-b"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_discarded_by_disconnect_is_not_published_after_kill9() {
    let mut edge = Edge::start("");
    drop(watcher(&edge, false).await);
    let mut leaving = connect_with_will(&edge, "dev-c", None, None).await;
    // DISCONNECT 0x00: the will is discarded; the edge closes the socket once that is durable.
    leaving.send_raw(&[0xE0, 0x00]).await.unwrap();
    assert_eq!(leaving.until_closed().await.unwrap(), vec![]);
    // A second client's will, open at the kill: the restart does publish stored wills.
    let staying = connect_with_will(&edge, "dev-c2", None, None).await;
    edge.kill9();
    drop(staying);
    edge.restart();

    let mut w = watcher(&edge, true).await;
    assert_eq!(
        published_before_marker(&edge, &mut w, "after-restart").await,
        vec![will_of("dev-c2")]
    );
    assert!(edge.stop().success());
    assert_eq!(logged_on(&edge, "wills/dev-c"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_back_within_the_delay_after_restart_cancels_its_will() {
    let mut edge = Edge::start("");
    let mut w = watcher(&edge, false).await;
    // Both open at the kill, Will Delay 8 s, session expiry 10 min.
    let back = connect_with_will(&edge, "dev-d", Some(8), Some(600)).await;
    let away = connect_with_will(&edge, "dev-d2", Some(8), Some(600)).await;
    edge.kill9();
    drop((back, away, w));
    edge.restart();

    // dev-d takes its session up within the delay: its will is cancelled.
    let (_back, ack) = RawClient::connect(edge.addr, Proto::V5, &persistent("dev-d", 600))
        .await
        .unwrap();
    assert_eq!(ack.connack(), Some((0, true)));
    wait_metric(&edge, "tributary_wills_cancelled_total", 1.0);
    w = watcher(&edge, true).await;
    // dev-d2's will, due at the same moment, comes once the delay is over; dev-d's never.
    only_this_will(&edge, &mut w, "dev-d2", "after-the-delay").await;
    assert!(edge.stop().success());
    assert_eq!(logged_on(&edge, "wills/dev-d"), 0);
    assert_eq!(logged_on(&edge, "wills/dev-d2"), 1);
}

/// A 5.0 DISCONNECT may carry its reason code without a property length (Remaining Length 1,
/// [MQTT-3.14.2.2.1]): 0x00 still discards the will and 0x04 still asks for it. Such a
/// DISCONNECT was once dropped without a word, so a normal one left the will in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_with_a_reason_code_and_no_properties_is_understood() {
    let mut edge = Edge::start("");
    let mut w = watcher(&edge, false).await;
    let mut normal = connect_with_will(&edge, "dev-e", None, None).await;
    normal.send_raw(&[0xE0, 0x01, 0x00]).await.unwrap();
    assert_eq!(normal.until_closed().await.unwrap(), vec![]);
    let mut asks = connect_with_will(&edge, "dev-f", None, None).await;
    asks.send_raw(&[0xE0, 0x01, 0x04]).await.unwrap();
    assert_eq!(asks.until_closed().await.unwrap(), vec![]);
    // dev-f's will is published; dev-e's is not, neither before it nor after.
    only_this_will(&edge, &mut w, "dev-f", "after-both").await;
    leave(w).await;
    assert!(edge.stop().success());
    assert_eq!(logged_on(&edge, "wills/dev-e"), 0);
    assert_eq!(logged_on(&edge, "wills/dev-f"), 1);
}
