//! Directory changes not yet made durable, and how a power cut undoes them.
//!
//! Creates, removals and renames are applied to the backing directory at once (so the
//! backing tree is always the current tree) and recorded here with what undoes them. A
//! removed file or directory, or one a rename replaced, is not deleted but moved into the
//! hidden stash directory at the top of the backing directory, so that a power cut can
//! put it back. An fsync commits entries (see [`Durability`](crate::Durability)): their
//! stashed victims are deleted and the entries forgotten. A power cut undoes the
//! uncommitted entries newest first.
//!
//! Recovery of the model itself: the stash is wiped when a mount starts, so if the
//! faultfs process dies without a power cut, every change it had applied stays.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The stash directory's name in the backing directory's top level, hidden from the mount.
pub(crate) const STASH: &str = ".faultfs-unsynced";

enum Change {
    /// A file or directory was created at `path` (backing inode `ino`).
    Created { path: PathBuf, ino: u64 },
    /// What was at `path` was removed; it waits in the stash at `stashed`.
    Removed { path: PathBuf, stashed: PathBuf },
    /// `from` was renamed to `to`; what `to` named before waits in the stash.
    Renamed {
        from: PathBuf,
        to: PathBuf,
        replaced: Option<PathBuf>,
    },
}

struct Entry {
    change: Change,
    /// The directory whose fsync commits the change in strict mode (for a rename, the
    /// destination directory), as an inode number of the mount.
    dir: u64,
}

/// Paths are relative to the backing directory.
pub(crate) struct NamespaceLog {
    root: PathBuf,
    next_stash: u64,
    entries: Vec<Entry>,
}

