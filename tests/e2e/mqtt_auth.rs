//! Password file and ACL, end to end, for MQTT 3.1.1 and 5.0: a password file made by
//! `mosquitto_passwd` and extended with `edge passwd` (password on stdin), an ACL in
//! Mosquitto's syntax where each device may only publish under `devices/%c/#`; clients are
//! the byte-level harness client (exact codes), mosquitto_pub/mosquitto_sub and paho-mqtt.
//! Denied publishes never reach the log (read back with `edge read`).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tributary_tests::{
    binary, client_script, http_get, python, ConnectOpts, Edge, Got, Proto, RawClient,
};

/// `edge passwd FILE USER` with the password on stdin.
fn edge_passwd(file: &Path, user: &str, password: &str, extra: &[&str]) -> (bool, String) {
    use std::io::Write as _;
    let mut child = Command::new(binary("edge"))
        .arg("passwd")
        .arg(file)
        .arg(user)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running edge passwd");
    // `--delete` reads nothing and may have exited already.
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn mosquitto_passwd(args: &[&str]) {
    let out = Command::new("mosquitto_passwd")
        .args(args)
        .output()
        .expect("mosquitto_passwd (Debian package mosquitto, installed by tests/run)");
    assert!(out.status.success(), "mosquitto_passwd {args:?}: {out:?}");
}

const ACL: &str = "\
# every client (a `topic` line before any `user` line would be for anonymous clients only)
pattern read public/#

user watcher
topic read devices/+/status

# every device publishes under its own client id, and reads its own commands
pattern write devices/%c/#
pattern read devices/%c/commands/#
";

/// An edge with a password file (mosquitto_passwd users plus `edge passwd` users) and ACL.
struct Secured {
    edge: Edge,
    _dir: tempfile::TempDir,
    passwords: PathBuf,
    acl: PathBuf,
}

fn start_secured() -> Secured {
    let dir = tempfile::tempdir().unwrap();
    let passwords = dir.path().join("passwd");
    let p = passwords.to_str().unwrap();
    mosquitto_passwd(&["-c", "-b", p, "legacy-7", "old-pass-7"]);
    mosquitto_passwd(&["-H", "sha512", "-b", p, "legacy-6", "old-pass-6"]);
    let mosquitto_lines = std::fs::read_to_string(&passwords).unwrap();
    for (user, pass) in [
        ("dev-a", "pass-a"),
        ("dev-b", "pass-b"),
        ("watcher", "pass-w"),
    ] {
        let (ok, err) = edge_passwd(&passwords, user, pass, &[]);
        assert!(ok, "edge passwd {user}: {err}");
    }
    let text = std::fs::read_to_string(&passwords).unwrap();
    assert!(
        text.starts_with(&mosquitto_lines),
        "edge passwd keeps the mosquitto_passwd lines: {text}"
    );
    assert_eq!(text.lines().count(), 5, "{text}");
    let acl = dir.path().join("acl");
    std::fs::write(&acl, ACL).unwrap();
    let edge = Edge::start(&format!(
        "[auth]\npassword_file = {:?}\nacl_file = {:?}\nfailure_delay = \"10ms\"\nmax_failure_delay = \"40ms\"\n",
        passwords.to_str().unwrap(),
        acl.to_str().unwrap()
    ));
    Secured {
        edge,
        _dir: dir,
        passwords,
        acl,
    }
}

fn code(proto: Proto, v311: u8, v5: u8) -> u8 {
    match proto {
        Proto::V311 => v311,
        Proto::V5 => v5,
    }
}

fn metric(edge: &Edge, name: &str) -> u64 {
    let (status, body) = http_get(edge.admin, "/metrics", None).unwrap();
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} in /metrics:\n{body}"))
        .trim()
        .parse()
        .unwrap()
}

