//! The example configs shipped in edge/config-examples load and run. Each is installed in a
//! scratch directory the way its header says (its `/etc/tributary` and `/var/lib/tributary`
//! paths moved there, its listeners on free 127.0.0.1 ports), with the files it names made
//! there: certificates, a password file written by `edge passwd`, secrets, the example ACL.
//! `edge check-config` accepts each one; then each runs, and a device publishes through it:
//! to the plant gateway over mutual TLS with a certificate from the device CA (its CN is its
//! user name for the ACL), to the vehicle edge with a password.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tributary_tests::pki::Ca;
use tributary_tests::{binary, free_port, http_get, Edge};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../edge/config-examples")
}

/// An example installed in a scratch directory: `edge.toml` (the example, its data
/// directory `data/`) and `etc/` (the files it names).
struct Installed {
    dir: tempfile::TempDir,
    etc: PathBuf,
    mqtt: u16,
    tls: u16,
    admin: u16,
}

impl Installed {
    fn config(&self) -> PathBuf {
        self.dir.path().join("edge.toml")
    }

    /// Runs the installed edge.
    fn run(self) -> Edge {
        Edge::start_in(
            self.dir,
            format!("127.0.0.1:{}", self.mqtt).parse().unwrap(),
            format!("127.0.0.1:{}", self.admin).parse().unwrap(),
        )
    }
}

/// Copies `name` with its paths and addresses moved into a scratch directory, and makes
/// every file it names.
fn install(name: &str) -> Installed {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    let data = dir.path().join("data");
    std::fs::create_dir_all(etc.join("certs")).unwrap();
    std::fs::create_dir_all(etc.join("secrets")).unwrap();
    let (mqtt, tls, admin) = (free_port(), free_port(), free_port());
    let text = std::fs::read_to_string(examples_dir().join(name)).unwrap();
    let text = text
        .replace("/etc/tributary", etc.to_str().unwrap())
        .replace("/var/lib/tributary", data.to_str().unwrap())
        .replace("0.0.0.0:1883", &format!("127.0.0.1:{mqtt}"))
        .replace("192.168.7.1:1883", &format!("127.0.0.1:{mqtt}"))
        .replace("0.0.0.0:8883", &format!("127.0.0.1:{tls}"))
        .replace("0.0.0.0:8080", &format!("127.0.0.1:{admin}"));
    let config = dir.path().join("edge.toml");
    std::fs::write(&config, &text).unwrap();
    if !text.contains("[admin]") {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&config)
            .unwrap();
        writeln!(f, "\n[admin]\nlisten = \"127.0.0.1:{admin}\"").unwrap();
    }

    // Certificates: the edge's own (from the plant CA), the device CA and a device, the
    // CA of the Kafka brokers, and the vehicle's client certificate for Kafka.
    let plant_ca = Ca::new("plant CA");
    let device_ca = Ca::new("plant device CA");
    let kafka_ca = Ca::new("cloud Kafka CA");
    std::fs::write(etc.join("certs/plant-ca.pem"), plant_ca.pem()).unwrap();
    std::fs::write(etc.join("certs/device-ca.pem"), device_ca.pem()).unwrap();
    std::fs::write(etc.join("certs/kafka-ca.pem"), kafka_ca.pem()).unwrap();
    for (ca, cn, file, sans) in [
        (
            &plant_ca,
            "edge-plant-7",
            "edge",
            &["127.0.0.1", "localhost"][..],
        ),
        (&device_ca, "press-4", "press-4", &[][..]),
        (&kafka_ca, "truck-0042", "truck-0042", &[][..]),
    ] {
        let (cert, key, _) = ca.issue(cn, sans, false);
        std::fs::write(etc.join(format!("certs/{file}.pem")), cert).unwrap();
        std::fs::write(etc.join(format!("certs/{file}.key")), key).unwrap();
    }
    std::fs::write(etc.join("secrets/kafka-password"), "not-a-real-password\n").unwrap();
    std::fs::write(
        etc.join("secrets/admin-token"),
        "a-long-admin-token-for-the-plant\n",
    )
    .unwrap();
    std::fs::copy(examples_dir().join("acl.conf"), etc.join("acl.conf")).unwrap();
    for (user, password) in [("historian", "hist-pw-1"), ("can-logger", "can-pw-2")] {
        let mut child = Command::new(binary("edge"))
            .arg("passwd")
            .arg(etc.join("passwd"))
            .arg(user)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "edge passwd: {out:?}");
    }
    Installed {
        dir,
        etc,
        mqtt,
        tls,
        admin,
    }
}

