//! A mounted faultfs in a scratch directory; unmounted and removed when dropped.

#![allow(dead_code)] // each test file uses part of it

use std::path::{Path, PathBuf};
use tributary_faultfs::{Durability, FaultFs};

pub struct Mounted {
    // Dropped in this order: the mount first, then the directories under it.
    pub fs: FaultFs,
    _dir: tempfile::TempDir,
}

impl Mounted {
    pub fn new(durability: Durability) -> Self {
        let dir = tempfile::tempdir().expect("scratch directory");
        let backing = dir.path().join("backing");
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&backing).expect("backing directory");
        std::fs::create_dir(&mountpoint).expect("mount point");
        // Never skip: a machine without FUSE fails these tests, and says why.
        let fs = FaultFs::mount_with(&backing, &mountpoint, durability)
            .unwrap_or_else(|e| panic!("faultfs tests need FUSE (/dev/fuse, run as root): {e}"));
        Self { fs, _dir: dir }
    }

    pub fn journaled() -> Self {
        Self::new(Durability::Journaled)
    }

    pub fn strict() -> Self {
        Self::new(Durability::Strict)
    }

    /// `name` on the mount.
    pub fn path(&self, name: &str) -> PathBuf {
        self.fs.mountpoint().join(name)
    }

    /// `name` in the backing directory (what is durable).
    pub fn backing(&self, name: &str) -> PathBuf {
        self.fs.backing().join(name)
    }
}

pub fn fsync_dir(path: &Path) {
    std::fs::File::open(path)
        .and_then(|dir| dir.sync_all())
        .unwrap_or_else(|e| panic!("fsync of directory {}: {e}", path.display()));
}

pub fn write_file(path: &Path, content: &[u8], sync: bool) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).expect("create");
    file.write_all(content).expect("write");
    if sync {
        file.sync_all().expect("fsync");
    }
}
