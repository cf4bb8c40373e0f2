//! A fault-injecting file system for crash tests (#18 item 1).
//!
//! [`FaultFs::mount`] mounts a FUSE file system over a backing directory (pass-through)
//! in this process, and the returned handle injects faults into it: a power cut, EIO from
//! fsync or write, ENOSPC past a byte budget, slow fsync. Tests run the real edge (or
//! fjall directly) on the mount point, kill it, cut the power and start it again on the
//! same directory. The `faultfs` binary offers the same over a control socket (its
//! documentation gives the protocol), for a mount held by another process.
//!
//! # The power-cut model
//!
//! The backing directory holds exactly what would survive a power cut; the rest lives in
//! this process's memory:
//!
//! - File data: writes and size changes (write, ftruncate, fallocate) since the file's
//!   last fsync or fdatasync are kept in memory, merged over the backing file for readers.
//!   An fsync of the file applies them to the backing file and fsyncs that; a power cut
//!   drops them, so the file has its content and size as of its last fsync.
//! - Names: create, mkdir, unlink, rmdir and rename are applied to the backing directory
//!   at once and logged with what undoes them (a removed or replaced file waits in a
//!   hidden stash). A power cut undoes every uncommitted one, newest first; which fsync
//!   commits them depends on the [`Durability`]:
//!   - [`Durability::Journaled`] (the default) behaves like ext4 or XFS with their
//!     metadata journal: any fsync, of a file or a directory, commits every name change
//!     made before it. So a file created and fsynced keeps its name.
//!   - [`Durability::Strict`] is POSIX at its letter: a name change is durable only after
//!     an fsync of the directory it changed (for a rename, the destination directory).
//!     A file created and fsynced without an fsync of its directory is gone after a cut.
//!
//! The default is the journaled mode because fjall (3.1.13, with lsm-tree 3.1.10), the
//! store the edge's log lives in, fsyncs the directory after most names it creates
//! (journal files, tables, the version file written by temp file and rename) but not all:
//! a new keyspace folder `keyspaces/<id>` is made with `create_dir_all` and `keyspaces/`
//! is never fsynced, and old journals and tables are deleted without a directory fsync.
//! Under the strict mode a new keyspace is gone after a cut, with every key synced into
//! it (the test `strict_mode_loses_a_new_fjall_keyspace_because_fjall_never_fsyncs_its_parent`
//! shows it); ext4 and XFS keep it, since their journal commits the folder's creation
//! with the next fsync of anything.
//!
//! What fjall does, and so what this file system needs: it preallocates every 64 MiB
//! journal with `set_len` (ftruncate, not fallocate, so the budget below does not charge
//! it), persists with `sync_all`/`sync_data` on the journal file, reads tables with
//! `pread` (no mmap anywhere), and locks its `lock` file with `flock` (the kernel handles
//! that locally for a FUSE mount).
//!
//! A power cut unmounts the file system, rolls the backing directory back and mounts it
//! again, so the kernel keeps no cached page or attribute from before the cut, and mmap
//! would be safe too. The unmount fails with [`Error::Busy`] while anything still uses
//! the mount: kill the processes working on it (and drop handles opened by the test)
//! before the cut, as a real power cut would have.
//!
//! Limits of the model: permissions, owners and times are applied at once and are always
//! durable; hard links, special files and `RENAME_EXCHANGE` are not supported; a failed
//! fsync leaves its data pending (a later fsync may still persist it, unlike Linux after
//! a writeback error); an unsynced size change is part of the file's data, never of the
//! journal; the strict mode undoes a cross-directory sequence of changes as well as the
//! recorded paths allow (what it cannot undo, [`FaultFs::power_cut`] reports). If the
//! process holding the mount dies without a power cut, all applied changes stay.
//!
//! # Faults
//!
//! - [`FaultFs::fail_fsync`]: fsync, fdatasync and directory fsync return EIO, and persist
//!   nothing.
//! - [`FaultFs::fail_writes`]: write, ftruncate and fallocate return EIO.
//! - [`FaultFs::set_space_budget`]: a write or fallocate that would take the space used
//!   past the budget returns ENOSPC. Space used is, over all files, the bytes up to the
//!   end of each file's written data rounded up to 4 KiB (sparse tails made by ftruncate
//!   cost nothing); `statfs` reports the budget.
//! - [`FaultFs::delay_fsync`]: every fsync (not a directory's) waits that long before it
//!   persists anything; the file system answers other requests meanwhile.
//!
//! FUSE needs `/dev/fuse` and root: as root, fuser mounts with mount(2) directly, with
//! no libfuse or fusermount3 (tests/run installs Debian's `fuse3` all the same, for
//! users who mount without root).