fn check_config(installed: &Installed) -> String {
    let out = Command::new(binary("edge"))
        .arg("check-config")
        .arg(installed.config())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "edge check-config {}: {}",
        installed.config().display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every example in the directory is one this test knows how to install and run.
#[test]
fn every_example_is_tested() {
    let mut names: Vec<String> = std::fs::read_dir(examples_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    assert_eq!(names, ["plant-gateway.toml", "vehicle.toml"]);
}

#[test]
fn plant_gateway_runs_with_mutual_tls_passwords_and_acls() {
    let installed = install("plant-gateway.toml");
    let effective = check_config(&installed);
    for line in [
        "identity = \"cn\"",
        "disk_full_policy = \"drop-oldest\"",
        "security_protocol = \"sasl_ssl\"",
    ] {
        assert!(
            effective.lines().any(|l| l == line),
            "{line} in\n{effective}"
        );
    }

    let certs = installed.etc.join("certs");
    let (tls_port, mqtt_port) = (installed.tls, installed.mqtt);
    let mut edge = installed.run();
    let token = "a-long-admin-token-for-the-plant";
    // The admin endpoint starts after the MQTT listeners: wait for it to say ready.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !matches!(http_get(edge.admin, "/ready", Some(token)), Ok((200, _))) {
        assert!(
            std::time::Instant::now() < deadline,
            "not ready:\n{}",
            edge.stderr()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        http_get(edge.admin, "/metrics", None).unwrap().0,
        401,
        "the admin endpoint wants its token"
    );

    // press-4 publishes over mutual TLS as itself: allowed under devices/press-4/.
    let publish = |topic: &str, payload: &str| {
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &tls_port.to_string()])
            .args(["-V", "mqttv5", "-q", "1", "-i", "press-4"])
            .arg("--cafile")
            .arg(certs.join("plant-ca.pem"))
            .arg("--cert")
            .arg(certs.join("press-4.pem"))
            .arg("--key")
            .arg(certs.join("press-4.key"))
            .args(["-t", topic, "-m", payload])
            .output()
            .expect("mosquitto_pub (Debian package mosquitto-clients)")
    };
    let out = publish("devices/press-4/temp", "71.5");
    assert!(out.status.success(), "{out:?}");
    // The historian logs in with its password on the plain port.
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string()])
        .args(["-V", "mqttv311", "-q", "1", "-i", "historian-1"])
        .args(["-u", "historian", "-P", "hist-pw-1"])
        .args(["-t", "commands/press-4/setpoint", "-m", "70"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string()])
        .args(["-V", "mqttv311", "-q", "1", "-i", "intruder"])
        .args(["-t", "devices/press-4/temp", "-m", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "anonymous clients are refused");

    assert!(edge.stop().success(), "{}", edge.stderr());
    let (status, log, stderr) = edge.cli(&["read", "--json", "--topic", "telemetry"]);
    assert!(status.success(), "{stderr}");
    assert!(log.contains("71.5") && log.contains("press-4"), "{log}");
    let (_, events, _) = edge.cli(&["read", "--json", "--topic", "plant-events"]);
    assert!(events.contains("commands/press-4/setpoint"), "{events}");
}

#[test]
fn vehicle_edge_runs_with_passwords() {
    let installed = install("vehicle.toml");
    let effective = check_config(&installed);
    assert!(
        effective.lines().any(|l| l == "fsync = \"interval:50\""),
        "{effective}"
    );
    let mqtt_port = installed.mqtt;
    let mut edge = installed.run();
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string()])
        .args(["-V", "mqttv5", "-q", "1", "-i", "ecu-1"])
        .args(["-u", "can-logger", "-P", "can-pw-2"])
        .args(["-t", "can/ecu-1/rpm", "-m", "2150"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string()])
        .args(["-V", "mqttv5", "-q", "1", "-i", "ecu-2"])
        .args(["-u", "can-logger", "-P", "wrong"])
        .args(["-t", "can/ecu-2/rpm", "-m", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a wrong password is refused");
    assert!(edge.stop().success(), "{}", edge.stderr());
    let (_, log, _) = edge.cli(&["read", "--json", "--topic", "can"]);
    assert!(log.contains("2150") && !log.contains("ecu-2"), "{log}");
}
