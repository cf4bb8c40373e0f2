//! Hostile and broken input: each offender's connection is closed with the right reason
//! code, a well-behaved client keeps publishing throughout, and nothing already acknowledged
//! is lost; nothing from an offending packet reaches the log.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tributary_tests::{payloads, ConnectOpts, Edge, Got, Proto, Pub, RawClient};

async fn connected(edge: &Edge, proto: Proto, id: &str) -> RawClient {
    let (c, ack) = RawClient::connect(edge.addr, proto, &ConnectOpts::new(id))
        .await
        .unwrap();
    assert!(matches!(ack, Got::ConnAck { code: 0, .. }), "{id}: {ack:?}");
    c
}

/// Sends `bytes` after CONNECT and returns what the edge sent until it closed.
async fn offend(edge: &Edge, proto: Proto, id: &str, bytes: &[u8]) -> Vec<Got> {
    let mut c = connected(edge, proto, id).await;
    c.send_raw(bytes).await.unwrap();
    c.until_closed().await.unwrap()
}

fn publish(proto: Proto, topic: &[u8], qos: u8, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    RawClient::encode_publish(
        proto,
        &Pub {
            topic,
            qos,
            pkid,
            dup: false,
            payload,
            alias: None,
        },
        &mut out,
    );
    out.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offenders_are_closed_with_reason_codes_and_others_keep_publishing() {
    let mut edge = Edge::start_with("max_packet_size = \"4KiB\"", "", "");
    let addr = edge.addr;

    // A well-behaved publisher for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let good = {
        let (stop, acked) = (stop.clone(), acked.clone());
        tokio::spawn(async move {
            let (mut c, _) = RawClient::connect(addr, Proto::V5, &ConnectOpts::new("good"))
                .await
                .unwrap();
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let payload = format!("good-{i}");
                let pkid = (i % 60000 + 1) as u16;
                c.publish("sensors/good/t", 1, pkid, payload.as_bytes())
                    .await
                    .unwrap();
                match c.recv().await.unwrap() {
                    Got::PubAck(p, 0) if p == pkid => acked.lock().unwrap().push(payload),
                    other => panic!("good client got {other:?}"),
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            i
        })
    };

    // Garbage instead of CONNECT: closed without an answer.
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw.write_all(b"\xff\xfe GET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut c = RawClient::open(addr, Proto::V5).await.unwrap();
    c.send_raw(b"\x00\x00\x00\x00").await.unwrap();
    assert_eq!(c.until_closed().await.unwrap(), vec![]);

    // MQTT 3.1 (MQIsdp, level 3): refused with return code 1.
    let mut c = RawClient::open(addr, Proto::V311).await.unwrap();
    c.send_raw(b"\x10\x12\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x04old1")
        .await
        .unwrap();
    let seen = c.until_closed().await.unwrap();
    assert!(
        matches!(seen.as_slice(), [Got::ConnAck { code: 1, .. }]),
        "{seen:?}"
    );

    // A truncated packet and then silence-then-close: the edge just ends the connection.
    let mut c = connected(&edge, Proto::V5, "truncated").await;
    let full = publish(Proto::V5, b"sensors/truncated/t", 1, 1, b"never-complete");
    c.send_raw(&full[..full.len() - 5]).await.unwrap();
    drop(c);

    // Over the maximum packet size: 0x95.
    let big = vec![b'x'; 8 * 1024];
    let seen = offend(
        &edge,
        Proto::V5,
        "oversize",
        &publish(Proto::V5, b"sensors/oversize/t", 1, 1, &big),
    )
    .await;
    assert_eq!(seen, vec![Got::Disconnect(0x95)]);
    let seen = offend(
        &edge,
        Proto::V311,
        "oversize311",
        &publish(Proto::V311, b"sensors/oversize/t", 1, 1, &big),
    )
    .await;
    assert_eq!(
        seen,
        vec![],
        "3.1.1 has no DISCONNECT from the server: just closed"
    );

    // A wildcard in a published topic: 0x90 Topic Name invalid.
    let seen = offend(
        &edge,
        Proto::V5,
        "wild",
        &publish(Proto::V5, b"a/+/b", 1, 1, b"wild-payload"),
    )
    .await;
    assert_eq!(seen, vec![Got::Disconnect(0x90)]);
    let seen = offend(
        &edge,
        Proto::V311,
        "wild311",
        &publish(Proto::V311, b"a/#", 0, 0, b"wild-payload"),
    )
    .await;
    assert_eq!(seen, vec![]);

    // Invalid UTF-8 in the topic: 0x81 Malformed Packet.
    let seen = offend(
        &edge,
        Proto::V5,
        "utf8",
        &publish(Proto::V5, b"sensors/\xc3\x28/t", 1, 1, b"bad-utf8"),
    )
    .await;
    assert_eq!(seen, vec![Got::Disconnect(0x81)]);
    let seen = offend(
        &edge,
        Proto::V311,
        "utf8-311",
        &publish(Proto::V311, b"sensors/\xff/t", 1, 1, b"bad-utf8"),
    )
    .await;
    assert_eq!(seen, vec![]);

    // A second CONNECT: 0x82 Protocol Error.
    let mut c = connected(&edge, Proto::V5, "twice").await;
    c.send_connect(&ConnectOpts::new("twice")).await.unwrap();
    assert_eq!(c.until_closed().await.unwrap(), vec![Got::Disconnect(0x82)]);

    // An empty topic without an alias: protocol error.
    let seen = offend(
        &edge,
        Proto::V5,
        "empty",
        &publish(Proto::V5, b"", 1, 1, b"empty-topic"),
    )
    .await;
    assert_eq!(seen, vec![Got::Disconnect(0x82)]);

    // A QoS 1 PUBLISH with packet id 0 is malformed.
    let seen = offend(
        &edge,
        Proto::V5,
        "pkid0",
        &publish(Proto::V5, b"sensors/pkid0/t", 1, 0, b"pkid-zero"),
    )
    .await;
    assert_eq!(seen, vec![Got::Disconnect(0x81)]);

    // Messages accepted before an offending packet on the same connection are kept and acked.
    let mut c = connected(&edge, Proto::V5, "mixed").await;
    let mut bytes = publish(Proto::V5, b"sensors/mixed/t", 1, 1, b"mixed-ok");
    bytes.extend(publish(Proto::V5, b"bad/#", 1, 2, b"mixed-bad"));
    c.send_raw(&bytes).await.unwrap();
    assert_eq!(
        c.until_closed().await.unwrap(),
        vec![Got::PubAck(1, 0), Got::Disconnect(0x90)]
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let published = good.await.unwrap();
    assert!(published > 10, "the good client kept publishing");
    assert!(edge.stop().success(), "{}", edge.stderr());

    let log = edge.read_log();
    let held: HashSet<String> = payloads(&log).into_iter().collect();
    for p in acked.lock().unwrap().iter() {
        assert!(held.contains(p), "acknowledged {p} lost");
    }
    assert!(held.contains("mixed-ok"));
    for bad in [
        "never-complete",
        "wild-payload",
        "bad-utf8",
        "empty-topic",
        "pkid-zero",
        "mixed-bad",
    ] {
        assert!(!held.contains(bad), "{bad} must not be logged");
    }
    assert!(log
        .iter()
        .all(|r| r["payload_encoding"] == "utf8"
            && !r["payload"].as_str().unwrap().starts_with("xxxx")));
}
