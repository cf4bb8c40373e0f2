//! Inspecting a running node: `edge topics --admin` and `edge read --admin [--follow]` read
//! an edge through its admin API while it runs. mosquitto_pub publishes QoS 1 with MQTT 5
//! properties (payload format, message expiry, response topic, correlation data); the API
//! read gives exactly the JSON lines `edge read` gives offline once the edge is stopped;
//! `--follow` prints what is published after it started, stops cleanly on SIGINT and fails
//! when the edge goes away; a wrong or missing token, an unknown topic and an address where
//! nothing answers are refused with one clear line. Offline `edge read` on the running node
//! is refused and names `--admin`.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use tributary_tests::{binary, free_port, http_get, Edge};

const TOKEN: &str = "inspect-token-0123456789";
const DEADLINE: Duration = Duration::from_secs(60);

/// `edge <args>` with `env`, returning (status, stdout, stderr).
fn edge(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let out = Command::new(binary("edge"))
        .args(args)
        .env_remove("TRIBUTARY_ADMIN_TOKEN")
        .env_remove("TRIBUTARY_ADMIN_TOKEN_FILE")
        .env_remove("TRIBUTARY_ADMIN_URL")
        .envs(env.iter().copied())
        .output()
        .expect("running edge");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A QoS 1 MQTT 5 publish by mosquitto_pub, with the properties given as `-D publish` pairs.
fn publish(addr: SocketAddr, topic: &str, payload: &str, properties: &[(&str, &str)]) {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(["-V", "mqttv5", "-q", "1", "-i", "inspector-pub"])
        .args(["-t", topic, "-m", payload]);
    for (name, value) in properties {
        cmd.args(["-D", "publish", name]);
        match (*name, value.split_once('=')) {
            // A user property is a name and a value: `name=value` here.
            ("user-property", Some((k, v))) => cmd.args([k, v]),
            _ => cmd.arg(value),
        };
    }
    let out = cmd
        .output()
        .expect("mosquitto_pub (Debian package mosquitto-clients)");
    assert!(out.status.success(), "mosquitto_pub: {out:?}");
}

/// A running `edge read --admin --follow`, killed when dropped.
struct Follower {
    child: Option<Child>,
    out: PathBuf,
    err: PathBuf,
}

impl Follower {
    fn start(dir: &Path, name: &str, args: &[&str]) -> Follower {
        let out = dir.join(format!("{name}.out"));
        let err = dir.join(format!("{name}.err"));
        let child = Command::new(binary("edge"))
            .args(args)
            .env("TRIBUTARY_ADMIN_TOKEN", TOKEN)
            .env_remove("TRIBUTARY_ADMIN_TOKEN_FILE")
            .env_remove("TRIBUTARY_ADMIN_URL")
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("starting edge read --follow");
        Follower {
            child: Some(child),
            out,
            err,
        }
    }

    fn lines(&self) -> Vec<String> {
        let mut text = String::new();
        std::fs::File::open(&self.out)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        // Only whole lines: the last may be half written.
        let whole = text.rfind('\n').map_or("", |end| &text[..=end]);
        whole.lines().map(str::to_string).collect()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    fn signal(&self, signal: i32) {
        let pid = self.child.as_ref().unwrap().id();
        assert!(tributary_tests::signal(pid, signal), "kill {pid}");
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "edge read --follow did not exit: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn offset(line: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    v["offset"].as_u64().unwrap()
}

#[test]
fn a_running_node_reads_through_its_admin_api_as_a_stopped_one_reads_from_disk() {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut node = Edge::start(&format!(
        "[admin]\nlisten = \"{admin}\"\ntoken = \"{TOKEN}\"\n\n\
         [[routes]]\nmatch = \"sensors/+\"\ntopic = \"telemetry\"\nkey = \"{{1}}\"\npartitions = 2\n"
    ));
    let url = format!("http://{admin}");
    let deadline = Instant::now() + DEADLINE;
    while !matches!(http_get(admin, "/ready", Some(TOKEN)), Ok((200, _))) {
        assert!(
            Instant::now() < deadline,
            "the admin endpoint never got ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let work = tempfile::tempdir().unwrap();
    let token_file = work.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let wrong_file = work.path().join("wrong-token");
    std::fs::write(&wrong_file, "not-the-token-0123456789\n").unwrap();
    let token_file_arg = token_file.to_str().unwrap();

    for i in 0..6 {
        publish(
            node.addr,
            &format!("sensors/dev-{}", i % 3),
            &format!("{{\"reading\":{i}}}"),
            &[
                ("payload-format-indicator", "1"),
                ("message-expiry-interval", "3600"),
                ("response-topic", &format!("replies/dev-{i}")),
                ("correlation-data", &format!("req-{i}")),
                ("content-type", "application/json"),
            ],
        );
    }
    publish(node.addr, "plain/topic", "no properties", &[]);

    // edge topics --admin: the topics and their ends, as offline.
    let (status, stdout, stderr) = edge(
        &["topics", "--admin", &url, "--json"],
        &[("TRIBUTARY_ADMIN_TOKEN", TOKEN)],
    );
    assert!(status.success(), "edge topics --admin: {stderr}");
    let topics: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let telemetry = topics
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["topic"] == "telemetry")
        .unwrap_or_else(|| panic!("no telemetry topic in {stdout}"));
    let ends: u64 = telemetry["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["end_offset"].as_u64().unwrap())
        .sum();
    assert_eq!(ends, 6, "{stdout}");
    assert_eq!(telemetry["partitions"].as_array().unwrap().len(), 2);

    // edge read --admin: every record with its MQTT 5 properties.
    let (status, api_read, stderr) = edge(
        &[
            "read",
            "--admin",
            &url,
            "--token-file",
            token_file_arg,
            "--json",
        ],
        &[],
    );
    assert!(status.success(), "edge read --admin: {stderr}");
    let api_lines: Vec<String> = api_read.lines().map(str::to_string).collect();
    assert_eq!(api_lines.len(), 7, "{api_read}");
    let first: serde_json::Value = serde_json::from_str(
        api_lines
            .iter()
            .find(|l| l.contains("req-0"))
            .expect("the record with correlation data req-0"),
    )
    .unwrap();
    let h = &first["headers"];
    assert_eq!(h["mqtt_topic"], "sensors/dev-0");
    assert_eq!(h["qos"], 1);
    assert_eq!(h["payload_format"], 1);
    assert_eq!(h["message_expiry"], 3600);
    assert_eq!(h["response_topic"], "replies/dev-0");
    assert_eq!(h["correlation_data"], "req-0");
    assert_eq!(h["correlation_data_encoding"], "utf8");
    assert_eq!(h["content_type"], "application/json");
    assert_eq!(first["payload"], "{\"reading\":0}");

    // Refusals, each one line naming the cause.
    let (status, _, stderr) = edge(&["read", "--admin", &url], &[]);
    assert!(!status.success());
    assert!(
        stderr.contains("401") && stderr.contains("needs a token"),
        "{stderr}"
    );
    let (status, _, stderr) = edge(
        &[
            "read",
            "--admin",
            &url,
            "--token-file",
            wrong_file.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!status.success());
    assert!(
        stderr.contains(&format!(
            "the token from --token-file {}",
            wrong_file.display()
        )),
        "{stderr}"
    );
    assert!(
        !stderr.contains("not-the-token"),
        "the token is never shown: {stderr}"
    );
    let (status, _, stderr) = edge(
        &["topics", "--admin", &url],
        &[("TRIBUTARY_ADMIN_TOKEN", "another-wrong-token-123")],
    );
    assert!(!status.success());
    assert!(stderr.contains("TRIBUTARY_ADMIN_TOKEN"), "{stderr}");
    assert!(!stderr.contains("another-wrong"), "{stderr}");
    let (status, _, stderr) = edge(
        &["read", "--admin", &url, "--topic", "nope"],
        &[("TRIBUTARY_ADMIN_TOKEN", TOKEN)],
    );
    assert!(!status.success());
    assert!(stderr.contains("no topic \"nope\""), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let config = node.config_path();
    let (status, _, stderr) = node.cli(&["--config", config.to_str().unwrap(), "read", "--json"]);
    assert!(!status.success(), "offline read of a running node");
    assert!(
        stderr.contains(&format!("--admin http://{admin}")),
        "the refusal points to --admin: {stderr}"
    );

    // --follow from the end: only what is published after it started.
    let follower = Follower::start(
        work.path(),
        "follow",
        &[
            "read",
            "--admin",
            &url,
            "--topic",
            "telemetry",
            "--follow",
            "--json",
        ],
    );
    let mut published = 0;
    let until = Instant::now() + DEADLINE;
    while follower.lines().is_empty() {
        assert!(
            Instant::now() < until,
            "--follow printed nothing: {}",
            follower.stderr()
        );
        publish(
            node.addr,
            "sensors/dev-9",
            &format!("after-{published}"),
            &[("correlation-data", "late")],
        );
        published += 1;
    }
    for i in 0..5 {
        publish(
            node.addr,
            &format!("sensors/dev-{i}"),
            &format!("more-{i}"),
            &[("message-expiry-interval", "60")],
        );
    }
    // The records it must have printed: the last five and at least the one that woke it.
    let wait_for = |follower: &Follower, n: usize| {
        let until = Instant::now() + DEADLINE;
        while follower
            .lines()
            .iter()
            .filter(|l| l.contains("more-"))
            .count()
            < n
        {
            assert!(
                Instant::now() < until,
                "--follow printed {:?}: {}",
                follower.lines(),
                follower.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for(&follower, 5);
    let mut follower = follower;
    follower.signal(libc::SIGINT);
    let status = follower.wait_exit();
    assert!(status.success(), "SIGINT ends --follow cleanly: {status}");
    let followed = follower.lines();
    assert!(
        followed.iter().all(|l| !l.contains("reading")),
        "--follow from the end printed records from before it started: {followed:?}"
    );

    // A follow that sees the edge go away fails saying so.
    let mut orphan = Follower::start(
        work.path(),
        "orphan",
        &["read", "--admin", &url, "--follow", "--json", "--from", "0"],
    );
    let until = Instant::now() + DEADLINE;
    while orphan.lines().len() < 7 + published + 5 {
        assert!(
            Instant::now() < until,
            "--from 0 printed {:?}",
            orphan.lines()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(node.stop().success());
    let status = orphan.wait_exit();
    assert!(!status.success(), "the edge went away: --follow must fail");
    assert!(orphan.stderr().contains("went away"), "{}", orphan.stderr());

    // Offline, after the stop: the same records, the same lines.
    let (status, offline, stderr) = node.cli(&["read", "--json"]);
    assert!(status.success(), "{stderr}");
    let offline: Vec<String> = offline.lines().map(str::to_string).collect();
    for line in &api_lines {
        assert!(
            offline.contains(line),
            "the API's line is not one of edge read's:\n{line}\noffline:\n{}",
            offline.join("\n")
        );
    }
    for line in &followed {
        assert!(offline.contains(line), "--follow printed {line}");
    }
    // --follow printed every record of the telemetry topic from the first it printed on,
    // partition by partition: nothing was skipped.
    for p in 0..2 {
        let printed: Vec<u64> = followed
            .iter()
            .filter(|l| l.contains(&format!("\"partition\":{p},")))
            .map(|l| offset(l))
            .collect();
        let Some(&from) = printed.first() else {
            continue;
        };
        let expected: Vec<u64> = offline
            .iter()
            .filter(|l| {
                l.contains("\"topic\":\"telemetry\"") && l.contains(&format!("\"partition\":{p},"))
            })
            .map(|l| offset(l))
            .filter(|o| *o >= from)
            .collect();
        assert_eq!(printed, expected, "partition {p}");
    }
    // The API read of the whole log after the stop reads the same as the stopped node's.
    let mut orphan_lines = orphan.lines();
    orphan_lines.truncate(offline.len());
    let mut sorted_orphan = orphan_lines.clone();
    sorted_orphan.sort();
    let mut sorted_offline = offline.clone();
    sorted_offline.sort();
    assert_eq!(
        sorted_orphan, sorted_offline,
        "--follow --from 0 read the whole log"
    );
    // Nothing answers now.
    let (status, _, stderr) = edge(
        &["read", "--admin", &url],
        &[("TRIBUTARY_ADMIN_TOKEN", TOKEN)],
    );
    assert!(!status.success());
    assert!(stderr.contains("does not answer"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn api_read_and_offline_read_print_identical_lines() {
    let mut node = Edge::start("[[routes]]\nmatch = \"a/#\"\ntopic = \"t\"\npartitions = 3\n");
    for i in 0..9 {
        publish(
            node.addr,
            &format!("a/{i}"),
            &format!("payload {i}"),
            &[
                ("payload-format-indicator", "1"),
                ("message-expiry-interval", &(100 + i).to_string()),
                ("response-topic", "reply/here"),
                ("correlation-data", "\u{e9}t\u{e9}"),
                ("user-property", "site=north"),
            ],
        );
    }
    let url = format!("http://{}", node.admin);
    let (status, online, stderr) = edge(&["read", "--admin", &url, "--json"], &[]);
    assert!(status.success(), "{stderr}");
    let (status, online_text, stderr) = edge(&["read", "--admin", &url], &[]);
    assert!(status.success(), "{stderr}");
    let (status, online_topics, _) = edge(&["topics", "--admin", &url, "--json"], &[]);
    assert!(status.success());
    assert!(node.stop().success());
    let (status, offline, stderr) = node.cli(&["read", "--json"]);
    assert!(status.success(), "{stderr}");
    let (status, offline_text, _) = node.cli(&["read"]);
    assert!(status.success());
    let (status, offline_topics, _) = node.cli(&["topics", "--json"]);
    assert!(status.success());
    assert_eq!(online.lines().count(), 9);
    assert_eq!(
        online, offline,
        "edge read --admin --json and edge read --json"
    );
    assert_eq!(online_text, offline_text, "edge read --admin and edge read");
    assert_eq!(
        online_topics, offline_topics,
        "edge topics --admin --json and offline"
    );
    assert!(online.contains("\"message_expiry\":108"), "{online}");
    assert!(online.contains("[[\"site\",\"north\"]]"), "{online}");
}
