//! The link log: an append-only, segmented write-ahead file of frames.
//!
//! [`LinkLog`] is the single writer. [`LinkLog::append`] returns only after its
//! frames are on disk (`fdatasync`); appends that arrive while a sync is in
//! progress are written and synced together by the next one (group commit),
//! so many concurrent callers share one fsync.
//!
//! [`LogTail`] is a reader that never writes: the edge's follower uses it to
//! pick up new frames as they appear. [`replay`] reads a whole log once.
//!
//! Recovery rules (also in `docs/storage.md`): on open, the writer reads every
//! segment. A frame that is cut short or fails its checksum at the end of the
//! last segment, with no valid frame after it, is a torn tail and is truncated.
//! Anything else that does not decode, or a sequence that is not exactly one
//! more than the previous, is corruption and an error naming file and offset.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

use super::frame::{FRAME_HEADER_LEN, FrameError, LogOp, LogOpRef, decode_frame, encode_frame};
use super::record::RecordError;
use super::sync_dir;

/// Magic bytes at the start of every segment file.
pub const SEGMENT_MAGIC: &[u8; 8] = b"ULOADLOG";
/// Segment format version this build writes and reads.
pub const SEGMENT_VERSION: u32 = 1;
/// Length of a segment's header.
pub const SEGMENT_HEADER_LEN: usize = 32;
/// Default size after which the writer starts a new segment.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// Errors of the link log. Corruption names the file and byte offset.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: corrupt log at offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("{path}: bad segment header: {reason}")]
    BadHeader { path: PathBuf, reason: String },
    #[error("log is missing records {expected}..{found}: segment {path} starts at {found}")]
    Gap {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("invalid record: {0}")]
    Invalid(#[from] RecordError),
    #[error("the log writer failed earlier and refuses further appends: {0}")]
    Poisoned(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Name of the segment whose first record has sequence `first_seq`.
pub fn segment_file_name(first_seq: u64) -> String {
    format!("{first_seq:020}.log")
}

/// The header of a segment file.
pub fn encode_segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(SEGMENT_HEADER_LEN as u32).to_le_bytes());
    h[16..24].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Parses a segment header, returning the first sequence number it declares.
pub fn decode_segment_header(buf: &[u8]) -> Result<u64, String> {
    if buf.len() < SEGMENT_HEADER_LEN {
        return Err(format!(
            "file is {} bytes, shorter than the {SEGMENT_HEADER_LEN}-byte header",
            buf.len()
        ));
    }
    if &buf[0..8] != SEGMENT_MAGIC {
        return Err("magic is not ULOADLOG".into());
    }
    let u32_at = |at: usize| u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
    let stored = u32_at(28);
    let computed = crc32c::crc32c(&buf[0..28]);
    if stored != computed {
        return Err(format!(
            "header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
        ));
    }
    let version = u32_at(8);
    if version != SEGMENT_VERSION {
        return Err(format!(
            "format version {version} is not supported (this build reads {SEGMENT_VERSION})"
        ));
    }
    if u32_at(12) as usize != SEGMENT_HEADER_LEN {
        return Err(format!(
            "header length {} is not {SEGMENT_HEADER_LEN}",
            u32_at(12)
        ));
    }
    if u32_at(24) != 0 {
        return Err("reserved field is not zero".into());
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&buf[16..24]);
    let first_seq = u64::from_le_bytes(seq);
    if first_seq == 0 || first_seq > super::frame::MAX_SEQ {
        return Err(format!(
            "first sequence {first_seq} is outside 1..={}",
            super::frame::MAX_SEQ
        ));
    }
    Ok(first_seq)
}

/// A segment file found in the log directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentFile {
    /// Sequence number its file name declares.
    pub first_seq: u64,
    pub path: PathBuf,
}

