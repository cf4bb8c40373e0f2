//! A power cut keeps what was fsynced and loses the rest, data and names alike.
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a failed unwrap is the report
#![allow(unsafe_code)] // signals to the test's own children; SAFETY at each site

mod common;

use common::{fsync_dir, write_file, Mounted};
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;

#[test]
fn fsynced_file_keeps_its_content_after_power_cut() {
    let mut m = Mounted::journaled();
    write_file(&m.path("synced"), b"durable bytes", true);
    m.fs.power_cut().expect("power cut");
    assert_eq!(fs::read(m.path("synced")).expect("read"), b"durable bytes");
}

#[test]
fn unsynced_writes_are_lost_and_size_reverts() {
    let mut m = Mounted::journaled();
    let path = m.path("file");
    write_file(&path, &[b'a'; 10_000], true);

    let file = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    file.write_all_at(b"overwritten", 100).expect("overwrite");
    file.write_all_at(&[b'b'; 5000], 10_000).expect("append");
    drop(file);
    // Readers see the unsynced data before the cut; the backing file does not hold it.
    let seen = fs::read(&path).expect("read");
    assert_eq!(seen.len(), 15_000);
    assert_eq!(&seen[100..111], b"overwritten");
    assert_eq!(fs::metadata(&path).expect("stat").len(), 15_000);
    assert_eq!(
        fs::read(m.backing("file")).expect("read backing"),
        vec![b'a'; 10_000]
    );

    m.fs.power_cut().expect("power cut");
    assert_eq!(fs::read(&path).expect("read"), vec![b'a'; 10_000]);
    assert_eq!(fs::metadata(&path).expect("stat").len(), 10_000);
}

#[test]
fn unsynced_truncation_is_undone() {
    let mut m = Mounted::journaled();
    let path = m.path("file");
    write_file(&path, b"0123456789", true);
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(3)
        .expect("truncate");
    assert_eq!(fs::read(&path).expect("read"), b"012");
    m.fs.power_cut().expect("power cut");
    assert_eq!(fs::read(&path).expect("read"), b"0123456789");
}

#[test]
fn file_never_fsynced_is_gone_after_power_cut() {
    let mut m = Mounted::journaled();
    write_file(&m.path("volatile"), b"lost", false);
    assert!(m.path("volatile").exists());
    m.fs.power_cut().expect("power cut");
    assert!(!m.path("volatile").exists());
}

#[test]
fn created_file_fsynced_with_its_directory_survives_in_strict_mode() {
    let mut m = Mounted::strict();
    fs::create_dir(m.path("dir")).expect("mkdir");
    fsync_dir(m.fs.mountpoint());
    write_file(&m.path("dir/file"), b"content", true);
    fsync_dir(&m.path("dir"));
    m.fs.power_cut().expect("power cut");
    assert_eq!(fs::read(m.path("dir/file")).expect("read"), b"content");
}

#[test]
fn created_file_fsynced_without_its_directory_is_lost_in_strict_mode() {
    let mut m = Mounted::strict();
    write_file(&m.path("file"), b"content", true);
    m.fs.power_cut().expect("power cut");
    assert!(
        !m.path("file").exists(),
        "strict mode needs an fsync of the directory"
    );
}

#[test]
fn created_file_fsynced_keeps_its_name_in_journaled_mode() {
    let mut m = Mounted::journaled();
    fs::create_dir(m.path("dir")).expect("mkdir");
    write_file(&m.path("dir/file"), b"content", true);
    m.fs.power_cut().expect("power cut");
    assert_eq!(fs::read(m.path("dir/file")).expect("read"), b"content");
}

#[test]
fn unsynced_rename_is_undone() {
    let mut m = Mounted::journaled();
    write_file(&m.path("old"), b"old content", true);
    write_file(&m.path("target"), b"target content", true);
    fsync_dir(m.fs.mountpoint());

    fs::rename(m.path("old"), m.path("target")).expect("rename");
    assert!(!m.path("old").exists());
    assert_eq!(fs::read(m.path("target")).expect("read"), b"old content");

    m.fs.power_cut().expect("power cut");
    assert_eq!(fs::read(m.path("old")).expect("read"), b"old content");
    assert_eq!(fs::read(m.path("target")).expect("read"), b"target content");
}

