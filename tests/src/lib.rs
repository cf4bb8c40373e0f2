//! Harness for the end-to-end tests: builds the release binaries, starts and kills `edge`
//! processes on loopback ports, reads their logs back, and speaks raw MQTT where a test
//! needs byte-level control (bad input, exact packet ids across a crash). Real Kafka clusters
//! for the mirror's tests are in [`kafka`].
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub mod kafka;
pub mod load;
pub mod mirror;
pub mod pki;
pub mod proxy;
pub mod raw;

pub use kafka::{ConsumedRecord, KafkaCluster, PartitionState, ProducedRecord, TimestampType};

/// The last line a process printed on stdout (firmware-sim's summary line).
pub fn last_line(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

/// The number after `name=` in a firmware-sim summary line.
pub fn summary_field(summary: &str, name: &str) -> u64 {
    summary
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("{name} in {summary:?}"))
        .parse()
        .unwrap()
}

/// Wall-clock time in ms since the Unix epoch, as the edge stamps its status and records.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// The workspace's target directory (`CARGO_TARGET_DIR` when set).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => workspace_root().join("target"),
    }
}

/// `cargo` in the workspace root, with `args`, for a build from a test.
pub fn cargo(args: &[&str]) -> Command {
    let mut cargo = Command::new(env!("CARGO"));
    cargo.args(args).current_dir(workspace_root());
    // cargo gives a test process the variables of the test's own package; some build
    // scripts (ring's) rerun when CARGO_MANIFEST_DIR changes, so passing them on would
    // rebuild what tests/run just built.
    for (key, _) in std::env::vars() {
        let per_package = key.starts_with("CARGO_PKG_")
            || matches!(
                key.as_str(),
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
            );
        if per_package {
            cargo.env_remove(&key);
        }
    }
    cargo
}

/// Builds the release binaries once per test process and returns the path of `name`.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = cargo(&[
            "build",
            "--release",
            "--bins",
            "-p",
            "edge",
            "-p",
            "firmware-sim",
        ])
        .status()
        .expect("running cargo build");
        assert!(status.success(), "cargo build --release failed");
    });
    let path = target_dir().join("release").join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A plain HTTP/1.1 GET with `Connection: close`; returns the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str, token: Option<&str>) -> Result<(u16, String)> {
    let (status, _, body) = http_get_raw(addr, path, token)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// GET `path` (HTTP/1.1, `Connection: close`): status, the header block (lowercase names)
/// and the body's bytes as sent.
pub fn http_get_raw(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String, Vec<u8>)> {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    // `Host` as a browser or curl sends it for `http://{addr}/`, which the admin endpoint
    // answers without configuration.
    http_request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\r\n"),
    )
}

/// Sends `request` (the request line and headers, written out) and reads the answer to the
/// end of the connection: status, the header block (lowercase names) and the body's bytes.
pub fn http_request(addr: SocketAddr, request: &str) -> Result<(u16, String, Vec<u8>)> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of HTTP headers")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    Ok((status, head, raw[split + 4..].to_vec()))
}

/// The value of one series in Prometheus text (`series` is the name with its labels, exactly
/// as exposed); panics with the whole text when it is absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Panics unless the README names every metric family in this `/metrics` text.
pub fn assert_readme_names_metrics(text: &str) {
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"),
    )
    .expect("README.md");
    let missing: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| !readme.contains(&format!("`{name}")))
        .collect();
    assert!(
        missing.is_empty(),
        "the README's Admin HTTP section does not name {missing:?}"
    );
}

