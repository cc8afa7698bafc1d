//! Small tables of state that must survive a restart and be shared, live,
//! by the old and the new process during a graceful upgrade: a file of
//! 16-byte slots (two `u64`s each) used in place through a shared memory
//! map, every word read and written as an atomic. The rate limits
//! ([`crate::ratelimit`]) and the edge's click counts
//! ([`crate::edge::clicks`]) keep theirs this way.
//!
//! File layout (little-endian):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic (one per kind of table) |
//! | 8 | 4 | format version |
//! | 12 | 4 | slot count (a power of two) |
//! | 16 | 8 | replaced: 0, or 1 once a table of another size has been put in this one's place (its users move to the new file) |
//! | 24 | 40 | zero |
//! | 64 | 16 × slots | slots: two `u64`s each, meaning up to the table |
//!
//! A file that does not match (other magic, version or size) is replaced by
//! an empty table with a warning, by a new file renamed into place, never by
//! rewriting the old one: a process of an earlier version may have it mapped
//! (the old edge during an upgrade), and cutting a mapped file short kills
//! its reader with SIGBUS. For the same reason every block of the file is
//! allocated before it is mapped: a page of a sparse file first written
//! through the map on a full file system is a SIGBUS. Without the space, the
//! table lives in memory only, with a warning.
//!
//! Every process holds a shared `flock` on the file it uses, for as long as
//! it uses it, so that a process that replaced a file of another size can
//! tell when no one writes to the old one any more (the click counts fold in
//! what the old edge counted until then: [`crate::edge::clicks`]).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use memmap2::MmapMut;

const HEADER_LEN: usize = 64;
const SLOT_LEN: usize = 16;

/// What a kind of table is called (in messages) and how its file starts.
#[derive(Debug)]
pub struct Format {
    /// For messages: "rate-limit state", "click counts".
    pub what: &'static str,
    pub magic: &'static [u8; 8],
    pub version: u32,
}

/// Errors opening a state file.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct StateError {
    pub what: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// A mapped table of slots. Cloning is not offered; share it in an `Arc`.
pub struct SlotFile {
    map: MmapMut,
    mask: usize,
    path: PathBuf,
    what: &'static str,
    /// The mapped file (none for a table kept in memory). A table opened
    /// with [`SlotFile::open`] holds a shared `flock` on it for as long as
    /// it lives, so that a process that replaced the file can tell when no
    /// one uses the old one any more ([`SlotFile::in_use_elsewhere`]).
    file: Option<std::fs::File>,
}

impl std::fmt::Debug for SlotFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotFile")
            .field("what", &self.what)
            .field("path", &self.path)
            .field("slots", &(self.mask + 1))
            .finish()
    }
}

