//! What ships for deployment (edge/deploy/) against the edge it ships with: the Grafana
//! dashboard only queries metrics the edge exposes, and the operations families
//! (`tributary_build_info`, the standard `process_*` ones) say true things.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::collections::BTreeSet;

use tributary_tests::{
    assert_readme_names_metrics, free_port, http_get, metric, workspace_root, Edge,
};

/// An edge with every optional family present: a disk budget, a consumer group and a
/// mirror (to a Kafka that is not there: its families exist all the same).
fn full_edge() -> Edge {
    Edge::start_with(
        "",
        "disk_budget = \"1GiB\"",
        &format!(
            "[[routes]]\nmatch = \"sensors/#\"\ntopic = \"telemetry\"\n\n\
             [[groups]]\nname = \"alarms\"\ntopics = [\"telemetry\"]\n\n\
             [cloud]\nbootstrap = \"127.0.0.1:{}\"\nsite = \"deploy-test\"\n",
            free_port()
        ),
    )
}

/// Metric names a PromQL expression uses: identifiers of the edge's two prefixes.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut current = String::new();
    for c in expr.chars().chain([' ']) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            current.push(c);
        } else {
            if current.starts_with("tributary_") || current.starts_with("process_") {
                names.push(current.clone());
            }
            current.clear();
        }
    }
    names
}

