//! Publishes with third-party clients (paho-mqtt 3.1.1 and 5.0, mosquitto_pub, rumqttc) at
//! QoS 0, 1 and 2, then reads the log back with `edge read --json` and checks that every
//! message is there once, on the partition Kafka's partitioner would choose, with its MQTT
//! metadata.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use tributary_tests::{client_script, python, run, Edge};

const ROUTES: &str = r#"
[[routes]]
match = "sensors/+/#"
topic = "telemetry"
key = "{1}"
partitions = 4
"#;

/// (payload, client id, qos) of every message a client had acknowledged.
type Sent = Vec<(String, String, u8)>;

fn paho(edge: &Edge, version: &str, qos: u8, count: usize) -> Sent {
    let client_id = format!("paho-v{version}-q{qos}");
    let prefix = format!("paho{version}q{qos}");
    let out = run(Command::new(python()).args([
        client_script("paho_publish.py").to_str().unwrap(),
        "127.0.0.1",
        &edge.addr.port().to_string(),
        version,
        &qos.to_string(),
        &count.to_string(),
        &prefix,
        &client_id,
    ]))
    .expect("paho publisher (is paho-mqtt installed? tests/run installs it)");
    let acked: Vec<String> = serde_json::from_str(out.trim()).expect("paho script prints JSON");
    assert_eq!(
        acked.len(),
        count,
        "paho {version} QoS {qos}: every publish acknowledged"
    );
    acked
        .into_iter()
        .map(|p| (p, client_id.clone(), qos))
        .collect()
}

fn mosquitto_pub(edge: &Edge, version: &str, qos: u8, count: usize) -> Sent {
    let client_id = format!("mosq-{version}-q{qos}");
    let lines: Vec<String> = (0..count)
        .map(|i| format!("mosq{version}q{qos}-{i}"))
        .collect();
    let mut args = vec![
        "-h".to_string(),
        "127.0.0.1".into(),
        "-p".into(),
        edge.addr.port().to_string(),
        "-q".into(),
        qos.to_string(),
        "-V".into(),
        version.into(),
        "-i".into(),
        client_id.clone(),
        "-t".into(),
        format!("sensors/{client_id}/line"),
        "-l".into(),
    ];
    if version == "mqttv5" {
        args.extend(["-D", "publish", "user-property", "origin", "mosquitto"].map(String::from));
    }
    let mut child = Command::new("mosquitto_pub")
        .args(&args)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub (tests/run installs mosquitto-clients)");
    {
        let mut stdin = child.stdin.take().unwrap();
        for l in &lines {
            writeln!(stdin, "{l}").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "mosquitto_pub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    lines
        .into_iter()
        .map(|p| (p, client_id.clone(), qos))
        .collect()
}

/// A rumqttc publisher; the 3.1.1 and 5.0 clients have the same shape but distinct types.
macro_rules! rumqttc_publisher {
    ($name:ident, $version:literal, $client:path, $options:path, $event:path, $packet:path, $qos:path) => {
        async fn $name(edge: &Edge, qos: u8, count: usize) -> Sent {
            use rumqttc::Outgoing;
            use $event as Event;
            use $packet as Packet;
            use $qos as QoS;
            let client_id = format!("rumqttc-{}-q{qos}", $version);
            let mut opts = <$options>::new(&client_id, "127.0.0.1", edge.addr.port());
            opts.set_keep_alive(Duration::from_secs(30));
            let (client, mut eventloop) = <$client>::new(opts, 100);
            let q = match qos {
                0 => QoS::AtMostOnce,
                1 => QoS::AtLeastOnce,
                _ => QoS::ExactlyOnce,
            };
            let payloads: Vec<String> = (0..count)
                .map(|i| format!("rumqttc{}q{qos}-{i}", $version))
                .collect();
            let topic = format!("sensors/{client_id}/x");
            let (to_send, sender) = (payloads.clone(), client.clone());
            tokio::spawn(async move {
                for p in to_send {
                    sender
                        .publish(&topic, q, false, p.into_bytes())
                        .await
                        .unwrap();
                }
            });
            let (mut acked, mut sent) = (0, 0);
            while acked < count || sent < count {
                let event = tokio::time::timeout(Duration::from_secs(20), eventloop.poll())
                    .await
                    .expect("rumqttc progress")
                    .unwrap();
                match event {
                    Event::Outgoing(Outgoing::Publish(_)) => {
                        sent += 1;
                        if qos == 0 {
                            acked += 1;
                        }
                    }
                    Event::Incoming(Packet::PubAck(_)) if qos == 1 => acked += 1,
                    Event::Incoming(Packet::PubComp(_)) if qos == 2 => acked += 1,
                    _ => {}
                }
            }
            client.disconnect().await.unwrap();
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while let Ok(ev) = eventloop.poll().await {
                    if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                        break;
                    }
                }
            })
            .await;
            payloads
                .into_iter()
                .map(|p| (p, client_id.clone(), qos))
                .collect()
        }
    };
}

rumqttc_publisher!(
    rumqttc_v311,
    "v311",
    rumqttc::AsyncClient,
    rumqttc::MqttOptions,
    rumqttc::Event,
    rumqttc::Packet,
    rumqttc::QoS
);
rumqttc_publisher!(
    rumqttc_v5,
    "v5",
    rumqttc::v5::AsyncClient,
    rumqttc::v5::MqttOptions,
    rumqttc::v5::Event,
    rumqttc::v5::mqttbytes::v5::Packet,
    rumqttc::v5::mqttbytes::QoS
);