impl SlotFile {
    /// Maps `path`, creating it (and its directory) with `slots` slots
    /// (rounded up to a power of two, at least 64) when missing or unusable.
    pub fn open(path: &Path, format: &Format, slots: usize) -> Result<Self, StateError> {
        let err = |source| StateError {
            what: format.what,
            path: path.to_owned(),
            source,
        };
        let slots = slot_count(slots);
        let want = (HEADER_LEN + slots * SLOT_LEN) as u64;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        let header = header(format, slots);
        let mut found = [0u8; HEADER_LEN];
        if len == want {
            use std::os::unix::fs::FileExt;
            file.read_exact_at(&mut found, 0).map_err(err)?;
        }
        let file = if len == want && found[..16] == header[..16] {
            allocate(&file, want).map(|()| file)
        } else {
            if len > 0 {
                tracing::warn!(path = %path.display(), "{} unusable (other format or size); starting empty", format.what);
            }
            fresh_file(path, want, &header)
        };
        let (map, file) = match file {
            Ok(file) => {
                // SAFETY: the file is only ever accessed through this
                // mapping's atomics (by this process and by uload processes
                // sharing it during an upgrade); a foreign writer could make
                // the values wrong but not unsound, since every slot is read
                // as plain integers. Files of another format or size are
                // replaced by rename, never truncated.
                let map = unsafe { MmapMut::map_mut(&file) }.map_err(err)?;
                (map, Some(file))
            }
            Err(e) => {
                tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    "{} cannot be written to disk; kept in memory only, lost at exit",
                    format.what
                );
                (MmapMut::map_anon(want as usize).map_err(err)?, None)
            }
        };
        let table = Self {
            map,
            mask: slots - 1,
            path: path.to_owned(),
            what: format.what,
            file,
        };
        table.lock_shared();
        // The file at the path is the one in use, whatever an earlier
        // process left in its header.
        if table.replaced() {
            table
                .replaced_word()
                .store(0, std::sync::atomic::Ordering::Release);
        }
        Ok(table)
    }

    /// The table at `path` if it is of this format but not of `slots`
    /// slots (the setting changed), mapped as it is, shared: a process
    /// that still uses it (the old edge of a graceful upgrade) goes on
    /// writing to it, and these writes are seen here. Takes no lock. Call
    /// before [`SlotFile::open`] replaces the file.
    pub fn of_another_size(path: &Path, format: &Format, slots: usize) -> Option<Self> {
        let slots = slot_count(slots);
        Self::existing(path, format).filter(|table| table.len() != slots)
    }

    /// The table at `path`, whatever its size, mapped as it is (`None`
    /// when there is no such file, or it is not a whole table of this
    /// format). Takes no lock.
    pub fn existing(path: &Path, format: &Format) -> Option<Self> {
        use std::os::unix::fs::FileExt;
        let file = OpenOptions::new().read(true).write(true).open(path).ok()?;
        let len = file.metadata().ok()?.len();
        let mut head = [0u8; HEADER_LEN];
        file.read_exact_at(&mut head, 0).ok()?;
        let count = u32::from_le_bytes(head[12..16].try_into().ok()?) as usize;
        let same_kind =
            head[0..8] == format.magic[..] && head[8..12] == format.version.to_le_bytes();
        let whole = (HEADER_LEN as u64)
            .saturating_add((count as u64).saturating_mul(SLOT_LEN as u64))
            == len;
        if !same_kind || !count.is_power_of_two() || !whole {
            return None;
        }
        // SAFETY: as in `open`; the file's length was checked against its
        // header just now, and such files are never cut short.
        let map = unsafe { MmapMut::map_mut(&file) }.ok()?;
        Some(Self {
            map,
            mask: count - 1,
            path: path.to_owned(),
            what: format.what,
            file: Some(file),
        })
    }

    /// Whether this table lives in memory only (its file could not be
    /// written; lost at exit, seen by no other process).
    pub fn in_memory(&self) -> bool {
        self.file.is_none()
    }

    /// Takes the shared lock [`SlotFile::open`] takes (for a table from
    /// [`SlotFile::existing`] that this process goes on to use). Only a sign
    /// for a later process (see `in_use_elsewhere`): where it cannot be
    /// taken, that process folds in less, nothing breaks.
    pub fn lock_shared(&self) {
        if let Some(file) = &self.file {
            let _ = flock(file, libc::LOCK_SH | libc::LOCK_NB);
        }
    }

    /// The header word that says a newer table of another size has been
    /// put in this one's place (bytes 16..24; 0 in a table in use).
    fn replaced_word(&self) -> &AtomicU64 {
        // SAFETY: the header is 64 bytes, 8-aligned at the start of a
        // page-aligned map; like the slots, read and written as an atomic.
        unsafe { &*(self.map[16..24].as_ptr() as *const AtomicU64) }
    }

    /// Marks this table as replaced by the one now at its path, for the
    /// processes that still map it ([`SlotFile::replaced`]).
    pub fn mark_replaced(&self) {
        self.replaced_word()
            .store(1, std::sync::atomic::Ordering::Release);
    }

    /// Whether a newer table of another size has been put in this one's
    /// place: its users should move to the file now at its path.
    #[inline]
    pub fn replaced(&self) -> bool {
        self.replaced_word()
            .load(std::sync::atomic::Ordering::Acquire)
            != 0
    }

    /// Every taken slot: `(first word, second word)` for each slot whose
    /// first word is not 0, read now.
    pub fn entries(&self) -> Vec<(u64, u64)> {
        use std::sync::atomic::Ordering::Acquire;
        (0..self.len())
            .filter_map(|i| {
                let (key, value) = self.slot(i);
                let key = key.load(Acquire);
                (key != 0).then(|| (key, value.load(Acquire)))
            })
            .collect()
    }

    /// Whether another process still holds the file as a table (the shared
    /// lock every [`SlotFile::open`] takes); meant for a table from
    /// [`SlotFile::of_another_size`], which holds none itself. A process of
    /// a version before the lock never counts as holding it.
    pub fn in_use_elsewhere(&self) -> bool {
        let Some(file) = &self.file else {
            return false;
        };
        if flock(file, libc::LOCK_EX | libc::LOCK_NB).is_ok() {
            let _ = flock(file, libc::LOCK_UN);
            return false;
        }
        true
    }

    /// Slot `i` (taken modulo the slot count): its two words.
    #[inline]
    pub fn slot(&self, i: usize) -> (&AtomicU64, &AtomicU64) {
        let at = HEADER_LEN + (i & self.mask) * SLOT_LEN;
        let bytes = &self.map[at..at + SLOT_LEN];
        let ptr = bytes.as_ptr();
        // SAFETY: the map is page-aligned, HEADER_LEN and SLOT_LEN are
        // multiples of 8, so both words are 8-aligned and inside the map,
        // which lives as long as `self`. AtomicU64 has u64's layout.
        unsafe {
            (
                &*(ptr as *const AtomicU64),
                &*(ptr.add(8) as *const AtomicU64),
            )
        }
    }

    /// How many slots the table has (at least 64).
    pub(crate) fn len(&self) -> usize {
        self.mask + 1
    }

    /// Writes the table's pages to disk (the kernel does so anyway; this is
    /// for a clean shutdown before a machine is powered off).
    pub fn flush(&self) {
        if let Err(e) = self.map.flush_async() {
            tracing::warn!(path = %self.path.display(), error = %e, "flushing {}", self.what);
        }
    }
}

