//! The FUSE file system: inodes of the mount mapped to paths in the backing directory,
//! file data through [`Overlay`], directory changes through [`NamespaceLog`], and the
//! injected faults.

use crate::namespace::NamespaceLog;
use crate::overlay::{allocated, Overlay};
use crate::{Durability, Faults};
use fuser::{
    FileAttr, FileType, Filesystem, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, Metadata, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, UNIX_EPOCH};

const ROOT: u64 = fuser::FUSE_ROOT_ID;
/// The parent of a node that lost its name; no inode has this number.
const DETACHED: u64 = 0;
/// Attributes and entries are not cached by the kernel: every change goes through this
/// file system anyway, and a zero TTL keeps nothing stale to reason about.
const TTL: Duration = Duration::ZERO;

struct Node {
    parent: u64,
    name: OsString,
    kind: FileType,
    /// Regular files, from their first open on.
    overlay: Option<Overlay>,
    /// Space accounting for a file not opened yet (see [`allocated`]).
    data_end: u64,
}

impl Node {
    fn data_end(&self) -> u64 {
        self.overlay
            .as_ref()
            .map_or(self.data_end, Overlay::data_end)
    }
}

/// Everything one mount knows; a power cut throws it away and starts a new one.
pub(crate) struct State {
    root: PathBuf,
    durability: Durability,
    nodes: HashMap<u64, Node>,
    index: HashMap<(u64, OsString), u64>,
    next_ino: u64,
    log: NamespaceLog,
    /// Space taken by the files, as counted for the budget.
    used: u64,
    /// Bumped by every power cut, so that a delayed fsync started before it does nothing.
    pub(crate) generation: u64,
}

fn kind_of(meta: &Metadata) -> FileType {
    let t = meta.file_type();
    if t.is_dir() {
        FileType::Directory
    } else if t.is_symlink() {
        FileType::Symlink
    } else {
        FileType::RegularFile
    }
}

/// The data end of an existing backing file: its allocated bytes, at most its size.
fn measured_data_end(meta: &Metadata) -> u64 {
    (meta.blocks() * 512).min(meta.len())
}