/// A free TCP port on 127.0.0.1, below the kernel's ephemeral port range, never handed out
/// twice by one test process.
///
/// A port the OS gives for `127.0.0.1:0` comes from the ephemeral range, the same range every
/// outgoing connection takes its local port from: between a kill and a restart of an edge,
/// a client connecting anywhere could be given the edge's port, and the restart would fail
/// with "Address already in use". Below that range only an explicit bind can take a port.
/// Test binaries run one after another and tests within one share this counter; the start
/// point is random so that two processes at once rarely meet, and every port is checked free.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (eph_lo, eph_hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    // The larger of the ranges outside the ephemeral one, from 10000 up.
    let below = (10_000, eph_lo.saturating_sub(1));
    let above: (u32, u32) = (eph_hi + 1, 65_535);
    let (lo, hi) = if below.1.saturating_sub(below.0) >= above.1.saturating_sub(above.0) {
        below
    } else {
        above
    };
    if hi > lo + 1000 {
        let span = hi - lo;
        let _ = NEXT.compare_exchange(
            0,
            1 + (std::process::id().wrapping_mul(7919)
                ^ std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0))
                % span,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        for _ in 0..span {
            let port = lo + NEXT.fetch_add(1, Ordering::SeqCst) % span;
            if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
                return port as u16;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}

/// Adds `user` with `password` to the password file `file` (created when missing) with
/// Mosquitto's own `mosquitto_passwd` (SHA-512 hashes: quick to check, unlike argon2).
pub fn mosquitto_passwd(file: &Path, user: &str, password: &str) {
    let mut cmd = Command::new("mosquitto_passwd");
    if !file.exists() {
        cmd.arg("-c");
    }
    let out = cmd
        .args(["-H", "sha512", "-b"])
        .arg(file)
        .args([user, password])
        .output()
        .expect("mosquitto_passwd (Debian package mosquitto)");
    assert!(out.status.success(), "{out:?}");
}

/// An `edge` process with its own data directory and config, stopped when dropped.
pub struct Edge {
    dir: tempfile::TempDir,
    /// MQTT address.
    pub addr: SocketAddr,
    /// Admin HTTP address (unless the test's config has its own `[admin]`).
    pub admin: SocketAddr,
    child: Option<Child>,
    starts: u32,
    /// The data directory, when the config puts it elsewhere than `dir/data`.
    data: Option<PathBuf>,
    /// The harness wrote the `[admin]` section, so `admin` is where `/ready` answers: a
    /// start waits for it (every part started), not only for the MQTT port (bound early).
    admin_known: bool,
    /// Environment of the next starts, beyond the harness's own.
    env: Vec<(String, String)>,
}

impl Edge {
    /// Starts an edge whose config is `extra` plus the listener and data directory.
    /// `extra` must not contain an `[mqtt]` or `[storage]` header; use `mqtt_extra` /
    /// `storage_extra` of [`Edge::start_with`] for those keys.
    pub fn start(extra: &str) -> Edge {
        Edge::start_with("", "", extra)
    }

    /// Starts an edge with extra `[mqtt]` keys, extra `[storage]` keys and other sections.
    pub fn start_with(mqtt_extra: &str, storage_extra: &str, extra: &str) -> Edge {
        let dir = tempfile::Builder::new()
            .prefix("tributary-edge-")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin_section = if extra.contains("[admin]") {
            String::new()
        } else {
            format!("[admin]\nlisten = \"{admin}\"\n")
        };
        let config = format!(
            "[mqtt]\nlisten = \"{addr}\"\n{mqtt_extra}\n[storage]\ndata_dir = \"{}\"\n{storage_extra}\n{admin_section}{extra}\n",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("edge.toml"), config).unwrap();
        let mut edge = Edge::new(dir, addr, admin, None);
        edge.admin_known = !extra.contains("[admin]");
        edge.spawn();
        edge
    }

    /// Starts an edge from `dir/edge.toml`, written by the caller, whose data directory is
    /// `dir/data` and whose MQTT and admin listeners are `addr` and `admin`.
    pub fn start_in(dir: tempfile::TempDir, addr: SocketAddr, admin: SocketAddr) -> Edge {
        Edge::start_in_at(dir, addr, admin, None)
    }

    /// Starts an edge whose data directory is `data` (a mount, say), with extra `[storage]`
    /// keys and other sections (with an `[admin]` on its own port); its config and logs live
    /// in a temporary directory of their own, off that data directory.
    pub fn start_on(data: &Path, storage_extra: &str, extra: &str) -> Edge {
        let dir = tempfile::Builder::new()
            .prefix("tributary-edge-")
            .tempdir()
            .expect("temp dir");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = format!(
            "[mqtt]\nlisten = \"{addr}\"\n\n[storage]\ndata_dir = \"{}\"\n{storage_extra}\n\n[admin]\nlisten = \"{admin}\"\n\n{extra}\n",
            data.display()
        );
        std::fs::write(dir.path().join("edge.toml"), config).unwrap();
        let mut edge = Edge::new(dir, addr, admin, Some(data.to_path_buf()));
        edge.admin_known = true;
        edge.spawn();
        edge
    }

    /// [`Edge::start_in`] for a config whose data directory is `data` (a mount, say).
    pub fn start_in_at(
        dir: tempfile::TempDir,
        addr: SocketAddr,
        admin: SocketAddr,
        data: Option<PathBuf>,
    ) -> Edge {
        let mut edge = Edge::new(dir, addr, admin, data);
        edge.spawn();
        edge
    }

    fn new(
        dir: tempfile::TempDir,
        addr: SocketAddr,
        admin: SocketAddr,
        data: Option<PathBuf>,
    ) -> Edge {
        Edge {
            dir,
            addr,
            admin,
            child: None,
            starts: 0,
            data,
            admin_known: false,
            env: Vec::new(),
        }
    }

    /// Sets the environment of the edge's next starts (replacing what an earlier call set),
    /// for example [`faketime`]'s.
    pub fn set_env(&mut self, env: &[(String, String)]) {
        self.env = env.to_vec();
    }

    /// Process id of the running edge.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("edge is running").id()
    }

    /// The config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("edge.toml")
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.data
            .clone()
            .unwrap_or_else(|| self.dir.path().join("data"))
    }

    fn stderr_path(&self, n: u32) -> PathBuf {
        self.dir.path().join(format!("edge-{n}.stderr"))
    }

    /// Everything the edge wrote to stderr in its latest run.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr_path(self.starts)).unwrap_or_default()
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let stderr = std::fs::File::create(self.stderr_path(self.starts)).unwrap();
        let child = Command::new(binary("edge"))
            .arg("--config")
            .arg(self.config_path())
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("starting edge");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // The MQTT port is bound before the groups, the mirror and the admin API start;
            // with the admin API known, "started" means /ready answers 200.
            let up = if self.admin_known {
                matches!(http_get(self.admin, "/ready", None), Ok((200, _)))
            } else {
                TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok()
            };
            if up {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "edge exited with {status} while starting:\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "edge did not listen on {} within 30 s:\n{}",
                self.addr,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9, as a power cut or an OOM kill would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().unwrap();
        }
    }

    /// Starts the edge again on the same data and port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the edge first");
        self.spawn();
    }

    /// The exit status, once the edge has exited (then it no longer counts as running).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().unwrap();
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// SIGTERM, then waits for the exit; returns its status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("edge is running");
        signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "edge did not stop within 20 s of SIGTERM:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `edge <args> --data-dir <data>` and returns (status, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (ExitStatus, String, String) {
        let out = Command::new(binary("edge"))
            .args(args)
            .arg("--data-dir")
            .arg(self.data_dir())
            .output()
            .expect("running edge");
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// All records as `edge read --json` prints them (the edge must be stopped).
    pub fn read_log(&self) -> Vec<serde_json::Value> {
        let (status, stdout, stderr) = self.cli(&["read", "--json"]);
        assert!(status.success(), "edge read failed: {stderr}");
        stdout
            .lines()
            .map(|l| serde_json::from_str(l).expect("edge read --json prints JSON lines"))
            .collect()
    }

    /// `edge topics --json` (the edge must be stopped).
    pub fn topics(&self) -> serde_json::Value {
        let (status, stdout, stderr) = self.cli(&["topics", "--json"]);
        assert!(status.success(), "edge topics failed: {stderr}");
        serde_json::from_str(&stdout).expect("edge topics --json prints JSON")
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The environment that runs a process with its wall clock `offset` off (`"+2h"`), through
/// libfaketime (Debian package libfaketime): the machine's clock is left alone, and so are
/// the process's monotonic clocks.
pub fn faketime(offset: &str) -> Vec<(String, String)> {
    let lib = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("libfaketime.so.1 (Debian package libfaketime; tests/run installs it)");
    [
        ("LD_PRELOAD", lib),
        ("FAKETIME", offset),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ("FAKETIME_DONT_RESET", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// `n` letters and digits drawn from `seed` that LZ4 finds nothing to repeat in: a payload the
/// log's compression (`storage.compression`) cannot shrink, for tests that fill a disk or a
/// budget with a known number of bytes.
pub fn incompressible_text(n: usize, seed: u64) -> String {
    const DIGITS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            DIGITS[(x % DIGITS.len() as u64) as usize] as char
        })
        .collect()
}

/// Payloads of the records in `log` (UTF-8 payloads only).
pub fn payloads(log: &[serde_json::Value]) -> Vec<String> {
    log.iter()
        .filter(|r| r["payload_encoding"] == "utf8")
        .map(|r| r["payload"].as_str().unwrap().to_string())
        .collect()
}

/// Runs a command and returns its stdout, failing with its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The Chromium binary on PATH (tests/run installs Debian's `chromium`), for dashboard tests.
pub fn chromium() -> &'static str {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {c}")])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return c;
        }
    }
    panic!("no Chromium on PATH: tests/run installs the Debian package chromium");
}

