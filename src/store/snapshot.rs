//! Snapshots: immutable files holding every link up to a sequence number,
//! used in place through `memmap2`.
//!
//! Layout (byte by byte in `docs/storage.md`): a 128-byte header, the records
//! region (link encodings sorted by code, each padded to 8 bytes), then the
//! hash index (`bucket_count` little-endian `u64` slots, linear probing).
//! Format version 2 (written by this build) holds link encoding v2 records;
//! version 1 files (link encoding v1 records, written by earlier builds) are
//! still read: each record's own version byte says how to decode it.
//! Opening maps the file and checks the header and, unless told not to, the
//! checksums of both regions; a lookup is a hash, a probe or two and a key
//! comparison, with no allocation.
//!
//! ```no_run
//! use uload::store::snapshot::{Snapshot, write_snapshot};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let link = uload::store::record::Link::new("abc", "https://example.com/")?;
//! let path = std::path::Path::new("/tmp/example.snap");
//! write_snapshot(path, 1, [link.as_ref()].into_iter().map(Ok::<_, std::convert::Infallible>))?;
//! let snap = Snapshot::open(path, true)?;
//! assert_eq!(snap.get(b"abc").unwrap().target, b"https://example.com/");
//! # Ok(()) }
//! ```

use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapMut};

use super::hash::{HASH_FNV1A_FMIX64, code_hash};
use super::record::{
    FLAG_DISABLED, FLAG_FORWARD_QUERY, LINK_V1_FIXED_LEN, LINK_V2_FIXED_LEN, LinkEncoding, LinkRef,
    RecordError, encoded_code, validate_code,
};
use super::sync_dir;

/// Magic bytes at the start of every snapshot.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"ULOADSNP";
/// Snapshot format version this build writes (link encoding v2 records).
pub const SNAPSHOT_VERSION: u32 = 2;
/// The earlier format version, still read (link encoding v1 records).
pub const SNAPSHOT_VERSION_V1: u32 = 1;
/// Length of the header.
pub const SNAPSHOT_HEADER_LEN: usize = 128;
/// Records are padded to this alignment; index slots count in these units.
pub const RECORD_ALIGN: usize = 8;
/// Largest records region a slot can address (u32 units of 8 bytes).
pub const MAX_RECORDS_LEN: u64 = (u32::MAX as u64 - 1) * RECORD_ALIGN as u64;

/// Errors opening or writing a snapshot. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: invalid snapshot: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path}: record for {code:?} is out of order or duplicated")]
    Unsorted { path: PathBuf, code: String },
    #[error("{path}: records region would exceed {MAX_RECORDS_LEN} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path}: {source}")]
    Record { path: PathBuf, source: RecordError },
}

/// The parsed, validated header of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotHeader {
    pub version: u32,
    /// Every log record up to and including this sequence is in the snapshot.
    pub seq: u64,
    pub link_count: u64,
    /// Number of index slots; a power of two.
    pub bucket_count: u64,
    pub records_offset: u64,
    pub records_len: u64,
    pub index_offset: u64,
    pub index_len: u64,
    pub created_at_ms: u64,
    pub records_crc: u32,
    pub index_crc: u32,
    pub hash_fn: u32,
}

