//! One hostile packet can neither stop the edge nor corrupt its log.
//!
//! Each packet below once did one or the other: a 3.1.1 SUBSCRIBE of a persistent session
//! with a 65,533-byte filter made a meta key past fjall's 64 KiB and the appender panicked
//! (the edge exited 2, every time); an MQTT 5 PUBLISH with 65,536 user properties was stored
//! with a wrapped count, so its whole group commit stopped decoding and, retained, the edge
//! no longer started. Now every field that reaches storage has a limit checked where it
//! enters. After each packet the test checks that an honest QoS 1 publisher is still served;
//! at the end that `edge read` reads every acknowledged record and none of the refused ones,
//! and that a restart comes up.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::process::Command;
use std::time::Duration;

use tributary_tests::raw::{string, user_properties, v5_connect, v5_publish, Will};
use tributary_tests::{
    client_script, http_get, metric, payloads, python, ConnectOpts, Edge, Got, Proto, RawClient,
};

/// Connects an honest 3.1.1 device, publishes one QoS 1 message and waits for its PUBACK:
/// the edge still serves. Returns the payload.
async fn honest_publish(edge: &Edge, n: &mut u32) -> String {
    *n += 1;
    let payload = format!("honest-{n}");
    let (mut c, ack) = RawClient::connect(edge.addr, Proto::V311, &ConnectOpts::new("honest"))
        .await
        .unwrap();
    assert_eq!(ack.connack(), Some((0, false)), "{ack:?}");
    c.publish("sensors/honest/t", 1, 1, payload.as_bytes())
        .await
        .unwrap();
    assert_eq!(c.recv().await.unwrap(), Got::PubAck(1, 0), "{payload}");
    payload
}

/// Connects a 5.0 client, sends `bytes`, and returns what the edge sent until it closed.
async fn v5_offend(edge: &Edge, id: &str, bytes: &[u8]) -> Vec<Got> {
    let (mut c, ack) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new(id))
        .await
        .unwrap();
    assert_eq!(ack.connack(), Some((0, false)), "{id}: {ack:?}");
    c.send_raw(bytes).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), c.until_closed())
        .await
        .expect("the edge closes the offender")
        .unwrap()
}