/// Lists the segments in `log_dir`, ordered by first sequence. Files that do
/// not look like segments (temporary files, editor leftovers) are skipped.
pub fn list_segments(log_dir: &Path) -> Result<Vec<SegmentFile>, LogError> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(log_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(log_dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(log_dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".log") else {
            continue;
        };
        if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(first_seq) = stem.parse::<u64>() {
            out.push(SegmentFile {
                first_seq,
                path: entry.path(),
            });
        }
    }
    out.sort_by_key(|s| s.first_seq);
    Ok(out)
}

/// How reading a segment's frames ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentEnd {
    /// Every byte belonged to a valid frame.
    Clean,
    /// A frame at `offset` did not decode (cut short, bad checksum, bad contents
    /// or a sequence out of order).
    Stopped { offset: u64, reason: String },
}

/// The result of scanning one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentScan {
    pub first_seq: u64,
    /// Sequence of the last valid frame (`first_seq - 1` when it has none).
    pub last_seq: u64,
    /// Number of valid frames.
    pub frames: u64,
    /// Byte offset just past the last valid frame.
    pub valid_len: u64,
    /// File length.
    pub file_len: u64,
    pub end: SegmentEnd,
}

/// Reads the frames of one segment held in `buf`, calling `visit` for each
/// valid one in order. Stops at the first frame that does not decode or whose
/// sequence is not the next one expected.
pub fn scan_segment<'a>(
    buf: &'a [u8],
    mut visit: impl FnMut(u64, LogOpRef<'a>),
) -> Result<SegmentScan, String> {
    let first_seq = decode_segment_header(buf)?;
    let mut pos = SEGMENT_HEADER_LEN;
    let mut next = first_seq;
    let mut frames = 0;
    let end = loop {
        if pos == buf.len() {
            break SegmentEnd::Clean;
        }
        match decode_frame(&buf[pos..]) {
            Ok((seq, op, used)) if seq == next => {
                visit(seq, op);
                next += 1;
                frames += 1;
                pos += used;
            }
            Ok((seq, _, _)) => {
                break SegmentEnd::Stopped {
                    offset: pos as u64,
                    reason: format!("sequence {seq} where {next} was expected"),
                };
            }
            Err(e) => {
                break SegmentEnd::Stopped {
                    offset: pos as u64,
                    reason: e.to_string(),
                };
            }
        }
    };
    Ok(SegmentScan {
        first_seq,
        last_seq: next - 1,
        frames,
        valid_len: pos as u64,
        file_len: buf.len() as u64,
        end,
    })
}

/// Whether the damage at the start of `buf` is followed by valid records:
/// a frame that decodes at offset 0 (whole, checksummed, but out of
/// sequence), or one with a sequence above `after_seq` at any later offset.
/// Used to tell a torn tail (nothing valid follows the damage) from damage
/// in the middle of the log.
pub fn valid_frame_follows(buf: &[u8], after_seq: u64) -> bool {
    (0..buf.len().saturating_sub(FRAME_HEADER_LEN))
        .any(|at| matches!(decode_frame(&buf[at..]), Ok((seq, _, _)) if at == 0 || seq > after_seq))
}

fn read_file(path: &Path) -> Result<Vec<u8>, LogError> {
    fs::read(path).map_err(io_err(path))
}

/// What [`replay`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Sequence of the last record read (0 for an empty log).
    pub last_seq: u64,
    /// Records above `after_seq`.
    pub applied: u64,
    /// Scan of each segment read, in order.
    pub segments: Vec<(PathBuf, SegmentScan)>,
}

/// The log's records above a sequence, read into memory and validated, so
/// that callers can borrow them (compaction sorts them without copying).
pub struct LogRead {
    /// Each segment's bytes, cut to the end of its last valid frame.
    buffers: Vec<Vec<u8>>,
    after_seq: u64,
    pub summary: ReplaySummary,
}

