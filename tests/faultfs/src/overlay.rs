//! The unsynced part of one regular file: writes and size changes since its last fsync.
//!
//! The backing file always holds the file's durable content. Everything written since the
//! last fsync lives here, in whole 4 KiB pages copied from the backing file on first
//! write, together with the file's current size and the lowest size it was truncated to.
//! Reads merge the pages over the backing file; [`Overlay::write_through`] (fsync) applies
//! them to the backing file and fsyncs it; dropping an `Overlay` is the power cut.
//!
//! Invariants: page bytes at or past `len` are zero; backing bytes at or past
//! `truncated_to` are never shown (a file shrunk and grown again reads zeros there, as it
//! would on a real file system).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

pub(crate) const PAGE: u64 = 4096;

/// Space accounting unit: a file takes its bytes up to the end of its data, rounded up to
/// whole pages. Extending a file with ftruncate allocates nothing (fjall preallocates its
/// 64 MiB journals that way); writing, even into such a hole, does.
pub(crate) fn allocated(data_end: u64) -> u64 {
    data_end.div_ceil(PAGE) * PAGE
}

pub(crate) struct Overlay {
    backing: File,
    /// The size of the backing file (the durable size).
    backing_len: u64,
    /// The file's current size, as readers see it.
    len: u64,
    /// The lowest size the file was truncated to since the last fsync, if it was.
    truncated_to: Option<u64>,
    pages: BTreeMap<u64, Box<[u8]>>,
    /// End of the file's data, for space accounting (see [`allocated`]).
    data_end: u64,
}

