//! MQTT over WebSocket from a browser: headless Chromium loads a page, served by this test
//! on 127.0.0.1, that runs MQTT.js (the npm package `mqtt`'s browser bundle, fetched by
//! tests/run at the version in tests/clients/mqttjs-version) against the edge's `ws`
//! listener. The page subscribes, publishes QoS 1 messages, waits for their PUBACKs and
//! for the messages on its subscription, and POSTs what happened back to the test's server.
//! The records are then read back from the stopped edge's log with `edge read`. The same
//! over `wss`, with a certificate from a test CA: Chromium is told to accept that one
//! certificate's key (`--ignore-certificate-errors-spki-list`, its SHA-256 SPKI hash), not
//! every certificate.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tributary_tests::pki::Ca;
use tributary_tests::{chromium, free_port, http_get, run, workspace_root, Edge};

const DEADLINE: Duration = Duration::from_secs(90);

/// MQTT.js's browser bundle, as tests/run fetches it.
fn mqttjs() -> Vec<u8> {
    let root = workspace_root();
    let version = std::fs::read_to_string(root.join("tests/clients/mqttjs-version")).unwrap();
    let path: PathBuf = root
        .join("target/mqttjs")
        .join(format!("mqtt-{}.min.js", version.trim()));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "MQTT.js's browser bundle {} is missing ({e}): tests/run fetches it with npm pack \
             (or run its MQTT.js step by hand)",
            path.display()
        )
    })
}

/// The page: MQTT.js over `ws_url`, subscribe to `prefix/#`, publish `payloads` with QoS 1
/// to `prefix/N`, then POST a report to `/result`.
fn page(ws_url: &str, prefix: &str, payloads: &[String]) -> String {
    let payloads = serde_json::to_string(payloads).unwrap();
    format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><script src="/mqtt.min.js"></script></head>
<body><script>
const report = {{ connected: false, subscribed: null, acked: [], received: [], errors: [] }};
let sent = false;
function send() {{
  if (sent) return;
  sent = true;
  fetch("/result", {{ method: "POST", body: JSON.stringify(report) }});
}}
window.onerror = (msg) => {{ report.errors.push("page: " + msg); send(); }};
const payloads = {payloads};
const client = mqtt.connect("{ws_url}", {{
  protocolVersion: 5, clientId: "browser-ws", clean: true, reconnectPeriod: 0, connectTimeout: 10000,
}});
client.on("error", (e) => {{ report.errors.push("mqtt: " + e.message); send(); }});
client.on("close", () => {{
  if (report.acked.length < payloads.length || report.received.length < payloads.length) {{
    report.errors.push("the connection closed before the exchange was done"); send();
  }}
}});
client.on("message", (topic, payload, packet) => {{
  report.received.push({{ topic, payload: new TextDecoder().decode(payload), qos: packet.qos }});
  if (report.received.length >= payloads.length && report.acked.length >= payloads.length) {{
    client.end(false, {{}}, send);
  }}
}});
client.on("connect", () => {{
  report.connected = true;
  client.subscribe("{prefix}/#", {{ qos: 1 }}, (err, granted) => {{
    if (err) {{ report.errors.push("subscribe: " + err.message); send(); return; }}
    report.subscribed = granted.map((g) => g.qos);
    payloads.forEach((p, i) => {{
      client.publish("{prefix}/" + i, p, {{ qos: 1 }}, (err) => {{
        if (err) {{ report.errors.push("publish: " + err.message); send(); return; }}
        report.acked.push(i);
        if (report.received.length >= payloads.length && report.acked.length >= payloads.length) {{
          client.end(false, {{}}, send);
        }}
      }});
    }});
  }});
}});
</script></body></html>"#
    )
}

/// The test's web server: `/` the page, `/mqtt.min.js` the bundle; a POST to `/result`
/// hands its body to the test.
fn serve(listener: TcpListener, page: String, bundle: Vec<u8>, results: mpsc::Sender<String>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let (page, bundle, results) = (page.clone(), bundle.clone(), results.clone());
        std::thread::spawn(move || {
            let _ = answer(stream, &page, &bundle, &results);
        });
    }
}

fn answer(
    stream: TcpStream,
    page: &str,
    bundle: &[u8],
    results: &mpsc::Sender<String>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body): (&str, &str, Vec<u8>) = match (method, path) {
        ("GET", "/") => (
            "200 OK",
            "text/html; charset=utf-8",
            page.as_bytes().to_vec(),
        ),
        ("GET", "/mqtt.min.js") => ("200 OK", "text/javascript", bundle.to_vec()),
        ("POST", "/result") => {
            let mut body = vec![0; length];
            reader.read_exact(&mut body)?;
            let _ = results.send(String::from_utf8_lossy(&body).into_owned());
            ("200 OK", "text/plain", b"ok".to_vec())
        }
        _ => ("404 Not Found", "text/plain", b"not here".to_vec()),
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(&body)?;
    stream.flush()
}