// Mounting, unmounting and statvfs go through libc; each site states its SAFETY.
#![allow(unsafe_code)]

mod fs;
mod namespace;
mod overlay;

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// When directory changes become durable; see the crate documentation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// Any fsync commits every directory change made before it (ext4, XFS).
    #[default]
    Journaled,
    /// Only an fsync of the changed directory commits its changes (POSIX).
    Strict,
}

/// Errors of mounting, cutting and unmounting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The FUSE mount failed; the usual causes are named in the message.
    #[error(
        "mounting faultfs at {mountpoint}: {source} (FUSE needs /dev/fuse and root; the \
         mount point must be an existing directory)"
    )]
    Mount {
        /// Where it was to be mounted.
        mountpoint: PathBuf,
        /// What the kernel said.
        source: io::Error,
    },
    /// Something still uses the mount: a process working in it, or an open file.
    #[error(
        "unmounting faultfs at {mountpoint}: {source} (a process or an open file still uses \
         it: kill the processes working on the mount and wait for them first)"
    )]
    Busy {
        /// The mount point.
        mountpoint: PathBuf,
        /// What the kernel said.
        source: io::Error,
    },
    /// The backing directory could not be prepared or rolled back.
    #[error("backing directory {backing}: {source}")]
    Backing {
        /// The backing directory.
        backing: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// A power cut could not undo some directory changes (strict mode only); the list
    /// names them. The file system is mounted again all the same.
    #[error("power cut at {mountpoint} left changes it could not undo: {}", problems.join("; "))]
    Revert {
        /// The mount point.
        mountpoint: PathBuf,
        /// What could not be undone.
        problems: Vec<String>,
    },
}

/// The faults in force; shared by the mount and its handle, kept across power cuts.
pub(crate) struct Faults {
    fail_fsync: AtomicBool,
    fail_writes: AtomicBool,
    fsync_delay_micros: AtomicU64,
    /// `u64::MAX` means no budget.
    space_budget: AtomicU64,
}

impl Faults {
    fn fsync_delay(&self) -> Duration {
        Duration::from_micros(self.fsync_delay_micros.load(Ordering::SeqCst))
    }

    fn space_budget(&self) -> Option<u64> {
        Some(self.space_budget.load(Ordering::SeqCst)).filter(|&b| b != u64::MAX)
    }
}

/// A mounted fault-injecting file system. Dropping it unmounts as [`FaultFs::unmount`]
/// does, or lazily (dropping what is pending) if the mount is still busy.
pub struct FaultFs {
    backing: PathBuf,
    mountpoint: PathBuf,
    durability: Durability,
    state: Arc<Mutex<fs::State>>,
    faults: Arc<Faults>,
    session: Option<fuser::BackgroundSession>,
}

impl FaultFs {
    /// Mounts `backing` at `mountpoint` (both existing directories) in journaled mode.
    pub fn mount(backing: impl AsRef<Path>, mountpoint: impl AsRef<Path>) -> Result<Self, Error> {
        Self::mount_with(backing, mountpoint, Durability::default())
    }

