//! The edge built without its `kafka` feature (`--no-default-features`): no librdkafka and no
//! other C library in its build, a config with `[cloud]` refused with a clear error, and MQTT
//! in and the log out as in the default build.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tributary_tests::{cargo, free_port, target_dir, ConnectOpts, Got, Proto, RawClient};

/// The packages of the edge's build (normal and build dependencies) with `features`.
fn build_packages(features: &[&str]) -> BTreeSet<String> {
    let mut args = vec![
        "tree",
        "-p",
        "edge",
        "-e",
        "normal,build",
        "--prefix",
        "none",
        "--format",
        "{p}",
    ];
    args.extend_from_slice(features);
    let out = cargo(&args).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Crates that build C code or link a system C library, as the Kafka client does.
const C_BUILDS: [&str; 8] = [
    "rdkafka",
    "rdkafka-sys",
    "openssl-sys",
    "libz-sys",
    "zstd-sys",
    "cmake",
    "pkg-config",
    "curl-sys",
];

#[test]
fn without_kafka_the_build_has_no_kafka_client_and_no_c_library() {
    let default = build_packages(&[]);
    assert!(
        default.contains("rdkafka-sys"),
        "the default build mirrors to Kafka: {default:?}"
    );
    let without = build_packages(&["--no-default-features"]);
    let c: Vec<&&str> = C_BUILDS.iter().filter(|p| without.contains(**p)).collect();
    assert!(c.is_empty(), "built without kafka, yet it has {c:?}");
    // The one crate left that runs the C compiler (the one Rust links with) is ring, for its
    // own C and assembly; nothing needs make, cmake, pkg-config or a -dev package.
    let out = cargo(&[
        "tree",
        "-p",
        "edge",
        "--no-default-features",
        "-e",
        "normal,build",
        "-i",
        "cc",
        "--depth",
        "1",
        "--prefix",
        "none",
        "--format",
        "{p}",
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let users: BTreeSet<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|p| p != "cc")
        .collect();
    assert_eq!(users, BTreeSet::from(["ring".to_string()]));
}

/// Builds the edge without `kafka`, in a target directory of its own so that the default
/// release build the other tests run stays as it is; returns the binary.
fn edge_without_kafka() -> PathBuf {
    let dir = target_dir().join("without-kafka");
    let status = cargo(&[
        "build",
        "-p",
        "edge",
        "--bin",
        "edge",
        "--no-default-features",
    ])
    .env("CARGO_TARGET_DIR", &dir)
    // Debug info is of no use here and only slows the link.
    .env("CARGO_PROFILE_DEV_DEBUG", "false")
    .status()
    .unwrap();
    assert!(status.success(), "building the edge without kafka failed");
    dir.join("debug").join("edge")
}

const REFUSAL: &str = "built without Kafka";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_kafka_the_edge_refuses_a_cloud_section_and_serves_mqtt() {
    let edge = edge_without_kafka();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();

    // A config with [cloud]: check-config and a start both refuse it, naming the section.
    let cloud = dir.path().join("cloud.toml");
    std::fs::write(
        &cloud,
        format!(
            "[mqtt]\nlisten = \"127.0.0.1:{port}\"\n\n[storage]\ndata_dir = \"{}\"\n\n\
             [cloud]\nbootstrap = \"127.0.0.1:9092\"\nsite = \"plant-7\"\n",
            data.display()
        ),
    )
    .unwrap();
    for args in [&["check-config", "--config"][..], &["--config"][..]] {
        let out = Command::new(&edge).args(args).arg(&cloud).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted [cloud]: {stderr}");
        assert!(
            stderr.contains(REFUSAL) && stderr.contains("cloud"),
            "{args:?}: {stderr}"
        );
        assert!(
            stderr.contains("cloud.toml:7"),
            "{args:?}: the error names the file and the line of [cloud]: {stderr}"
        );
    }
    assert!(!data.exists(), "a refused config left a data directory");

    // Without [cloud] it is the same edge: QoS 1 in, acknowledged, read back offline.
    let child = Command::new(&edge)
        .args(["--mqtt-listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(&data)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let guard = KillOnDrop(child.id());
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut c = loop {
        if let Ok((c, Got::ConnAck { code: 0, .. })) =
            RawClient::connect(addr, Proto::V5, &ConnectOpts::new("no-kafka")).await
        {
            break c;
        }
        assert!(Instant::now() < deadline, "the edge never accepted MQTT");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for i in 1..=20u16 {
        c.publish("plant/line-1/temp", 1, i, format!("t-{i}").as_bytes())
            .await
            .unwrap();
        assert_eq!(c.recv().await.unwrap(), Got::PubAck(i, 0));
    }
    drop(c);
    assert!(tributary_tests::signal(child.id(), libc::SIGTERM));
    let out = child.wait_with_output().unwrap();
    std::mem::forget(guard);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains(REFUSAL), "{stderr}");

    let read = Command::new(&edge)
        .args(["read", "--json", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(read.status.success(), "{read:?}");
    let payloads: Vec<String> = String::from_utf8(read.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["payload"].as_str().unwrap().to_string()
        })
        .collect();
    let expected: Vec<String> = (1..=20).map(|i| format!("t-{i}")).collect();
    assert_eq!(payloads, expected);
}

/// Kills the process when a failed assertion unwinds past it.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        tributary_tests::signal(self.0, libc::SIGKILL);
    }
}
