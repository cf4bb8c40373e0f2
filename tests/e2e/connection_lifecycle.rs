//! The connection life cycle as a client sees it: CONNACK codes and client id rules, session
//! take-over, keepalive, Receive Maximum, topic aliases, QoS 2 state across a crash, and
//! session expiry.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::time::Duration;

use bytes::BytesMut;
use tributary_tests::{payloads, ConnectOpts, Edge, Got, Proto, Pub, RawClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_rules_per_version() {
    let edge = Edge::start("");
    // 3.1.1: an empty id needs clean session.
    let mut opts = ConnectOpts::new("");
    opts.clean = false;
    let (_c, ack) = RawClient::connect(edge.addr, Proto::V311, &opts)
        .await
        .unwrap();
    assert_eq!(ack.connack(), Some((2, false)), "{ack:?}");
    let (_c, ack) = RawClient::connect(edge.addr, Proto::V311, &ConnectOpts::new(""))
        .await
        .unwrap();
    assert!(matches!(ack, Got::ConnAck { code: 0, .. }), "{ack:?}");
    // 5.0: the edge assigns one and says which.
    let (_c, ack) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new(""))
        .await
        .unwrap();
    match ack {
        Got::ConnAck {
            code: 0,
            assigned_id: Some(id),
            ..
        } => assert!(!id.is_empty()),
        other => panic!("{other:?}"),
    }
    // Too long.
    let (_c, ack) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new(&"x".repeat(300)))
        .await
        .unwrap();
    assert!(matches!(ack, Got::ConnAck { code: 0x85, .. }), "{ack:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_with_same_id_takes_over() {
    let edge = Edge::start("");
    let (mut first, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("dup"))
        .await
        .unwrap();
    let (mut second, ack) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("dup"))
        .await
        .unwrap();
    assert!(matches!(ack, Got::ConnAck { code: 0, .. }));
    assert_eq!(
        first.until_closed().await.unwrap(),
        vec![Got::Disconnect(0x8E)]
    );
    second.ping().await.unwrap();
    assert_eq!(second.recv().await.unwrap(), Got::PingResp);

    let (mut old, _) = RawClient::connect(edge.addr, Proto::V311, &ConnectOpts::new("dup311"))
        .await
        .unwrap();
    let (_new, ack) = RawClient::connect(edge.addr, Proto::V311, &ConnectOpts::new("dup311"))
        .await
        .unwrap();
    assert!(matches!(ack, Got::ConnAck { code: 0, .. }));
    assert_eq!(old.until_closed().await.unwrap(), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_dropped_after_keepalive_and_pinging_one_is_not() {
    let edge = Edge::start("");
    let mut opts = ConnectOpts::new("silent");
    opts.keep_alive = 1;
    let (mut silent, _) = RawClient::connect(edge.addr, Proto::V5, &opts)
        .await
        .unwrap();
    let mut opts = ConnectOpts::new("chatty");
    opts.keep_alive = 1;
    let (mut chatty, _) = RawClient::connect(edge.addr, Proto::V5, &opts)
        .await
        .unwrap();
    for _ in 0..6 {
        chatty.ping().await.unwrap();
        assert_eq!(chatty.recv().await.unwrap(), Got::PingResp);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        silent.until_closed().await.unwrap(),
        vec![Got::Disconnect(0x8D)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_is_announced_and_enforced() {
    let edge = Edge::start_with("receive_maximum = 5", "", "");
    let (mut c, ack) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("greedy"))
        .await
        .unwrap();
    assert!(
        matches!(
            ack,
            Got::ConnAck {
                code: 0,
                receive_maximum: Some(5),
                ..
            }
        ),
        "{ack:?}"
    );
    // QoS 2 flows count until PUBCOMP; never sending PUBREL keeps them in flight.
    for pkid in 1..=5u16 {
        c.publish("sensors/greedy/t", 2, pkid, b"x").await.unwrap();
        assert_eq!(c.recv().await.unwrap(), Got::PubRec(pkid, 0));
    }
    // Completing one frees a slot.
    c.pubrel(1).await.unwrap();
    assert_eq!(c.recv().await.unwrap(), Got::PubComp(1, 0));
    c.publish("sensors/greedy/t", 2, 6, b"x").await.unwrap();
    assert_eq!(c.recv().await.unwrap(), Got::PubRec(6, 0));
    c.publish("sensors/greedy/t", 2, 7, b"x").await.unwrap();
    assert_eq!(c.until_closed().await.unwrap(), vec![Got::Disconnect(0x93)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_topic_aliases() {
    let mut edge = Edge::start("");
    let (mut c, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("aliaser"))
        .await
        .unwrap();
    let mut out = BytesMut::new();
    RawClient::encode_publish(
        Proto::V5,
        &Pub {
            topic: b"sensors/alias/t",
            qos: 1,
            pkid: 1,
            dup: false,
            payload: b"with-topic",
            alias: Some(1),
        },
        &mut out,
    );
    RawClient::encode_publish(
        Proto::V5,
        &Pub {
            topic: b"",
            qos: 1,
            pkid: 2,
            dup: false,
            payload: b"alias-only",
            alias: Some(1),
        },
        &mut out,
    );
    c.send_raw(&out).await.unwrap();
    assert_eq!(c.recv().await.unwrap(), Got::PubAck(1, 0));
    assert_eq!(c.recv().await.unwrap(), Got::PubAck(2, 0));

    for (alias, topic, code) in [
        (0u16, &b"sensors/a"[..], 0x94u8),
        (65, b"sensors/a", 0x94),
        (9, b"", 0x82),
    ] {
        let (mut c, _) = RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("bad-alias"))
            .await
            .unwrap();
        let mut out = BytesMut::new();
        RawClient::encode_publish(
            Proto::V5,
            &Pub {
                topic,
                qos: 1,
                pkid: 1,
                dup: false,
                payload: b"bad-alias",
                alias: Some(alias),
            },
            &mut out,
        );
        c.send_raw(&out).await.unwrap();
        assert_eq!(
            c.until_closed().await.unwrap(),
            vec![Got::Disconnect(code)],
            "alias {alias}"
        );
    }
    drop(c);
    assert!(edge.stop().success());
    let log = edge.read_log();
    assert_eq!(payloads(&log), vec!["with-topic", "alias-only"]);
    assert!(log
        .iter()
        .all(|r| r["headers"]["mqtt_topic"] == "sensors/alias/t"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_state_survives_kill_9_so_a_resend_is_not_logged_twice() {
    let mut edge = Edge::start("");
    let mut opts = ConnectOpts::new("exactly-once");
    opts.clean = false;
    opts.session_expiry = Some(3600);
    let (mut c, ack) = RawClient::connect(edge.addr, Proto::V5, &opts)
        .await
        .unwrap();
    assert_eq!(ack.connack(), Some((0, false)));
    c.publish("sensors/eo/t", 2, 7, b"once").await.unwrap();
    assert_eq!(c.recv().await.unwrap(), Got::PubRec(7, 0));
    edge.kill9();
    edge.restart();

    let (mut c, ack) = RawClient::connect(edge.addr, Proto::V5, &opts)
        .await
        .unwrap();
    assert_eq!(ack.connack(), Some((0, true)), "{ack:?}");
    let mut out = BytesMut::new();
    RawClient::encode_publish(
        Proto::V5,
        &Pub {
            topic: b"sensors/eo/t",
            qos: 2,
            pkid: 7,
            dup: true,
            payload: b"once",
            alias: None,
        },
        &mut out,
    );
    c.send_raw(&out).await.unwrap();
    assert_eq!(c.recv().await.unwrap(), Got::PubRec(7, 0));
    c.pubrel(7).await.unwrap();
    assert_eq!(c.recv().await.unwrap(), Got::PubComp(7, 0));
    // A PUBREL for an id the edge no longer holds: 0x92.
    c.pubrel(7).await.unwrap();
    assert_eq!(c.recv().await.unwrap(), Got::PubComp(7, 0x92));
    // The packet id is free again: a new message with it is logged.
    c.publish("sensors/eo/t", 2, 7, b"twice-new").await.unwrap();
    assert_eq!(c.recv().await.unwrap(), Got::PubRec(7, 0));
    c.pubrel(7).await.unwrap();
    assert_eq!(c.recv().await.unwrap(), Got::PubComp(7, 0));
    c.send_raw(&[0xE0, 0]).await.unwrap();
    drop(c);

    // Clean start discards the session.
    opts.clean = true;
    let (_c, ack) = RawClient::connect(edge.addr, Proto::V5, &opts)
        .await
        .unwrap();
    assert_eq!(ack.connack(), Some((0, false)));
    drop(_c);
    assert!(edge.stop().success());
    assert_eq!(payloads(&edge.read_log()), vec!["once", "twice-new"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_311_session_is_present_after_restart_and_expired_v5_session_is_not() {
    let mut edge = Edge::start_with("", "retention_check_interval = \"200ms\"", "");
    let mut p311 = ConnectOpts::new("keeper");
    p311.clean = false;
    let mut short = ConnectOpts::new("short-lived");
    short.clean = false;
    short.session_expiry = Some(1);
    for opts in [&p311] {
        let (mut c, _) = RawClient::connect(edge.addr, Proto::V311, opts)
            .await
            .unwrap();
        c.send_raw(&[0xE0, 0]).await.unwrap();
        c.until_closed().await.unwrap();
    }
    let (mut c, _) = RawClient::connect(edge.addr, Proto::V5, &short)
        .await
        .unwrap();
    c.send_raw(&[0xE0, 0]).await.unwrap();
    c.until_closed().await.unwrap();
    assert!(edge.stop().success());
    edge.restart();
    let (_c, ack) = RawClient::connect(edge.addr, Proto::V311, &p311)
        .await
        .unwrap();
    assert_eq!(ack.connack(), Some((0, true)), "{ack:?}");
    // Well past the 1 s expiry.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_c2, ack) = RawClient::connect(edge.addr, Proto::V5, &short)
        .await
        .unwrap();
    assert_eq!(ack.connack(), Some((0, false)), "{ack:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suback_grants_each_valid_filter_and_refuses_an_invalid_one() {
    let edge = Edge::start("");
    for (proto, refused) in [(Proto::V311, 0x80u8), (Proto::V5, 0x8F)] {
        let (mut c, _) = RawClient::connect(edge.addr, proto, &ConnectOpts::new("sub"))
            .await
            .unwrap();
        let mut out = BytesMut::new();
        match proto {
            Proto::V311 => {
                use rumqttc::mqttbytes::v4::{Subscribe, SubscribeFilter};
                use rumqttc::mqttbytes::QoS;
                Subscribe::new_many([
                    SubscribeFilter::new("a/#".into(), QoS::AtLeastOnce),
                    SubscribeFilter::new("a/#/b".into(), QoS::AtLeastOnce),
                    SubscribeFilter::new("c/+".into(), QoS::ExactlyOnce),
                ])
                .write(&mut out)
                .unwrap();
            }
            Proto::V5 => {
                use rumqttc::v5::mqttbytes::v5::{Filter, Subscribe};
                use rumqttc::v5::mqttbytes::QoS;
                Subscribe::new_many(
                    [
                        Filter::new("a/#", QoS::AtLeastOnce),
                        Filter::new("a/#/b", QoS::AtLeastOnce),
                        Filter::new("c/+", QoS::ExactlyOnce),
                    ],
                    None,
                )
                .write(&mut out)
                .unwrap();
            }
        }
        c.send_raw(&out).await.unwrap();
        match c.recv().await.unwrap() {
            Got::SubAck(_, codes) => assert_eq!(codes, vec![1, refused, 2]),
            other => panic!("{other:?}"),
        }
        // The connection stays usable.
        c.ping().await.unwrap();
        assert_eq!(c.recv().await.unwrap(), Got::PingResp);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_qos2_beyond_the_read_ahead_window_completes() {
    // 3.1.1 has no Receive Maximum: the edge bounds how much it reads ahead instead. QoS 2
    // flows stay open until PUBCOMP, so the edge must keep reading PUBRELs when many are open.
    let mut edge = Edge::start_with("receive_maximum = 5", "", "");
    let (mut c, _) = RawClient::connect(edge.addr, Proto::V311, &ConnectOpts::new("many-q2"))
        .await
        .unwrap();
    let mut out = BytesMut::new();
    for pkid in 1..=20u16 {
        let payload = format!("q2-{pkid}");
        RawClient::encode_publish(
            Proto::V311,
            &Pub {
                topic: b"sensors/many/t",
                qos: 2,
                pkid,
                dup: false,
                payload: payload.as_bytes(),
                alias: None,
            },
            &mut out,
        );
    }
    c.send_raw(&out).await.unwrap();
    for pkid in 1..=20u16 {
        assert_eq!(c.recv().await.unwrap(), Got::PubRec(pkid, 0));
    }
    for pkid in 1..=20u16 {
        c.pubrel(pkid).await.unwrap();
    }
    for pkid in 1..=20u16 {
        assert_eq!(c.recv().await.unwrap(), Got::PubComp(pkid, 0));
    }
    drop(c);
    assert!(edge.stop().success());
    assert_eq!(payloads(&edge.read_log()).len(), 20);
}