impl SnapshotHeader {
    /// Encodes the header, computing its own checksum.
    pub fn encode(&self) -> [u8; SNAPSHOT_HEADER_LEN] {
        let mut h = [0u8; SNAPSHOT_HEADER_LEN];
        h[0..8].copy_from_slice(SNAPSHOT_MAGIC);
        h[8..12].copy_from_slice(&self.version.to_le_bytes());
        h[12..16].copy_from_slice(&(SNAPSHOT_HEADER_LEN as u32).to_le_bytes());
        for (at, v) in [
            (16, self.seq),
            (24, self.link_count),
            (32, self.bucket_count),
            (40, self.records_offset),
            (48, self.records_len),
            (56, self.index_offset),
            (64, self.index_len),
            (72, self.created_at_ms),
        ] {
            h[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        h[80..84].copy_from_slice(&self.records_crc.to_le_bytes());
        h[84..88].copy_from_slice(&self.index_crc.to_le_bytes());
        h[88..92].copy_from_slice(&self.hash_fn.to_le_bytes());
        let crc = crc32c::crc32c(&h[0..124]);
        h[124..128].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Decodes and checks a header against the length of its file.
    pub fn decode(buf: &[u8], file_len: u64) -> Result<Self, String> {
        if buf.len() < SNAPSHOT_HEADER_LEN {
            return Err(format!(
                "file is {} bytes, shorter than the {SNAPSHOT_HEADER_LEN}-byte header",
                buf.len()
            ));
        }
        if &buf[0..8] != SNAPSHOT_MAGIC {
            return Err("magic is not ULOADSNP".into());
        }
        let u32_at =
            |at: usize| u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let stored = u32_at(124);
        let computed = crc32c::crc32c(&buf[0..124]);
        if stored != computed {
            return Err(format!(
                "header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ));
        }
        let h = Self {
            version: u32_at(8),
            seq: u64_at(16),
            link_count: u64_at(24),
            bucket_count: u64_at(32),
            records_offset: u64_at(40),
            records_len: u64_at(48),
            index_offset: u64_at(56),
            index_len: u64_at(64),
            created_at_ms: u64_at(72),
            records_crc: u32_at(80),
            index_crc: u32_at(84),
            hash_fn: u32_at(88),
        };
        if h.version != SNAPSHOT_VERSION && h.version != SNAPSHOT_VERSION_V1 {
            return Err(format!(
                "format version {} is not supported (this build reads {SNAPSHOT_VERSION_V1} and {SNAPSHOT_VERSION})",
                h.version
            ));
        }
        if u32_at(12) as usize != SNAPSHOT_HEADER_LEN {
            return Err(format!(
                "header length {} is not {SNAPSHOT_HEADER_LEN}",
                u32_at(12)
            ));
        }
        if buf[92..124].iter().any(|&b| b != 0) {
            return Err("reserved header bytes are not zero".into());
        }
        if h.seq > super::frame::MAX_SEQ {
            return Err(format!(
                "sequence {} is above {}",
                h.seq,
                super::frame::MAX_SEQ
            ));
        }
        if h.hash_fn != HASH_FNV1A_FMIX64 {
            return Err(format!("unknown hash function {}", h.hash_fn));
        }
        if !h.bucket_count.is_power_of_two() {
            return Err(format!(
                "bucket count {} is not a power of two",
                h.bucket_count
            ));
        }
        if h.link_count >= h.bucket_count {
            return Err(format!(
                "{} links do not fit {} buckets with a free slot",
                h.link_count, h.bucket_count
            ));
        }
        if h.index_len != h.bucket_count.saturating_mul(8) {
            return Err(format!(
                "index length {} is not 8 x {} buckets",
                h.index_len, h.bucket_count
            ));
        }
        if h.records_offset != SNAPSHOT_HEADER_LEN as u64
            || h.records_len > MAX_RECORDS_LEN
            || !h.records_len.is_multiple_of(RECORD_ALIGN as u64)
            || h.index_offset != h.records_offset + h.records_len
            || h.index_offset.checked_add(h.index_len) != Some(file_len)
        {
            return Err(format!(
                "regions (records {}+{}, index {}+{}) do not tile the {file_len}-byte file",
                h.records_offset, h.records_len, h.index_offset, h.index_len
            ));
        }
        // Every record takes at least the fixed part plus a one-byte code,
        // padded: that of v1 in a version 1 file, that of v2 in a version 2 file.
        let fixed = if h.version == SNAPSHOT_VERSION_V1 {
            LINK_V1_FIXED_LEN
        } else {
            LINK_V2_FIXED_LEN
        };
        let min_record = (fixed + 1).next_multiple_of(RECORD_ALIGN) as u64;
        if h.link_count.saturating_mul(min_record) > h.records_len {
            return Err(format!(
                "{} links cannot fit in {} bytes of records",
                h.link_count, h.records_len
            ));
        }
        Ok(h)
    }
}

/// An open snapshot. Cloning is not offered; share it through `Arc<Snapshot>`.
/// The mapping stays valid after the file is unlinked (compaction removes old
/// snapshots while readers may still hold them).
pub struct Snapshot {
    map: Mmap,
    header: SnapshotHeader,
    path: PathBuf,
    mask: u64,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("path", &self.path)
            .field("header", &self.header)
            .finish()
    }
}

impl Snapshot {
    /// Maps and validates a snapshot. With `verify_checksums`, the CRC32C of the
    /// records and index regions is checked too (a read of the whole file);
    /// without, only the header is read and the rest is paged in on use.
    pub fn open(path: &Path, verify_checksums: bool) -> Result<Self, SnapshotError> {
        let io = |source| SnapshotError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: snapshots are immutable once renamed into place; the writer
        // never modifies a published file (it writes a new one and renames).
        // Bytes are only ever read through bounds-checked slices.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        // Ask for 2 MiB (PMD) mappings before anything reads the pages (the
        // checksum check reads them all). A file `write_snapshot` wrote sits
        // in the page cache in 2 MiB folios, each mapped by one PMD (fewer TLB
        // misses per cold lookup, fewer page faults); pages not cached are
        // read in as 2 MiB folios only with this advice. It is only advice:
        // if the kernel refuses (THP off, an old kernel), the mapping works
        // with 4 KiB pages as before, so the error is ignored.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        Self::from_map(map, path, verify_checksums)
    }

    /// Validates a snapshot held in memory (tests, fuzzing, a snapshot received
    /// over the wire): the bytes are copied into an anonymous read-only map and
    /// checked exactly as [`Snapshot::open`] checks a file. Errors name the
    /// path `<memory>`. An empty slice is refused as too short for a header.
    pub fn from_bytes(bytes: &[u8], verify_checksums: bool) -> Result<Self, SnapshotError> {
        let path = Path::new("<memory>");
        let io = |source| SnapshotError::Io {
            path: path.to_owned(),
            source,
        };
        // memmap2 maps one byte for a zero length and still derefs to an empty
        // slice, so `len == 0` needs no special case: the header check refuses it.
        let mut map = MmapMut::map_anon(bytes.len()).map_err(io)?;
        map.copy_from_slice(bytes);
        let map = map.make_read_only().map_err(io)?;
        Self::from_map(map, path, verify_checksums)
    }

    fn from_map(map: Mmap, path: &Path, verify_checksums: bool) -> Result<Self, SnapshotError> {
        let invalid = |reason: String| SnapshotError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let header = SnapshotHeader::decode(&map, map.len() as u64).map_err(invalid)?;
        let snap = Self {
            mask: header.bucket_count - 1,
            header,
            map,
            path: path.to_owned(),
        };
        if verify_checksums {
            snap.verify_checksums().map_err(invalid)?;
        }
        Ok(snap)
    }

    /// Checks the CRC32C of the records and index regions, each computed on
    /// the available cores ([`crc32c_parallel`]; the same values as one pass).
    pub fn verify_checksums(&self) -> Result<(), String> {
        let threads = crc_threads();
        let records = crc32c_parallel(self.records(), threads);
        if records != self.header.records_crc {
            return Err(format!(
                "records checksum mismatch: stored {:#010x}, computed {records:#010x}",
                self.header.records_crc
            ));
        }
        let index = crc32c_parallel(self.index(), threads);
        if index != self.header.index_crc {
            return Err(format!(
                "index checksum mismatch: stored {:#010x}, computed {index:#010x}",
                self.header.index_crc
            ));
        }
        Ok(())
    }

    /// The validated header.
    pub fn header(&self) -> &SnapshotHeader {
        &self.header
    }

    /// Path the snapshot was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sequence of the last log record it holds.
    pub fn seq(&self) -> u64 {
        self.header.seq
    }

    /// Number of links.
    pub fn len(&self) -> u64 {
        self.header.link_count
    }

    /// Whether it holds no links.
    pub fn is_empty(&self) -> bool {
        self.header.link_count == 0
    }

    fn records(&self) -> &[u8] {
        let start = self.header.records_offset as usize;
        &self.map[start..start + self.header.records_len as usize]
    }

    fn index(&self) -> &[u8] {
        let start = self.header.index_offset as usize;
        &self.map[start..start + self.header.index_len as usize]
    }

    /// Starts loading the index slot where a lookup of `code` begins into the
    /// CPU cache, without waiting for it: a caller that has other work to do
    /// before [`Self::get`] (reading the rest of a request) overlaps that
    /// work with the slot's cache miss. Reads nothing, changes nothing.
    #[inline]
    pub fn prefetch(&self, code: &[u8]) {
        let at = ((code_hash(code) & self.mask) as usize) * 8;
        if let Some(slot) = self.index().get(at..at + 8) {
            prefetch_line(slot.as_ptr());
        }
    }

    /// Looks a code up. Allocation-free; a damaged index or record makes the
    /// lookup miss rather than panic.
    #[inline]
    pub fn get(&self, code: &[u8]) -> Option<LinkRef<'_>> {
        let h = code_hash(code);
        let tag = (h >> 32) as u32;
        let index = self.index();
        let records = self.records();
        let mut i = h & self.mask;
        for _ in 0..=self.mask {
            let at = (i as usize) * 8;
            let slot = u64::from_le_bytes(index.get(at..at + 8)?.try_into().ok()?);
            if slot == 0 {
                return None;
            }
            if (slot >> 32) as u32 == tag {
                // Units count from 1; a damaged slot holding unit 0 is a miss.
                let off = ((slot as u32) as usize).checked_sub(1)? * RECORD_ALIGN;
                let rec = records.get(off..)?;
                if encoded_code(rec) == Some(code) {
                    return LinkRef::decode(rec).ok().map(|(link, _)| link);
                }
            }
            i = (i + 1) & self.mask;
        }
        None
    }

    /// Every link, in code order. Yields an error (and stops) at a damaged record.
    pub fn iter(&self) -> SnapshotIter<'_> {
        SnapshotIter {
            records: self.records(),
            pos: 0,
            remaining: self.header.link_count,
            path: &self.path,
        }
    }
}

/// A hint to the CPU to bring the cache line of `p` in (x86-64 `prefetcht0`;
/// nothing elsewhere). It cannot fault, whatever the address.
#[inline(always)]
fn prefetch_line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it reads nothing the program sees and
    // does not fault on any address.
    #[allow(unused_unsafe)]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Smallest piece of a region checksummed on a thread of its own: below
/// this, starting a thread costs more than it saves.
pub const CRC_CHUNK_MIN: usize = 4 << 20;

/// Threads for checking a snapshot: the CPUs this process may run on.
fn crc_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// CRC32C of `data`, computed in up to `threads` contiguous pieces of at
/// least [`CRC_CHUNK_MIN`] bytes on scoped threads (the calling thread takes
/// the first) and combined with `crc32c_combine`. The result is exactly
/// `crc32c::crc32c(data)`, for any length and thread count.
pub fn crc32c_parallel(data: &[u8], threads: usize) -> u32 {
    let pieces = threads.min(data.len() / CRC_CHUNK_MIN).max(1);
    if pieces == 1 {
        return crc32c::crc32c(data);
    }
    crc32c_pieces(data, pieces)
}

/// CRC32C of `data` split into `pieces` (≥ 1) contiguous parts of nearly
/// equal length, one thread each.
fn crc32c_pieces(data: &[u8], pieces: usize) -> u32 {
    let size = data.len().div_ceil(pieces).max(1);
    let mut parts = data.chunks(size);
    let first = parts.next().unwrap_or_default();
    std::thread::scope(|scope| {
        // A thread that cannot be started (no resources) is not an error:
        // its piece is checksummed here instead, after the first.
        let others: Vec<_> = parts
            .map(|part| {
                let spawned = std::thread::Builder::new()
                    .name("uload-snapshot-crc".into())
                    .spawn_scoped(scope, move || crc32c::crc32c(part))
                    .ok();
                (part, spawned)
            })
            .collect();
        let mut crc = crc32c::crc32c(first);
        for (part, handle) in others {
            // crc32c does not panic; if a thread did, compute its part here.
            let part_crc = handle
                .and_then(|h| h.join().ok())
                .unwrap_or_else(|| crc32c::crc32c(part));
            crc = crc32c::crc32c_combine(crc, part_crc, part.len());
        }
        crc
    })
}

/// Iterator over a snapshot's records.
pub struct SnapshotIter<'a> {
    records: &'a [u8],
    pos: usize,
    remaining: u64,
    path: &'a Path,
}

impl<'a> Iterator for SnapshotIter<'a> {
    type Item = Result<LinkRef<'a>, SnapshotError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        let rec = self.records.get(self.pos..).unwrap_or_default();
        match LinkRef::decode(rec) {
            Ok((link, used)) => {
                self.pos += used.next_multiple_of(RECORD_ALIGN);
                self.remaining -= 1;
                Some(Ok(link))
            }
            Err(source) => {
                self.remaining = 0;
                Some(Err(SnapshotError::Record {
                    path: self.path.to_owned(),
                    source,
                }))
            }
        }
    }
}