/// mosquitto_pub/mosquitto_sub; returns (success, stdout + stderr).
fn mosquitto(tool: &str, edge: &Edge, args: &[&str]) -> (bool, String) {
    let out = Command::new(tool)
        .args(["-h", "127.0.0.1", "-p", &edge.addr.port().to_string()])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e} (Debian package mosquitto-clients)"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Runs tests/clients/paho_auth.py and returns its JSON report.
fn paho(
    edge: &Edge,
    version: &str,
    id: &str,
    user: &str,
    pass: &str,
    actions: &[&str],
) -> serde_json::Value {
    let out = Command::new(python())
        .arg(client_script("paho_auth.py"))
        .args([
            "127.0.0.1",
            &edge.addr.port().to_string(),
            version,
            id,
            user,
            pass,
        ])
        .args(actions)
        .output()
        .expect("python with paho-mqtt (tests/run installs it)");
    assert!(out.status.success(), "paho_auth.py: {out:?}");
    serde_json::from_slice(&out.stdout).expect("paho_auth.py prints JSON")
}

#[test]
fn edge_passwd_writes_a_private_file_and_never_takes_the_password_from_argv() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("new-passwd");
    let (ok, err) = edge_passwd(&file, "alice", "first", &[]);
    assert!(ok, "{err}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("alice:$argon2id$"), "{text}");
    assert!(!text.contains("first"));

    // Changing the password replaces the line; a comment stays.
    std::fs::write(&file, format!("# operators\n{text}")).unwrap();
    let (ok, err) = edge_passwd(&file, "alice", "second", &[]);
    assert!(ok, "{err}");
    let changed = std::fs::read_to_string(&file).unwrap();
    assert!(
        changed.starts_with("# operators\nalice:$argon2id$"),
        "{changed}"
    );
    assert_ne!(changed, format!("# operators\n{text}"));
    assert_eq!(changed.lines().count(), 2);

    let (ok, err) = edge_passwd(&file, "alice", "", &["--delete"]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "# operators\n");

    // A password given as an argument is refused by the command line itself.
    let out = Command::new(binary("edge"))
        .arg("passwd")
        .arg(&file)
        .args(["bob", "hunter2"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    // An empty password is refused; a file the edge could not load is not rewritten.
    let (ok, err) = edge_passwd(&file, "bob", "", &[]);
    assert!(!ok && err.contains("empty"), "{err}");
    std::fs::write(&file, "carol:plaintext\n").unwrap();
    let (ok, err) = edge_passwd(&file, "bob", "pw", &[]);
    assert!(
        !ok && err.contains(":1:") && err.contains("unknown hash format"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "carol:plaintext\n");
}

#[test]
fn logins_are_checked_for_both_versions() {
    let s = start_secured();
    let edge = &s.edge;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for proto in [Proto::V311, Proto::V5] {
            let opts = ConnectOpts::new("login-check");
            for (user, pass) in [
                ("dev-a", "pass-a"),
                ("legacy-7", "old-pass-7"),
                ("legacy-6", "old-pass-6"),
            ] {
                let (_c, ack) = RawClient::connect_as(edge.addr, proto, &opts, user, pass)
                    .await
                    .unwrap();
                assert_eq!(ack.connack(), Some((0, false)), "{proto:?} {user}");
            }
            for (user, pass) in [
                ("dev-a", "pass-b"),
                ("legacy-7", "old-pass-6"),
                ("nobody", "pass-a"),
            ] {
                let (mut c, ack) = RawClient::connect_as(edge.addr, proto, &opts, user, pass)
                    .await
                    .unwrap();
                assert_eq!(
                    ack.connack().map(|a| a.0),
                    Some(code(proto, 4, 0x86)),
                    "{proto:?} {user}/{pass}"
                );
                assert_eq!(c.recv().await.unwrap(), Got::Closed);
            }
            let (_c, ack) = RawClient::connect(edge.addr, proto, &opts).await.unwrap();
            assert_eq!(
                ack.connack().map(|a| a.0),
                Some(code(proto, 5, 0x87)),
                "{proto:?} anonymous"
            );
        }
    });

    for version in ["mqttv311", "mqttv5"] {
        let (ok, out) = mosquitto(
            "mosquitto_pub",
            edge,
            &[
                "-V",
                version,
                "-i",
                "dev-a",
                "-u",
                "dev-a",
                "-P",
                "pass-a",
                "-q",
                "1",
                "-t",
                "devices/dev-a/login",
                "-m",
                &format!("login-{version}"),
            ],
        );
        assert!(ok, "{version}: {out}");
        let (ok, out) = mosquitto(
            "mosquitto_pub",
            edge,
            &[
                "-V",
                version,
                "-i",
                "dev-a",
                "-u",
                "dev-a",
                "-P",
                "wrong",
                "-q",
                "1",
                "-t",
                "devices/dev-a/login",
                "-m",
                "never",
            ],
        );
        assert!(!ok, "{version}: {out}");
        assert!(
            out.to_lowercase().contains("bad user name or password"),
            "{version}: {out}"
        );
        let (ok, out) = mosquitto(
            "mosquitto_pub",
            edge,
            &[
                "-V", version, "-i", "anon", "-q", "1", "-t", "public/x", "-m", "never",
            ],
        );
        assert!(!ok, "{version}: {out}");
        assert!(
            out.to_lowercase().contains("not authori"),
            "{version}: {out}"
        );
    }
    for version in ["311", "5"] {
        let r = paho(edge, version, "legacy-7", "legacy-7", "old-pass-7", &[]);
        assert_eq!(r["connack"], 0, "{version}: {r}");
        let r = paho(edge, version, "dev-b", "dev-b", "pass-a", &[]);
        assert_eq!(r["connack"], 0x86, "{version}: {r}");
        let r = paho(edge, version, "anon", "-", "", &[]);
        assert_eq!(r["connack"], 0x87, "{version}: {r}");
        // A will the ACL does not allow is refused at CONNECT.
        let r = paho(
            edge,
            version,
            "dev-a",
            "dev-a",
            "pass-a",
            &["will:devices/dev-b/gone"],
        );
        assert_eq!(r["connack"], 0x87, "{version}: {r}");
        let r = paho(
            edge,
            version,
            "dev-a",
            "dev-a",
            "pass-a",
            &["will:devices/dev-a/gone"],
        );
        assert_eq!(r["connack"], 0, "{version}: {r}");
    }
    // Per version: 4 raw refusals, 2 from mosquitto_pub, 2 from paho (a refused will is
    // counted as a denied publish).
    assert_eq!(metric(edge, "tributary_auth_failures_total"), 8 + 4 + 4);
    assert_eq!(metric(edge, "tributary_publishes_denied_total"), 2);
}

#[test]
fn each_device_publishes_only_under_its_own_client_id() {
    let mut s = start_secured();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let edge = &s.edge;
        // 5.0: a denied publish gets PUBACK/PUBREC 0x87 and the connection goes on.
        let (mut a, ack) = RawClient::connect_as(
            edge.addr,
            Proto::V5,
            &ConnectOpts::new("dev-a"),
            "dev-a",
            "pass-a",
        )
        .await
        .unwrap();
        assert_eq!(ack.connack(), Some((0, false)));
        a.publish("devices/dev-a/x", 1, 1, b"raw-ok-5")
            .await
            .unwrap();
        assert_eq!(a.recv().await.unwrap(), Got::PubAck(1, 0));
        a.publish("devices/dev-b/x", 1, 2, b"raw-denied-5")
            .await
            .unwrap();
        assert_eq!(a.recv().await.unwrap(), Got::PubAck(2, 0x87));
        a.publish("devices/dev-b/x", 2, 3, b"raw-denied-5-qos2")
            .await
            .unwrap();
        assert_eq!(a.recv().await.unwrap(), Got::PubRec(3, 0x87));
        a.publish("devices/dev-b/x", 0, 0, b"raw-denied-5-qos0")
            .await
            .unwrap();
        let codes = a
            .subscribe(
                4,
                &[
                    ("devices/dev-a/commands/#", 1),
                    ("devices/#", 1),
                    ("devices/dev-b/commands/#", 1),
                    ("public/news", 0),
                ],
            )
            .await
            .unwrap();
        assert_eq!(codes, [1, 0x87, 0x87, 0]);
        a.publish("devices/dev-a/y", 1, 5, b"raw-ok-5-after")
            .await
            .unwrap();
        assert_eq!(a.recv().await.unwrap(), Got::PubAck(5, 0));

        // 3.1.1: a denied subscription gets 0x80; a denied publish closes the connection.
        let (mut b, ack) = RawClient::connect_as(
            edge.addr,
            Proto::V311,
            &ConnectOpts::new("dev-b"),
            "dev-b",
            "pass-b",
        )
        .await
        .unwrap();
        assert_eq!(ack.connack(), Some((0, false)));
        b.publish("devices/dev-b/x", 1, 1, b"raw-ok-3")
            .await
            .unwrap();
        assert_eq!(b.recv().await.unwrap(), Got::PubAck(1, 0));
        let codes = b
            .subscribe(
                2,
                &[
                    ("devices/dev-a/commands/#", 1),
                    ("devices/dev-b/commands/+", 1),
                ],
            )
            .await
            .unwrap();
        assert_eq!(codes, [0x80, 1]);
        b.publish("devices/dev-a/x", 1, 3, b"raw-denied-3")
            .await
            .unwrap();
        assert_eq!(b.until_closed().await.unwrap(), Vec::<Got>::new());

        // A client id with a wildcard or a slash matches no device's topics.
        for id in ["+", "dev-a/x"] {
            let (mut c, ack) = RawClient::connect_as(
                edge.addr,
                Proto::V5,
                &ConnectOpts::new(id),
                "dev-a",
                "pass-a",
            )
            .await
            .unwrap();
            assert_eq!(ack.connack(), Some((0, false)), "{id}");
            c.publish("devices/dev-a/x/y", 1, 1, b"raw-denied-odd-id")
                .await
                .unwrap();
            assert_eq!(c.recv().await.unwrap(), Got::PubAck(1, 0x87), "{id}");
            let codes = c
                .subscribe(2, &[("devices/+/commands/#", 1)])
                .await
                .unwrap();
            assert_eq!(codes, [0x87], "{id}");
        }
    });
    let edge = &s.edge;

    for (version, id, pass) in [
        ("mqttv5", "dev-a", "pass-a"),
        ("mqttv311", "dev-b", "pass-b"),
    ] {
        let login = ["-V", version, "-i", id, "-u", id, "-P", pass, "-q", "1"];
        let own = format!("devices/{id}/mosquitto");
        let ok_payload = format!("mosquitto-ok-{version}");
        let (ok, out) = mosquitto(
            "mosquitto_pub",
            edge,
            &[&login[..], &["-t", &own, "-m", &ok_payload]].concat(),
        );
        assert!(ok, "{version}: {out}");
        let other = if id == "dev-a" {
            "devices/dev-b/mosquitto"
        } else {
            "devices/dev-a/mosquitto"
        };
        let denied_payload = format!("mosquitto-denied-{version}");
        let (ok, out) = mosquitto(
            "mosquitto_pub",
            edge,
            &[&login[..], &["-t", other, "-m", &denied_payload]].concat(),
        );
        if version == "mqttv5" {
            assert!(
                out.contains("Publish 1 failed: Not authorized"),
                "{version}: {out}"
            );
        } else {
            assert!(!ok, "3.1.1: the edge closes the connection: {out}");
        }
        let (_, out) = mosquitto(
            "mosquitto_sub",
            edge,
            &[&login[..], &["-t", "devices/#", "-C", "1", "-W", "20"]].concat(),
        );
        assert!(
            out.contains("All subscription requests were denied"),
            "{version}: {out}"
        );
    }
    for (version, id, pass) in [("5", "dev-b", "pass-b"), ("311", "dev-a", "pass-a")] {
        let other = if id == "dev-a" { "dev-b" } else { "dev-a" };
        let r = paho(
            edge,
            version,
            id,
            id,
            pass,
            &[
                &format!("sub:devices/{other}/commands/#"),
                &format!("sub:devices/{id}/commands/#"),
                &format!("pub:devices/{id}/paho:paho-ok-{version}"),
                &format!("pub:devices/{other}/paho:paho-denied-{version}"),
            ],
        );
        assert_eq!(r["connack"], 0, "{r}");
        let denied = if version == "5" {
            serde_json::json!(135)
        } else {
            serde_json::json!("closed")
        };
        let sub_denied = if version == "5" { 135 } else { 128 };
        assert_eq!(
            r["actions"],
            serde_json::json!([[sub_denied], [1], 0, denied]),
            "{version}: {r}"
        );
    }

    // raw: 3 (5.0) + 1 (3.1.1) + 2 odd ids; mosquitto_pub: 2; paho: 2.
    assert_eq!(
        metric(edge, "tributary_publishes_denied_total"),
        4 + 2 + 2 + 2
    );
    // raw: 2 + 1 + 2; mosquitto_sub: 2; paho: 2.
    assert_eq!(
        metric(edge, "tributary_subscriptions_denied_total"),
        5 + 2 + 2
    );

    s.edge.stop();
    let log = s.edge.read_log();
    let payloads = tributary_tests::payloads(&log);
    for ok in [
        "raw-ok-5",
        "raw-ok-5-after",
        "raw-ok-3",
        "mosquitto-ok-mqttv5",
        "mosquitto-ok-mqttv311",
        "paho-ok-5",
        "paho-ok-311",
    ] {
        assert!(payloads.iter().any(|p| p == ok), "{ok} in {payloads:?}");
    }
    assert!(
        payloads.iter().all(|p| !p.contains("denied")),
        "nothing denied is logged: {payloads:?}"
    );
    for r in &log {
        let topic = r["headers"]["mqtt_topic"].as_str().unwrap();
        let client = r["headers"]["client_id"].as_str().unwrap();
        assert!(
            topic.starts_with(&format!("devices/{client}/")),
            "{client} published {topic}"
        );
    }
    let _ = (&s.passwords, &s.acl);
}

