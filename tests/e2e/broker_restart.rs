//! Persistent sessions and retained messages across kill -9: a subscriber's queued QoS 1 and
//! QoS 2 messages, its unfinished QoS 2 flow and the retained store come back after the edge
//! is killed and restarted, delivered as MQTT requires (raw client, so packet ids, DUP and
//! RETAIN flags are visible).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::collections::BTreeMap;
use std::time::Duration;

use tributary_tests::{ConnectOpts, Edge, Got, Proto, RawClient};

fn persistent(proto: Proto, id: &str) -> ConnectOpts {
    ConnectOpts {
        client_id: id.to_string(),
        clean: false,
        keep_alive: 60,
        session_expiry: (proto == Proto::V5).then_some(3600),
    }
}

/// Receives `n` PUBLISH packets (anything else is a failure), by topic.
async fn publishes(c: &mut RawClient, n: usize) -> BTreeMap<String, Got> {
    let mut out = BTreeMap::new();
    while out.len() < n {
        match c.recv().await.unwrap() {
            p @ Got::Publish { .. } => {
                let Got::Publish { topic, .. } = &p else {
                    unreachable!()
                };
                assert!(
                    out.insert(topic.clone(), p.clone()).is_none(),
                    "{topic} twice"
                );
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    out
}

async fn nothing_more(c: &mut RawClient) {
    match c.recv_within(Duration::from_millis(700)).await {
        Err(_) => {}
        Ok(other) => panic!("expected nothing more, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_4_1_0_1_queued_qos1_qos2_and_retained_survive_kill9() {
    for proto in [Proto::V311, Proto::V5] {
        let mut edge = Edge::start("");
        let id = format!("plant-dashboard-{proto:?}");
        // The subscriber's session: subscribed at QoS 2, then offline.
        let (mut s, ack) = RawClient::connect(edge.addr, proto, &persistent(proto, &id))
            .await
            .unwrap();
        assert_eq!(ack.connack(), Some((0, false)));
        assert_eq!(s.subscribe(1, &[("line/#", 2)]).await.unwrap(), vec![2]);
        drop(s);

        let (mut p, _) = RawClient::connect(edge.addr, proto, &ConnectOpts::new("press-7"))
            .await
            .unwrap();
        p.publish("line/q1", 1, 1, b"one").await.unwrap();
        assert_eq!(p.recv().await.unwrap(), Got::PubAck(1, 0));
        p.publish("line/q2", 2, 2, b"two").await.unwrap();
        assert_eq!(p.recv().await.unwrap(), Got::PubRec(2, 0));
        p.pubrel(2).await.unwrap();
        assert_eq!(p.recv().await.unwrap(), Got::PubComp(2, 0));
        // QoS 0 to an offline session is not queued.
        p.publish("line/q0", 0, 0, b"zero").await.unwrap();
        // Retained, published by raw PUBLISH with the retain flag.
        let mut out = bytes::BytesMut::new();
        RawClient::encode_publish(
            proto,
            &tributary_tests::Pub {
                topic: b"status/press-7",
                qos: 1,
                pkid: 3,
                dup: false,
                payload: b"running",
                alias: None,
            },
            &mut out,
        );
        out[0] |= 1; // RETAIN
        p.send_raw(&out).await.unwrap();
        assert_eq!(p.recv().await.unwrap(), Got::PubAck(3, 0));
        drop(p);

        edge.kill9();
        edge.restart();

        // Session present; both queued messages arrive once, at their QoS, not retained.
        let (mut s, ack) = RawClient::connect(edge.addr, proto, &persistent(proto, &id))
            .await
            .unwrap();
        assert_eq!(ack.connack(), Some((0, true)), "{proto:?}");
        let got = publishes(&mut s, 2).await;
        let (pk1, pk2) = match (&got["line/q1"], &got["line/q2"]) {
            (
                Got::Publish {
                    payload: p1,
                    qos: 1,
                    pkid: k1,
                    retain: false,
                    ..
                },
                Got::Publish {
                    payload: p2,
                    qos: 2,
                    pkid: k2,
                    retain: false,
                    ..
                },
            ) => {
                assert_eq!((p1.as_slice(), p2.as_slice()), (&b"one"[..], &b"two"[..]));
                (*k1, *k2)
            }
            other => panic!("{other:?}"),
        };
        nothing_more(&mut s).await;
        // Acknowledge the QoS 1 message; take the QoS 2 one to PUBREL, then the edge dies.
        s.ack(0x40, pk1).await.unwrap();
        s.ack(0x50, pk2).await.unwrap();
        assert_eq!(s.recv().await.unwrap(), Got::PubRel(pk2));
        drop(s);
        edge.kill9();
        edge.restart();

        // The QoS 2 flow resumes at PUBREL with the same packet id; nothing is delivered
        // again.
        let (mut s, ack) = RawClient::connect(edge.addr, proto, &persistent(proto, &id))
            .await
            .unwrap();
        assert_eq!(ack.connack(), Some((0, true)));
        assert_eq!(s.recv().await.unwrap(), Got::PubRel(pk2));
        s.ack(0x70, pk2).await.unwrap();
        nothing_more(&mut s).await;

        // The retained message survived both kills and is sent with RETAIN set.
        let (mut r, _) = RawClient::connect(edge.addr, proto, &ConnectOpts::new("late-viewer"))
            .await
            .unwrap();
        assert_eq!(r.subscribe(1, &[("status/+", 1)]).await.unwrap(), vec![1]);
        match r.recv().await.unwrap() {
            Got::Publish {
                topic,
                payload,
                retain: true,
                qos: 1,
                ..
            } => assert_eq!(
                (topic.as_str(), payload.as_slice()),
                ("status/press-7", &b"running"[..])
            ),
            other => panic!("{other:?}"),
        }
        edge.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_4_4_0_1_unacknowledged_qos1_is_resent_with_dup_after_kill9() {
    let proto = Proto::V5;
    let mut edge = Edge::start("");
    let (mut s, _) = RawClient::connect(edge.addr, proto, &persistent(proto, "alarm-panel"))
        .await
        .unwrap();
    assert_eq!(s.subscribe(1, &[("alarm/#", 1)]).await.unwrap(), vec![1]);
    let (mut p, _) = RawClient::connect(edge.addr, proto, &ConnectOpts::new("sensor"))
        .await
        .unwrap();
    for i in 1..=5u16 {
        p.publish(&format!("alarm/{i}"), 1, i, format!("a{i}").as_bytes())
            .await
            .unwrap();
        assert_eq!(p.recv().await.unwrap(), Got::PubAck(i, 0));
    }
    // Received live, first attempt, none acknowledged.
    let first = publishes(&mut s, 5).await;
    for g in first.values() {
        assert!(matches!(g, Got::Publish { dup: false, .. }), "{g:?}");
    }
    // Acknowledge two of them; kill the edge with three in flight.
    let pkid = |g: &Got| match g {
        Got::Publish { pkid, .. } => *pkid,
        _ => unreachable!(),
    };
    s.ack(0x40, pkid(&first["alarm/1"])).await.unwrap();
    s.ack(0x40, pkid(&first["alarm/2"])).await.unwrap();
    // A PING round trip makes sure the edge has read the acks before it dies.
    s.ping().await.unwrap();
    assert_eq!(s.recv().await.unwrap(), Got::PingResp);
    edge.kill9();
    edge.restart();
    let (mut s, ack) = RawClient::connect(edge.addr, proto, &persistent(proto, "alarm-panel"))
        .await
        .unwrap();
    assert_eq!(ack.connack(), Some((0, true)));
    // The three never acknowledged come again; the two acknowledged may too if the edge
    // died before their acks reached the disk (at least once), but nothing else does.
    let mut again = BTreeMap::new();
    while let Ok(g) = s.recv_within(Duration::from_millis(700)).await {
        match &g {
            Got::Publish { topic, .. } => {
                assert!(
                    again.insert(topic.clone(), g.clone()).is_none(),
                    "{topic} twice"
                );
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    for t in ["alarm/3", "alarm/4", "alarm/5"] {
        assert!(again.contains_key(t), "{t} not resent: {again:?}");
    }
    assert!(again.len() <= 5, "{again:?}");
    for (topic, g) in &again {
        match g {
            Got::Publish {
                dup: true, pkid, ..
            } => assert_eq!(*pkid, pkid_of(&first[topic]), "same packet id on resend"),
            other => panic!("{other:?}"),
        }
    }
    edge.stop();
}

fn pkid_of(g: &Got) -> u16 {
    match g {
        Got::Publish { pkid, .. } => *pkid,
        other => panic!("{other:?}"),
    }
}
