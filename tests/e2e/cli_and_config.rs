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

    // The server holds the data directory: the offline CLI says so.
    let busy = Command::new(binary("edge"))
        .args(["topics", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("in use by another process"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );

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