fn used_under(dir: &Path, skip: Option<&OsStr>) -> io::Result<u64> {
    let mut used = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if Some(entry.file_name().as_os_str()) == skip {
            continue;
        }
        let meta = entry.metadata()?;
        if meta.is_dir() {
            used += used_under(&entry.path(), None)?;
        } else if meta.is_file() {
            used += allocated(measured_data_end(&meta));
        }
    }
    Ok(used)
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl State {
    pub(crate) fn open(root: &Path, durability: Durability, generation: u64) -> io::Result<Self> {
        let log = NamespaceLog::open(root)?;
        let used = used_under(root, Some(OsStr::new(crate::namespace::STASH)))?;
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                parent: ROOT,
                name: OsString::new(),
                kind: FileType::Directory,
                overlay: None,
                data_end: 0,
            },
        );
        Ok(Self {
            root: root.to_path_buf(),
            durability,
            nodes,
            index: HashMap::new(),
            next_ino: ROOT + 1,
            log,
            used,
            generation,
        })
    }

    /// The power cut: drops every unsynced write and undoes every uncommitted directory
    /// change. Returns what could not be undone.
    pub(crate) fn cut(&mut self) -> Vec<String> {
        self.nodes.clear();
        self.index.clear();
        self.log.revert()
    }

    pub(crate) fn used(&self) -> u64 {
        self.used
    }

    /// A clean shutdown: every pending write and directory change is made durable.
    pub(crate) fn sync_all(&mut self) -> io::Result<()> {
        for node in self.nodes.values_mut() {
            if let Some(overlay) = node.overlay.as_mut().filter(|o| o.is_dirty()) {
                overlay.write_through()?;
            }
        }
        self.log.commit_all();
        Ok(())
    }

    /// The path of `ino` relative to the backing directory.
    fn rel_path(&self, ino: u64) -> Result<PathBuf, i32> {
        let mut names = Vec::new();
        let mut at = ino;
        while at != ROOT {
            let node = self.nodes.get(&at).ok_or(libc::ESTALE)?;
            names.push(node.name.as_os_str());
            at = node.parent;
        }
        Ok(names.iter().rev().collect())
    }

    fn child_rel(&self, parent: u64, name: &OsStr) -> Result<PathBuf, i32> {
        if NamespaceLog::is_stash(parent == ROOT, name) {
            return Err(libc::EACCES);
        }
        Ok(self.rel_path(parent)?.join(name))
    }

    fn node(&self, ino: u64) -> Result<&Node, i32> {
        self.nodes.get(&ino).ok_or(libc::ESTALE)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node, i32> {
        self.nodes.get_mut(&ino).ok_or(libc::ESTALE)
    }

    /// The inode for `parent/name`, known or new, described by `meta`.
    fn child(&mut self, parent: u64, name: &OsStr, meta: &Metadata) -> u64 {
        if let Some(&ino) = self.index.get(&(parent, name.to_os_string())) {
            return ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(
            ino,
            Node {
                parent,
                name: name.to_os_string(),
                kind: kind_of(meta),
                overlay: None,
                data_end: measured_data_end(meta),
            },
        );
        self.index.insert((parent, name.to_os_string()), ino);
        ino
    }

    /// Forgets the name of `parent/name` (removed or replaced) and frees its space.
    fn unname(&mut self, parent: u64, name: &OsStr, meta: &Metadata) {
        let data_end = match self.index.remove(&(parent, name.to_os_string())) {
            Some(ino) => self.nodes.get_mut(&ino).map_or(0, |node| {
                // Still open perhaps, but nameless: its path must not resolve to whatever
                // takes the name next.
                node.parent = DETACHED;
                node.data_end()
            }),
            None => measured_data_end(meta),
        };
        if meta.is_file() {
            self.used = self.used.saturating_sub(allocated(data_end));
        }
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, i32> {
        let node = self.node(ino)?;
        let meta = match &node.overlay {
            // An open file may have lost its name: ask the open backing file.
            Some(overlay) => overlay.backing_metadata(),
            None => fs::symlink_metadata(self.root.join(self.rel_path(ino)?)),
        }
        .map_err(|e| errno(&e))?;
        let (size, blocks) = match &node.overlay {
            Some(overlay) => (overlay.len(), allocated(overlay.data_end()) / 512),
            None => (meta.len(), meta.blocks()),
        };
        let time = |secs: i64, nanos: i64| {
            UNIX_EPOCH
                + Duration::new(
                    secs.max(0).unsigned_abs(),
                    nanos.clamp(0, 999_999_999) as u32,
                )
        };
        Ok(FileAttr {
            ino,
            size,
            blocks,
            atime: time(meta.atime(), meta.atime_nsec()),
            mtime: time(meta.mtime(), meta.mtime_nsec()),
            ctime: time(meta.ctime(), meta.ctime_nsec()),
            crtime: time(meta.ctime(), meta.ctime_nsec()),
            kind: node.kind,
            perm: (meta.mode() & 0o7777) as u16,
            nlink: meta.nlink() as u32,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: meta.rdev() as u32,
            blksize: crate::overlay::PAGE as u32,
            flags: 0,
        })
    }

    fn overlay(&mut self, ino: u64) -> Result<&mut Overlay, i32> {
        let path = self.root.join(self.rel_path(ino)?);
        let node = self.node_mut(ino)?;
        if node.kind != FileType::RegularFile {
            return Err(libc::EISDIR);
        }
        if node.overlay.is_none() {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| errno(&e))?;
            node.overlay = Some(Overlay::new(file, node.data_end).map_err(|e| errno(&e))?);
        }
        node.overlay.as_mut().ok_or(libc::EIO)
    }

    /// Charges `growth` bytes against the budget, or refuses with ENOSPC.
    fn charge(&mut self, faults: &Faults, growth: u64) -> Result<(), i32> {
        if let Some(budget) = faults.space_budget() {
            if self.used + growth > budget {
                return Err(libc::ENOSPC);
            }
        }
        self.used += growth;
        Ok(())
    }

    /// Truncation frees the space past the new size.
    fn truncate(&mut self, ino: u64, size: u64) -> Result<(), i32> {
        let overlay = self.overlay(ino)?;
        let before = allocated(overlay.data_end());
        overlay.truncate(size);
        let freed = before - allocated(overlay.data_end());
        self.used = self.used.saturating_sub(freed);
        Ok(())
    }

    fn commit_after_fsync(&mut self, dir: Option<u64>) {
        match (self.durability, dir) {
            (Durability::Journaled, _) => self.log.commit_all(),
            (Durability::Strict, Some(dir)) => self.log.commit_dir(dir),
            (Durability::Strict, None) => {}
        }
    }

    pub(crate) fn fsync(&mut self, faults: &Faults, ino: u64) -> Result<(), i32> {
        if faults.fail_fsync.load(Ordering::SeqCst) {
            return Err(libc::EIO);
        }
        if let Some(overlay) = self.node_mut(ino)?.overlay.as_mut() {
            if overlay.is_dirty() {
                overlay.write_through().map_err(|e| errno(&e))?;
            }
        }
        self.commit_after_fsync(None);
        Ok(())
    }

    pub(crate) fn fsyncdir(&mut self, faults: &Faults, ino: u64) -> Result<(), i32> {
        if faults.fail_fsync.load(Ordering::SeqCst) {
            return Err(libc::EIO);
        }
        let path = self.root.join(self.rel_path(ino)?);
        File::open(path)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| errno(&e))?;
        self.commit_after_fsync(Some(ino));
        Ok(())
    }
}