/// The slots a table asked for `slots` has: a power of two, 64 to 2^26.
fn slot_count(slots: usize) -> usize {
    slots.clamp(64, 1 << 26).next_power_of_two()
}

/// `flock(2)`, retried on EINTR.
fn flock(file: &std::fs::File, op: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: a plain system call on a descriptor `file` owns.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

fn header(format: &Format, slots: usize) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[0..8].copy_from_slice(format.magic);
    header[8..12].copy_from_slice(&format.version.to_le_bytes());
    header[12..16].copy_from_slice(&(slots as u32).to_le_bytes());
    header
}

/// Gives `file` disk blocks for its first `len` bytes (a no-op where they
/// are already there). A file system without `fallocate` is left as it is.
fn allocate(file: &std::fs::File, len: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let len = libc::off_t::try_from(len).map_err(std::io::Error::other)?;
        loop {
            // SAFETY: a valid, open descriptor; mode 0 only allocates (never
            // changes the contents or shrinks the file).
            if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP) => return Ok(()),
                _ => return Err(e),
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, len);
        Ok(())
    }
}

/// An empty table of `len` bytes starting with `header` at `path`: written
/// under a temporary name and renamed over whatever was there.
fn fresh_file(path: &Path, len: u64, header: &[u8]) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::FileExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let written = (|| {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.set_len(len)?;
        allocate(&file, len)?;
        file.write_all_at(header, 0)?;
        std::fs::rename(&tmp, path)?;
        Ok(file)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// For tests: the byte offset of the slots and the size of one.
#[doc(hidden)]
pub const LAYOUT: (usize, usize) = (HEADER_LEN, SLOT_LEN);