impl LogRead {
    /// Every record above `after_seq`, in sequence order.
    pub fn records(&self) -> impl Iterator<Item = (u64, LogOpRef<'_>)> + '_ {
        self.buffers.iter().flat_map(move |buf| {
            let mut pos = SEGMENT_HEADER_LEN.min(buf.len());
            std::iter::from_fn(move || {
                // Validated by `read_log`, so decoding succeeds up to the cut.
                let (seq, op, used) = decode_frame(buf.get(pos..)?).ok()?;
                pos += used;
                Some((seq, op))
            })
            .filter(move |(seq, _)| *seq > self.after_seq)
        })
    }
}

/// Reads and validates every segment holding records above `after_seq`.
/// Read-only: a torn tail in the last segment ends the read (a writer may be
/// mid-append, or recovery will truncate it); damage anywhere else is an error.
pub fn read_log(log_dir: &Path, after_seq: u64) -> Result<LogRead, LogError> {
    let segments = list_segments(log_dir)?;
    let mut read = LogRead {
        buffers: Vec::new(),
        after_seq,
        summary: ReplaySummary {
            last_seq: after_seq,
            ..Default::default()
        },
    };
    let mut expected: Option<u64> = None;
    for (i, seg) in segments.iter().enumerate() {
        let is_last = i + 1 == segments.len();
        // Segments wholly at or below `after_seq` are skipped unread.
        if let Some(next) = segments.get(i + 1)
            && next.first_seq <= after_seq + 1
        {
            expected = Some(next.first_seq);
            continue;
        }
        let mut buf = read_file(&seg.path)?;
        let mut applied = 0;
        let scan = scan_segment(&buf, |seq, _| applied += u64::from(seq > after_seq)).map_err(
            |reason| LogError::BadHeader {
                path: seg.path.clone(),
                reason,
            },
        )?;
        check_segment_order(seg, &scan, expected, after_seq)?;
        if let SegmentEnd::Stopped { offset, reason } = &scan.end
            && (!is_last || valid_frame_follows(&buf[*offset as usize..], scan.last_seq))
        {
            return Err(LogError::Corrupt {
                path: seg.path.clone(),
                offset: *offset,
                reason: reason.clone(),
            });
        }
        buf.truncate(scan.valid_len as usize);
        read.summary.applied += applied;
        read.summary.last_seq = read.summary.last_seq.max(scan.last_seq);
        expected = Some(scan.last_seq + 1);
        read.summary.segments.push((seg.path.clone(), scan));
        read.buffers.push(buf);
    }
    Ok(read)
}

/// Reads every record above `after_seq` from the log in `log_dir`, calling
/// `visit` for each in sequence order. See [`read_log`] for the rules.
pub fn replay(
    log_dir: &Path,
    after_seq: u64,
    mut visit: impl FnMut(u64, LogOpRef<'_>),
) -> Result<ReplaySummary, LogError> {
    let read = read_log(log_dir, after_seq)?;
    for (seq, op) in read.records() {
        visit(seq, op);
    }
    Ok(read.summary)
}

/// Checks that a segment continues the log: its header agrees with its file
/// name and it starts right after the previous segment (or, for the first
/// segment read, no later than the record after `after_seq`).
fn check_segment_order(
    seg: &SegmentFile,
    scan: &SegmentScan,
    expected: Option<u64>,
    after_seq: u64,
) -> Result<(), LogError> {
    if scan.first_seq != seg.first_seq {
        return Err(LogError::BadHeader {
            path: seg.path.clone(),
            reason: format!(
                "header says first sequence {}, file name says {}",
                scan.first_seq, seg.first_seq
            ),
        });
    }
    match expected {
        Some(e) if seg.first_seq < e => Err(LogError::BadHeader {
            path: seg.path.clone(),
            reason: format!(
                "first sequence {} overlaps the previous segment, which ends at {}",
                seg.first_seq,
                e - 1
            ),
        }),
        Some(e) if seg.first_seq > e => Err(LogError::Gap {
            path: seg.path.clone(),
            expected: e,
            found: seg.first_seq,
        }),
        None if seg.first_seq > after_seq + 1 => Err(LogError::Gap {
            path: seg.path.clone(),
            expected: after_seq + 1,
            found: seg.first_seq,
        }),
        _ => Ok(()),
    }
}

/// Options of the log writer.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Size after which the next batch starts a new segment.
    pub segment_bytes: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
        }
    }
}