impl Overlay {
    /// Takes over `backing`, whose `data_end` was measured by the caller.
    pub(crate) fn new(backing: File, data_end: u64) -> io::Result<Self> {
        let backing_len = backing.metadata()?.len();
        Ok(Self {
            backing,
            backing_len,
            len: backing_len,
            truncated_to: None,
            pages: BTreeMap::new(),
            data_end: data_end.min(backing_len),
        })
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The backing file's metadata (its size is the durable size, not [`Overlay::len`]).
    pub(crate) fn backing_metadata(&self) -> io::Result<std::fs::Metadata> {
        self.backing.metadata()
    }

    pub(crate) fn data_end(&self) -> u64 {
        self.data_end
    }

    pub(crate) fn is_dirty(&self) -> bool {
        !self.pages.is_empty() || self.truncated_to.is_some() || self.len != self.backing_len
    }

    /// Reads durable bytes at `offset` into `buf` (zeros past the backing file's end or
    /// past a pending truncation).
    fn read_backing(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        let visible_end = self
            .truncated_to
            .map_or(self.backing_len, |t| t.min(self.backing_len));
        if offset >= visible_end {
            return Ok(());
        }
        let want = usize::try_from((visible_end - offset).min(buf.len() as u64))
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut done = 0;
        while done < want {
            let n = self
                .backing
                .read_at(&mut buf[done..want], offset + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(())
    }

    /// Reads up to `size` bytes at `offset`, as the current (unsynced) file shows them.
    pub(crate) fn read(&self, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        if offset >= self.len {
            return Ok(Vec::new());
        }
        let end = self.len.min(offset + u64::from(size));
        let mut out = vec![0u8; (end - offset) as usize];
        let mut pos = offset;
        while pos < end {
            let index = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let chunk_end = end.min((index + 1) * PAGE);
            let out_range = (pos - offset) as usize..(chunk_end - offset) as usize;
            match self.pages.get(&index) {
                Some(page) => out[out_range.clone()]
                    .copy_from_slice(&page[in_page..in_page + out_range.len()]),
                None => self.read_backing(pos, &mut out[out_range])?,
            }
            pos = chunk_end;
        }
        Ok(out)
    }

    /// How many more bytes of space a write or allocation ending at `end` would take.
    pub(crate) fn growth_to(&self, end: u64) -> u64 {
        allocated(end.max(self.data_end)) - allocated(self.data_end)
    }

    fn load_page(&self, index: u64) -> io::Result<Box<[u8]>> {
        let mut page = vec![0u8; PAGE as usize].into_boxed_slice();
        self.read_backing(index * PAGE, &mut page)?;
        // Bytes past the current size read as zeros (the invariant above).
        if self.len < (index + 1) * PAGE {
            let keep = self.len.saturating_sub(index * PAGE) as usize;
            page[keep..].fill(0);
        }
        Ok(page)
    }

    fn page_mut(&mut self, index: u64) -> io::Result<&mut [u8]> {
        let page = match self.pages.remove(&index) {
            Some(page) => page,
            None => self.load_page(index)?,
        };
        Ok(&mut self.pages.entry(index).or_insert(page)[..])
    }

    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset + data.len() as u64;
        let mut pos = offset;
        while pos < end {
            let index = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let chunk_end = end.min((index + 1) * PAGE);
            let src = &data[(pos - offset) as usize..(chunk_end - offset) as usize];
            self.page_mut(index)?[in_page..in_page + src.len()].copy_from_slice(src);
            pos = chunk_end;
        }
        self.len = self.len.max(end);
        self.data_end = self.data_end.max(end);
        Ok(())
    }

    /// Allocates `[offset, end)` (fallocate); grows the size unless `keep_size`.
    pub(crate) fn allocate(&mut self, end: u64, keep_size: bool) {
        self.data_end = self.data_end.max(end);
        if !keep_size && end > self.len {
            self.len = end;
        }
    }

    pub(crate) fn truncate(&mut self, size: u64) {
        if size < self.len {
            self.pages.retain(|&index, _| index * PAGE < size);
            if !size.is_multiple_of(PAGE) {
                let index = size / PAGE;
                if let Some(page) = self.pages.get_mut(&index) {
                    page[(size % PAGE) as usize..].fill(0);
                }
            }
            self.truncated_to = Some(self.truncated_to.map_or(size, |t| t.min(size)));
            self.data_end = self.data_end.min(size);
        }
        self.len = size;
    }

    /// fsync: applies every pending change to the backing file and fsyncs it. On error the
    /// pending changes stay pending (a later fsync may retry them).
    pub(crate) fn write_through(&mut self) -> io::Result<()> {
        if let Some(t) = self.truncated_to {
            if t < self.backing_len {
                self.backing.set_len(t)?;
            }
        }
        if self.backing.metadata()?.len() != self.len {
            self.backing.set_len(self.len)?;
        }
        for (&index, page) in &self.pages {
            let start = index * PAGE;
            let valid = (self.len - start).min(PAGE) as usize;
            self.backing.write_all_at(&page[..valid], start)?;
        }
        self.backing.sync_all()?;
        self.pages.clear();
        self.truncated_to = None;
        self.backing_len = self.len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn overlay_over(content: &[u8]) -> (tempfile::TempDir, std::path::PathBuf, Overlay) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(content))
            .expect("write");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        let overlay = Overlay::new(file, content.len() as u64).expect("overlay");
        (dir, path, overlay)
    }

    #[test]
    fn reads_merge_pending_writes_over_backing() {
        let (_dir, path, mut overlay) = overlay_over(&[1u8; 10_000]);
        overlay.write(4090, &[2u8; 20]).expect("write");
        overlay.write(12_000, b"end").expect("write");
        let all = overlay.read(0, 20_000).expect("read");
        assert_eq!(all.len(), 12_003);
        assert!(all[..4090].iter().all(|&b| b == 1));
        assert!(all[4090..4110].iter().all(|&b| b == 2));
        assert!(all[4110..10_000].iter().all(|&b| b == 1));
        assert!(all[10_000..12_000].iter().all(|&b| b == 0));
        assert_eq!(&all[12_000..], b"end");
        assert_eq!(
            std::fs::read(&path).expect("read backing"),
            vec![1u8; 10_000]
        );
    }

    #[test]
    fn write_through_makes_backing_equal_to_what_readers_saw() {
        let (_dir, path, mut overlay) = overlay_over(&[1u8; 10_000]);
        overlay.write(5000, &[3u8; 9000]).expect("write");
        overlay.truncate(12_000);
        let seen = overlay.read(0, 1 << 20).expect("read");
        overlay.write_through().expect("fsync");
        assert!(!overlay.is_dirty());
        assert_eq!(std::fs::read(&path).expect("read backing"), seen);
    }

    #[test]
    fn shrink_then_grow_reads_zeros_not_old_backing_bytes() {
        let (_dir, path, mut overlay) = overlay_over(&[7u8; 9000]);
        overlay.truncate(100);
        overlay.truncate(9000);
        let seen = overlay.read(0, 9000).expect("read");
        assert!(seen[..100].iter().all(|&b| b == 7));
        assert!(seen[100..].iter().all(|&b| b == 0));
        overlay.write_through().expect("fsync");
        assert_eq!(std::fs::read(&path).expect("read backing"), seen);
    }

    #[test]
    fn space_counts_written_data_not_ftruncate_holes() {
        let (_dir, _path, mut overlay) = overlay_over(b"");
        overlay.truncate(64 << 20);
        assert_eq!(overlay.growth_to(0), 0);
        assert_eq!(overlay.growth_to(1), PAGE);
        overlay.write(0, &[1u8; 5000]).expect("write");
        assert_eq!(overlay.data_end(), 5000);
        assert_eq!(overlay.growth_to(8192), 0);
        assert_eq!(overlay.growth_to(8193), PAGE);
    }
}