/// Every PromQL query of the dashboard: panel targets and template variable queries.
fn queries(node: &serde_json::Value, out: &mut Vec<String>) {
    match node {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(q)) => out.push(q.clone()),
                    _ => queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

#[test]
fn the_grafana_dashboard_queries_only_metrics_the_edge_exposes() {
    let mut edge = full_edge();
    let (status, text) = http_get(edge.admin, "/metrics", None).unwrap();
    assert_eq!(status, 200);
    // Families with the series names they give: a histogram's _bucket, _sum and _count.
    let mut exposed = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            exposed.insert(name.to_string());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    exposed.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    let path = workspace_root().join("edge/deploy/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut all = Vec::new();
    queries(&dashboard, &mut all);
    assert!(all.len() >= 20, "the dashboard has its queries: {all:?}");
    let mut used = BTreeSet::new();
    for q in &all {
        let names = metric_names(q);
        assert!(!names.is_empty(), "a query that names no edge metric: {q}");
        for name in names {
            assert!(
                exposed.contains(&name),
                "the dashboard queries {name} ({q}), which the edge does not expose; it has {exposed:?}"
            );
            used.insert(name);
        }
    }
    // It shows each area an operator watches.
    for wanted in [
        "tributary_messages_received_total",
        "tributary_disk_free_bytes",
        "tributary_mirror_lag_records",
        "tributary_group_lag_records",
        "process_resident_memory_bytes",
    ] {
        assert!(used.contains(wanted), "the dashboard shows {wanted}");
    }
    assert!(edge.stop().success(), "{}", edge.stderr());
}

#[test]
fn build_info_and_process_metrics_describe_the_running_edge() {
    let mut edge = full_edge();
    let (status, text) = http_get(edge.admin, "/metrics", None).unwrap();
    assert_eq!(status, 200);
    assert_readme_names_metrics(&text);

    let version = env!("CARGO_PKG_VERSION");
    let info = text
        .lines()
        .find(|l| l.starts_with("tributary_build_info{"))
        .unwrap_or_else(|| panic!("no tributary_build_info in\n{text}"));
    assert!(info.ends_with(" 1"), "{info}");
    assert!(info.contains(&format!("version=\"{version}\"")), "{info}");
    // Built from this checkout: the commit label is its HEAD.
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(workspace_root())
        .output()
        .unwrap();
    if head.status.success() {
        let head = String::from_utf8(head.stdout).unwrap();
        assert!(
            info.contains(&format!("commit=\"{}\"", head.trim())),
            "{info} is not built from HEAD {head}"
        );
    }

    let rss = metric(&text, "process_resident_memory_bytes");
    assert!(rss > 1e6 && rss < 4e9, "resident memory {rss}");
    let fds = metric(&text, "process_open_fds");
    let max_fds = metric(&text, "process_max_fds");
    // Listeners, the log's files, stdio at least.
    assert!(fds >= 5.0 && fds <= max_fds, "open fds {fds} of {max_fds}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = metric(&text, "process_start_time_seconds");
    assert!(
        started <= now + 1.0 && started > now - 3600.0,
        "started at {started}, now {now}"
    );
    // CPU time counts in clock ticks: a fresh, idle edge may not have used one yet. Scrapes
    // cost it some; wait for the first tick.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (_, text) = http_get(edge.admin, "/metrics", None).unwrap();
        let cpu = metric(&text, "process_cpu_seconds_total");
        if cpu > 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process_cpu_seconds_total stays {cpu}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(edge.stop().success(), "{}", edge.stderr());
}

/// Runs a command, panicking with its output unless it succeeds; returns stdout.
fn run_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Builds the Debian package into `out` (the release binary is built first by the
/// harness); returns its path.
fn build_package(out: &std::path::Path) -> std::path::PathBuf {
    tributary_tests::binary("edge");
    let has_cargo_deb = std::process::Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_cargo_deb,
        "cargo-deb is missing: tests/run installs it (cargo install --locked cargo-deb)"
    );
    run_ok(
        std::process::Command::new("cargo")
            .args(["deb", "-p", "edge", "--no-build", "--output"])
            .arg(out)
            .current_dir(workspace_root()),
    );
    let arch = run_ok(std::process::Command::new("dpkg").arg("--print-architecture"));
    let name = format!(
        "tributary-edge_{}_{}.deb",
        env!("CARGO_PKG_VERSION"),
        arch.trim()
    );
    let deb = out.join(&name);
    assert!(
        deb.exists(),
        "{name} in {:?}",
        std::fs::read_dir(out).unwrap().collect::<Vec<_>>()
    );
    deb
}

/// A child process killed when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the edge told its service manager, as a fake `NOTIFY_SOCKET` received it.
struct Notifications {
    got: std::sync::Arc<std::sync::Mutex<Vec<(std::time::Instant, String)>>>,
}

impl Notifications {
    fn listen(path: &std::path::Path) -> Notifications {
        let socket = std::os::unix::net::UnixDatagram::bind(path).unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::downgrade(&got);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with the test (the last strong reference gone).
            while let Some(got) = sink.upgrade() {
                if let Ok(n) = socket.recv(&mut buf) {
                    for line in String::from_utf8_lossy(&buf[..n]).lines() {
                        got.lock()
                            .unwrap()
                            .push((std::time::Instant::now(), line.to_string()));
                    }
                }
            }
        });
        Notifications { got }
    }

    fn count(&self, what: &str) -> usize {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, l)| l == what)
            .count()
    }

    fn last(&self, what: &str) -> Option<std::time::Instant> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(_, l)| l == what)
            .map(|(at, _)| *at)
    }

    /// Waits (generously) until `what` has arrived `n` times.
    async fn wait_for(&self, what: &str, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        while self.count(what) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{what} x{n} never arrived; got {:?}",
                self.got.lock().unwrap()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// The package as a new user installs it, checked without touching this machine's /usr or
/// /etc: its name and contents, the unit (systemd-analyze verify and security), the
/// maintainer scripts run against a scratch root, and the unpacked binary run with the
/// shipped config under a fake service manager: READY=1 once the port answers, WATCHDOG=1
/// while the log is healthy and not while the disk hangs, STOPPING=1 at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_debian_package_installs_a_hardened_notify_service() {
    use std::process::Command;
    let work = tempfile::Builder::new()
        .prefix("tributary-deb-")
        .tempdir()
        .unwrap();
    let deb = build_package(&work.path().join("out"));

    // Control fields and files.
    let field = |name: &str| run_ok(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name));
    assert_eq!(field("Package").trim(), "tributary-edge");
    assert_eq!(field("Version").trim(), env!("CARGO_PKG_VERSION"));
    assert!(
        field("Depends").contains("passwd"),
        "useradd comes from passwd"
    );
    let control = work.path().join("control");
    run_ok(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    assert_eq!(
        std::fs::read_to_string(control.join("conffiles"))
            .unwrap()
            .trim(),
        "/etc/tributary/edge.toml"
    );
    let listing = run_ok(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for (mode, path) in [
        ("-rwxr-xr-x", "./usr/bin/tributary-edge"),
        ("-rw-r-----", "./etc/tributary/edge.toml"),
        ("-rw-r--r--", "./lib/systemd/system/tributary-edge.service"),
        (
            "-rw-r--r--",
            "./usr/share/doc/tributary-edge/privileged-ports.conf",
        ),
        (
            "-rw-r--r--",
            "./usr/share/doc/tributary-edge/grafana-dashboard.json",
        ),
    ] {
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with(mode) && l.ends_with(path)),
            "{mode} {path} in\n{listing}"
        );
    }

    // Unpacked into a scratch root.
    let root = work.path().join("root");
    run_ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    let binary = root.join("usr/bin/tributary-edge");
    let unit_text =
        std::fs::read_to_string(root.join("lib/systemd/system/tributary-edge.service")).unwrap();
    for line in [
        "Type=notify",
        "ExecStart=/usr/bin/tributary-edge --config /etc/tributary/edge.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=30s",
        "StateDirectory=tributary",
        "User=tributary",
        "LimitNOFILE=1048576",
        "ProtectSystem=strict",
        "NoNewPrivileges=true",
        "PrivateTmp=true",
        "CapabilityBoundingSet=",
    ] {
        assert!(unit_text.lines().any(|l| l == line), "{line} in the unit");
    }
    // systemd-analyze checks the unit against this machine: the unpacked binary stands in
    // for /usr/bin/tributary-edge. Unknown keys are only warnings: none may be printed.
    let units = work.path().join("units");
    std::fs::create_dir_all(&units).unwrap();
    let unit = units.join("tributary-edge.service");
    std::fs::write(
        &unit,
        unit_text.replace("/usr/bin/tributary-edge", &binary.display().to_string()),
    )
    .unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let complaints = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && !complaints.contains("tributary-edge.service"),
        "systemd-analyze verify: {complaints}"
    );
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(&unit)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&security.stdout);
    let exposure: f64 = report
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for tributary-edge.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in\n{report}"));
    assert!(
        exposure <= 4.0,
        "systemd rates the unit's exposure {exposure}:\n{report}"
    );

    // The maintainer scripts against the scratch root (DPKG_ROOT), twice: an upgrade
    // reconfigures what is there.
    let etc = root.join("etc");
    std::fs::write(etc.join("passwd"), "root:x:0:0:root:/root:/bin/bash\n").unwrap();
    std::fs::write(etc.join("group"), "root:x:0:\n").unwrap();
    std::fs::write(etc.join("shadow"), "root:*:19000:0:99999:7:::\n").unwrap();
    std::fs::write(etc.join("gshadow"), "root:*::\n").unwrap();
    let host = (
        std::fs::read("/etc/passwd").unwrap(),
        std::fs::read("/etc/group").unwrap(),
    );
    for args in [
        &["configure"][..],
        &["configure", env!("CARGO_PKG_VERSION")],
    ] {
        run_ok(
            Command::new("sh")
                .arg(control.join("postinst"))
                .args(args)
                .env("DPKG_ROOT", &root),
        );
    }
    let passwd = std::fs::read_to_string(etc.join("passwd")).unwrap();
    let users: Vec<&str> = passwd
        .lines()
        .filter(|l| l.starts_with("tributary:"))
        .collect();
    assert_eq!(users.len(), 1, "{passwd}");
    let user: Vec<&str> = users[0].split(':').collect();
    let uid: u32 = user[2].parse().unwrap();
    assert!(uid < 1000, "a system user: {passwd}");
    assert_eq!(&user[5..], ["/var/lib/tributary", "/usr/sbin/nologin"]);
    let gid: u32 = user[3].parse().unwrap();
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let state = std::fs::metadata(root.join("var/lib/tributary")).unwrap();
        assert_eq!((state.uid(), state.gid()), (uid, gid));
        assert_eq!(state.permissions().mode() & 0o777, 0o750);
        let config = std::fs::metadata(etc.join("tributary/edge.toml")).unwrap();
        assert_eq!((config.uid(), config.gid()), (0, gid));
        assert_eq!(config.permissions().mode() & 0o777, 0o640);
    }
    assert_eq!(
        (
            std::fs::read("/etc/passwd").unwrap(),
            std::fs::read("/etc/group").unwrap()
        ),
        host,
        "the machine's own users were not touched"
    );
    for (script, args) in [("prerm", "remove"), ("postrm", "purge")] {
        run_ok(
            Command::new("sh")
                .arg(control.join(script))
                .arg(args)
                .env("DPKG_ROOT", &root),
        );
    }
    assert!(
        root.join("var/lib/tributary").exists(),
        "purging keeps the log"
    );

    // The unpacked binary with the shipped config, its data on the fault-injecting file
    // system so the disk can hang, under a fake service manager asking for a 1 s watchdog.
    let (_mount_root, fs, data) = tributary_tests::fault_mount("tributary-deb-data-");
    let notify_path = work.path().join("notify.sock");
    let notes = Notifications::listen(&notify_path);
    let (port, admin) = (free_port(), free_port());
    // Killed if the test fails before it stops it: dropped before the mount, which cannot
    // be unmounted while the edge holds files on it.
    let mut child = KillOnDrop(
        Command::new(&binary)
            .arg("--config")
            .arg(etc.join("tributary/edge.toml"))
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--mqtt-listen",
                &format!("127.0.0.1:{port}"),
                "--admin-listen",
                &format!("127.0.0.1:{admin}"),
            ])
            .env("NOTIFY_SOCKET", &notify_path)
            .env("WATCHDOG_USEC", "1000000")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    notes.wait_for("READY=1", 1).await;
    // Ready means serving: the port answers at once.
    let (mut c, ack) = tributary_tests::RawClient::connect(
        addr,
        tributary_tests::Proto::V5,
        &tributary_tests::ConnectOpts::new("deb"),
    )
    .await
    .expect("the port answers once READY=1 is sent");
    assert_eq!(ack.connack(), Some((0, false)));
    c.publish("sensors/deb", 1, 1, b"one").await.unwrap();
    assert_eq!(c.recv().await.unwrap(), tributary_tests::Got::PubAck(1, 0));
    notes.wait_for("WATCHDOG=1", 3).await;

    // A disk that hangs: every fsync takes 10 s. The appender is stuck in one, the health
    // check fails, the pings stop (systemd would restart the edge) although the process
    // is still there; once the fsync completes they come back.
    fs.delay_fsync(std::time::Duration::from_secs(10));
    c.publish("sensors/deb", 1, 2, b"two").await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let quiet = notes
            .last("WATCHDOG=1")
            .is_some_and(|at| at.elapsed() >= std::time::Duration::from_secs(4));
        if quiet {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "WATCHDOG=1 kept coming while the disk hung"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "the edge is still running"
    );
    fs.delay_fsync(std::time::Duration::ZERO);
    assert_eq!(
        c.recv_within(std::time::Duration::from_secs(90))
            .await
            .unwrap(),
        tributary_tests::Got::PubAck(2, 0)
    );
    let pings = notes.count("WATCHDOG=1");
    notes.wait_for("WATCHDOG=1", pings + 2).await;

    assert!(tributary_tests::signal(child.0.id(), libc::SIGTERM));
    let status = child.0.wait().unwrap();
    assert!(status.success(), "the edge stopped cleanly: {status}");
    notes.wait_for("STOPPING=1", 1).await;
    fs.unmount()
        .expect("unmounting the fault-injecting file system");
}