/// Waits until the edge's stderr mentions `what` `n` times.
fn wait_for_log(edge: &Edge, what: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while edge.stderr().matches(what).count() < n {
        assert!(
            Instant::now() < deadline,
            "{what:?} x{n} in:\n{}",
            edge.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sighup(edge: &Edge) {
    assert!(tributary_tests::signal(edge.pid(), libc::SIGHUP));
}

#[test]
fn sighup_reloads_the_acl_and_passwords_for_connected_clients() {
    let s = start_secured();
    let edge = &s.edge;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (mut a, ack) = RawClient::connect_as(
            edge.addr,
            Proto::V5,
            &ConnectOpts::new("dev-a"),
            "dev-a",
            "pass-a",
        )
        .await
        .unwrap();
        assert_eq!(ack.connack(), Some((0, false)));
        a.publish("fleet/dev-a", 1, 1, b"before-reload")
            .await
            .unwrap();
        assert_eq!(a.recv().await.unwrap(), Got::PubAck(1, 0x87));
        assert_eq!(a.subscribe(2, &[("fleet/#", 1)]).await.unwrap(), [0x87]);

        std::fs::write(
            &s.acl,
            format!("{ACL}\nuser dev-a\ntopic readwrite fleet/#\n"),
        )
        .unwrap();
        sighup(edge);
        wait_for_log(edge, "ACL file reloaded", 1);
        a.publish("fleet/dev-a", 1, 3, b"after-reload")
            .await
            .unwrap();
        assert_eq!(a.recv().await.unwrap(), Got::PubAck(3, 0));
        assert_eq!(a.subscribe(4, &[("fleet/#", 1)]).await.unwrap(), [1]);

        // A broken file is reported and the rules in force stay.
        std::fs::write(
            &s.acl,
            "user dev-a\ntopic sometimes fleet/#\nallow everything\n",
        )
        .unwrap();
        sighup(edge);
        wait_for_log(edge, "reloading auth files on SIGHUP", 1);
        assert!(
            edge.stderr().contains(":3: unknown keyword \"allow\""),
            "{}",
            edge.stderr()
        );
        a.publish("fleet/dev-a", 1, 5, b"after-bad-reload")
            .await
            .unwrap();
        // Acknowledged, and delivered to its own subscription.
        let got = [a.recv().await.unwrap(), a.recv().await.unwrap()];
        assert!(got.contains(&Got::PubAck(5, 0)), "{got:?}");
        assert!(
            got.iter()
                .any(|g| matches!(g, Got::Publish { topic, .. } if topic == "fleet/dev-a")),
            "{got:?}"
        );

        // A user added with edge passwd can log in after the next SIGHUP.
        let opts = ConnectOpts::new("dev-c");
        let (_c, ack) = RawClient::connect_as(edge.addr, Proto::V311, &opts, "dev-c", "pass-c")
            .await
            .unwrap();
        assert_eq!(ack.connack().map(|a| a.0), Some(4));
        let (ok, err) = edge_passwd(&s.passwords, "dev-c", "pass-c", &[]);
        assert!(ok, "{err}");
        // dev-a loses fleet/#; watcher may now publish there.
        std::fs::write(
            &s.acl,
            format!("{ACL}\nuser watcher\ntopic write fleet/#\n"),
        )
        .unwrap();
        sighup(edge);
        wait_for_log(edge, "password file reloaded", 3);
        let (mut c, ack) = RawClient::connect_as(edge.addr, Proto::V311, &opts, "dev-c", "pass-c")
            .await
            .unwrap();
        assert_eq!(ack.connack(), Some((0, false)));
        c.publish("devices/dev-c/x", 1, 1, b"dev-c").await.unwrap();
        assert_eq!(c.recv().await.unwrap(), Got::PubAck(1, 0));
        // dev-a's grant on fleet/# is gone again.
        a.publish("fleet/dev-a", 1, 6, b"after-revoke")
            .await
            .unwrap();
        assert_eq!(a.recv().await.unwrap(), Got::PubAck(6, 0x87));
        // Its subscription to fleet/# stays, but delivers nothing it may no longer read:
        // watcher's publish is fanned out before watcher's PUBACK, and dev-a's connection
        // writes pending deliveries before it answers its next packet, so a delivery would
        // come before the second PINGRESP.
        let (mut w, ack) = RawClient::connect_as(
            edge.addr,
            Proto::V5,
            &ConnectOpts::new("watcher-1"),
            "watcher",
            "pass-w",
        )
        .await
        .unwrap();
        assert_eq!(ack.connack(), Some((0, false)));
        w.publish("fleet/w", 1, 1, b"fleet-news").await.unwrap();
        assert_eq!(w.recv().await.unwrap(), Got::PubAck(1, 0));
        let mut seen = Vec::new();
        for _ in 0..2 {
            a.ping().await.unwrap();
            loop {
                match a.recv().await.unwrap() {
                    Got::PingResp => break,
                    other => seen.push(other),
                }
            }
        }
        assert_eq!(
            seen,
            Vec::<Got>::new(),
            "nothing from fleet/# reaches dev-a"
        );
    });
}

#[test]
fn broken_auth_files_stop_the_start_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("passwd");
    std::fs::write(&pw, "# users\nalice:$1$md5$nope\n").unwrap();
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        format!("[auth]\npassword_file = {:?}\n", pw.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new(binary("edge"))
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("auth.password_file")
            && err.contains("passwd:2: user \"alice\": unknown hash format"),
        "{err}"
    );
}
