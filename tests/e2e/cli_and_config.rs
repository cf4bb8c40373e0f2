//! The binary as an operator meets it: flags, config errors, and the offline CLI.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::process::Command;

use tributary_tests::{binary, free_port, ConnectOpts, Edge, Got, Proto, RawClient};

fn edge_with_config(text: &str) -> (std::process::Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(binary("edge"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    (out, dir)
}

#[test]
fn unknown_config_key_is_named_with_file_and_line() {
    let (out, _dir) =
        edge_with_config("[mqtt]\nlisten = \"127.0.0.1:1\"\n\n[storage]\nfsink = \"always\"\n");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("edge.toml:5"), "{err}");
    assert!(err.contains("fsink"), "{err}");
}

#[test]
fn bad_route_template_is_explained() {
    let (out, _dir) = edge_with_config(
        "[[routes]]\nmatch = \"sensors/+\"\ntopic = \"telemetry\"\nkey = \"{9}\"\n",
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "edge.toml:4: routes[0].key \"{9}\": the filter \"sensors/+\" has only 2 levels"
        ),
        "{err}"
    );
}

#[test]
fn busy_port_is_a_clear_error() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary("edge"))
        .args(["--mqtt-listen", &addr.to_string(), "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("cannot listen for MQTT on {addr}"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_override_embedded_defaults_and_offline_cli_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Command::new(binary("edge"))
        .args(["--mqtt-listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = loop {
        if let Ok((c, Got::ConnAck { code: 0, .. })) =
            RawClient::connect(addr, Proto::V5, &ConnectOpts::new("cli")).await
        {
            break c;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    for i in 1..=30u16 {
        c.publish(
            &format!("site/dev-{}/t", i % 3),
            1,
            i,
            format!("rec-{i}").as_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(c.recv().await.unwrap(), Got::PubAck(i, 0));
    }

    // The server holds the data directory: the offline CLI says so, and how to read it.
    for cmd in ["topics", "read"] {
        let busy = Command::new(binary("edge"))
            .args([cmd, "--data-dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(!busy.status.success());
        let stderr = String::from_utf8_lossy(&busy.stderr);
        assert!(
            stderr.contains("in use by another process") && stderr.contains("--admin http://"),
            "{stderr}"
        );
    }

    assert!(tributary_tests::signal(child.id(), libc::SIGTERM));
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("anonymous access is allowed"),
        "the default warns about anonymous access:\n{stderr}"
    );

    let cli = |args: &[&str]| {
        let out = Command::new(binary("edge"))
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, _) = cli(&["topics", "--json"]);
    assert!(ok);
    let topics: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        topics,
        serde_json::json!([{"topic": "mqtt", "partitions": [{"partition": 0, "start_offset": 0, "end_offset": 30, "bytes": topics[0]["partitions"][0]["bytes"], "removed_records": 0}]}])
    );
    let (ok, stdout, _) = cli(&[
        "read",
        "--topic",
        "mqtt",
        "--partition",
        "0",
        "--from",
        "10",
        "--limit",
        "5",
        "--json",
    ]);
    assert!(ok);
    let offsets: Vec<u64> = stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["offset"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(offsets, vec![10, 11, 12, 13, 14]);
    let (ok, stdout, _) = cli(&["read", "--limit", "1"]);
    assert!(ok);
    assert!(
        stdout.starts_with("mqtt/0@0 ") && stdout.contains("payload(utf8)=\"rec-1\""),
        "{stdout}"
    );
    let (ok, _, stderr) = cli(&["read", "--topic", "nope"]);
    assert!(!ok && stderr.contains("no topic \"nope\""), "{stderr}");
    let (ok, _, stderr) = cli(&["read", "--topic", "mqtt", "--partition", "3"]);
    assert!(!ok && stderr.contains("no partition 3"), "{stderr}");
}

#[test]
fn a_log_written_by_one_config_is_readable_after_adding_partitions() {
    let mut edge = Edge::start("[[routes]]\nmatch = \"a/#\"\ntopic = \"t\"\npartitions = 2\n");
    assert!(edge.stop().success());
    let config = std::fs::read_to_string(edge.config_path())
        .unwrap()
        .replace("partitions = 2", "partitions = 1");
    std::fs::write(edge.config_path(), config).unwrap();
    let out = Command::new(binary("edge"))
        .arg("--config")
        .arg(edge.config_path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("has 2 partitions on disk but the config gives 1"));
}

#[test]
fn offline_commands_refuse_a_directory_without_a_log_and_leave_it_untouched() {
    let dir = tempfile::tempdir().unwrap();
    for cmd in ["read", "topics"] {
        let out = Command::new(binary("edge"))
            .args([cmd, "--data-dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no log in"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing was created"
    );
}

#[test]
fn check_config_prints_effective_settings_with_secrets_redacted_and_names_bad_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plant.toml");
    std::fs::write(
        &file,
        "[mqtt]\nlisten = \"127.0.0.1:1883\"\nmax_queued_messages = 500\n\
         [storage]\ndata_dir = \"/var/lib/tributary\"\nfsync = \"interval:10\"\ndisk_budget = \"10GiB\"\n\
         [[routes]]\nmatch = \"sensors/+/#\"\ntopic = \"telemetry\"\nkey = \"{1}\"\npartitions = 4\n\
         [cloud]\nbootstrap = \"kafka-1:9092\"\nsite = \"plant-7\"\nsecurity_protocol = \"sasl_ssl\"\n\
         sasl_mechanism = \"PLAIN\"\nusername = \"edge\"\npassword = \"kafka-s3cret\"\n\
         [admin]\ntoken = \"admin-s3cret-0123456789\"\n",
    )
    .unwrap();
    let check = |path: &std::path::Path| {
        Command::new(binary("edge"))
            .arg("check-config")
            .arg(path)
            .output()
            .unwrap()
    };
    let out = check(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effective = String::from_utf8(out.stdout).unwrap();
    // What the file sets, and the defaults it does not.
    for line in [
        "max_queued_messages = 500",
        "fsync = \"interval:10\"",
        "disk_budget = \"10GiB\"",
        "max_inflight_messages = 1024",
        "sys_interval = \"5s\"",
        "compression = \"lz4\"",
        "password = \"<redacted>\"",
        "token = \"<redacted>\"",
    ] {
        assert!(
            effective.lines().any(|l| l == line),
            "{line} in\n{effective}"
        );
    }
    assert!(
        !effective.contains("s3cret"),
        "secrets are not printed:\n{effective}"
    );
    // The output, secrets put back, is itself a valid config that says the same.
    let again = dir.path().join("effective.toml");
    let restored = effective
        .replace("password = \"<redacted>\"", "password = \"kafka-s3cret\"")
        .replace(
            "token = \"<redacted>\"",
            "token = \"admin-s3cret-0123456789\"",
        );
    std::fs::write(&again, restored).unwrap();
    let out = check(&again);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), effective);

    // A bad value: exit 2, with the file, the line and the key.
    std::fs::write(
        &file,
        "[mqtt]\nlisten = \"127.0.0.1:1883\"\nmax_queued_messages = 0\n",
    )
    .unwrap();
    let out = check(&file);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:3: mqtt.max_queued_messages", file.display())),
        "{stderr}"
    );
}

/// A container sets everything from the environment: every command-line option has a
/// `TRIBUTARY_*` variable (the option wins over it), durations combine units as `"1h30m"`,
/// and `check-config` takes `--config` (or `TRIBUTARY_CONFIG`) like every other command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_come_from_the_environment_and_durations_combine_units() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        "[storage]\nretention_check_interval = \"1h30m\"\n\n[topics.telemetry]\nretention = \"1d 12h\"\n\n\
         [[routes]]\nmatch = \"sensors/#\"\ntopic = \"telemetry\"\n",
    )
    .unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let env = [
        ("TRIBUTARY_CONFIG", config.display().to_string()),
        ("TRIBUTARY_DATA_DIR", data.display().to_string()),
        ("TRIBUTARY_MQTT_LISTEN", format!("127.0.0.1:{port}")),
        ("TRIBUTARY_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}")),
        ("TRIBUTARY_LOG_FORMAT", "json".to_string()),
    ];

    // check-config reads the file from the environment and prints the effective settings,
    // durations in their shortest exact form.
    let out = Command::new(binary("edge"))
        .arg("check-config")
        .envs(env.clone())
        .output()
        .unwrap();
    let effective = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "retention_check_interval = \"1h30m\"".to_string(),
        "retention = \"1d12h\"".to_string(),
        format!("data_dir = \"{}\"", data.display()),
        format!("listen = \"127.0.0.1:{port}\""),
    ] {
        assert!(
            effective.lines().any(|l| l == line),
            "{line} in\n{effective}"
        );
    }
    // An option wins over its variable.
    let out = Command::new(binary("edge"))
        .args(["check-config", "--data-dir", "/srv/other"])
        .envs(env.clone())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l == "data_dir = \"/srv/other\""));
    // Without a file anywhere, check-config says how to give one.
    let out = Command::new(binary("edge"))
        .arg("check-config")
        .env_remove("TRIBUTARY_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--config FILE"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A duration with a unit missing is refused, naming the file and line.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[storage]\nretention_check_interval = \"1h30\"\n").unwrap();
    let out = Command::new(binary("edge"))
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("bad.toml:2") && stderr.contains("is not a duration"),
        "{stderr}"
    );

    // The server itself: listener, admin and data directory from the environment.
    let child = Command::new(binary("edge"))
        .envs(env.clone())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut c = loop {
        if let Ok((c, Got::ConnAck { code: 0, .. })) =
            RawClient::connect(addr, Proto::V5, &ConnectOpts::new("env")).await
        {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the edge never listened on TRIBUTARY_MQTT_LISTEN"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    c.publish("sensors/env", 1, 1, b"from-env").await.unwrap();
    assert_eq!(c.recv().await.unwrap(), Got::PubAck(1, 0));
    let admin = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let (status, _) = tributary_tests::http_get(admin, "/ready", None).unwrap();
    assert_eq!(status, 200);
    assert!(tributary_tests::signal(child.id(), libc::SIGTERM));
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().any(|l| l.starts_with('{')),
        "TRIBUTARY_LOG_FORMAT=json gives JSON logs:\n{stderr}"
    );
    // The offline reader finds the record through the same variables.
    let out = Command::new(binary("edge"))
        .args(["read", "--json"])
        .envs(env)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("from-env"));

    // The help names the variables and has examples.
    let help = Command::new(binary("edge")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for wanted in ["TRIBUTARY_DATA_DIR", "Examples:", "check-config --config"] {
        assert!(help.contains(wanted), "{wanted} in\n{help}");
    }
}
