//! MQTT over TLS and mutual TLS: mosquitto_pub/mosquitto_sub and paho-mqtt (Python's ssl)
//! against the edge's TLS listener, with certificates made here with rcgen. Client
//! certificates without one, from another CA or expired are refused; a good one names the
//! client; SIGHUP swaps the server certificate while open connections keep publishing.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tributary_tests::pki::Ca;
use tributary_tests::{binary, client_script, free_port, http_get, payloads, python, Edge};

/// The test's certificates, as files: `ca.pem`, `server.pem`/`server.key` (for localhost
/// and 127.0.0.1), `good`, `stranger` (another CA) and `expired` client certificates.
struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
    server_der: Vec<u8>,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("tributary test CA");
        let other = Ca::new("some other CA");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let pki = Pki {
            server_der: Vec::new(),
            dir,
            ca,
        };
        let server_der = pki.put_server("edge-a");
        for (name, ca, expired) in [
            ("good", &pki.ca, false),
            ("stranger", &other, false),
            ("expired", &pki.ca, true),
        ] {
            let cn = format!("sensor-{name}");
            let (cert, key, _) = ca.issue(&cn, &[], expired);
            std::fs::write(pki.path(&format!("{name}.pem")), cert).unwrap();
            std::fs::write(pki.path(&format!("{name}.key")), key).unwrap();
        }
        Pki { server_der, ..pki }
    }

    /// Writes a new server certificate and key named `cn`; returns the certificate's DER.
    fn put_server(&self, cn: &str) -> Vec<u8> {
        let (cert, key, der) = self.ca.issue(cn, &["localhost", "127.0.0.1"], false);
        std::fs::write(self.path("server.pem"), cert).unwrap();
        std::fs::write(self.path("server.key"), key).unwrap();
        der
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// The `[tls]` section of an edge on `port`.
    fn section(&self, port: u16, mutual: bool, more: &str) -> String {
        let client_ca = if mutual {
            format!("client_ca_file = \"{}\"\n", self.arg("ca.pem"))
        } else {
            String::new()
        };
        format!(
            "[tls]\nlisten = \"127.0.0.1:{port}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n{client_ca}{more}",
            self.arg("server.pem"),
            self.arg("server.key")
        )
    }
}

/// A child process killed (by its PID) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Waits up to `secs` for the exit.
    fn wait(&mut self, secs: u64) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "{:?} did not exit", self.0);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts an edge with a TLS listener; returns it once `/ready` says every listener is bound.
