//! Injected faults: EIO from fsync and write, ENOSPC past the budget, slow fsync.
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a failed unwrap is the report

mod common;

use common::{write_file, Mounted};
use std::fs;
use std::io::{ErrorKind, Write};
use std::time::Duration;

#[test]
fn fsync_fails_with_eio_while_set_and_persists_after() {
    let mut m = Mounted::journaled();
    let mut file = fs::File::create(m.path("file")).expect("create");
    file.write_all(b"data").expect("write");

    m.fs.fail_fsync(true);
    let err = file.sync_all().expect_err("fsync must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(
        fs::read(m.backing("file")).expect("read backing"),
        b"",
        "nothing persisted"
    );

    m.fs.fail_fsync(false);
    file.sync_all().expect("fsync after the fault is lifted");
    drop(file);
    m.fs.power_cut().expect("power cut");
    assert_eq!(fs::read(m.path("file")).expect("read"), b"data");
}

#[test]
fn directory_fsync_fails_with_eio_while_set() {
    let m = Mounted::strict();
    m.fs.fail_fsync(true);
    let err = fs::File::open(m.fs.mountpoint())
        .and_then(|dir| dir.sync_all())
        .expect_err("directory fsync must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
}

#[test]
fn writes_fail_with_eio_while_set() {
    let m = Mounted::journaled();
    let mut file = fs::File::create(m.path("file")).expect("create");
    m.fs.fail_writes(true);
    let err = file.write_all(b"data").expect_err("write must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    m.fs.fail_writes(false);
    file.write_all(b"data")
        .expect("write after the fault is lifted");
}

#[test]
fn writes_past_the_space_budget_fail_with_enospc() {
    let m = Mounted::journaled();
    m.fs.set_space_budget(Some(64 * 1024));
    let mut file = fs::File::create(m.path("file")).expect("create");
    file.write_all(&[1u8; 60 * 1024])
        .expect("within the budget");
    // A sparse tail made by ftruncate costs nothing, as fjall's preallocated journals.
    file.set_len(1 << 30).expect("extend");

    let mut other = fs::File::create(m.path("other")).expect("create");
    let err = other
        .write_all(&[2u8; 8 * 1024])
        .expect_err("past the budget");
    assert_eq!(err.kind(), ErrorKind::StorageFull, "{err}");
    assert_eq!(m.fs.space_used(), 60 * 1024);

    m.fs.set_space_budget(None);
    other.write_all(&[2u8; 8 * 1024]).expect("no budget");
}

#[test]
fn removing_a_file_frees_its_space_in_the_budget() {
    let m = Mounted::journaled();
    m.fs.set_space_budget(Some(16 * 1024));
    write_file(&m.path("a"), &[1u8; 12 * 1024], true);
    fs::remove_file(m.path("a")).expect("unlink");
    write_file(&m.path("b"), &[1u8; 12 * 1024], true);
}

#[test]
fn delayed_fsync_persists_nothing_before_the_delay_ends() {
    let m = Mounted::journaled();
    write_file(&m.path("other"), b"readable meanwhile", true);
    let mut file = fs::File::create(m.path("file")).expect("create");
    file.write_all(b"data").expect("write");
    m.fs.delay_fsync(Duration::from_secs(3));

    let syncing = std::thread::spawn(move || file.sync_all());
    // Other requests are answered while the fsync waits.
    assert_eq!(
        fs::read(m.path("other")).expect("read"),
        b"readable meanwhile"
    );
    assert_eq!(fs::read(m.backing("file")).expect("read backing"), b"");
    syncing
        .join()
        .expect("fsync thread")
        .expect("delayed fsync succeeds");
    assert_eq!(fs::read(m.backing("file")).expect("read backing"), b"data");
}
