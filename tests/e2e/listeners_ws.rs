//! Listeners and MQTT over WebSocket: a config that lists only an `mqtts` listener binds
//! nothing else; paho-mqtt's websockets transport publishes QoS 1 and receives on a
//! subscription over `ws` and over `wss` (the records then read back with `edge read`); a
//! raw WebSocket client sends several packets in one message and one packet across two; an
//! upgrade to another path or without the `mqtt` subprotocol gets an HTTP error.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tributary_tests::pki::Ca;
use tributary_tests::{
    client_script, free_port, http_get, http_request, metric, payloads, python, Edge,
};

/// A CA, and a server certificate for 127.0.0.1 and localhost signed by it, as files.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("tributary test CA");
        let (cert, key, _) = ca.issue("edge", &["localhost", "127.0.0.1"], false);
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("server.pem"), cert).unwrap();
        std::fs::write(dir.path().join("server.key"), key).unwrap();
        Pki { dir }
    }

    fn arg(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// The TLS keys of a listener entry.
    fn keys(&self) -> String {
        format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"\n",
            self.arg("server.pem"),
            self.arg("server.key")
        )
    }
}

/// Starts an edge whose only listeners are `listeners` (`[[listeners]]` entries, the first
/// on `first`), with its admin API on a port of its own; returns once `/ready` answers.
fn start(first: SocketAddr, listeners: &str) -> Edge {
    let dir = tempfile::Builder::new()
        .prefix("tributary-edge-")
        .tempdir()
        .unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = format!(
        "{listeners}\n[storage]\ndata_dir = \"{}\"\n\n[admin]\nlisten = \"{admin}\"\n",
        dir.path().join("data").display()
    );
    std::fs::write(dir.path().join("edge.toml"), config).unwrap();
    let edge = Edge::start_in(dir, first, admin);
    wait_until("the edge is ready", || {
        http_get(edge.admin, "/ready", None).is_ok_and(|(code, _)| code == 200)
    });
    edge
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

/// The TCP ports process `pid` listens on: its socket inodes matched against the kernel's
/// table of listening sockets.
fn listening_ports(pid: u32) -> BTreeSet<u16> {
    let inodes: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut ports = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is f[1] (ADDR:PORT in hex), st f[3] (0A: LISTEN), inode f[9].
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                let port = f[1].rsplit(':').next().unwrap();
                ports.insert(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports
}

/// Runs tests/clients/paho_ws.py against `port`; returns its JSON report.
fn paho_ws(port: u16, ca: Option<&str>, topic: &str, payloads: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(python());
    cmd.arg(client_script("paho_ws.py"))
        .args(["--port", &port.to_string(), "--topic", topic]);
    if let Some(ca) = ca {
        cmd.args(["--ca", ca]);
    }
    for p in payloads {
        cmd.args(["--payload", p]);
    }
    let out = cmd.output().expect("running paho_ws.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "paho_ws.py failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("paho_ws.py printed no JSON ({e}): {stdout}"))
}

/// paho over a WebSocket listener: QoS 1 publishes acknowledged and received by a
/// subscription in order, then in the log with their MQTT topic.
fn paho_round_trip(edge: &mut Edge, port: u16, ca: Option<&str>, topic: &str) {
    let sent = ["first", "second", "third"];
    let report = paho_ws(port, ca, topic, &sent);
    assert_eq!(report["error"], serde_json::Value::Null, "{report}");
    assert_eq!(report["subscribed"], serde_json::json!([1]), "{report}");
    assert_eq!(report["acked"], serde_json::json!(sent), "{report}");
    assert_eq!(report["received"], serde_json::json!(sent), "{report}");
    assert!(edge.stop().success());
    let log = edge.read_log();
    assert_eq!(payloads(&log), sent, "{log:?}");
    assert!(
        log.iter()
            .all(|r| r["headers"]["mqtt_topic"] == topic
                && r["headers"]["client_id"] == "paho-ws-pub")
    );
}

#[test]
fn a_config_with_only_an_mqtts_listener_binds_nothing_else() {
    let pki = Pki::new();
    let tls = addr();
    let mut edge = start(
        tls,
        &format!(
            "[[listeners]]\nprotocol = \"mqtts\"\nbind = \"{tls}\"\n{}",
            pki.keys()
        ),
    );
    assert_eq!(
        listening_ports(edge.pid()),
        BTreeSet::from([tls.port(), edge.admin.port()]),
        "the edge listens on the mqtts port and the admin port only"
    );
    let stderr = edge.stderr();
    assert!(stderr.contains("MQTT listener (TLS) is bound"), "{stderr}");
    assert!(!stderr.contains("plain TCP"), "{stderr}");
    let out = Command::new(python())
        .arg(client_script("paho_tls.py"))
        .args(["publish", "--port", &tls.port().to_string(), "--ca"])
        .arg(pki.arg("ca.pem"))
        .args(["--topic", "tls/only", "--payload", "over-tls"])
        .output()
        .unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(report["acked"], serde_json::json!(["over-tls"]), "{report}");
    assert!(edge.stop().success());
    assert_eq!(payloads(&edge.read_log()), ["over-tls"]);
}

#[test]
fn paho_publishes_and_subscribes_over_ws() {
    let ws = addr();
    let mut edge = start(
        ws,
        &format!("[[listeners]]\nprotocol = \"ws\"\nbind = \"{ws}\"\n"),
    );
    let stderr = edge.stderr();
    assert!(
        stderr.contains("MQTT listener (WebSocket) is bound"),
        "{stderr}"
    );
    paho_round_trip(&mut edge, ws.port(), None, "plant/ws/temp");
}

#[test]
fn paho_publishes_and_subscribes_over_wss() {
    let pki = Pki::new();
    let wss = addr();
    let mut edge = start(
        wss,
        &format!(
            "[[listeners]]\nprotocol = \"wss\"\nbind = \"{wss}\"\n{}",
            pki.keys()
        ),
    );
    paho_round_trip(
        &mut edge,
        wss.port(),
        Some(&pki.arg("ca.pem")),
        "plant/wss/temp",
    );
}

/// An MQTT 3.1.1 packet: the fixed header byte, the remaining length (under 128), the body.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128);
    let mut p = vec![first, body.len() as u8];
    p.extend_from_slice(body);
    p
}

fn string(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_may_share_a_websocket_message_or_span_two() {
    let ws = addr();
    let mut edge = tokio::task::spawn_blocking(move || {
        start(
            ws,
            &format!("[[listeners]]\nprotocol = \"ws\"\nbind = \"{ws}\"\npath = \"/broker\"\n"),
        )
    })
    .await
    .unwrap();
    let mut request = format!("ws://{ws}/broker").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let (mut client, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "mqtt");

    // CONNECT (clean session, keepalive 30) and SUBSCRIBE (id 1, QoS 1) in one message.
    let mut connect = string("MQTT");
    connect.extend_from_slice(&[4, 0x02, 0, 30]);
    connect.extend_from_slice(&string("raw-ws"));
    let mut subscribe = vec![0, 1];
    subscribe.extend_from_slice(&string("raw/ws"));
    subscribe.push(1);
    let mut message = packet(0x10, &connect);
    message.extend_from_slice(&packet(0x82, &subscribe));
    client.send(Message::binary(message)).await.unwrap();
    // A QoS 1 PUBLISH (id 7) split across two messages, the second also holding a PINGREQ.
    let mut publish = string("raw/ws");
    publish.extend_from_slice(&[0, 7]);
    publish.extend_from_slice(b"spanning");
    let publish = packet(0x32, &publish);
    let (head, tail) = publish.split_at(5);
    client.send(Message::binary(head.to_vec())).await.unwrap();
    let mut rest = tail.to_vec();
    rest.extend_from_slice(&[0xC0, 0]);
    client.send(Message::binary(rest)).await.unwrap();

    // What comes back, as one byte stream: CONNACK, SUBACK, then (in either order) the
    // PUBACK, the delivery of the publish to our own subscription, and the PINGRESP.
    let mut got = Vec::new();
    let want = [
        packet(0x20, &[0, 0]),
        packet(0x90, &[0, 1, 1]),
        packet(0x40, &[0, 7]),
        packet(0xD0, &[]),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let delivered = |got: &[u8]| got.windows(b"spanning".len()).any(|w| w == b"spanning");
    while !(want
        .iter()
        .all(|p| got.windows(p.len()).any(|w| w == p.as_slice()))
        && delivered(&got))
    {
        let next = tokio::time::timeout_at(deadline, client.next())
            .await
            .unwrap_or_else(|_| panic!("not every reply within 30 s; got {got:02x?}"));
        match next {
            Some(Ok(Message::Binary(b))) => got.extend_from_slice(&b),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("{other:?} after {got:02x?}"),
        }
    }
    assert!(
        got.starts_with(&[want[0].clone(), want[1].clone()].concat()),
        "{got:02x?}"
    );
    client.close(None).await.unwrap();
    let log = tokio::task::spawn_blocking(move || {
        assert!(edge.stop().success());
        edge.read_log()
    })
    .await
    .unwrap();
    assert_eq!(payloads(&log), ["spanning"]);
}

#[test]
fn an_upgrade_to_another_path_or_without_the_mqtt_subprotocol_is_refused() {
    let ws = addr();
    let edge = start(
        ws,
        &format!("[[listeners]]\nprotocol = \"ws\"\nbind = \"{ws}\"\n"),
    );
    let upgrade = |path: &str, protocol: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: {ws}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{protocol}\r\n"
        )
    };
    let refused = || {
        let (_, metrics) = http_get(edge.admin, "/metrics", None).unwrap();
        metric(
            &metrics,
            "tributary_connections_refused_total{reason=\"websocket_upgrade\"}",
        )
    };
    // The harness's own probe of the port (a bare TCP connect) counts too.
    let before = refused();
    let (status, _, body) =
        http_request(ws, &upgrade("/other", "Sec-WebSocket-Protocol: mqtt\r\n")).unwrap();
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("/mqtt"));
    let (status, _, body) = http_request(ws, &upgrade("/mqtt", "")).unwrap();
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("subprotocol"));
    assert_eq!(refused() - before, 2.0);
}