impl From<std::convert::Infallible> for SnapshotError {
    fn from(e: std::convert::Infallible) -> Self {
        match e {}
    }
}

/// Figures about a snapshot just written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub path: PathBuf,
    pub header: SnapshotHeader,
}

/// Buckets for `n` links: a power of two keeping the load at or under 0.7
/// (and at least one free slot, so every probe sequence ends).
pub fn bucket_count_for(n: u64) -> u64 {
    (n.saturating_mul(10) / 7 + 1).max(8).next_power_of_two()
}

/// Writes a snapshot of `links` (strictly ascending by code) holding the log
/// up to `seq`, to `path`: written to `path.tmp`, fsynced, renamed into
/// place, directory fsynced. On error the temporary file is removed.
/// Writes the current format (version 2, link encoding v2 records).
pub fn write_snapshot<'a, E>(
    path: &Path,
    seq: u64,
    links: impl Iterator<Item = Result<LinkRef<'a>, E>>,
) -> Result<SnapshotInfo, SnapshotError>
where
    SnapshotError: From<E>,
{
    write_snapshot_as(path, seq, links, LinkEncoding::CURRENT)
}

/// [`write_snapshot`] with records in `encoding`: `LinkEncoding::V1` writes
/// a format version 1 file, exactly as builds before link encoding v2 did.
/// The store only writes the current format; the old one is for tests and
/// tools that must produce files an earlier build can read.
pub fn write_snapshot_as<'a, E>(
    path: &Path,
    seq: u64,
    links: impl Iterator<Item = Result<LinkRef<'a>, E>>,
    encoding: LinkEncoding,
) -> Result<SnapshotInfo, SnapshotError>
where
    SnapshotError: From<E>,
{
    let tmp = path.with_extension("snap.tmp");
    let result = write_snapshot_to(&tmp, path, seq, links, encoding);
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The size of every write [`HugeChunkWriter`] issues but the last: 2 MiB,
/// the size of a PMD mapping on x86-64 (and of a 4 KiB-granule arm64 one).
pub(crate) const HUGE_CHUNK: usize = 2 << 20;

/// Writes a new file from offset 0 in 2 MiB pieces: every `write` but the
/// last covers exactly one 2 MiB-aligned range of the file. A filesystem with
/// large folios (ext4 on kernel 6.16+) then caches the file in 2 MiB folios,
/// which a `MADV_HUGEPAGE` mapping ([`Snapshot::open`]) maps with one PMD
/// each. Smaller or unaligned writes (a 1 MiB `BufWriter`, `cp`) leave
/// smaller folios that are never PMD-mapped.
pub(crate) struct HugeChunkWriter {
    file: File,
    buf: Vec<u8>,
}

impl HugeChunkWriter {
    /// `file` must be empty, at offset 0.
    pub(crate) fn new(file: File) -> Self {
        Self {
            file,
            buf: Vec::with_capacity(HUGE_CHUNK),
        }
    }

    pub(crate) fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = data.len().min(HUGE_CHUNK - self.buf.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == HUGE_CHUNK {
                self.file.write_all(&self.buf)?;
                self.buf.clear();
            }
        }
        Ok(())
    }

    /// Writes the tail (under 2 MiB) and hands the file back, unsynced.
    pub(crate) fn finish(mut self) -> io::Result<File> {
        self.file.write_all(&self.buf)?;
        Ok(self.file)
    }
}