/// The DOM of the admin dashboard at `admin` after its scripts ran, as headless Chromium
/// dumps it.
pub fn dashboard_dom(admin: SocketAddr) -> String {
    dashboard_dom_at(&format!("http://{admin}/"))
}

/// The DOM of the page at `url` (the dashboard, with a query) after its scripts ran.
pub fn dashboard_dom_at(url: &str) -> String {
    let out = Command::new(chromium())
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ])
        .output()
        .expect("running Chromium");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("the DOM is UTF-8")
}

/// The Python interpreter that has paho-mqtt (tests/run installs it).
pub fn python() -> String {
    std::env::var("TRIBUTARY_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Path of a client script in tests/clients/.
pub fn client_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("clients")
        .join(name)
}

/// MQTT version of a [`RawClient`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// 3.1.1
    V311,
    /// 5.0
    V5,
}

/// A packet the edge sent, reduced to what tests check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    /// CONNACK: (5.0) reason code or (3.1.1) return code, session present, assigned id.
    ConnAck {
        /// 5.0 reason code / 3.1.1 return code number.
        code: u8,
        /// Session present.
        session_present: bool,
        /// 5.0 assigned client identifier.
        assigned_id: Option<String>,
        /// 5.0 Receive Maximum.
        receive_maximum: Option<u16>,
    },
    /// PUBACK.
    PubAck(u16, u8),
    /// PUBREC.
    PubRec(u16, u8),
    /// PUBCOMP.
    PubComp(u16, u8),
    /// SUBACK with its codes.
    SubAck(u16, Vec<u8>),
    /// PUBLISH from the edge to a subscriber.
    Publish {
        /// Topic (empty when only a 5.0 alias was sent).
        topic: String,
        /// Body.
        payload: Vec<u8>,
        /// QoS.
        qos: u8,
        /// Packet id.
        pkid: u16,
        /// DUP flag.
        dup: bool,
        /// RETAIN flag.
        retain: bool,
    },
    /// PUBREL from the edge.
    PubRel(u16),
    /// PINGRESP.
    PingResp,
    /// 5.0 DISCONNECT with its reason code.
    Disconnect(u8),
    /// The edge closed the connection.
    Closed,
    /// Anything else.
    Other(String),
}