/// What recovery did when the writer opened the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Last durable sequence after recovery.
    pub last_seq: u64,
    /// `(file, offset, bytes removed)` when a torn tail was truncated.
    pub truncated: Option<(PathBuf, u64, u64)>,
}

/// The single writer of the link log. Cheap to share behind an `Arc`;
/// `append` may be called from many threads at once and they share fsyncs.
pub struct LinkLog {
    dir: PathBuf,
    opts: LogOptions,
    state: Mutex<WriterState>,
    durable: Condvar,
    /// The file being appended to; locked only by the thread doing a flush.
    active: Mutex<ActiveSegment>,
    /// fsyncs done so far (appends ÷ syncs is the group-commit batch size).
    syncs: std::sync::atomic::AtomicU64,
}

struct WriterState {
    /// Sequence the next appended record gets.
    next_seq: u64,
    /// Encoded frames waiting for the next flush.
    pending: Vec<u8>,
    /// Every record up to here is on disk.
    durable_seq: u64,
    /// A thread is writing and syncing a batch.
    flushing: bool,
    /// Set when a write or fsync failed: after a failed fsync the page cache
    /// can no longer be trusted to match the file, so appends stop for good.
    failed: Option<String>,
}

struct ActiveSegment {
    file: File,
    path: PathBuf,
    len: u64,
}

