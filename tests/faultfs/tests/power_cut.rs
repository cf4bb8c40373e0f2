//! A power cut keeps what was fsynced and loses the rest, data and names alike.

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