fn qos_of(q: u8) -> rumqttc::mqttbytes::QoS {
    match q {
        0 => rumqttc::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::mqttbytes::QoS::ExactlyOnce,
    }
}

/// The fields of a PUBLISH to encode, taken as they are (tests send what a codec would
/// refuse: wildcards, bad UTF-8, packet id 0).
#[derive(Debug, Clone, Copy)]
pub struct Pub<'a> {
    /// Topic bytes.
    pub topic: &'a [u8],
    /// QoS as a number.
    pub qos: u8,
    /// Packet id (ignored for QoS 0).
    pub pkid: u16,
    /// DUP flag.
    pub dup: bool,
    /// Body.
    pub payload: &'a [u8],
    /// 5.0 topic alias.
    pub alias: Option<u16>,
}

impl Got {
    /// `(code, session_present)` of a CONNACK, `None` for any other packet.
    pub fn connack(&self) -> Option<(u8, bool)> {
        match self {
            Got::ConnAck {
                code,
                session_present,
                ..
            } => Some((*code, *session_present)),
            _ => None,
        }
    }
}

/// Next packet id not in use by `in_flight`, advancing `next` past it.
pub fn next_free_pkid<V>(in_flight: &std::collections::HashMap<u16, V>, next: &mut u16) -> u16 {
    while in_flight.contains_key(next) || *next == 0 {
        *next = next.wrapping_add(1);
    }
    let id = *next;
    *next = next.wrapping_add(1);
    id
}