impl LinkLog {
    /// Opens (or creates) the log in `dir` for writing, recovering a torn tail.
    /// `base_seq` is the sequence the current snapshot holds: an empty log
    /// starts right after it, and a log that starts later has lost records.
    ///
    /// The caller must hold the data dir's writer lock.
    pub fn open(dir: &Path, base_seq: u64, opts: LogOptions) -> Result<(Self, Recovery), LogError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        remove_temp_files(dir)?;
        let segments = list_segments(dir)?;
        let mut recovery = Recovery {
            last_seq: base_seq,
            truncated: None,
        };
        let mut expected: Option<u64> = None;
        let mut last_scanned = 0;
        for (i, seg) in segments.iter().enumerate() {
            let is_last = i + 1 == segments.len();
            // Segments wholly covered by the snapshot are not needed (and may
            // end before it, when the snapshot is ahead of the log's end).
            if let Some(next) = segments.get(i + 1)
                && next.first_seq <= base_seq + 1
            {
                expected = Some(next.first_seq);
                continue;
            }
            let buf = read_file(&seg.path)?;
            let scan = scan_segment(&buf, |_, _| {}).map_err(|reason| LogError::BadHeader {
                path: seg.path.clone(),
                reason,
            })?;
            check_segment_order(seg, &scan, expected, base_seq)?;
            if let SegmentEnd::Stopped { offset, reason } = &scan.end {
                if !is_last || valid_frame_follows(&buf[*offset as usize..], scan.last_seq) {
                    return Err(LogError::Corrupt {
                        path: seg.path.clone(),
                        offset: *offset,
                        reason: reason.clone(),
                    });
                }
                truncate_tail(&seg.path, *offset)?;
                recovery.truncated = Some((seg.path.clone(), *offset, scan.file_len - offset));
            }
            recovery.last_seq = recovery.last_seq.max(scan.last_seq);
            expected = Some(scan.last_seq + 1);
            last_scanned = scan.last_seq;
        }
        let active = match segments.last() {
            // The snapshot is ahead of the log's end (its records were
            // compacted and the log lost its tail): continue in a new segment
            // so that sequences stay contiguous within every file.
            Some(_) if last_scanned < recovery.last_seq => {
                create_segment(dir, recovery.last_seq + 1)?
            }
            Some(seg) => {
                let file = OpenOptions::new()
                    .append(true)
                    .open(&seg.path)
                    .map_err(io_err(&seg.path))?;
                let len = file.metadata().map_err(io_err(&seg.path))?.len();
                ActiveSegment {
                    file,
                    path: seg.path.clone(),
                    len,
                }
            }
            None => create_segment(dir, recovery.last_seq + 1)?,
        };
        let log = Self {
            dir: dir.to_owned(),
            opts,
            state: Mutex::new(WriterState {
                next_seq: recovery.last_seq + 1,
                pending: Vec::new(),
                durable_seq: recovery.last_seq,
                flushing: false,
                failed: None,
            }),
            durable: Condvar::new(),
            active: Mutex::new(active),
            syncs: Default::default(),
        };
        Ok((log, recovery))
    }

    /// The directory holding the segments.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of fsyncs done by appends since open.
    pub fn sync_count(&self) -> u64 {
        self.syncs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sequence of the last record on disk.
    pub fn durable_seq(&self) -> u64 {
        lock(&self.state).durable_seq
    }

    /// Appends `ops` as consecutive records and returns the sequence of the
    /// last one once all of them are on disk. Every op is validated first; an
    /// invalid one fails the whole call before anything is written.
    pub fn append(&self, ops: &[LogOp]) -> Result<u64, LogError> {
        for op in ops {
            op.validate()?;
        }
        let mut st = lock(&self.state);
        if let Some(why) = &st.failed {
            return Err(LogError::Poisoned(why.clone()));
        }
        if ops.is_empty() {
            return Ok(st.durable_seq);
        }
        for op in ops {
            let seq = st.next_seq;
            encode_frame(seq, op, &mut st.pending);
            st.next_seq += 1;
        }
        let mine = st.next_seq - 1;
        loop {
            if st.durable_seq >= mine {
                return Ok(mine);
            }
            if let Some(why) = &st.failed {
                return Err(LogError::Poisoned(why.clone()));
            }
            if st.flushing {
                st = self
                    .durable
                    .wait(st)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                continue;
            }
            // Become the flusher for everything pending, including others' frames.
            st.flushing = true;
            let batch = std::mem::take(&mut st.pending);
            let batch_first = st.durable_seq + 1;
            let batch_last = st.next_seq - 1;
            drop(st);
            // If the write panics, the guard poisons the log and wakes the
            // waiters, so that no append blocks forever on `flushing`.
            let guard = FlushGuard { log: self };
            let result = self.write_batch(&batch, batch_first);
            std::mem::forget(guard);
            st = lock(&self.state);
            st.flushing = false;
            match result {
                Ok(()) => st.durable_seq = batch_last,
                Err(e) => st.failed = Some(e.to_string()),
            }
            if st.pending.capacity() == 0 {
                let mut reuse = batch;
                reuse.clear();
                st.pending = reuse;
            }
            self.durable.notify_all();
        }
    }

    fn write_batch(&self, batch: &[u8], first_seq: u64) -> Result<(), LogError> {
        let mut active = lock(&self.active);
        if active.len >= self.opts.segment_bytes && active.len > SEGMENT_HEADER_LEN as u64 {
            *active = create_segment(&self.dir, first_seq)?;
        }
        let path = active.path.clone();
        active.file.write_all(batch).map_err(io_err(&path))?;
        active.len += batch.len() as u64;
        active.file.sync_data().map_err(io_err(&path))?;
        self.syncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// Clears `flushing` and poisons the log if a flush unwinds.
struct FlushGuard<'a> {
    log: &'a LinkLog,
}

impl Drop for FlushGuard<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.log.state);
        st.flushing = false;
        st.failed = Some("a log write panicked".into());
        self.log.durable.notify_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave WriterState half-updated in
    // a way that matters: `failed` and the sequence fields are set atomically.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Creates a segment starting at `first_seq`: header written to a temporary