fn remove_any(path: &Path) -> io::Result<()> {
    if fs::symlink_metadata(path)?.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

impl NamespaceLog {
    /// Starts an empty log over `root`, wiping a stash left by an earlier run.
    pub(crate) fn open(root: &Path) -> io::Result<Self> {
        let stash = root.join(STASH);
        if fs::symlink_metadata(&stash).is_ok() {
            remove_any(&stash)?;
        }
        fs::create_dir(&stash)?;
        Ok(Self {
            root: root.to_path_buf(),
            next_stash: 0,
            entries: Vec::new(),
        })
    }

    pub(crate) fn is_stash(parent_is_root: bool, name: &OsStr) -> bool {
        parent_is_root && name == STASH
    }

    /// Moves what is at `path` into the stash and returns its stashed path.
    fn stash(&mut self, path: &Path) -> io::Result<PathBuf> {
        let stashed = Path::new(STASH).join(self.next_stash.to_string());
        self.next_stash += 1;
        fs::rename(self.root.join(path), self.root.join(&stashed))?;
        Ok(stashed)
    }

    pub(crate) fn created(&mut self, dir: u64, path: PathBuf) -> io::Result<()> {
        let ino = fs::symlink_metadata(self.root.join(&path))?.ino();
        self.entries.push(Entry {
            change: Change::Created { path, ino },
            dir,
        });
        Ok(())
    }

    /// Removes what is at `path` (a file or an empty directory), undoably.
    pub(crate) fn remove(&mut self, dir: u64, path: PathBuf) -> io::Result<()> {
        let stashed = self.stash(&path)?;
        self.entries.push(Entry {
            change: Change::Removed { path, stashed },
            dir,
        });
        Ok(())
    }

    /// Renames `from` to `to`, undoably; the caller has checked that a `to` that exists
    /// may be replaced.
    pub(crate) fn rename(&mut self, dir: u64, from: PathBuf, to: PathBuf) -> io::Result<()> {
        let replaced = match fs::symlink_metadata(self.root.join(&to)) {
            Ok(_) => Some(self.stash(&to)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        if let Err(e) = fs::rename(self.root.join(&from), self.root.join(&to)) {
            if let Some(stashed) = &replaced {
                // Put the victim back: the rename did not happen.
                let _ = fs::rename(self.root.join(stashed), self.root.join(&to));
            }
            return Err(e);
        }
        self.entries.push(Entry {
            change: Change::Renamed { from, to, replaced },
            dir,
        });
        Ok(())
    }

    fn forget(&self, entry: Entry) {
        let stashed = match entry.change {
            Change::Removed { stashed, .. } => Some(stashed),
            Change::Renamed { replaced, .. } => replaced,
            Change::Created { .. } => None,
        };
        if let Some(stashed) = stashed {
            // A victim that cannot be deleted now is wiped with the stash at the next mount.
            let _ = remove_any(&self.root.join(stashed));
        }
    }

    /// Makes every recorded change durable.
    pub(crate) fn commit_all(&mut self) {
        for entry in std::mem::take(&mut self.entries) {
            self.forget(entry);
        }
    }

    /// Makes the changes recorded against directory `dir` durable.
    pub(crate) fn commit_dir(&mut self, dir: u64) {
        let (committed, kept) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition(|entry| entry.dir == dir);
        self.entries = kept;
        for entry in committed {
            self.forget(entry);
        }
    }

    /// The power cut: undoes every uncommitted change, newest first, and empties the
    /// stash. Returns what could not be undone (a later committed change moved the thing
    /// away: possible only in strict mode, where commits are per directory).
    pub(crate) fn revert(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for entry in std::mem::take(&mut self.entries).into_iter().rev() {
            if let Err(e) = self.undo(&entry.change) {
                problems.push(e);
            }
        }
        let stash = self.root.join(STASH);
        if let Err(e) = remove_any(&stash).and_then(|()| fs::create_dir(&stash)) {
            problems.push(format!("emptying the stash {}: {e}", stash.display()));
        }
        problems
    }

    fn undo(&self, change: &Change) -> Result<(), String> {
        let abs = |p: &Path| self.root.join(p);
        let exists = |p: &Path| fs::symlink_metadata(abs(p)).is_ok();
        let move_back = |from: &Path, to: &Path| {
            fs::rename(abs(from), abs(to)).map_err(|e| {
                format!(
                    "undoing: moving {} back to {}: {e}",
                    from.display(),
                    to.display()
                )
            })
        };
        match change {
            Change::Created { path, ino } => match fs::symlink_metadata(abs(path)) {
                Ok(meta) if meta.ino() == *ino => remove_any(&abs(path))
                    .map_err(|e| format!("undoing the creation of {}: {e}", path.display())),
                _ => Err(format!(
                    "undoing the creation of {}: it is no longer there",
                    path.display()
                )),
            },
            Change::Removed { path, stashed } => {
                if exists(path) {
                    return Err(format!(
                        "undoing the removal of {}: the name is taken",
                        path.display()
                    ));
                }
                move_back(stashed, path)
            }
            Change::Renamed { from, to, replaced } => {
                if exists(from) || !exists(to) {
                    return Err(format!(
                        "undoing the rename of {} to {}: the names changed since",
                        from.display(),
                        to.display()
                    ));
                }
                move_back(to, from)?;
                match replaced {
                    Some(stashed) => move_back(stashed, to),
                    None => Ok(()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revert_undoes_create_remove_and_rename_newest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::write(root.join("kept"), b"old").expect("write");
        fs::write(root.join("victim"), b"victim").expect("write");
        let mut log = NamespaceLog::open(root).expect("open");

        fs::write(root.join("new"), b"x").expect("write");
        log.created(1, "new".into()).expect("created");
        log.rename(1, "new".into(), "kept".into())
            .expect("rename over kept");
        log.remove(1, "victim".into()).expect("remove");

        assert_eq!(fs::read(root.join("kept")).expect("read"), b"x");
        assert!(!root.join("victim").exists());
        assert_eq!(log.revert(), Vec::<String>::new());
        assert_eq!(fs::read(root.join("kept")).expect("read"), b"old");
        assert_eq!(fs::read(root.join("victim")).expect("read"), b"victim");
        assert!(!root.join("new").exists());
        assert_eq!(fs::read_dir(root.join(STASH)).expect("stash").count(), 0);
    }

    #[test]
    fn committed_changes_survive_revert_and_free_the_stash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir(root.join("a")).expect("mkdir");
        fs::write(root.join("a/f"), b"f").expect("write");
        let mut log = NamespaceLog::open(root).expect("open");
        log.remove(2, "a/f".into()).expect("remove");
        fs::write(root.join("g"), b"g").expect("write");
        log.created(1, "g".into()).expect("created");

        log.commit_dir(2);
        assert_eq!(fs::read_dir(root.join(STASH)).expect("stash").count(), 0);
        assert_eq!(log.revert(), Vec::<String>::new());
        assert!(!root.join("a/f").exists(), "the committed removal stays");
        assert!(
            !root.join("g").exists(),
            "the uncommitted creation is undone"
        );
    }
}