/// A byte-level MQTT client over one TCP connection.
pub struct RawClient {
    stream: tokio::net::TcpStream,
    buf: BytesMut,
    /// Protocol spoken.
    pub proto: Proto,
}

/// Options of [`RawClient::connect`].
#[derive(Debug, Clone)]
pub struct ConnectOpts {
    /// Client id.
    pub client_id: String,
    /// Clean session / clean start.
    pub clean: bool,
    /// Keepalive seconds.
    pub keep_alive: u16,
    /// 5.0 session expiry.
    pub session_expiry: Option<u32>,
}

impl ConnectOpts {
    /// Clean session, keepalive 60, no expiry.
    pub fn new(client_id: &str) -> ConnectOpts {
        ConnectOpts {
            client_id: client_id.to_string(),
            clean: true,
            keep_alive: 60,
            session_expiry: None,
        }
    }
}

impl RawClient {
    /// Opens a TCP connection without sending anything.
    pub async fn open(addr: SocketAddr, proto: Proto) -> Result<RawClient> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(RawClient {
            stream,
            buf: BytesMut::new(),
            proto,
        })
    }

    /// Connects and returns the CONNACK.
    pub async fn connect(
        addr: SocketAddr,
        proto: Proto,
        opts: &ConnectOpts,
    ) -> Result<(RawClient, Got)> {
        let mut c = RawClient::open(addr, proto).await?;
        c.send_connect(opts).await?;
        let ack = c.recv().await?;
        Ok((c, ack))
    }

    /// Connects with a user name and password and returns the CONNACK.
    pub async fn connect_as(
        addr: SocketAddr,
        proto: Proto,
        opts: &ConnectOpts,
        user: &str,
        password: &str,
    ) -> Result<(RawClient, Got)> {
        let mut c = RawClient::open(addr, proto).await?;
        c.send_connect_login(opts, Some((user, password))).await?;
        let ack = c.recv().await?;
        Ok((c, ack))
    }

    /// Sends a CONNECT.
    pub async fn send_connect(&mut self, opts: &ConnectOpts) -> Result<()> {
        self.send_connect_login(opts, None).await
    }

    /// Sends a CONNECT with an optional user name and password.
    pub async fn send_connect_login(
        &mut self,
        opts: &ConnectOpts,
        login: Option<(&str, &str)>,
    ) -> Result<()> {
        let mut out = BytesMut::new();
        match self.proto {
            Proto::V311 => {
                let mut c = v4::Connect::new(opts.client_id.clone());
                c.clean_session = opts.clean;
                c.keep_alive = opts.keep_alive;
                c.login = login.map(|(u, p)| v4::Login::new(u, p));
                c.write(&mut out)?;
            }
            Proto::V5 => {
                let mut props = v5::ConnectProperties::new();
                props.session_expiry_interval = opts.session_expiry;
                v5::Connect {
                    keep_alive: opts.keep_alive,
                    client_id: opts.client_id.clone(),
                    clean_start: opts.clean,
                    properties: Some(props),
                }
                .write(
                    &None,
                    &login.map(|(u, p)| v5::Login::new(u, p)),
                    &mut out,
                )?;
            }
        }
        self.send_raw(&out).await
    }

    /// Sends bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// Encodes a PUBLISH.
    pub fn encode_publish(proto: Proto, p: &Pub<'_>, out: &mut BytesMut) {
        let Pub {
            topic,
            qos,
            pkid,
            dup,
            payload,
            alias,
        } = *p;
        // Encoded by hand so tests can send what a codec would refuse (wildcards, bad UTF-8).
        let mut props = Vec::new();
        if proto == Proto::V5 {
            if let Some(a) = alias {
                props.push(0x23);
                props.extend_from_slice(&a.to_be_bytes());
            }
        }
        let mut body = Vec::new();
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic);
        if qos > 0 {
            body.extend_from_slice(&pkid.to_be_bytes());
        }
        if proto == Proto::V5 {
            body.push(props.len() as u8);
            body.extend_from_slice(&props);
        }
        body.extend_from_slice(payload);
        let mut first = 0x30 | (qos << 1);
        if dup {
            first |= 0x08;
        }
        out.extend_from_slice(&[first]);
        let mut len = body.len();
        loop {
            let mut b = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                b |= 0x80;
            }
            out.extend_from_slice(&[b]);
            if len == 0 {
                break;
            }
        }
        out.extend_from_slice(&body);
    }

    /// Sends a PUBLISH.
    pub async fn publish(&mut self, topic: &str, qos: u8, pkid: u16, payload: &[u8]) -> Result<()> {
        let mut out = BytesMut::new();
        Self::encode_publish(
            self.proto,
            &Pub {
                topic: topic.as_bytes(),
                qos,
                pkid,
                dup: false,
                payload,
                alias: None,
            },
            &mut out,
        );
        self.send_raw(&out).await
    }

    /// Sends a PUBREL.
    pub async fn pubrel(&mut self, pkid: u16) -> Result<()> {
        let [hi, lo] = pkid.to_be_bytes();
        self.send_raw(&[0x62, 2, hi, lo]).await
    }

    /// Sends PUBACK (0x40), PUBREC (0x50) or PUBCOMP (0x70) for a packet id.
    pub async fn ack(&mut self, type_byte: u8, pkid: u16) -> Result<()> {
        let [hi, lo] = pkid.to_be_bytes();
        self.send_raw(&[type_byte, 2, hi, lo]).await
    }

    /// Subscribes to filters at QoS levels; returns the SUBACK codes.
    pub async fn subscribe(&mut self, pkid: u16, filters: &[(&str, u8)]) -> Result<Vec<u8>> {
        let mut out = BytesMut::new();
        match self.proto {
            Proto::V311 => {
                let filters = filters
                    .iter()
                    .map(|(f, q)| v4::SubscribeFilter::new(f.to_string(), qos_of(*q)));
                v4::Subscribe {
                    pkid,
                    filters: filters.collect(),
                }
                .write(&mut out)?;
            }
            Proto::V5 => {
                let filters = filters.iter().map(|(f, q)| {
                    v5::Filter::new(
                        *f,
                        match q {
                            0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                            1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                            _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
                        },
                    )
                });
                let mut s = v5::Subscribe::new_many(filters, None);
                s.pkid = pkid;
                s.write(&mut out)?;
            }
        }
        self.send_raw(&out).await?;
        match self.recv().await? {
            Got::SubAck(p, codes) if p == pkid => Ok(codes),
            other => bail!("expected SUBACK {pkid}, got {other:?}"),
        }
    }

    /// Sends a PINGREQ.
    pub async fn ping(&mut self) -> Result<()> {
        self.send_raw(&[0xC0, 0]).await
    }

    /// Receives the next packet (or `Closed`), failing after 10 s.
    pub async fn recv(&mut self) -> Result<Got> {
        self.recv_within(Duration::from_secs(10)).await
    }

    /// Receives the next packet (or `Closed`) within `limit`.
    pub async fn recv_within(&mut self, limit: Duration) -> Result<Got> {
        tokio::time::timeout(limit, self.recv_inner())
            .await
            .context("no packet from the edge in time")?
    }

    async fn recv_inner(&mut self) -> Result<Got> {
        loop {
            if let Some(p) = self.try_decode()? {
                return Ok(p);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Ok(Got::Closed),
                Ok(_) => {}
            }
        }
    }

    fn try_decode(&mut self) -> Result<Option<Got>> {
        match self.proto {
            Proto::V311 => match v4::Packet::read(&mut self.buf, 1 << 20) {
                Ok(p) => Ok(Some(match p {
                    v4::Packet::ConnAck(a) => Got::ConnAck {
                        code: a.code as u8,
                        session_present: a.session_present,
                        assigned_id: None,
                        receive_maximum: None,
                    },
                    v4::Packet::PubAck(a) => Got::PubAck(a.pkid, 0),
                    v4::Packet::PubRec(a) => Got::PubRec(a.pkid, 0),
                    v4::Packet::PubComp(a) => Got::PubComp(a.pkid, 0),
                    v4::Packet::SubAck(s) => Got::SubAck(
                        s.pkid,
                        s.return_codes
                            .iter()
                            .map(|c| match c {
                                v4::SubscribeReasonCode::Success(q) => *q as u8,
                                v4::SubscribeReasonCode::Failure => 0x80,
                            })
                            .collect(),
                    ),
                    v4::Packet::PingResp => Got::PingResp,
                    v4::Packet::Publish(p) => Got::Publish {
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                        qos: p.qos as u8,
                        pkid: p.pkid,
                        dup: p.dup,
                        retain: p.retain,
                    },
                    v4::Packet::PubRel(r) => Got::PubRel(r.pkid),
                    other => Got::Other(format!("{other:?}")),
                })),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => bail!("undecodable packet from the edge: {e}"),
            },
            Proto::V5 => match v5::Packet::read(&mut self.buf, None) {
                Ok(p) => Ok(Some(match p {
                    v5::Packet::ConnAck(a) => Got::ConnAck {
                        code: connack_code_v5(a.code),
                        session_present: a.session_present,
                        assigned_id: a
                            .properties
                            .as_ref()
                            .and_then(|p| p.assigned_client_identifier.clone()),
                        receive_maximum: a.properties.as_ref().and_then(|p| p.receive_max),
                    },
                    v5::Packet::PubAck(a) => Got::PubAck(a.pkid, puback_code(a.reason)),
                    v5::Packet::PubRec(a) => Got::PubRec(a.pkid, pubrec_code(a.reason)),
                    v5::Packet::PubComp(a) => Got::PubComp(
                        a.pkid,
                        if a.reason == v5::PubCompReason::Success {
                            0
                        } else {
                            0x92
                        },
                    ),
                    v5::Packet::SubAck(s) => Got::SubAck(
                        s.pkid,
                        s.return_codes
                            .iter()
                            .map(|c| {
                                use v5::SubscribeReasonCode as C;
                                match c {
                                    C::Success(q) => *q as u8,
                                    C::Failure | C::Unspecified => 0x80,
                                    C::ImplementationSpecific => 0x83,
                                    C::NotAuthorized => 0x87,
                                    C::TopicFilterInvalid => 0x8F,
                                    C::PkidInUse => 0x91,
                                    C::QuotaExceeded => 0x97,
                                    C::SharedSubscriptionsNotSupported => 0x9E,
                                    C::SubscriptionIdNotSupported => 0xA1,
                                    C::WildcardSubscriptionsNotSupported => 0xA2,
                                }
                            })
                            .collect(),
                    ),
                    v5::Packet::Publish(p) => Got::Publish {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload.to_vec(),
                        qos: p.qos as u8,
                        pkid: p.pkid,
                        dup: p.dup,
                        retain: p.retain,
                    },
                    v5::Packet::PubRel(r) => Got::PubRel(r.pkid),
                    v5::Packet::PingResp(_) => Got::PingResp,
                    v5::Packet::Disconnect(d) => Got::Disconnect(d.reason_code as u8),
                    other => Got::Other(format!("{other:?}")),
                })),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => bail!("undecodable packet from the edge: {e}"),
            },
        }
    }

    /// Reads until the edge closes the connection; returns the packets seen before.
    pub async fn until_closed(&mut self) -> Result<Vec<Got>> {
        let mut seen = Vec::new();
        loop {
            match self.recv().await? {
                Got::Closed => return Ok(seen),
                other => seen.push(other),
            }
        }
    }
}