fn refused(edge: &Edge, reason: &str) -> f64 {
    let (status, text) = http_get(edge.admin, "/metrics", None).unwrap();
    assert_eq!(status, 200);
    metric(
        &text,
        &format!("tributary_packets_refused_total{{reason=\"{reason}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hostile_packet_is_refused_and_the_edge_keeps_its_log() {
    // Defaults throughout: anonymous access, no ACL, the default [mqtt] limits.
    let mut edge = Edge::start("");
    let mut n = 0;
    let mut acked = vec![honest_publish(&edge, &mut n).await];

    // 1. The SUBSCRIBE that stopped the edge: a persistent 3.1.1 session, a 65,533-byte
    //    filter. Refused alone (0x80), the connection stays, the session stores nothing.
    let mut opts = ConnectOpts::new("sub-attacker");
    opts.clean = false;
    let (mut c, ack) = RawClient::connect(edge.addr, Proto::V311, &opts)
        .await
        .unwrap();
    assert_eq!(ack.connack(), Some((0, false)));
    let huge = "f".repeat(65_533);
    let codes = c
        .subscribe(1, &[(huge.as_str(), 1), ("sensors/ok", 1)])
        .await
        .unwrap();
    assert_eq!(codes, vec![0x80, 1], "the long filter alone is refused");
    c.ping().await.unwrap();
    assert_eq!(
        c.recv().await.unwrap(),
        Got::PingResp,
        "the connection stays up"
    );
    drop(c);
    acked.push(honest_publish(&edge, &mut n).await);
    assert_eq!(refused(&edge, "filter_length"), 1.0);

    // 2. The PUBLISH that corrupted the log: 65,536 user properties, QoS 1, RETAIN.
    //    DISCONNECT 0x95 and no PUBACK: nothing of it is stored.
    let attack = v5_publish(
        "sensors/attacker/t",
        1,
        7,
        true,
        &user_properties(65_536, 0),
        b"poison-65536-props",
    );
    let got = v5_offend(&edge, "prop-attacker", &attack).await;
    assert_eq!(got, vec![Got::Disconnect(0x95)], "{got:?}");
    acked.push(honest_publish(&edge, &mut n).await);
    assert_eq!(refused(&edge, "user_properties"), 1.0);

    // The limit itself: 128 properties are accepted and read back, 129 are not.
    let at_limit = v5_publish(
        "sensors/limit/t",
        1,
        1,
        false,
        &user_properties(128, 3),
        b"props-128",
    );
    let (mut c, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("at-limit"))
        .await
        .unwrap();
    c.send_raw(&at_limit).await.unwrap();
    assert_eq!(c.recv().await.unwrap(), Got::PubAck(1, 0));
    acked.push("props-128".into());
    drop(c);
    let past = v5_publish(
        "sensors/limit/t",
        1,
        1,
        false,
        &user_properties(129, 3),
        b"props-129",
    );
    assert_eq!(
        v5_offend(&edge, "past-limit", &past).await,
        vec![Got::Disconnect(0x95)]
    );
    assert_eq!(refused(&edge, "user_properties"), 2.0);

    // User properties within the count but over their total size (64 KiB by default).
    let big = v5_publish(
        "sensors/limit/t",
        1,
        1,
        false,
        &user_properties(2, 20_000),
        b"props-big",
    );
    assert_eq!(
        v5_offend(&edge, "big-props", &big).await,
        vec![Got::Disconnect(0x95)]
    );
    assert_eq!(refused(&edge, "user_properties_bytes"), 1.0);

    // Content type and correlation data past their limits, a topic past its limit.
    let mut ct = vec![0x03];
    string(&[b'c'; 257], &mut ct);
    let p = v5_publish("sensors/ct/t", 1, 1, false, &ct, b"content-type");
    assert_eq!(
        v5_offend(&edge, "ct", &p).await,
        vec![Got::Disconnect(0x95)]
    );
    assert_eq!(refused(&edge, "content_type_length"), 1.0);
    let mut cd = vec![0x09];
    string(&[7u8; 4097], &mut cd);
    let p = v5_publish("sensors/cd/t", 1, 1, false, &cd, b"correlation");
    assert_eq!(
        v5_offend(&edge, "cd", &p).await,
        vec![Got::Disconnect(0x95)]
    );
    assert_eq!(refused(&edge, "correlation_data_length"), 1.0);
    let long_topic = "t".repeat(1025);
    let p = v5_publish(&long_topic, 1, 1, false, &[], b"long-topic");
    assert_eq!(
        v5_offend(&edge, "topic", &p).await,
        vec![Got::Disconnect(0x90)]
    );
    assert_eq!(refused(&edge, "topic_length"), 1.0);
    let mut rt = vec![0x08];
    string("r".repeat(1025).as_bytes(), &mut rt);
    let p = v5_publish("sensors/rt/t", 1, 1, false, &rt, b"response-topic");
    assert_eq!(
        v5_offend(&edge, "rt", &p).await,
        vec![Got::Disconnect(0x95)]
    );
    assert_eq!(refused(&edge, "topic_length"), 2.0);
    acked.push(honest_publish(&edge, &mut n).await);

    // `$` topics are the edge's: 5.0 gets 0x90 and stays connected, 3.1.1 is closed.
    let (mut c, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("sys-5"))
        .await
        .unwrap();
    c.send_raw(&v5_publish(
        "$SYS/broker/uptime",
        1,
        3,
        true,
        &[],
        b"fake-sys",
    ))
    .await
    .unwrap();
    assert_eq!(c.recv().await.unwrap(), Got::PubAck(3, 0x90));
    drop(c);
    let (mut c, _) = RawClient::connect(edge.addr, Proto::V311, &ConnectOpts::new("sys-3"))
        .await
        .unwrap();
    c.publish("$internal/x", 1, 1, b"fake-sys").await.unwrap();
    assert_eq!(c.until_closed().await.unwrap(), vec![]);
    assert_eq!(refused(&edge, "reserved_topic"), 2.0);

    // A 5.0 QoS 1 PUBLISH that ends before its property length: malformed (0x81), closed.
    // It was once taken for an incomplete packet and dropped without a word or a PUBACK.
    let cut = [0x32, 7, 0, 3, b's', b'/', b't', 0, 9];
    assert_eq!(
        v5_offend(&edge, "cut-short", &cut).await,
        vec![Got::Disconnect(0x81)]
    );
    acked.push(honest_publish(&edge, &mut n).await);

    // A will with too many user properties: CONNACK 0x95, nothing stored or published.
    let mut c = RawClient::open(edge.addr, Proto::V5).await.unwrap();
    let will = Will {
        topic: "sensors/will/t",
        payload: b"will-payload",
        props: &user_properties(129, 1),
        qos: 1,
    };
    c.send_raw(&v5_connect("will-attacker", None, Some(&will)))
        .await
        .unwrap();
    let got = c.until_closed().await.unwrap();
    assert!(
        matches!(got.as_slice(), [Got::ConnAck { code: 0x95, .. }]),
        "{got:?}"
    );
    assert_eq!(refused(&edge, "will"), 1.0);
    acked.push(honest_publish(&edge, &mut n).await);

    // Everything acknowledged is readable, nothing refused was stored, and it restarts.
    assert!(edge.stop().success(), "{}", edge.stderr());
    let read = edge.read_log();
    let stored = payloads(&read);
    for p in &acked {
        assert!(stored.contains(p), "{p} acknowledged but not read back");
    }
    for refused in [
        "poison-65536-props",
        "props-129",
        "props-big",
        "content-type",
        "correlation",
        "long-topic",
        "response-topic",
        "will-payload",
        "fake-sys",
    ] {
        assert!(!stored.iter().any(|s| s == refused), "{refused} was stored");
    }
    let (status, _, stderr) = edge.cli(&["read"]);
    assert!(status.success() && !stderr.contains("corrupt"), "{stderr}");
    // Every stored entry decodes: sessions, subscriptions, retained messages, batches.
    let (status, out, err) = edge.cli(&["check"]);
    assert!(status.success(), "{out}{err}");
    assert!(out.contains(": 0 do not decode"), "{out}");
    edge.restart();
    acked.push(honest_publish(&edge, &mut n).await);
    assert!(edge.stop().success());
    assert!(payloads(&edge.read_log()).contains(acked.last().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_at_their_ceilings_are_stored_and_survive_a_restart() {
    // Every limit raised to its ceiling: the longest client id with the longest filter makes
    // the longest subscription key the edge can be asked to store, and it must fit.
    let mut edge = Edge::start_with(
        "max_client_id_length = 16384\nmax_filter_length = 32768\nmax_topic_length = 32768\nmax_topic_levels = 100000\n",
        "",
        "",
    );
    let client = "c".repeat(16_384);
    let filter = "f".repeat(32_768);
    let mut opts = ConnectOpts::new(&client);
    opts.clean = false;
    let (mut c, ack) = RawClient::connect(edge.addr, Proto::V311, &opts)
        .await
        .unwrap();
    assert_eq!(ack.connack(), Some((0, false)));
    assert_eq!(
        c.subscribe(1, &[(filter.as_str(), 1)]).await.unwrap(),
        vec![1]
    );
    let past = "f".repeat(32_769);
    assert_eq!(
        c.subscribe(2, &[(past.as_str(), 1)]).await.unwrap(),
        vec![0x80]
    );
    drop(c);

    // A retained message on the longest topic, QoS 1.
    let (mut p, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("retainer"))
        .await
        .unwrap();
    p.send_raw(&v5_publish(
        &filter,
        1,
        1,
        true,
        &user_properties(128, 200),
        b"at-the-ceiling",
    ))
    .await
    .unwrap();
    assert_eq!(p.recv().await.unwrap(), Got::PubAck(1, 0));
    drop(p);

    // kill -9 and back: the session, its subscription and the retained message load, and
    // the message queued for the session is delivered.
    edge.kill9();
    edge.restart();
    let (mut c, ack) = RawClient::connect(edge.addr, Proto::V311, &opts)
        .await
        .unwrap();
    assert_eq!(ack.connack(), Some((0, true)), "the session survived");
    match c.recv_within(Duration::from_secs(60)).await.unwrap() {
        Got::Publish { topic, payload, .. } => {
            assert_eq!(topic, filter);
            assert_eq!(payload, b"at-the-ceiling");
        }
        other => panic!("expected the queued message, got {other:?}"),
    }
    drop(c);
    assert!(edge.stop().success());
    assert!(payloads(&edge.read_log()).contains(&"at-the-ceiling".to_string()));
    let (status, out, err) = edge.cli(&["check", "--json"]);
    assert!(status.success(), "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["bad"], serde_json::json!([]), "{out}");
    assert!(
        report["meta_checked"].as_u64().unwrap() >= 3,
        "session, subscription, retained"
    );
}

#[test]
fn the_one_packet_attacks_fail_as_a_new_user_would_try_them() {
    let mut edge = Edge::start("");
    // mosquitto_sub: a persistent session subscribing to a 65,533-byte filter.
    let filter = "m".repeat(65_533);
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &edge.addr.port().to_string()])
        .args([
            "-c",
            "-i",
            "mosq-attacker",
            "-q",
            "1",
            "-W",
            "5",
            "-t",
            &filter,
        ])
        .output()
        .expect("mosquitto_sub (Debian package mosquitto-clients) runs");
    assert!(
        edge.try_wait().is_none(),
        "the edge is still running: {out:?}"
    );
    assert_eq!(
        refused(&edge, "filter_length"),
        1.0,
        "the filter reached the edge"
    );

    // paho-mqtt: QoS 1, RETAIN, 65,536 user properties; then an honest paho publish.
    let script = r#"
import sys, time
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
host, port = sys.argv[1], int(sys.argv[2])
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-attacker", protocol=mqtt.MQTTv5)
reasons = []
c.on_disconnect = lambda cl, ud, flags, rc, props: reasons.append(rc.value)
c.connect(host, port)
c.loop_start()
props = Properties(PacketTypes.PUBLISH)
props.UserProperty = [("k", "v")] * 65536
info = c.publish("sensors/paho/t", b"paho-poison", qos=1, retain=True, properties=props)
deadline = time.time() + 60
while not reasons and time.time() < deadline:
    time.sleep(0.05)
c.loop_stop()
print("acked" if info.is_published() else "not-acked", reasons)
"#;
    let out = Command::new(python())
        .args(["-c", script, "127.0.0.1", &edge.addr.port().to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("not-acked [149]"),
        "paho is disconnected with 0x95 (149) and sees no PUBACK: {stdout}"
    );
    assert!(edge.try_wait().is_none(), "the edge is still running");

    let out = Command::new(python())
        .arg(client_script("paho_publish.py"))
        .args([
            "127.0.0.1",
            &edge.addr.port().to_string(),
            "5",
            "1",
            "20",
            "after",
            "paho-honest",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let acked: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(acked.len(), 20, "an honest paho client is served");

    assert!(edge.stop().success());
    let stored = payloads(&edge.read_log());
    for p in &acked {
        assert!(stored.contains(p));
    }
    assert!(!stored.iter().any(|p| p == "paho-poison"));
    edge.restart();
    assert!(edge.stop().success(), "the edge starts again");
}