/// name, fsynced, renamed, directory fsynced, so a segment file always has a
/// whole header.
fn create_segment(dir: &Path, first_seq: u64) -> Result<ActiveSegment, LogError> {
    let path = dir.join(segment_file_name(first_seq));
    let tmp = dir.join(format!("{}.tmp", segment_file_name(first_seq)));
    {
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&encode_segment_header(first_seq))
            .map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir).map_err(io_err(dir))?;
    let file = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(io_err(&path))?;
    Ok(ActiveSegment {
        file,
        path,
        len: SEGMENT_HEADER_LEN as u64,
    })
}

fn truncate_tail(path: &Path, at: u64) -> Result<(), LogError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    f.set_len(at).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

fn remove_temp_files(dir: &Path) -> Result<(), LogError> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.extension().is_some_and(|e| e == "tmp") {
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

/// Deletes segments whose records are all at or below `upto_seq` (they are in
/// a snapshot now). The last segment is never deleted. Returns the paths removed.
pub fn remove_segments_upto(dir: &Path, upto_seq: u64) -> Result<Vec<PathBuf>, LogError> {
    let segments = list_segments(dir)?;
    let mut removed = Vec::new();
    for pair in segments.windows(2) {
        if pair[1].first_seq <= upto_seq + 1 {
            fs::remove_file(&pair[0].path).map_err(io_err(&pair[0].path))?;
            removed.push(pair[0].path.clone());
        }
    }
    if !removed.is_empty() {
        sync_dir(dir).map_err(io_err(dir))?;
    }
    Ok(removed)
}

/// A read-only cursor that follows the log as the writer appends to it.
///
/// `poll` returns the complete, valid frames written since the last call.
/// A frame still being written at the end of the newest segment is left for
/// a later poll; damage anywhere else is an error and the cursor stays where
/// it was, so its owner keeps serving what it already has.
pub struct LogTail {
    dir: PathBuf,
    /// Sequence of the last record returned.
    last_seq: u64,
    /// The segment being read, its path and the offset of the next frame.
    current: Option<(File, PathBuf, u64)>,
    buf: Vec<u8>,
    /// Directory mtime, `last_seq` and the answer of the last
    /// `segment_after_exists` listing.
    dir_seen: Option<(std::time::SystemTime, u64, bool)>,
}

/// Where a [`LogTail`] poll ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailStatus {
    /// Caught up with everything complete on disk.
    CaughtUp,
    /// The records after `last_seq` are no longer in the log (compacted into a
    /// snapshot): reload from the newest snapshot.
    NeedSnapshot,
}

impl LogTail {
    /// A cursor that will return records after `after_seq`.
    pub fn new(dir: &Path, after_seq: u64) -> Self {
        Self {
            dir: dir.to_owned(),
            last_seq: after_seq,
            current: None,
            buf: Vec::new(),
            dir_seen: None,
        }
    }