fn connack_code_v5(c: v5::ConnectReturnCode) -> u8 {
    use v5::ConnectReturnCode as C;
    match c {
        C::Success => 0,
        C::UnspecifiedError => 0x80,
        C::MalformedPacket => 0x81,
        C::ProtocolError => 0x82,
        C::UnsupportedProtocolVersion => 0x84,
        C::ClientIdentifierNotValid => 0x85,
        C::ServerBusy => 0x89,
        C::PacketTooLarge => 0x95,
        C::QuotaExceeded => 0x97,
        C::BadUserNamePassword => 0x86,
        C::NotAuthorized => 0x87,
        other => panic!("unexpected CONNACK code {other:?}"),
    }
}

fn puback_code(r: v5::PubAckReason) -> u8 {
    match r {
        v5::PubAckReason::Success => 0,
        v5::PubAckReason::QuotaExceeded => 0x97,
        v5::PubAckReason::NotAuthorized => 0x87,
        v5::PubAckReason::TopicNameInvalid => 0x90,
        _ => 0x80,
    }
}

fn pubrec_code(r: v5::PubRecReason) -> u8 {
    match r {
        v5::PubRecReason::Success => 0,
        v5::PubRecReason::QuotaExceeded => 0x97,
        v5::PubRecReason::NotAuthorized => 0x87,
        _ => 0x80,
    }
}

/// Sends `sig` to the process `pid` (one this test started); true if it was delivered.
pub fn signal(pid: u32, sig: i32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    #[allow(unsafe_code)]
    let r = unsafe { libc::kill(pid, sig) };
    r == 0
}

/// Raises this process's open-file limit to `want` (or the hard limit, if lower).
pub fn raise_open_files(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in, which is ours.
    #[allow(unsafe_code)]
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max.min(want);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The fault-injecting file system (`tests/faultfs`) mounted on a fresh data directory: the
/// temporary directory holding the backing store and the mount point (drop it last), the
/// mount, and the data directory to give the edge.
pub fn fault_mount(prefix: &str) -> (tempfile::TempDir, tributary_faultfs::FaultFs, PathBuf) {
    let root = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir");
    let (backing, data) = (root.path().join("backing"), root.path().join("data"));
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    let fs = tributary_faultfs::FaultFs::mount(&backing, &data)
        .expect("mounting the fault-injecting file system (needs root and /dev/fuse)");
    (root, fs, data)
}