#[test]
fn rename_followed_by_directory_fsync_survives() {
    let mut m = Mounted::strict();
    write_file(&m.path("tmp"), b"new version", true);
    fsync_dir(m.fs.mountpoint());
    fs::rename(m.path("tmp"), m.path("current")).expect("rename");
    fsync_dir(m.fs.mountpoint());
    m.fs.power_cut().expect("power cut");
    assert!(!m.path("tmp").exists());
    assert_eq!(fs::read(m.path("current")).expect("read"), b"new version");
}

#[test]
fn unsynced_unlink_and_rmdir_are_undone() {
    let mut m = Mounted::journaled();
    fs::create_dir(m.path("dir")).expect("mkdir");
    write_file(&m.path("dir/file"), b"kept", true);
    fs::create_dir(m.path("empty")).expect("mkdir");
    fsync_dir(m.fs.mountpoint());

    fs::remove_file(m.path("dir/file")).expect("unlink");
    fs::remove_dir(m.path("empty")).expect("rmdir");
    let listed: Vec<_> = fs::read_dir(m.fs.mountpoint())
        .expect("readdir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(listed, vec!["dir"], "the stash stays hidden");

    m.fs.power_cut().expect("power cut");
    assert_eq!(fs::read(m.path("dir/file")).expect("read"), b"kept");
    assert!(m.path("empty").is_dir());
}

#[test]
fn power_cut_refuses_while_a_file_is_open() {
    let mut m = Mounted::journaled();
    let mut file = fs::File::create(m.path("open")).expect("create");
    file.write_all(b"x").expect("write");
    let err =
        m.fs.power_cut()
            .expect_err("an open file keeps the mount busy");
    assert!(err.to_string().contains("still uses it"), "{err}");
    drop(file);
    m.fs.power_cut().expect("power cut once closed");
    assert!(!m.path("open").exists());
}

#[test]
fn mmap_reader_sees_pending_data_and_then_the_durable_data_after_power_cut() {
    // fjall reads with pread today; a reader that maps the file must work all the same.
    fn mapped(path: &std::path::Path, len: usize) -> Vec<u8> {
        use std::os::fd::AsRawFd;
        let file = fs::File::open(path).expect("open");
        // SAFETY: a private read-only mapping of `len` bytes of an open file, copied out
        // and unmapped before the file is closed.
        unsafe {
            let at = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(
                at,
                libc::MAP_FAILED,
                "mmap: {}",
                std::io::Error::last_os_error()
            );
            let copy = std::slice::from_raw_parts(at.cast::<u8>(), len).to_vec();
            libc::munmap(at, len);
            copy
        }
    }
    let mut m = Mounted::journaled();
    let path = m.path("file");
    write_file(&path, b"durable!", true);
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .write_all_at(b"PENDING!", 0)
        .expect("write");
    assert_eq!(mapped(&path, 8), b"PENDING!");
    m.fs.power_cut().expect("power cut");
    assert_eq!(mapped(&path, 8), b"durable!");
}

#[test]
fn power_cut_waits_for_a_process_on_the_mount_to_be_killed() {
    // The intended use: a process works on the mount, the test kills it with SIGKILL,
    // waits for it, and cuts the power.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut m = Mounted::journaled();
    let mut writer = Killed(
        std::process::Command::new("sh")
            .arg("-c")
            .arg(r#"exec 3>"$0/held"; printf unsynced >&3; printf ready; exec sleep 600"#)
            .arg(m.fs.mountpoint())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start a writer"),
    );
    let mut ready = [0u8; 5];
    std::io::Read::read_exact(writer.0.stdout.as_mut().expect("stdout"), &mut ready)
        .expect("the writer says it is ready");
    assert_eq!(fs::read(m.path("held")).expect("read"), b"unsynced");

    let err =
        m.fs.power_cut()
            .expect_err("the writer still holds the mount");
    assert!(err.to_string().contains("still uses it"), "{err}");

    writer.0.kill().expect("kill -9 the writer");
    writer.0.wait().expect("wait for the writer");
    m.fs.power_cut().expect("power cut");
    assert!(!m.path("held").exists());
}