    /// Sequence of the last record returned.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Reads new records, calling `visit` for each in order.
    pub fn poll(
        &mut self,
        mut visit: impl FnMut(u64, LogOpRef<'_>),
    ) -> Result<TailStatus, LogError> {
        loop {
            if self.current.is_none() && !self.open_segment_for_next()? {
                return Ok(if self.segment_after_exists()? {
                    TailStatus::NeedSnapshot
                } else {
                    TailStatus::CaughtUp
                });
            }
            let Some((file, path, offset)) = self.current.as_mut() else {
                return Ok(TailStatus::CaughtUp);
            };
            let path = path.clone();
            let len = file.metadata().map_err(io_err(&path))?.len();
            self.buf.clear();
            if len > *offset {
                self.buf.resize((len - *offset) as usize, 0);
                file.read_exact_at(&mut self.buf, *offset)
                    .map_err(io_err(&path))?;
            }
            let mut pos = 0usize;
            let mut stop: Option<FrameError> = None;
            let mut bad_seq = None;
            while pos < self.buf.len() {
                match decode_frame(&self.buf[pos..]) {
                    Ok((seq, op, used)) if seq == self.last_seq + 1 => {
                        visit(seq, op);
                        self.last_seq = seq;
                        pos += used;
                    }
                    Ok((seq, _, _)) => {
                        bad_seq = Some(seq);
                        break;
                    }
                    Err(e) => {
                        stop = Some(e);
                        break;
                    }
                }
            }
            *offset += pos as u64;
            let at = *offset;
            let read_end = len;
            // The file grew while we decoded (a write finished): read on.
            let grew = || -> Result<bool, LogError> {
                Ok(file.metadata().map_err(io_err(&path))?.len() != read_end)
            };
            if pos == self.buf.len() {
                if grew()? {
                    continue;
                }
                // Clean end of a complete read. The writer finishes a segment
                // before it starts the next, which begins at our next record.
                let next = self.dir.join(segment_file_name(self.last_seq + 1));
                if next != path && next.exists() {
                    self.current = None;
                    continue;
                }
                // A later segment but not ours: our next records were
                // compacted away.
                if self.segment_after_exists()? {
                    return Ok(TailStatus::NeedSnapshot);
                }
                return Ok(TailStatus::CaughtUp);
            }
            if grew()? {
                continue;
            }
            let reason = match (stop, bad_seq) {
                (_, Some(seq)) => {
                    format!("sequence {seq} where {} was expected", self.last_seq + 1)
                }
                (Some(e), _) if !e.is_incomplete() || self.newer_segment_exists()? => e.to_string(),
                // An incomplete frame at the end of the newest segment is a
                // write in progress (or a torn tail the writer will truncate).
                _ => return Ok(TailStatus::CaughtUp),
            };
            // A bad frame in the newest segment may be a torn tail that the
            // writer truncates on restart; only valid frames after it prove damage.
            if !self.newer_segment_exists()?
                && !valid_frame_follows(&self.buf[pos..], self.last_seq)
            {
                return Ok(TailStatus::CaughtUp);
            }
            // Reopen from the directory next time: the damaged file may be
            // replaced or removed by then.
            self.current = None;
            return Err(LogError::Corrupt {
                path,
                offset: at,
                reason,
            });
        }
    }

    /// Opens the segment holding record `last_seq + 1`, if there is one.
    fn open_segment_for_next(&mut self) -> Result<bool, LogError> {
        let want = self.last_seq + 1;
        let segments = list_segments(&self.dir)?;
        let Some(seg) = segments.iter().rev().find(|s| s.first_seq <= want) else {
            return Ok(false);
        };
        let file = File::open(&seg.path).map_err(io_err(&seg.path))?;
        // Segments are renamed into place with their header written, so a
        // short one is damage, reported as such (not as a failed read).
        let mut header = [0u8; SEGMENT_HEADER_LEN];
        let len = file.metadata().map_err(io_err(&seg.path))?.len();
        let have = (len as usize).min(SEGMENT_HEADER_LEN);
        file.read_exact_at(&mut header[..have], 0)
            .map_err(io_err(&seg.path))?;
        let first = decode_segment_header(&header[..have]).map_err(|reason| LogError::BadHeader {
            path: seg.path.clone(),
            reason,
        })?;
        if first != seg.first_seq {
            return Err(LogError::BadHeader {
                path: seg.path.clone(),
                reason: format!(
                    "header says first sequence {first}, file name says {}",
                    seg.first_seq
                ),
            });
        }
        let mut offset = SEGMENT_HEADER_LEN as u64;
        let mut skip_to = self.last_seq;
        if first <= self.last_seq {
            // Skip the records we already have.
            let len = file.metadata().map_err(io_err(&seg.path))?.len();
            let mut buf = vec![0u8; (len - offset.min(len)) as usize];
            file.read_exact_at(&mut buf, offset)
                .map_err(io_err(&seg.path))?;
            let mut pos = 0;
            let mut seq_here = first - 1;
            while seq_here < self.last_seq {
                match decode_frame(&buf[pos..]) {
                    Ok((seq, _, used)) if seq == seq_here + 1 => {
                        seq_here = seq;
                        pos += used;
                    }
                    _ => break,
                }
            }
            if seq_here < self.last_seq {
                // The records we need are not (yet) readable; the segment
                // either does not reach our position or was replaced.
                skip_to = seq_here;
            }
            offset += pos as u64;
        }
        if skip_to != self.last_seq {
            return Ok(false);
        }
        self.current = Some((file, seg.path.clone(), offset));
        Ok(true)
    }

    /// Whether a segment starting after our next record exists. Segments
    /// appear and disappear only with a change of the directory's mtime, so
    /// an idle follower answers from the last listing (one `stat`, not a
    /// `readdir`, per poll).
    fn segment_after_exists(&mut self) -> Result<bool, LogError> {
        let mtime = match fs::metadata(&self.dir).and_then(|m| m.modified()) {
            Ok(t) => t,
            // No log directory yet (a data dir no writer has opened): no segments.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err(&self.dir)(e)),
        };
        if let Some((seen, seq, answer)) = self.dir_seen
            && seen == mtime
            && seq == self.last_seq
        {
            return Ok(answer);
        }
        let answer = list_segments(&self.dir)?
            .iter()
            .any(|s| s.first_seq > self.last_seq + 1);
        self.dir_seen = Some((mtime, self.last_seq, answer));
        Ok(answer)
    }

    fn newer_segment_exists(&self) -> Result<bool, LogError> {
        let Some((_, path, _)) = &self.current else {
            return Ok(false);
        };
        Ok(list_segments(&self.dir)?
            .last()
            .is_some_and(|s| &s.path != path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_header_fields() {
        let h = encode_segment_header(0x0102_0304_0506_0708);
        assert_eq!(&h[0..8], b"ULOADLOG", "magic");
        assert_eq!(&h[8..12], &1u32.to_le_bytes(), "version");
        assert_eq!(&h[12..16], &32u32.to_le_bytes(), "header length");
        assert_eq!(
            &h[16..24],
            &0x0102_0304_0506_0708u64.to_le_bytes(),
            "first seq"
        );
        assert_eq!(&h[24..28], &[0; 4], "reserved");
        assert_eq!(&h[28..32], &crc32c::crc32c(&h[0..28]).to_le_bytes(), "crc");
        assert_eq!(decode_segment_header(&h), Ok(0x0102_0304_0506_0708));
    }

    #[test]
    fn each_bad_segment_header_field_is_refused() {
        let resign = |mut h: [u8; SEGMENT_HEADER_LEN]| {
            let crc = crc32c::crc32c(&h[0..28]);
            h[28..32].copy_from_slice(&crc.to_le_bytes());
            h
        };
        let good = encode_segment_header(7);
        let cases: [(usize, u8, &str); 5] = [
            (0, b'X', "magic"),
            (8, 2, "version"),
            (12, 31, "header length"),
            (24, 1, "reserved"),
            (16, 0, "first sequence"),
        ];
        for (at, byte, want) in cases {
            let mut h = good;
            if at == 16 {
                h[16..24].copy_from_slice(&[0; 8]);
            } else {
                h[at] = byte;
            }
            let err = decode_segment_header(&resign(h)).unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
        }
        let mut h = good;
        h[20] ^= 1;
        assert!(decode_segment_header(&h).unwrap_err().contains("checksum"));
        for cut in 0..SEGMENT_HEADER_LEN {
            assert!(decode_segment_header(&good[..cut]).is_err());
        }
    }

    #[test]
    fn segment_names_sort_by_sequence() {
        assert_eq!(segment_file_name(42), "00000000000000000042.log");
        assert!(segment_file_name(9) < segment_file_name(10));
    }
}
