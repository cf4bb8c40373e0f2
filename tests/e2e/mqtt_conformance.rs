//! The MQTT conformance suite (tests/conformance, pytest with paho-mqtt, raw sockets and
//! Mosquitto's command-line clients) against the release edge. Each of its tests starts its
//! own edge; this test builds the binary, runs the suite and passes if every test did.
//!
//! The suite itself is checked against Mosquitto with
//! `CONFORMANCE_BROKER=mosquitto python3 -m pytest tests/conformance`; this test passes
//! `CONFORMANCE_BROKER` through, so the same switch applies to it.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::process::Command;

use tributary_tests::{binary, python, workspace_root};

#[test]
fn mqtt_conformance_suite_passes() {
    let edge = binary("edge");
    let root = workspace_root();
    // stdout and stderr are inherited: pytest's progress and failures show as they come.
    let status = Command::new(python())
        .args([
            "-m",
            "pytest",
            "tests/conformance",
            "-q",
            "-p",
            "no:cacheprovider",
        ])
        .current_dir(&root)
        .env("EDGE_BIN", &edge)
        .status()
        .expect("running pytest (tests/run installs it)");
    assert!(
        status.success(),
        "the MQTT conformance suite failed ({status}); rerun one test with \
         EDGE_BIN={} {} -m pytest tests/conformance -k NAME",
        edge.display(),
        python()
    );
}