    /// [`FaultFs::mount`] with the given [`Durability`] of directory changes.
    pub fn mount_with(
        backing: impl AsRef<Path>,
        mountpoint: impl AsRef<Path>,
        durability: Durability,
    ) -> Result<Self, Error> {
        let backing = backing.as_ref().to_path_buf();
        let state = fs::State::open(&backing, durability, 0).map_err(|source| Error::Backing {
            backing: backing.clone(),
            source,
        })?;
        let mut mounted = Self {
            backing,
            mountpoint: mountpoint.as_ref().to_path_buf(),
            durability,
            state: Arc::new(Mutex::new(state)),
            faults: Arc::new(Faults {
                fail_fsync: AtomicBool::new(false),
                fail_writes: AtomicBool::new(false),
                fsync_delay_micros: AtomicU64::new(0),
                space_budget: AtomicU64::new(u64::MAX),
            }),
            session: None,
        };
        mounted.start_session()?;
        Ok(mounted)
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The directory holding what survives a power cut.
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    fn start_session(&mut self) -> Result<(), Error> {
        let filesystem = fs::FaultFs {
            state: Arc::clone(&self.state),
            faults: Arc::clone(&self.faults),
        };
        let options = [
            fuser::MountOption::FSName("faultfs".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::RW,
        ];
        let session =
            fuser::spawn_mount2(filesystem, &self.mountpoint, &options).map_err(|source| {
                Error::Mount {
                    mountpoint: self.mountpoint.clone(),
                    source,
                }
            })?;
        self.session = Some(session);
        Ok(())
    }

    /// Unmounts now, failing with [`Error::Busy`] (still mounted) while anything uses it.
    fn stop_session(&mut self) -> Result<(), Error> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let path =
            CString::new(self.mountpoint.as_os_str().as_bytes()).map_err(|e| Error::Busy {
                mountpoint: self.mountpoint.clone(),
                source: io::Error::new(io::ErrorKind::InvalidInput, e),
            })?;
        // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
        if unsafe { libc::umount2(path.as_ptr(), 0) } != 0 {
            let source = io::Error::last_os_error();
            self.session = Some(session);
            return Err(Error::Busy {
                mountpoint: self.mountpoint.clone(),
                source,
            });
        }
        // The kernel has let go of the mount: the session thread ends on its own; wait
        // for it so that no request of the old mount runs after this.
        let _ = session.guard.join();
        Ok(())
    }

    /// Cuts the power: every write not fsynced and every directory change not committed
    /// is lost, and the kernel forgets everything it cached. Kill the processes using the
    /// mount first (see [`Error::Busy`]). The faults in force stay in force.
    pub fn power_cut(&mut self) -> Result<(), Error> {
        self.stop_session()?;
        let problems = {
            let mut state = self
                .state
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let problems = state.cut();
            let generation = state.generation + 1;
            *state =
                fs::State::open(&self.backing, self.durability, generation).map_err(|source| {
                    Error::Backing {
                        backing: self.backing.clone(),
                        source,
                    }
                })?;
            problems
        };
        self.start_session()?;
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Revert {
                mountpoint: self.mountpoint.clone(),
                problems,
            })
        }
    }

    /// While set, fsync, fdatasync and directory fsync fail with EIO and persist nothing.
    pub fn fail_fsync(&self, fail: bool) {
        self.faults.fail_fsync.store(fail, Ordering::SeqCst);
    }

    /// While set, write, ftruncate and fallocate fail with EIO.
    pub fn fail_writes(&self, fail: bool) {
        self.faults.fail_writes.store(fail, Ordering::SeqCst);
    }

    /// Writes past `budget` bytes of space used fail with ENOSPC; `None` lifts the limit.
    pub fn set_space_budget(&self, budget: Option<u64>) {
        self.faults
            .space_budget
            .store(budget.unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// Every fsync waits `delay` before it persists anything; zero turns the delay off.
    pub fn delay_fsync(&self, delay: Duration) {
        let micros = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.faults
            .fsync_delay_micros
            .store(micros, Ordering::SeqCst);
    }

    /// Space used as the budget counts it.
    pub fn space_used(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .used()
    }

    /// Unmounts cleanly, like a shutdown: everything pending is made durable.
    pub fn unmount(mut self) -> Result<(), Error> {
        self.stop_session()?;
        self.sync_backing()
    }

    fn sync_backing(&self) -> Result<(), Error> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        state.sync_all().map_err(|source| Error::Backing {
            backing: self.backing.clone(),
            source,
        })
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        if self.session.is_none() {
            return;
        }
        if self.stop_session().is_ok() {
            let _ = self.sync_backing();
        } else {
            // Still in use (a test failed with a process on the mount): detach it so the
            // mount point is not left dead, and let the session thread end with it.
            if let Ok(path) = CString::new(self.mountpoint.as_os_str().as_bytes()) {
                // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
                unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
            }
            self.session.take();
        }
    }
}

pub(crate) struct StatVfs {
    blocks: u64,
    bfree: u64,
    bavail: u64,
    files: u64,
    ffree: u64,
    bsize: u32,
    frsize: u32,
}

pub(crate) fn statvfs(path: &Path) -> io::Result<StatVfs> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs is plain old data; all zeros is a valid value to be overwritten.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `s` is a valid, writable statvfs.
    if unsafe { libc::statvfs(path.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(StatVfs {
        blocks: s.f_blocks,
        bfree: s.f_bfree,
        bavail: s.f_bavail,
        files: s.f_files,
        ffree: s.f_ffree,
        bsize: s.f_bsize as u32,
        frsize: s.f_frsize as u32,
    })
}