/// The fuser face of [`State`]; one per mount.
pub(crate) struct FaultFs {
    pub(crate) state: Arc<Mutex<State>>,
    pub(crate) faults: Arc<Faults>,
}

impl FaultFs {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic in one request must not wedge every later one: the state is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn reply_entry(result: Result<(u64, &State), i32>, reply: ReplyEntry) {
    match result.and_then(|(ino, state)| state.attr(ino)) {
        Ok(attr) => reply.entry(&TTL, &attr, 0),
        Err(e) => reply.error(e),
    }
}

fn done(result: Result<(), i32>, reply: ReplyEmpty) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for FaultFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let mut state = self.state();
        let found = state.child_rel(parent, name).and_then(|rel| {
            let meta = fs::symlink_metadata(state.root.join(rel)).map_err(|e| errno(&e))?;
            Ok(state.child(parent, name, &meta))
        });
        reply_entry(found.map(|ino| (ino, &*state)), reply);
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.state().attr(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let mut state = self.state();
        let result = (|| {
            if let Some(size) = size {
                if self.faults.fail_writes.load(Ordering::SeqCst) {
                    return Err(libc::EIO);
                }
                state.truncate(ino, size)?;
            }
            if let Some(mode) = mode {
                // Permission changes are applied at once and treated as durable: the model
                // covers data and names, not metadata.
                let path = state.root.join(state.rel_path(ino)?);
                fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(|e| errno(&e))?;
            }
            state.attr(ino)
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        let state = self.state();
        let target = state
            .rel_path(ino)
            .and_then(|rel| fs::read_link(state.root.join(rel)).map_err(|e| errno(&e)));
        match target {
            Ok(target) => reply.data(target.as_os_str().as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut state = self.state();
        let made = (|| {
            let rel = state.child_rel(parent, name)?;
            let path = state.root.join(&rel);
            fs::DirBuilder::new()
                .mode(mode & !umask & 0o7777)
                .create(&path)
                .map_err(|e| errno(&e))?;
            state.log.created(parent, rel).map_err(|e| errno(&e))?;
            let meta = fs::symlink_metadata(&path).map_err(|e| errno(&e))?;
            Ok(state.child(parent, name, &meta))
        })();
        reply_entry(made.map(|ino| (ino, &*state)), reply);
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut state = self.state();
        let result = (|| {
            let rel = state.child_rel(parent, name)?;
            let meta = fs::symlink_metadata(state.root.join(&rel)).map_err(|e| errno(&e))?;
            if meta.is_dir() {
                return Err(libc::EISDIR);
            }
            state.log.remove(parent, rel).map_err(|e| errno(&e))?;
            state.unname(parent, name, &meta);
            Ok(())
        })();
        done(result, reply);
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut state = self.state();
        let result = (|| {
            let rel = state.child_rel(parent, name)?;
            let path = state.root.join(&rel);
            let meta = fs::symlink_metadata(&path).map_err(|e| errno(&e))?;
            if !meta.is_dir() {
                return Err(libc::ENOTDIR);
            }
            if fs::read_dir(&path).map_err(|e| errno(&e))?.next().is_some() {
                return Err(libc::ENOTEMPTY);
            }
            state.log.remove(parent, rel).map_err(|e| errno(&e))?;
            state.unname(parent, name, &meta);
            Ok(())
        })();
        done(result, reply);
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        let mut state = self.state();
        let result = (|| {
            if flags & libc::RENAME_EXCHANGE != 0 {
                return Err(libc::EINVAL);
            }
            let from = state.child_rel(parent, name)?;
            let to = state.child_rel(newparent, newname)?;
            let source = fs::symlink_metadata(state.root.join(&from)).map_err(|e| errno(&e))?;
            if from == to {
                return Ok(());
            }
            if let Ok(target) = fs::symlink_metadata(state.root.join(&to)) {
                if flags & libc::RENAME_NOREPLACE != 0 {
                    return Err(libc::EEXIST);
                }
                match (source.is_dir(), target.is_dir()) {
                    (false, true) => return Err(libc::EISDIR),
                    (true, false) => return Err(libc::ENOTDIR),
                    (true, true) => {
                        let mut entries =
                            fs::read_dir(state.root.join(&to)).map_err(|e| errno(&e))?;
                        if entries.next().is_some() {
                            return Err(libc::ENOTEMPTY);
                        }
                    }
                    (false, false) => {}
                }
                state.unname(newparent, newname, &target);
            }
            let ino = state.child(parent, name, &source);
            state
                .log
                .rename(newparent, from, to)
                .map_err(|e| errno(&e))?;
            state.index.remove(&(parent, name.to_os_string()));
            state.index.insert((newparent, newname.to_os_string()), ino);
            let node = state.node_mut(ino)?;
            node.parent = newparent;
            node.name = newname.to_os_string();
            Ok(())
        })();
        done(result, reply);
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        match self.state().overlay(ino) {
            Ok(_) => reply.opened(0, 0),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut state = self.state();
        let created = (|| {
            let rel = state.child_rel(parent, name)?;
            let path = state.root.join(&rel);
            let made = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode & !umask & 0o7777)
                .open(&path);
            match made {
                Ok(_) => state.log.created(parent, rel).map_err(|e| errno(&e))?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && flags & libc::O_EXCL == 0 => {
                }
                Err(e) => return Err(errno(&e)),
            }
            let meta = fs::symlink_metadata(&path).map_err(|e| errno(&e))?;
            let ino = state.child(parent, name, &meta);
            if flags & libc::O_TRUNC != 0 {
                state.truncate(ino, 0)?;
            }
            state.overlay(ino)?;
            state.attr(ino)
        })();
        match created {
            Ok(attr) => reply.created(&TTL, &attr, 0, 0, 0),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let mut state = self.state();
        let data = state.overlay(ino).and_then(|overlay| {
            overlay
                .read(offset.max(0) as u64, size)
                .map_err(|e| errno(&e))
        });
        match data {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let mut state = self.state();
        let result = (|| {
            if self.faults.fail_writes.load(Ordering::SeqCst) {
                return Err(libc::EIO);
            }
            let offset = u64::try_from(offset).map_err(|_| libc::EINVAL)?;
            let growth = state.overlay(ino)?.growth_to(offset + data.len() as u64);
            state.charge(&self.faults, growth)?;
            state
                .overlay(ino)?
                .write(offset, data)
                .map_err(|e| errno(&e))
        })();
        match result {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _lock_owner: u64,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let delay = self.faults.fsync_delay();
        if delay.is_zero() {
            done(self.state().fsync(&self.faults, ino), reply);
            return;
        }
        // Delay on a thread of its own: the session answers other requests meanwhile, as
        // a slow disk would. A power cut during the delay wins: the fsync then fails.
        let state = Arc::clone(&self.state);
        let faults = Arc::clone(&self.faults);
        let generation = self.state().generation;
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            let mut state = state
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if state.generation != generation {
                reply.error(libc::EIO);
                return;
            }
            done(state.fsync(&faults, ino), reply);
        });
    }

    fn fsyncdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        done(self.state().fsyncdir(&self.faults, ino), reply);
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let mut state = self.state();
        let listed = (|| {
            let path = state.root.join(state.rel_path(ino)?);
            let parent = state.node(ino)?.parent;
            let mut entries = vec![
                (ino, FileType::Directory, OsString::from(".")),
                (parent, FileType::Directory, OsString::from("..")),
            ];
            let mut names: Vec<(OsString, Metadata)> = Vec::new();
            for entry in fs::read_dir(&path).map_err(|e| errno(&e))? {
                let entry = entry.map_err(|e| errno(&e))?;
                let name = entry.file_name();
                if NamespaceLog::is_stash(ino == ROOT, &name) {
                    continue;
                }
                names.push((name, entry.metadata().map_err(|e| errno(&e))?));
            }
            names.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, meta) in names {
                let child = state.child(ino, &name, &meta);
                entries.push((child, kind_of(&meta), name));
            }
            Ok(entries)
        })();
        match listed {
            Ok(entries) => {
                for (i, (child, kind, name)) in
                    entries.into_iter().enumerate().skip(offset.max(0) as usize)
                {
                    if reply.add(child, i as i64 + 1, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let state = self.state();
        let page = crate::overlay::PAGE;
        match self.faults.space_budget() {
            Some(budget) => {
                let blocks = budget / page;
                let free = budget.saturating_sub(state.used) / page;
                reply.statfs(blocks, free, free, 0, 0, page as u32, 255, page as u32);
            }
            None => match crate::statvfs(&state.root) {
                Ok(s) => reply.statfs(
                    s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, 255, s.frsize,
                ),
                Err(e) => reply.error(errno(&e)),
            },
        }
    }

    fn access(&mut self, _req: &Request<'_>, ino: u64, _mask: i32, reply: ReplyEmpty) {
        done(self.state().node(ino).map(|_| ()), reply);
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut state = self.state();
        let result = (|| {
            if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
                return Err(libc::EOPNOTSUPP);
            }
            if self.faults.fail_writes.load(Ordering::SeqCst) {
                return Err(libc::EIO);
            }
            let end = u64::try_from(offset.saturating_add(length)).map_err(|_| libc::EINVAL)?;
            let growth = state.overlay(ino)?.growth_to(end);
            state.charge(&self.faults, growth)?;
            state
                .overlay(ino)?
                .allocate(end, mode & libc::FALLOC_FL_KEEP_SIZE != 0);
            Ok(())
        })();
        done(result, reply);
    }
}
