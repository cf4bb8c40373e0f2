//! firmware-sim is broker-agnostic: against Eclipse Mosquitto over TLS (a CA made here with
//! openssl), a fleet publishes QoS 1 and `verify --mqtt` subscribes over TLS and finds every
//! acknowledged message.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tributary_tests::{binary, free_port, run};

struct Mosquitto(Child);

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    run(Command::new("openssl").args(args).current_dir(dir))
        .expect("openssl (tests/run installs it)");
}

#[test]
fn fleet_over_tls_to_mosquitto_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=tributary-test-ca",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        d.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
    // Mosquitto started as root drops to its own user before it reads the key: let it read
    // these throwaway test files.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in ["ca.pem", "server.pem", "server.key"] {
        std::fs::set_permissions(d.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let port = free_port();
    std::fs::write(
        d.join("mosquitto.conf"),
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\ncafile {0}/ca.pem\ncertfile {0}/server.pem\nkeyfile {0}/server.key\npersistence false\n",
            d.display()
        ),
    )
    .unwrap();
    let _broker = Mosquitto(
        Command::new("mosquitto")
            .arg("-c")
            .arg(d.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("mosquitto.log")).unwrap())
            .spawn()
            .expect("mosquitto (tests/run installs it)"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "mosquitto did not listen:\n{}",
            std::fs::read_to_string(d.join("mosquitto.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let url = format!("mqtts://127.0.0.1:{port}");
    let ca = d.join("ca.pem");
    let manifest = d.join("manifest");
    let verify = Command::new(binary("firmware-sim"))
        .args([
            "verify",
            "--mqtt",
            &url,
            "--filter",
            "sensors/#",
            "--qos",
            "1",
            "--idle",
            "2s",
        ])
        .arg("--ca-file")
        .arg(&ca)
        .arg("--manifest")
        .arg(&manifest)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Give the subscriber time to subscribe before the fleet starts.
    std::thread::sleep(Duration::from_secs(1));
    let fleet = Command::new(binary("firmware-sim"))
        .args([
            "run",
            "--broker",
            &url,
            "--devices",
            "20",
            "--rate",
            "20",
            "--qos",
            "1",
            "--duration",
            "3s",
        ])
        .arg("--ca-file")
        .arg(&ca)
        .arg("--manifest")
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(
        fleet.status.success(),
        "run over TLS failed: {}",
        String::from_utf8_lossy(&fleet.stderr)
    );
    let out = verify.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(
        out.status.success(),
        "verify failed: {summary}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        summary.contains(" lost=0 ") && summary.contains(" duplicates=0 "),
        "{summary}"
    );
    let expected: u64 = summary
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("expected="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        expected > 600,
        "at least half of 20 devices x 20/s x 3 s were acknowledged: {summary}"
    );
}
