//! `storage.compression` changed between restarts: a log written with `"none"`, then `"lz4"`,
//! then `"none"` again holds batches of both formats, and every record reads back byte for
//! byte, in order; `edge check` finds nothing wrong; the LZ4 batches take less room.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::time::Duration;

use base64::Engine as _;
use tributary_tests::{http_get, metric, ConnectOpts, Edge, Got, Proto, RawClient};

/// Messages per phase, sent 100 in flight so that group commits hold many records.
const PER_PHASE: u16 = 300;

/// One phase's payloads: JSON telemetry (compresses), random bytes (does not), and empty
/// ones, tagged with the phase.
fn phase_payloads(phase: u8) -> Vec<Vec<u8>> {
    let mut x = 0x2545_F491_4F6C_DD1Du64 ^ u64::from(phase);
    (0..PER_PHASE)
        .map(|i| match i % 3 {
            0 => format!(
                r#"{{"phase":{phase},"device":"dev-{}","seq":{i},"temperature_c":21.{},"humidity_pct":40.{}}}"#,
                i % 7,
                i % 10,
                i % 9
            )
            .into_bytes(),
            1 => (0..64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect(),
            _ => Vec::new(),
        })
        .collect()
}

/// Publishes `payloads` at QoS 1 on `sensors/dev-{i % 7}/t`, 100 in flight, and waits for
/// every PUBACK (success).
async fn publish_all(edge: &Edge, phase: u8, payloads: &[Vec<u8>]) -> Vec<String> {
    let (mut c, ack) = RawClient::connect(
        edge.addr,
        Proto::V5,
        &ConnectOpts::new(&format!("compression-{phase}")),
    )
    .await
    .unwrap();
    assert_eq!(ack.connack(), Some((0, false)));
    let topics: Vec<String> = (0..payloads.len())
        .map(|i| format!("sensors/dev-{}/t", i % 7))
        .collect();
    for (w, window) in payloads.chunks(100).enumerate() {
        for (i, p) in window.iter().enumerate() {
            c.publish(&topics[w * 100 + i], 1, i as u16 + 1, p)
                .await
                .unwrap();
        }
        for _ in window {
            match c.recv_within(Duration::from_secs(60)).await.unwrap() {
                Got::PubAck(_, 0) => {}
                other => panic!("expected a successful PUBACK, got {other:?}"),
            }
        }
    }
    topics
}

fn log_bytes(edge: &Edge) -> f64 {
    let (status, text) = http_get(edge.admin, "/metrics", None).unwrap();
    assert_eq!(status, 200);
    metric(&text, "tributary_log_bytes{topic=\"mqtt\"}")
}

fn set_compression(edge: &Edge, from: &str, to: &str) {
    let path = edge.config_path();
    let config = std::fs::read_to_string(&path).unwrap();
    let old = format!("compression = \"{from}\"");
    assert!(config.contains(&old), "{config}");
    std::fs::write(
        &path,
        config.replace(&old, &format!("compression = \"{to}\"")),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_written_with_and_without_compression_read_back_byte_identical() {
    let mut edge = Edge::start_with("", "compression = \"none\"", "");
    let mut expected: Vec<(String, Vec<u8>)> = Vec::new();
    let mut stored = Vec::new();
    for (phase, compression) in [(1u8, "none"), (2, "lz4"), (3, "none")] {
        if phase > 1 {
            assert!(edge.stop().success(), "{}", edge.stderr());
            let previous = if compression == "lz4" { "none" } else { "lz4" };
            set_compression(&edge, previous, compression);
            edge.restart();
        }
        let before = log_bytes(&edge);
        let payloads = phase_payloads(phase);
        let topics = publish_all(&edge, phase, &payloads).await;
        stored.push(log_bytes(&edge) - before);
        expected.extend(topics.into_iter().zip(payloads));
    }
    assert!(edge.stop().success(), "{}", edge.stderr());

    // The LZ4 phase stored the same kind of records in clearly fewer bytes than either
    // uncompressed one.
    assert!(
        stored[1] < 0.8 * stored[0] && stored[1] < 0.8 * stored[2],
        "bytes stored per phase (none, lz4, none): {stored:?}"
    );

    let log = edge.read_log();
    assert_eq!(log.len(), expected.len(), "records read back");
    for (i, (record, (topic, payload))) in log.iter().zip(&expected).enumerate() {
        assert_eq!(record["offset"], i as u64, "dense offsets");
        assert_eq!(
            record["headers"]["mqtt_topic"],
            topic.as_str(),
            "record {i}"
        );
        let read = match record["payload_encoding"].as_str().unwrap() {
            "utf8" => record["payload"].as_str().unwrap().as_bytes().to_vec(),
            "base64" => base64::engine::general_purpose::STANDARD
                .decode(record["payload"].as_str().unwrap())
                .unwrap(),
            other => panic!("payload encoding {other}"),
        };
        assert_eq!(&read, payload, "record {i}");
    }

    let (status, out, err) = edge.cli(&["check", "--json"]);
    assert!(status.success(), "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["bad"], serde_json::json!([]), "{out}");
}
