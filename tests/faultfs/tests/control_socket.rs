//! The `faultfs` binary, driven through its control socket as another process would.
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a failed unwrap is the report
#![allow(unsafe_code)] // signals to the test's own children; SAFETY at each site

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The running binary; killed by its pid and its mount detached if the test fails.
struct Daemon {
    child: Child,
    mountpoint: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let path = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes())
                .expect("mount point path");
            // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ask(control: &mut (UnixStream, BufReader<UnixStream>), command: &str) -> String {
    writeln!(control.0, "{command}").expect("send command");
    let mut answer = String::new();
    control.1.read_line(&mut answer).expect("read answer");
    answer.trim_end().to_string()
}

fn connect(socket: &Path) -> (UnixStream, BufReader<UnixStream>) {
    let stream = UnixStream::connect(socket).expect("connect to the control socket");
    let reader = BufReader::new(stream.try_clone().expect("clone stream"));
    (stream, reader)
}

#[test]
fn binary_cuts_power_and_injects_faults_on_command() {
    let dir = tempfile::tempdir().expect("scratch directory");
    let (backing, mountpoint) = (dir.path().join("backing"), dir.path().join("mnt"));
    std::fs::create_dir(&backing).expect("backing");
    std::fs::create_dir(&mountpoint).expect("mount point");
    let socket = dir.path().join("control.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_faultfs"))
        .arg(&backing)
        .arg(&mountpoint)
        .arg("--control")
        .arg(&socket)
        .spawn()
        .expect("start faultfs");
    let mut daemon = Daemon {
        child,
        mountpoint: mountpoint.clone(),
    };
    wait_for("the control socket", || {
        if let Ok(Some(status)) = daemon.child.try_wait() {
            panic!("faultfs exited with {status} (FUSE needs /dev/fuse and root)");
        }
        UnixStream::connect(&socket).is_ok()
    });
    let mut control = connect(&socket);

    std::fs::write(mountpoint.join("unsynced"), b"lost").expect("write");
    assert_eq!(ask(&mut control, "power-cut"), "ok");
    assert!(!mountpoint.join("unsynced").exists());

    assert_eq!(ask(&mut control, "fail-fsync on"), "ok");
    let file = std::fs::File::create(mountpoint.join("file")).expect("create");
    let err = file.sync_all().expect_err("fsync fails");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert_eq!(ask(&mut control, "fail-fsync off"), "ok");
    drop(file);

    assert_eq!(ask(&mut control, "space-budget 4096"), "ok");
    let err = std::fs::write(mountpoint.join("big"), [0u8; 8192]).expect_err("ENOSPC");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    assert!(ask(&mut control, "space-used").starts_with("ok "));
    assert!(ask(&mut control, "nonsense").starts_with("error: "));

    assert_eq!(ask(&mut control, "unmount"), "ok");
    let status = daemon.child.wait().expect("wait for faultfs");
    assert!(status.success(), "faultfs exited with {status}");
}