/// Headless Chromium on a URL, in a process group of its own, killed (the group whose id is
/// its pid: the browser and the renderer and GPU processes it started) when dropped.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Opens `url`; `trusted_spki` is the SHA-256 hash (base64) of the one server key the
    /// browser accepts beyond its usual roots.
    fn open(url: &str, trusted_spki: Option<&str>) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(chromium());
        if let Some(spki) = trusted_spki {
            cmd.arg(format!("--ignore-certificate-errors-spki-list={spki}"));
        }
        let child = cmd
            .args(["--headless=new", "--no-sandbox", "--disable-gpu"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(["--no-first-run", "--remote-debugging-port=0", url])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("starting Chromium");
        Browser {
            child,
            _profile: profile,
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Ok(pgid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) takes two integers and touches no memory of ours; the group is
            // the one this test made for the browser (its id is the browser's pid, not reaped
            // yet, so not reused).
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test CA's certificate for 127.0.0.1, as files, and the SHA-256 hash of its key.
struct ServerCert {
    dir: tempfile::TempDir,
    spki_sha256: String,
}

impl ServerCert {
    fn new() -> ServerCert {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("tributary browser test CA");
        let (cert, key, _) = ca.issue("edge", &["127.0.0.1", "localhost"], false);
        std::fs::write(dir.path().join("server.pem"), cert).unwrap();
        std::fs::write(dir.path().join("server.key"), key).unwrap();
        let spki_sha256 = run(Command::new("sh").arg("-c").arg(format!(
            "openssl x509 -in '{}' -pubkey -noout | openssl pkey -pubin -outform der \
             | openssl dgst -sha256 -binary | openssl base64 -A",
            dir.path().join("server.pem").display()
        )))
        .expect("openssl (Debian package openssl)")
        .trim()
        .to_string();
        assert_eq!(spki_sha256.len(), 44, "a base64 SHA-256: {spki_sha256:?}");
        ServerCert { dir, spki_sha256 }
    }

    /// The TLS keys of a listener entry.
    fn keys(&self) -> String {
        format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"\n",
            self.dir.path().join("server.pem").display(),
            self.dir.path().join("server.key").display()
        )
    }
}

/// Starts an edge whose only listener is `listener` (a `[[listeners]]` entry) on `ws`.
fn start_edge(ws: SocketAddr, listener: &str) -> Edge {
    let dir = tempfile::Builder::new()
        .prefix("tributary-edge-")
        .tempdir()
        .unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    std::fs::write(
        dir.path().join("edge.toml"),
        format!(
            "{listener}\n[storage]\ndata_dir = \"{}\"\n\n[admin]\nlisten = \"{admin}\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let edge = Edge::start_in(dir, ws, admin);
    let deadline = Instant::now() + DEADLINE;
    while !matches!(http_get(admin, "/ready", None), Ok((200, _))) {
        assert!(Instant::now() < deadline, "the edge never got ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    edge
}

#[test]
fn mqtt_js_in_chromium_publishes_and_subscribes_over_ws() {
    let ws: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let edge = start_edge(
        ws,
        &format!("[[listeners]]\nprotocol = \"ws\"\nbind = \"{ws}\"\n"),
    );
    round_trip(edge, &format!("ws://{ws}/mqtt"), "browser/ws", None);
}

#[test]
fn mqtt_js_in_chromium_publishes_and_subscribes_over_wss() {
    let cert = ServerCert::new();
    let wss: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let edge = start_edge(
        wss,
        &format!(
            "[[listeners]]\nprotocol = \"wss\"\nbind = \"{wss}\"\n{}",
            cert.keys()
        ),
    );
    round_trip(
        edge,
        &format!("wss://{wss}/mqtt"),
        "browser/wss",
        Some(&cert.spki_sha256),
    );
}

/// The page's exchange over `url`, then the records in the log.
fn round_trip(mut edge: Edge, url: &str, prefix: &str, trusted_spki: Option<&str>) {
    let bundle = mqttjs();
    let payloads: Vec<String> = (0..20)
        .map(|i| format!("{{\"from\":\"chromium\",\"n\":{i},\"t\":\"h\u{e9}at\"}}"))
        .collect();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let site = listener.local_addr().unwrap();
    let (tx, results) = mpsc::channel();
    let html = page(url, prefix, &payloads);
    std::thread::spawn(move || serve(listener, html, bundle, tx));

    let browser = Browser::open(&format!("http://{site}/"), trusted_spki);
    let report = results.recv_timeout(DEADLINE).unwrap_or_else(|_| {
        panic!(
            "the page reported nothing within {} s; edge log:\n{}",
            DEADLINE.as_secs(),
            edge.stderr()
        )
    });
    drop(browser);
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["errors"], serde_json::json!([]), "{report}");
    assert_eq!(report["connected"], true, "{report}");
    assert_eq!(report["subscribed"], serde_json::json!([1]), "{report}");
    let mut acked: Vec<u64> = report["acked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    acked.sort();
    assert_eq!(acked, (0..payloads.len() as u64).collect::<Vec<_>>());
    let received: Vec<(String, String, u64)> = report["received"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["topic"].as_str().unwrap().to_string(),
                m["payload"].as_str().unwrap().to_string(),
                m["qos"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, String, u64)> = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("{prefix}/{i}"), p.clone(), 1))
        .collect();
    assert_eq!(received, expected, "received on the subscription, in order");

    assert!(edge.stop().success());
    // Sorted: the default route may spread the topics over partitions.
    let mut records: Vec<(String, String, String, u64)> = edge
        .read_log()
        .iter()
        .map(|r| {
            assert_eq!(r["payload_encoding"], "utf8");
            (
                r["headers"]["mqtt_topic"].as_str().unwrap().to_string(),
                r["payload"].as_str().unwrap().to_string(),
                r["headers"]["client_id"].as_str().unwrap().to_string(),
                r["headers"]["qos"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut expected: Vec<(String, String, String, u64)> = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                format!("{prefix}/{i}"),
                p.clone(),
                "browser-ws".to_string(),
                1,
            )
        })
        .collect();
    records.sort();
    expected.sort();
    assert_eq!(
        records, expected,
        "the log holds what the browser published"
    );
}
