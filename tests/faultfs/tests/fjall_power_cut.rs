//! The proof that matters: fjall on the mount keeps every key it committed with an fsync
//! and loses those it only handed to the OS, once the power is cut. The crash is a drop
//! of the database while fsync fails, so that fjall's persist-on-drop cannot sync the
//! buffered keys (a kill -9 of a process would leave them unsynced the same way).
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a failed unwrap is the report

mod common;

use common::Mounted;
use fjall::{Database, KeyspaceCreateOptions, PersistMode};
use std::path::Path;

const SYNCED: usize = 200;
const BUFFERED: usize = 200;

fn key(kind: &str, i: usize) -> String {
    format!("{kind}-{i:05}")
}

/// Writes the synced keys (half SyncAll, half SyncData) and then the buffered ones, their
/// kinds prefixed with `round`, and crashes the database.
fn write_and_crash(m: &Mounted, path: &Path, round: &str) {
    let db = Database::builder(path)
        .open()
        .expect("open fjall on the mount");
    let items = db
        .keyspace("items", KeyspaceCreateOptions::default)
        .expect("keyspace");
    for i in 0..SYNCED {
        items
            .insert(key(&format!("{round}synced"), i), format!("value {i}"))
            .expect("insert");
        let mode = if i % 2 == 0 {
            PersistMode::SyncAll
        } else {
            PersistMode::SyncData
        };
        db.persist(mode).expect("persist with fsync");
    }
    for i in 0..BUFFERED {
        items
            .insert(key(&format!("{round}buffered"), i), format!("value {i}"))
            .expect("insert");
    }
    // Into the file system, not into the disk: this is a write(2), no fsync.
    db.persist(PersistMode::Buffer).expect("persist to the OS");

    m.fs.fail_fsync(true);
    drop(items);
    drop(db);
    m.fs.fail_fsync(false);
}

fn count(path: &Path, kind: &str, n: usize) -> usize {
    let db = Database::builder(path).open().expect("reopen fjall");
    let items = db
        .keyspace("items", KeyspaceCreateOptions::default)
        .expect("keyspace");
    let found = (0..n)
        .filter(|&i| items.get(key(kind, i)).expect("get").is_some())
        .count();
    drop(items);
    drop(db);
    found
}

#[test]
fn fjall_keeps_synced_keys_and_loses_buffered_ones_after_power_cut() {
    let mut m = Mounted::journaled();
    let path = m.path("db");
    write_and_crash(&m, &path, "");

    m.fs.power_cut().expect("power cut");

    assert_eq!(
        count(&path, "synced", SYNCED),
        SYNCED,
        "every fsynced key survives"
    );
    assert_eq!(
        count(&path, "buffered", BUFFERED),
        0,
        "no unsynced key survives"
    );
}

#[test]
fn fjall_keeps_buffered_keys_after_a_crash_without_power_cut() {
    // The contrast to the test above: the buffered keys did reach the file system, and
    // only the power cut takes them away.
    let m = Mounted::journaled();
    let path = m.path("db");
    write_and_crash(&m, &path, "");

    assert_eq!(count(&path, "synced", SYNCED), SYNCED);
    assert_eq!(count(&path, "buffered", BUFFERED), BUFFERED);
}

#[test]
fn fjall_keeps_keys_synced_after_recovering_from_a_power_cut() {
    // The second round runs on a recovered journal: fjall opens it with O_APPEND, then
    // truncates its torn, preallocated tail through another handle, and appends from
    // there. What it syncs in that round survives the next cut like the first round's.
    let mut m = Mounted::journaled();
    let path = m.path("db");
    write_and_crash(&m, &path, "");
    m.fs.power_cut().expect("first power cut");
    write_and_crash(&m, &path, "again-");
    m.fs.power_cut().expect("second power cut");

    assert_eq!(count(&path, "synced", SYNCED), SYNCED);
    assert_eq!(
        count(&path, "again-synced", SYNCED),
        SYNCED,
        "every key fsynced into the recovered journal survives"
    );
    assert_eq!(count(&path, "buffered", BUFFERED), 0);
    assert_eq!(count(&path, "again-buffered", BUFFERED), 0);
}

#[test]
fn strict_mode_loses_a_new_fjall_keyspace_because_fjall_never_fsyncs_its_parent() {
    // Why journaled is the default mode: fjall 3.1.13 creates `keyspaces/<id>` with
    // create_dir_all and fsyncs the folder itself but never `keyspaces/`, so under POSIX
    // at its letter the new keyspace, with every key synced into it, is gone after a cut.
    let mut m = Mounted::strict();
    let path = m.path("db");
    std::fs::create_dir(&path).expect("mkdir");
    common::fsync_dir(m.fs.mountpoint());
    write_and_crash(&m, &path, "");

    m.fs.power_cut().expect("power cut");

    assert_eq!(
        count(&path, "synced", SYNCED),
        0,
        "fjall now makes a new keyspace durable under strict POSIX: the strict mode could \
         become the default (update the crate documentation)"
    );
}