fn write_snapshot_to<'a, E>(
    tmp: &Path,
    path: &Path,
    seq: u64,
    links: impl Iterator<Item = Result<LinkRef<'a>, E>>,
    encoding: LinkEncoding,
) -> Result<SnapshotInfo, SnapshotError>
where
    SnapshotError: From<E>,
{
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source| SnapshotError::Io { path: p, source }
    };
    let file = File::create(tmp).map_err(io(tmp))?;
    let mut out = HugeChunkWriter::new(file);
    out.write_all(&[0u8; SNAPSHOT_HEADER_LEN])
        .map_err(io(tmp))?;
    // (hash, slot value) per link, collected while records stream out.
    let mut entries: Vec<(u64, u32)> = Vec::new();
    let mut records_len = 0u64;
    let mut records_crc = 0u32;
    let mut buf = Vec::with_capacity(4096);
    let mut last_code: Vec<u8> = Vec::new();
    for link in links {
        let link = link?;
        if !entries.is_empty() && link.code <= last_code.as_slice() {
            return Err(SnapshotError::Unsorted {
                path: path.to_owned(),
                code: link.code_str().to_owned(),
            });
        }
        last_code.clear();
        last_code.extend_from_slice(link.code);
        validate_code(link.code)
            .and(std::str::from_utf8(link.target).map_err(|_| RecordError::TargetUtf8))
            .map_err(|source| SnapshotError::Record {
                path: path.to_owned(),
                source,
            })?;
        if link.target.len() > u16::MAX as usize {
            return Err(SnapshotError::Record {
                path: path.to_owned(),
                source: RecordError::TargetLength(link.target.len()),
            });
        }
        let unknown_flags = link.flags & !(FLAG_DISABLED | FLAG_FORWARD_QUERY);
        if unknown_flags != 0 {
            return Err(SnapshotError::Record {
                path: path.to_owned(),
                source: RecordError::Flags(unknown_flags),
            });
        }
        buf.clear();
        link.encode_as(encoding, &mut buf);
        buf.resize(buf.len().next_multiple_of(RECORD_ALIGN), 0);
        let unit = records_len / RECORD_ALIGN as u64 + 1;
        if records_len + buf.len() as u64 > MAX_RECORDS_LEN {
            return Err(SnapshotError::TooLarge {
                path: path.to_owned(),
            });
        }
        entries.push((code_hash(link.code), unit as u32));
        records_crc = crc32c::crc32c_append(records_crc, &buf);
        records_len += buf.len() as u64;
        out.write_all(&buf).map_err(io(tmp))?;
    }
    let bucket_count = bucket_count_for(entries.len() as u64);
    let mask = bucket_count - 1;
    let mut index = vec![0u64; bucket_count as usize];
    for (h, unit) in entries.iter().copied() {
        let mut i = h & mask;
        while index[i as usize] != 0 {
            i = (i + 1) & mask;
        }
        index[i as usize] = (h >> 32) << 32 | unit as u64;
    }
    let mut index_crc = 0u32;
    let mut chunk = Vec::with_capacity(64 * 1024);
    for slots in index.chunks(8 * 1024) {
        chunk.clear();
        for s in slots {
            chunk.extend_from_slice(&s.to_le_bytes());
        }
        index_crc = crc32c::crc32c_append(index_crc, &chunk);
        out.write_all(&chunk).map_err(io(tmp))?;
    }
    let header = SnapshotHeader {
        version: match encoding {
            LinkEncoding::V1 => SNAPSHOT_VERSION_V1,
            LinkEncoding::V2 => SNAPSHOT_VERSION,
        },
        seq,
        link_count: entries.len() as u64,
        bucket_count,
        records_offset: SNAPSHOT_HEADER_LEN as u64,
        records_len,
        index_offset: SNAPSHOT_HEADER_LEN as u64 + records_len,
        index_len: bucket_count * 8,
        created_at_ms: super::record::now_ms(),
        records_crc,
        index_crc,
        hash_fn: HASH_FNV1A_FMIX64,
    };
    let mut file = out.finish().map_err(io(tmp))?;
    // The header lands in the first 2 MiB folio, which is still cached.
    file.seek(SeekFrom::Start(0)).map_err(io(tmp))?;
    file.write_all(&header.encode()).map_err(io(tmp))?;
    file.sync_all().map_err(io(tmp))?;
    drop(file);
    fs::rename(tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir).map_err(io(dir))?;
    }
    Ok(SnapshotInfo {
        path: path.to_owned(),
        header,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::record::Link;
    use std::convert::Infallible;

    fn links(n: usize) -> Vec<Link> {
        let mut v: Vec<Link> = (0..n)
            .map(|i| {
                let mut l =
                    Link::new(&format!("c{i:05}"), &format!("https://example.com/{i}")).unwrap();
                l.max_clicks = Some(i as u64 + 1);
                l
            })
            .collect();
        v.sort_by(|a, b| a.code.cmp(&b.code));
        v
    }

    fn write(dir: &Path, links: &[Link]) -> PathBuf {
        let path = dir.join("s.snap");
        write_snapshot(
            &path,
            77,
            links.iter().map(|l| Ok::<_, Infallible>(l.as_ref())),
        )
        .unwrap();
        path
    }

    #[test]
    fn write_open_get_iter() {
        let dir = tempfile::tempdir().unwrap();
        for n in [0, 1, 7, 1000] {
            let links = links(n);
            let path = write(dir.path(), &links);
            let snap = Snapshot::open(&path, true).unwrap();
            assert_eq!(snap.len(), n as u64);
            assert_eq!(snap.seq(), 77);
            for l in &links {
                // A prefetch first changes nothing about the answer.
                snap.prefetch(l.code.as_bytes());
                assert_eq!(snap.get(l.code.as_bytes()).unwrap().to_link().unwrap(), *l);
            }
            for code in [&b"missing"[..], b""] {
                snap.prefetch(code);
                assert!(snap.get(code).is_none());
            }
            let all: Vec<Link> = snap.iter().map(|r| r.unwrap().to_link().unwrap()).collect();
            assert_eq!(all, links);
        }
    }

    #[test]
    fn header_fields_round_trip_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &links(10));
        let bytes = fs::read(&path).unwrap();
        let h = SnapshotHeader::decode(&bytes, bytes.len() as u64).unwrap();
        assert_eq!(h.encode().as_slice(), &bytes[..SNAPSHOT_HEADER_LEN]);
        assert_eq!(&bytes[0..8], b"ULOADSNP");
        assert_eq!(h.version, 2);
        assert_eq!(h.link_count, 10);
        assert_eq!(h.bucket_count, 16);
        assert_eq!(h.index_offset, 128 + h.records_len);
        assert_eq!(h.hash_fn, HASH_FNV1A_FMIX64);
        // Each field, changed and re-checksummed, is refused on its own terms.
        type Change = fn(&mut SnapshotHeader);
        let changes: Vec<(&str, Change)> = vec![
            ("version", |h| h.version = 3),
            ("version", |h| h.version = 0),
            ("bucket count", |h| h.bucket_count = 15),
            ("links do not fit", |h| h.link_count = 16),
            ("index length", |h| h.index_len += 8),
            ("tile", |h| h.records_offset += 8),
            ("tile", |h| h.records_len += 8),
            ("tile", |h| h.index_offset += 8),
            ("hash function", |h| h.hash_fn = 2),
            ("sequence", |h| h.seq = u64::MAX),
        ];
        for (want, change) in changes {
            let mut bad = h;
            change(&mut bad);
            let err = SnapshotHeader::decode(&bad.encode(), bytes.len() as u64).unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
        }
        let mut magic = h.encode();
        magic[0] = b'X';
        assert!(
            SnapshotHeader::decode(&magic, bytes.len() as u64)
                .unwrap_err()
                .contains("magic")
        );
        let mut crc = h.encode();
        crc[20] ^= 1;
        assert!(
            SnapshotHeader::decode(&crc, bytes.len() as u64)
                .unwrap_err()
                .contains("checksum")
        );
        let mut reserved = h.encode();
        reserved[100] = 1;
        let c = crc32c::crc32c(&reserved[0..124]);
        reserved[124..128].copy_from_slice(&c.to_le_bytes());
        assert!(
            SnapshotHeader::decode(&reserved, bytes.len() as u64)
                .unwrap_err()
                .contains("reserved")
        );
        for cut in 0..SNAPSHOT_HEADER_LEN {
            assert!(SnapshotHeader::decode(&bytes[..cut], bytes.len() as u64).is_err());
        }
    }

    #[test]
    fn records_are_link_encoding_v2_padded_to_8() {
        let dir = tempfile::tempdir().unwrap();
        let links = links(3);
        let bytes = fs::read(write(dir.path(), &links)).unwrap();
        let mut at = SNAPSHOT_HEADER_LEN;
        for l in &links {
            let mut want = Vec::new();
            l.encode_into(&mut want);
            assert_eq!(want[0], 2);
            assert_eq!(&bytes[at..at + want.len()], want.as_slice());
            let padded = want.len().next_multiple_of(RECORD_ALIGN);
            assert!(bytes[at + want.len()..at + padded].iter().all(|&b| b == 0));
            at += padded;
        }
    }

    /// Files written before link encoding v2 (format version 1, v1 records)
    /// still open, look up and iterate exactly as before.
    #[test]
    fn format_version_1_with_v1_records_is_still_read() {
        let dir = tempfile::tempdir().unwrap();
        for n in [0, 1, 7, 300] {
            let links = links(n);
            let path = dir.path().join("v1.snap");
            let info = write_snapshot_as(
                &path,
                9,
                links.iter().map(|l| Ok::<_, Infallible>(l.as_ref())),
                LinkEncoding::V1,
            )
            .unwrap();
            assert_eq!(info.header.version, 1);
            let bytes = fs::read(&path).unwrap();
            if n > 0 {
                assert_eq!(bytes[SNAPSHOT_HEADER_LEN], 1, "a v1 record");
            }
            let snap = Snapshot::open(&path, true).unwrap();
            assert_eq!(snap.header().version, 1);
            for l in &links {
                assert_eq!(snap.get(l.code.as_bytes()).unwrap().to_link().unwrap(), *l);
            }
            assert!(snap.get(b"missing").is_none());
            let all: Vec<Link> = snap.iter().map(|r| r.unwrap().to_link().unwrap()).collect();
            assert_eq!(all, links);
            // Rewritten by this build (compaction): the same links, as v2, smaller.
            let v2 = dir.path().join("v2.snap");
            let info2 = write_snapshot(&v2, 9, snap.iter()).unwrap();
            assert_eq!(info2.header.version, 2);
            if n > 0 {
                assert!(info2.header.records_len < info.header.records_len);
            }
            let snap2 = Snapshot::open(&v2, true).unwrap();
            let again: Vec<Link> = snap2
                .iter()
                .map(|r| r.unwrap().to_link().unwrap())
                .collect();
            assert_eq!(again, links);
        }
    }

    /// The minimum record size a header is checked against is that of its
    /// format: 48 bytes in version 1, 16 in version 2.
    #[test]
    fn link_count_is_bounded_by_the_formats_smallest_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &links(1));
        let bytes = fs::read(&path).unwrap();
        let h = SnapshotHeader::decode(&bytes, bytes.len() as u64).unwrap();
        for (version, records_len, ok) in [
            (2, 7 * 16, true),
            (2, 7 * 16 - 8, false),
            (1, 7 * 48, true),
            (1, 7 * 48 - 8, false),
        ] {
            let mut forged = h;
            forged.version = version;
            forged.link_count = 7;
            forged.bucket_count = 8;
            forged.index_len = 64;
            forged.records_len = records_len;
            forged.index_offset = 128 + forged.records_len;
            let len = forged.index_offset + 64;
            let result = SnapshotHeader::decode(&forged.encode(), len);
            assert_eq!(
                result.is_ok(),
                ok,
                "version {version}, {records_len}: {result:?}"
            );
        }
    }

    #[test]
    fn damaged_regions_fail_the_checksum_but_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let links = links(50);
        let path = write(dir.path(), &links);
        let good = fs::read(&path).unwrap();
        for at in (SNAPSHOT_HEADER_LEN..good.len()).step_by(7) {
            let mut bad = good.clone();
            bad[at] ^= 0x5a;
            fs::write(&path, &bad).unwrap();
            let err = Snapshot::open(&path, true).unwrap_err();
            assert!(err.to_string().contains("checksum mismatch"), "{err}");
            // Unverified, it must still answer without panicking.
            let snap = Snapshot::open(&path, false).unwrap();
            for l in &links {
                let _ = snap.get(l.code.as_bytes());
            }
            let _ = snap.iter().count();
        }
        fs::write(&path, &good[..good.len() - 1]).unwrap();
        assert!(Snapshot::open(&path, false).is_err());
    }

    #[test]
    fn unsorted_input_is_refused_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = links(3);
        l.swap(0, 1);
        let path = dir.path().join("u.snap");
        let err = write_snapshot(&path, 1, l.iter().map(|l| Ok::<_, Infallible>(l.as_ref())))
            .unwrap_err();
        assert!(matches!(err, SnapshotError::Unsorted { .. }));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn from_bytes_matches_open() {
        let dir = tempfile::tempdir().unwrap();
        let links = links(20);
        let bytes = fs::read(write(dir.path(), &links)).unwrap();
        let snap = Snapshot::from_bytes(&bytes, true).unwrap();
        assert_eq!((snap.len(), snap.seq()), (20, 77));
        assert_eq!(snap.path(), Path::new("<memory>"));
        for l in &links {
            assert_eq!(snap.get(l.code.as_bytes()).unwrap().to_link().unwrap(), *l);
        }
        let mut bad = bytes.clone();
        bad[SNAPSHOT_HEADER_LEN] ^= 1;
        let err = Snapshot::from_bytes(&bad, true).unwrap_err();
        assert!(
            err.to_string()
                .contains("<memory>: invalid snapshot: records checksum")
        );
        assert!(Snapshot::from_bytes(&bad, false).is_ok());
        for empty_or_short in [&[][..], &bytes[..SNAPSHOT_HEADER_LEN - 1]] {
            let err = Snapshot::from_bytes(empty_or_short, false).unwrap_err();
            assert!(matches!(err, SnapshotError::Invalid { .. }), "{err}");
        }
    }

    /// The parallel checksum is the serial one, for every length (0, odd,
    /// not divisible by the piece count) and piece count.
    #[test]
    fn parallel_crc_equals_serial() {
        let data: Vec<u8> = (0..20_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in [0, 1, 2, 3, 7, 8, 9, 63, 64, 65, 1000, 4097, 19_999, 20_000] {
            let d = &data[..len];
            let want = crc32c::crc32c(d);
            for pieces in 1..=9 {
                assert_eq!(
                    crc32c_pieces(d, pieces),
                    want,
                    "{len} bytes, {pieces} pieces"
                );
            }
            // More pieces than bytes: empty pieces are never made.
            assert_eq!(crc32c_pieces(d, len + 3), want, "{len} bytes");
            for threads in [0, 1, 2, 16] {
                assert_eq!(crc32c_parallel(d, threads), want);
            }
        }
        // Large enough to be split for real: 3 minimum pieces and 5 bytes.
        let big: Vec<u8> = (0..3 * CRC_CHUNK_MIN + 5)
            .map(|i| (i % 251) as u8)
            .collect();
        let want = crc32c::crc32c(&big);
        for threads in [1, 2, 3, 4, 7] {
            assert_eq!(crc32c_parallel(&big, threads), want, "{threads} threads");
        }
    }

    /// 60,000 links with 120-byte targets, about 10 MB of records, in code
    /// order (the codes are fixed-width numbers).
    fn ten_mb_of_links() -> Vec<Link> {
        (0..60_000)
            .map(|i| {
                Link::new(
                    &format!("k{i:07}"),
                    &format!("https://example.com/{}/{i}", "p".repeat(100)),
                )
                .unwrap()
            })
            .collect()
    }

    /// A damaged byte is found by the parallel check wherever it is, in the
    /// records or the index, in any piece: a corrupt snapshot is refused.
    #[test]
    fn corrupt_large_snapshot_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // About 10 MB of records: split across threads on any machine with 2+ CPUs.
        let path = write(dir.path(), &ten_mb_of_links());
        let good = fs::read(&path).unwrap();
        let h = SnapshotHeader::decode(&good, good.len() as u64).unwrap();
        assert!(h.records_len as usize > 2 * CRC_CHUNK_MIN);
        assert!(Snapshot::open(&path, true).is_ok());
        let last = good.len() - 1;
        let records_mid = SNAPSHOT_HEADER_LEN + h.records_len as usize / 2;
        for (at, region) in [
            (SNAPSHOT_HEADER_LEN, "records"),
            (records_mid, "records"),
            (records_mid + CRC_CHUNK_MIN, "records"),
            (h.index_offset as usize - 1, "records"),
            (h.index_offset as usize, "index"),
            (last, "index"),
        ] {
            let mut bad = good.clone();
            bad[at] ^= 0x01;
            fs::write(&path, &bad).unwrap();
            let err = Snapshot::open(&path, true).unwrap_err().to_string();
            assert!(
                err.contains(&format!("{region} checksum mismatch")) && err.contains("s.snap"),
                "byte {at}: {err}"
            );
        }
    }

    /// Kibibytes of `FilePmdMapped` in /proc/self/smaps over the mappings
    /// inside `[addr, addr + len)`, and whether all of them have
    /// `MADV_HUGEPAGE` (`hg` in `VmFlags`).
    #[cfg(target_os = "linux")]
    fn pmd_mapped_kb(addr: usize, len: usize) -> (u64, bool) {
        let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
        let (mut inside, mut kb, mut hg) = (false, 0, true);
        for line in smaps.lines() {
            // A mapping's first line: "start-end perms offset dev inode path".
            let start = line
                .split_whitespace()
                .next()
                .and_then(|r| r.split_once('-'))
                .and_then(|(a, _)| usize::from_str_radix(a, 16).ok());
            if let Some(start) = start {
                inside = start >= addr && start < addr + len;
            } else if inside && let Some(v) = line.strip_prefix("FilePmdMapped:") {
                kb += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap();
            } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
                hg &= flags.split_whitespace().any(|f| f == "hg");
            }
        }
        (kb, hg)
    }

    /// Why this machine cannot PMD-map a file in `dir` at all, if it cannot:
    /// THP is off, or a probe file written in 2 MiB writes (what
    /// `write_snapshot` does) and mapped with `MADV_HUGEPAGE` gets no PMD
    /// (a filesystem without large folios, such as ext4 before 6.16-ish).
    #[cfg(target_os = "linux")]
    fn no_pmd_mappings_here(dir: &Path) -> Option<String> {
        let thp = "/sys/kernel/mm/transparent_hugepage/enabled";
        match fs::read_to_string(thp) {
            Ok(s) if s.contains("[never]") => return Some(format!("{thp} is {}", s.trim())),
            Ok(_) => {}
            Err(e) => return Some(format!("cannot read {thp}: {e}")),
        }
        let probe = dir.join("probe");
        let mut f = File::create(&probe).unwrap();
        let chunk = vec![7u8; HUGE_CHUNK];
        for _ in 0..2 {
            f.write_all(&chunk).unwrap();
        }
        drop(f);
        let f = File::open(&probe).unwrap();
        // SAFETY: the probe file is ours and nobody changes it while mapped.
        let map = unsafe { Mmap::map(&f) }.unwrap();
        let _ = map.advise(memmap2::Advice::HugePage);
        let touched: u64 = map.iter().step_by(4096).map(|&b| b as u64).sum();
        assert_eq!(touched, 7 * (2 * HUGE_CHUNK as u64 / 4096));
        let (kb, _) = pmd_mapped_kb(map.as_ptr() as usize, map.len());
        (kb == 0).then(|| {
            format!(
                "a file in {} written in 2 MiB writes and mapped with MADV_HUGEPAGE \
                 gets no PMD mapping (filesystem without large folios? memory fragmented?)",
                dir.display()
            )
        })
    }

    /// A snapshot `write_snapshot` wrote and `Snapshot::open` mapped is, at
    /// least in part, mapped with 2 MiB pages, wherever the machine can do
    /// that at all (checked first with a probe file; else the test says why
    /// it checks nothing). Fails if the writer stops writing 2 MiB-aligned
    /// 2 MiB pieces (then the page cache holds smaller folios), or if `open`
    /// stops advising `MADV_HUGEPAGE` (checked apart: folios already cached
    /// at 2 MiB get PMDs without it; the advice decides the folio size when
    /// an evicted file is read back in).
    #[cfg(target_os = "linux")]
    #[test]
    fn snapshot_is_mapped_with_2mib_pages_where_the_machine_can() {
        let dir = tempfile::tempdir().unwrap();
        if let Some(why) = no_pmd_mappings_here(dir.path()) {
            eprintln!("skipped: {why}");
            return;
        }
        // About 10 MB: at least four whole 2 MiB-aligned pieces.
        let path = write(dir.path(), &ten_mb_of_links());
        assert!(fs::metadata(&path).unwrap().len() > 4 * HUGE_CHUNK as u64);
        // The checksum check reads every page of the mapping.
        let snap = Snapshot::open(&path, true).unwrap();
        let (kb, hg) = pmd_mapped_kb(snap.map.as_ptr() as usize, snap.map.len());
        assert!(hg, "Snapshot::open did not advise MADV_HUGEPAGE");
        assert!(
            kb >= HUGE_CHUNK as u64 / 1024,
            "snapshot of {} bytes has {kb} kB PMD-mapped though a probe file got PMDs",
            snap.map.len()
        );
    }

    #[test]
    fn bucket_counts() {
        assert_eq!(bucket_count_for(0), 8);
        assert_eq!(bucket_count_for(5), 8);
        assert_eq!(bucket_count_for(6), 16);
        assert_eq!(bucket_count_for(10_000_000), 1 << 24);
    }
}