fn start(pki: &Pki, mutual: bool, mqtt_extra: &str, tls_extra: &str) -> (Edge, u16) {
    let port = free_port();
    let edge = Edge::start_with(mqtt_extra, "", &pki.section(port, mutual, tls_extra));
    wait_until("the edge is ready", || {
        http_get(edge.admin, "/ready", None).is_ok_and(|(code, _)| code == 200)
    });
    (edge, port)
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The client `client_id` as `/api/v1/clients` lists it.
fn client(edge: &Edge, client_id: &str) -> Option<serde_json::Value> {
    let (code, body) = http_get(edge.admin, "/api/v1/clients", None).ok()?;
    assert_eq!(code, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    list["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["client_id"] == client_id && c["connected"] == true)
        .cloned()
}

/// mosquitto_pub or mosquitto_sub over TLS to `port` with the CA, and a client
/// certificate when `cert` names one.
fn mosquitto(tool: &str, pki: &Pki, port: u16, cert: Option<&str>) -> Command {
    let mut cmd = Command::new(tool);
    cmd.args(["-h", "localhost", "-p", &port.to_string(), "--cafile"])
        .arg(pki.path("ca.pem"));
    if let Some(name) = cert {
        cmd.arg("--cert")
            .arg(pki.path(&format!("{name}.pem")))
            .arg("--key")
            .arg(pki.path(&format!("{name}.key")));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs mosquitto_pub (QoS 1) to completion; returns whether it succeeded.
fn mosquitto_pub(pki: &Pki, port: u16, cert: Option<&str>, id: &str, msg: &str) -> bool {
    let mut cmd = mosquitto("mosquitto_pub", pki, port, cert);
    cmd.args(["-i", id, "-q", "1", "-t", &format!("tls/{id}"), "-m", msg]);
    let mut child = Proc(cmd.spawn().expect("mosquitto_pub (tests/run installs it)"));
    child.wait(30).success()
}

/// paho_tls.py in `mode` with `args`.
fn paho(pki: &Pki, port: u16, mode: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(python());
    cmd.arg(client_script("paho_tls.py"))
        .arg(mode)
        .arg("--port")
        .arg(port.to_string())
        .arg("--ca")
        .arg(pki.path("ca.pem"))
        .args(args);
    cmd
}

/// paho_tls.py publish: the JSON it prints.
fn paho_publish(pki: &Pki, port: u16, args: &[&str]) -> serde_json::Value {
    let mut cmd = paho(pki, port, "publish", args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = Proc(
        cmd.spawn()
            .expect("python3 with paho-mqtt (tests/run installs it)"),
    );
    let status = child.wait(60);
    let mut out = String::new();
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "paho_tls.py failed: {out}{err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}{err}"))
}

/// The server certificate (DER) that a new TLS connection to `port` sees.
fn peer_cert(pki: &Pki, port: u16) -> Vec<u8> {
    let out = tributary_tests::run(&mut paho(pki, port, "peer-cert", &[])).unwrap();
    (0..out.trim().len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&out.trim()[i..i + 2], 16).unwrap())
        .collect()
}

fn mqtt_topics_and_payloads(edge: &Edge) -> Vec<(String, String, String)> {
    edge.read_log()
        .iter()
        .map(|r| {
            (
                r["headers"]["mqtt_topic"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                r["headers"]["client_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                r["payload"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn mosquitto_clients_over_tls_beside_plain_tcp() {
    let pki = Pki::new();
    let (mut edge, port) = start(&pki, false, "", "");
    let stderr = edge.stderr();
    assert!(
        stderr.contains("MQTT listener (TLS) is bound") && stderr.contains("not asked for"),
        "{stderr}"
    );

    let mut sub = mosquitto("mosquitto_sub", &pki, port, None);
    sub.args([
        "-i", "tls-sub", "-q", "1", "-t", "tls/#", "-C", "2", "-W", "60", "-v",
    ]);
    let mut sub = Proc(sub.spawn().expect("mosquitto_sub (tests/run installs it)"));
    wait_until("mosquitto_sub has subscribed over TLS", || {
        client(&edge, "tls-sub").is_some_and(|c| !c["subscriptions"].as_array().unwrap().is_empty())
    });

    assert!(mosquitto_pub(&pki, port, None, "tls-pub", "over-tls"));
    let plain = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &edge.addr.port().to_string()])
        .args([
            "-i",
            "plain-pub",
            "-q",
            "1",
            "-t",
            "tls/plain-pub",
            "-m",
            "over-plain",
        ])
        .status()
        .unwrap();
    assert!(plain.success());

    assert!(
        sub.wait(60).success(),
        "mosquitto_sub did not get both messages"
    );
    let mut out = String::new();
    sub.0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(out.contains("tls/tls-pub over-tls"), "{out}");
    assert!(out.contains("tls/plain-pub over-plain"), "{out}");

    assert!(edge.stop().success());
    let log = mqtt_topics_and_payloads(&edge);
    for want in [
        ("tls/tls-pub", "tls-pub", "over-tls"),
        ("tls/plain-pub", "plain-pub", "over-plain"),
    ] {
        assert!(
            log.iter()
                .any(|(t, c, p)| (t.as_str(), c.as_str(), p.as_str()) == want),
            "{want:?} not in {log:?}"
        );
    }
}

#[test]
fn paho_over_tls_1_2_and_1_3() {
    let pki = Pki::new();
    let (mut edge, port) = start(&pki, false, "", "");
    for (version, name) in [("1.2", "TLSv1.2"), ("1.3", "TLSv1.3")] {
        let payload = format!("paho-{version}");
        let r = paho_publish(
            &pki,
            port,
            &[
                "--tls",
                version,
                "--client-id",
                &format!("paho-{version}"),
                "--payload",
                &payload,
            ],
        );
        assert_eq!(r["connected"], true, "{r}");
        assert_eq!(r["tls_version"], name, "{r}");
        assert_eq!(r["acked"], serde_json::json!([payload]), "{r}");
    }
    assert!(edge.stop().success());
    let got = payloads(&edge.read_log());
    assert!(got.contains(&"paho-1.2".to_string()), "{got:?}");
    assert!(got.contains(&"paho-1.3".to_string()), "{got:?}");

    // min_version = "1.3": a client that only speaks 1.2 gets no connection.
    let (_edge13, port13) = start(&pki, false, "", "min_version = \"1.3\"\n");
    let r = paho_publish(&pki, port13, &["--tls", "1.2", "--payload", "refused"]);
    assert_eq!(r["connected"], false, "{r}");
    let r = paho_publish(&pki, port13, &["--tls", "1.3", "--payload", "accepted"]);
    assert_eq!(r["acked"], serde_json::json!(["accepted"]), "{r}");
}

#[test]
fn mutual_tls_accepts_only_valid_certificates_from_the_ca() {
    let pki = Pki::new();
    let (mut edge, port) = start(&pki, true, "", "");
    assert!(
        edge.stderr().contains("required (mutual TLS)"),
        "{}",
        edge.stderr()
    );

    assert!(!mosquitto_pub(&pki, port, None, "no-cert", "x"));
    assert!(!mosquitto_pub(
        &pki,
        port,
        Some("stranger"),
        "stranger",
        "x"
    ));
    assert!(!mosquitto_pub(&pki, port, Some("expired"), "expired", "x"));
    let r = paho_publish(
        &pki,
        port,
        &[
            "--cert",
            &pki.arg("expired.pem"),
            "--key",
            &pki.arg("expired.key"),
            "--payload",
            "x",
        ],
    );
    assert_eq!(r["connected"], false, "{r}");

    assert!(mosquitto_pub(
        &pki,
        port,
        Some("good"),
        "good-pub",
        "with-cert"
    ));
    let r = paho_publish(
        &pki,
        port,
        &[
            "--cert",
            &pki.arg("good.pem"),
            "--key",
            &pki.arg("good.key"),
            "--client-id",
            "good-paho",
            "--payload",
            "paho-with-cert",
        ],
    );
    assert_eq!(r["acked"], serde_json::json!(["paho-with-cert"]), "{r}");

    // The certificate's CN is the client's username while it is connected, and the TLS
    // connection counts as a connection.
    let mut sub = mosquitto("mosquitto_sub", &pki, port, Some("good"));
    sub.args(["-i", "mtls-sub", "-t", "tls/none", "-C", "1", "-W", "120"]);
    let _sub = Proc(sub.spawn().expect("mosquitto_sub (tests/run installs it)"));
    wait_until("mtls-sub is connected", || {
        client(&edge, "mtls-sub").is_some()
    });
    let c = client(&edge, "mtls-sub").unwrap();
    assert_eq!(c["username"], "sensor-good", "{c}");
    wait_until("the metrics count the TLS connection", || {
        http_get(edge.admin, "/metrics", None)
            .is_ok_and(|(_, m)| m.lines().any(|l| l == "tributary_connections 1"))
    });

    // Each refusal is logged with its reason (the edge may log it just after the client
    // gave up).
    for reason in [
        "peer sent no certificates",
        "UnknownIssuer",
        "certificate expired",
    ] {
        wait_until(&format!("the edge logged a refusal for {reason:?}"), || {
            edge.stderr()
                .lines()
                .any(|l| l.contains("TLS connection refused") && l.contains(reason))
        });
    }
    drop(_sub);

    assert!(edge.stop().success());
    let got = payloads(&edge.read_log());
    assert_eq!(got.len(), 2, "only the good certificate published: {got:?}");
    assert!(got.contains(&"with-cert".to_string()), "{got:?}");
    assert!(got.contains(&"paho-with-cert".to_string()), "{got:?}");
}

/// An `mqtts` listener with a client CA and `require_certificate = false`: a client without a
/// certificate connects as on any listener, one with a certificate of the CA gets its
/// identity, and a certificate the CA did not sign, or an expired one, is still refused.
#[test]
fn optional_client_certificates_are_checked_when_given() {
    let pki = Pki::new();
    let port = free_port();
    let mut edge = Edge::start(&format!(
        "[[listeners]]\nprotocol = \"mqtts\"\nbind = \"127.0.0.1:{port}\"\ncert_file = \"{}\"\n\
         key_file = \"{}\"\nclient_ca_file = \"{}\"\nrequire_certificate = false\n",
        pki.arg("server.pem"),
        pki.arg("server.key"),
        pki.arg("ca.pem"),
    ));
    assert!(mosquitto_pub(&pki, port, None, "no-cert", "without"));
    assert!(mosquitto_pub(&pki, port, Some("good"), "good-pub", "with"));
    assert!(!mosquitto_pub(
        &pki,
        port,
        Some("stranger"),
        "stranger",
        "x"
    ));
    assert!(!mosquitto_pub(&pki, port, Some("expired"), "expired", "x"));

    // With a certificate, its identity is the username; without, there is none.
    let mut with = mosquitto("mosquitto_sub", &pki, port, Some("good"));
    with.args(["-i", "opt-with", "-t", "tls/none", "-C", "1", "-W", "120"]);
    let _with = Proc(with.spawn().expect("mosquitto_sub (tests/run installs it)"));
    let mut without = mosquitto("mosquitto_sub", &pki, port, None);
    without.args([
        "-i",
        "opt-without",
        "-t",
        "tls/none",
        "-C",
        "1",
        "-W",
        "120",
    ]);
    let _without = Proc(
        without
            .spawn()
            .expect("mosquitto_sub (tests/run installs it)"),
    );
    wait_until("both subscribers are connected", || {
        client(&edge, "opt-with").is_some() && client(&edge, "opt-without").is_some()
    });
    assert_eq!(
        client(&edge, "opt-with").unwrap()["username"],
        "sensor-good"
    );
    let anonymous = client(&edge, "opt-without").unwrap();
    assert!(anonymous["username"].is_null(), "{anonymous}");
    drop((_with, _without));

    assert!(edge.stop().success());
    let mut got = payloads(&edge.read_log());
    got.sort();
    assert_eq!(got, ["with", "without"]);
}

#[test]
fn sighup_reloads_the_certificate_and_keeps_connections() {
    let pki = Pki::new();
    let (mut edge, port) = start(&pki, false, "", "");
    assert_eq!(peer_cert(&pki, port), pki.server_der);

    let mut cmd = paho(&pki, port, "session", &["--client-id", "long-lived"]);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut session = Proc(cmd.spawn().expect("python3 with paho-mqtt"));
    let mut to_session = session.0.stdin.take().unwrap();
    let mut from_session = BufReader::new(session.0.stdout.take().unwrap()).lines();
    let hello: serde_json::Value =
        serde_json::from_str(&from_session.next().unwrap().unwrap()).unwrap();
    assert_eq!(hello["connected"], true, "{hello}");
    let mut publish = |payload: &str| {
        writeln!(to_session, "{payload}").unwrap();
        to_session.flush().unwrap();
        from_session.next().unwrap().unwrap()
    };
    assert_eq!(publish("before-reload"), "acked before-reload connects=1");

    let renewed = pki.put_server("edge-b");
    assert_ne!(renewed, pki.server_der);
    sighup(&edge);
    wait_until("the edge reloaded", || {
        edge.stderr().contains("TLS certificate and key reloaded")
    });
    assert_eq!(
        peer_cert(&pki, port),
        renewed,
        "new handshakes see the new certificate"
    );
    assert_eq!(publish("after-reload"), "acked after-reload connects=1");

    // A reload that fails keeps the certificate in use.
    std::fs::write(pki.path("server.pem"), "not a certificate\n").unwrap();
    sighup(&edge);
    wait_until("the edge refused the reload", || {
        edge.stderr().contains("TLS reload failed")
    });
    let stderr = edge.stderr();
    assert!(stderr.contains("tls.cert_file"), "{stderr}");
    assert_eq!(peer_cert(&pki, port), renewed);
    assert_eq!(
        publish("after-failed-reload"),
        "acked after-failed-reload connects=1"
    );

    drop(to_session);
    assert!(session.wait(30).success());
    assert!(edge.stop().success());
    let got = payloads(&edge.read_log());
    assert_eq!(
        got,
        ["before-reload", "after-reload", "after-failed-reload"],
        "{got:?}"
    );
}

fn sighup(edge: &Edge) {
    assert!(tributary_tests::signal(edge.pid(), libc::SIGHUP));
}

#[test]
fn silent_client_is_dropped_after_connect_timeout_without_blocking_others() {
    let pki = Pki::new();
    let (_edge, port) = start(&pki, false, "connect_timeout = \"1s\"\n", "");
    let mut silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();

    // While that connection waits in its handshake, others are served.
    let r = paho_publish(&pki, port, &["--payload", "meanwhile"]);
    assert_eq!(r["acked"], serde_json::json!(["meanwhile"]), "{r}");

    let mut buf = [0u8; 64];
    let n = silent
        .read(&mut buf)
        .expect("the edge closes a connection that never handshakes");
    assert_eq!(n, 0, "closed without a TLS record");
}

#[test]
fn missing_certificate_file_stops_the_edge_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "[mqtt]\nlisten = \"127.0.0.1:{}\"\n[storage]\ndata_dir = \"{}\"\n[admin]\nenabled = false\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            free_port(),
            dir.path().join("data").display(),
            missing.display(),
            missing.display()
        ),
    )
    .unwrap();
    let (status, stderr) = edge_exit(&["--config", &config.display().to_string()]);
    assert!(!status.success());
    assert!(stderr.contains("tls.cert_file"), "{stderr}");
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    assert!(stderr.contains(":8:"), "names the line: {stderr}");

    let (status, stderr) = edge_exit(&["check-config", &config.display().to_string()]);
    assert!(!status.success());
    assert!(stderr.contains("tls.cert_file"), "{stderr}");

    let (status, stderr) = edge_exit(&[
        "--tls-listen",
        "127.0.0.1:1",
        "--data-dir",
        &dir.path().join("d").display().to_string(),
    ]);
    assert!(!status.success());
    assert!(stderr.contains("no [tls] section"), "{stderr}");
}

/// Runs `edge args` (expected to exit at once) and returns its status and stderr.
fn edge_exit(args: &[&str]) -> (ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let err_path = dir.path().join("stderr");
    let mut child = Proc(
        Command::new(binary("edge"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let status = child.wait(30);
    (status, std::fs::read_to_string(err_path).unwrap())
}

/// Clients connected with at least one subscription to `filter`.
fn subscribed(edge: &Edge, filter: &str) -> bool {
    let Ok((200, body)) = http_get(edge.admin, "/api/v1/clients", None) else {
        return false;
    };
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    list["clients"].as_array().unwrap().iter().any(|c| {
        c["connected"] == true
            && c["subscriptions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["filter"] == filter)
    })
}

#[test]
fn fleet_over_mutual_tls_loses_nothing() {
    let pki = Pki::new();
    let (_edge, port) = start(&pki, true, "", "");
    let url = format!("mqtts://127.0.0.1:{port}");
    let tls_args = |cmd: &mut Command| {
        cmd.arg("--ca-file")
            .arg(pki.path("ca.pem"))
            .arg("--cert")
            .arg(pki.path("good.pem"))
            .arg("--key")
            .arg(pki.path("good.key"));
    };
    let manifest = pki.path("manifest");
    let mut verify = Command::new(binary("firmware-sim"));
    verify.args([
        "verify",
        "--mqtt",
        &url,
        "--filter",
        "sensors/#",
        "--qos",
        "1",
        "--idle",
        "3s",
    ]);
    tls_args(&mut verify);
    verify
        .arg("--manifest")
        .arg(&manifest)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut verify = Proc(verify.spawn().unwrap());
    wait_until("the verifier has subscribed over TLS", || {
        subscribed(&_edge, "sensors/#")
    });

    // Every acknowledged publish also goes out to the verifier: many small TLS writes.
    let mut fleet = Command::new(binary("firmware-sim"));
    fleet.args([
        "run",
        "--broker",
        &url,
        "--devices",
        "20",
        "--rate",
        "100",
        "--qos",
        "1",
        "--duration",
        "3s",
    ]);
    tls_args(&mut fleet);
    let fleet = fleet.arg("--manifest").arg(&manifest).output().unwrap();
    assert!(
        fleet.status.success(),
        "run over mutual TLS failed: {}",
        String::from_utf8_lossy(&fleet.stderr)
    );

    assert!(verify.wait(120).success(), "verify failed");
    let mut stdout = String::new();
    verify
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(
        summary.contains(" lost=0 ") && summary.contains(" duplicates=0 "),
        "{summary}"
    );
    let expected = tributary_tests::summary_field(summary, "expected");
    assert!(
        expected > 1000,
        "a good part of 20 devices x 100/s x 3 s was acknowledged: {summary}"
    );
}

#[test]
fn large_messages_reach_a_tls_subscriber_that_paused_reading() {
    // More than the socket buffers hold while the subscriber does not read: the edge's writes
    // stop part way with TLS records held in rustls, and must all go out once it reads again,
    // with nothing else (no keepalive) prompting the edge to write.
    let pki = Pki::new();
    let (_edge, port) = start(&pki, false, "", "");
    let out_path = pki.path("received");
    let mut sub = Command::new(python());
    sub.arg(client_script("tls_slow_subscriber.py"))
        .arg(port.to_string())
        .arg(pki.path("ca.pem"))
        .args(["tls/big", "8"])
        .arg(&out_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut sub = Proc(sub.spawn().expect("python3"));
    let mut to_sub = sub.0.stdin.take().unwrap();
    let mut from_sub = BufReader::new(sub.0.stdout.take().unwrap()).lines();
    assert_eq!(from_sub.next().unwrap().unwrap(), "subscribed");

    let mut expected = Vec::new();
    for i in 0..8u8 {
        let body: Vec<u8> = (0..900 * 1024u32)
            .map(|j| b'a' + ((j % 26) as u8 + i) % 26)
            .collect();
        let file = pki.path(&format!("big-{i}"));
        std::fs::write(&file, &body).unwrap();
        let mut publish = mosquitto("mosquitto_pub", &pki, port, None);
        publish
            .args(["-i", "big-pub", "-q", "1", "-t", "tls/big", "-f"])
            .arg(&file);
        assert!(Proc(publish.spawn().unwrap()).wait(60).success());
        expected.extend_from_slice(&body);
    }

    writeln!(to_sub, "read now").unwrap();
    to_sub.flush().unwrap();
    assert_eq!(
        from_sub.next().map(|l| l.unwrap()),
        Some("8".to_string()),
        "the subscriber got all 8 messages"
    );
    assert!(sub.wait(30).success());
    let got = std::fs::read(&out_path).unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "the messages arrived altered");
}