/// Kafka's partition for a key of 4 partitions, computed independently of the edge's code.
fn kafka_partition(key: &str) -> u64 {
    // Same constants as Kafka's Utils.murmur2; checked against Kafka 4.4.0's output in the
    // edge's unit tests.
    let data = key.as_bytes();
    let m: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(m);
        k ^= k >> 24;
        k = k.wrapping_mul(m);
        h = h.wrapping_mul(m) ^ k;
    }
    let t = chunks.remainder();
    match t.len() {
        3 => {
            h ^= (t[2] as u32) << 16;
            h ^= (t[1] as u32) << 8;
            h ^= t[0] as u32;
            h = h.wrapping_mul(m);
        }
        2 => {
            h ^= (t[1] as u32) << 8;
            h ^= t[0] as u32;
            h = h.wrapping_mul(m);
        }
        1 => {
            h ^= t[0] as u32;
            h = h.wrapping_mul(m);
        }
        _ => {}
    }
    h ^= h >> 13;
    h = h.wrapping_mul(m);
    h ^= h >> 15;
    ((h & 0x7fff_ffff) % 4) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_and_qos_lands_in_the_log_once() {
    let mut edge = Edge::start(ROUTES);
    let mut sent: Sent = Vec::new();
    for qos in 0..=2u8 {
        sent.extend(paho(&edge, "311", qos, 50));
        sent.extend(paho(&edge, "5", qos, 50));
        sent.extend(mosquitto_pub(&edge, "mqttv311", qos, 50));
        sent.extend(mosquitto_pub(&edge, "mqttv5", qos, 50));
        sent.extend(rumqttc_v311(&edge, qos, 50).await);
        sent.extend(rumqttc_v5(&edge, qos, 50).await);
    }
    let status = edge.stop();
    assert!(
        status.success(),
        "graceful stop exits 0, got {status}:\n{}",
        edge.stderr()
    );

    let log = edge.read_log();
    let mut by_payload: HashMap<String, Vec<&serde_json::Value>> = HashMap::new();
    for r in &log {
        by_payload
            .entry(r["payload"].as_str().unwrap().to_string())
            .or_default()
            .push(r);
    }
    for (payload, client_id, qos) in &sent {
        let found = by_payload
            .get(payload)
            .unwrap_or_else(|| panic!("{payload} from {client_id} is missing"));
        assert_eq!(found.len(), 1, "{payload} logged {} times", found.len());
        let r = found[0];
        assert_eq!(r["topic"], "telemetry");
        assert_eq!(r["headers"]["client_id"], client_id.as_str());
        assert_eq!(r["headers"]["qos"], *qos);
        assert_eq!(r["key"], client_id.as_str(), "key is level 1 of the topic");
        assert_eq!(
            r["partition"].as_u64().unwrap(),
            kafka_partition(client_id),
            "{client_id} on Kafka's partition"
        );
        assert!(r["headers"]["mqtt_topic"]
            .as_str()
            .unwrap()
            .starts_with(&format!("sensors/{client_id}/")));
        if client_id.starts_with("paho-v5") {
            assert_eq!(r["headers"]["content_type"], "text/plain");
            let seq = payload.rsplit('-').next().unwrap();
            assert_eq!(
                r["headers"]["user_properties"],
                serde_json::json!([["seq", seq]])
            );
        }
        if client_id.starts_with("mosq-mqttv5") {
            assert_eq!(
                r["headers"]["user_properties"],
                serde_json::json!([["origin", "mosquitto"]])
            );
        }
    }
    assert_eq!(
        log.len(),
        sent.len(),
        "nothing but what was sent is in the log"
    );

    // Per client, offsets grow with the order of sending.
    let mut last: HashMap<(u64, String), (u64, usize)> = HashMap::new();
    for r in &log {
        let payload = r["payload"].as_str().unwrap();
        let (prefix, seq) = payload.rsplit_once('-').unwrap();
        let seq: usize = seq.parse().unwrap();
        let key = (r["partition"].as_u64().unwrap(), prefix.to_string());
        let offset = r["offset"].as_u64().unwrap();
        if let Some((prev_off, prev_seq)) = last.get(&key) {
            assert!(
                offset > *prev_off && seq > *prev_seq,
                "{payload} out of order"
            );
        }
        last.insert(key, (offset, seq));
    }

    // The topics listing agrees with what was read.
    let topics = edge.topics();
    let telemetry = topics
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["topic"] == "telemetry")
        .unwrap();
    let total: u64 = telemetry["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["end_offset"].as_u64().unwrap() - p["start_offset"].as_u64().unwrap())
        .sum();
    assert_eq!(total as usize, sent.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_publishes_go_to_the_default_topic_keyed_by_mqtt_topic() {
    let mut edge = Edge::start(ROUTES);
    let out = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &edge.addr.port().to_string(),
            "-q",
            "1",
            "-t",
            "plant/line-3/press",
            "-m",
            "unrouted",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(edge.stop().success());
    let log = edge.read_log();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["topic"], "mqtt");
    assert_eq!(log[0]["key"], "plant/line-3/press");
    assert_eq!(log[0]["payload"], "unrouted");
}
