//! The link log: an append-only, segmented write-ahead file of frames.
//!
//! [`LinkLog`] is the single writer. [`LinkLog::append`] returns only after its
//! frames are on disk (`fdatasync`); appends that arrive while a sync is in
//! progress are written and synced together by the next one (group commit),
//! so many concurrent callers share one fsync.
//!
//! [`LogTail`] is a reader that never writes: the edge's follower uses it to
//! pick up new frames as they appear. [`replay`] reads a whole log once.
//! Readers start from a snapshot's sequence: the frames at or below it are
//! checked (length, checksum, sequence) but not decoded
//! ([`scan_segment_after`]), and segments wholly below it are not read.
//!
//! Recovery rules (also in `docs/storage.md`): on open, the writer reads every
//! segment. A frame that is cut short or fails its checksum at the end of the
//! last segment, with no valid frame after it, is a torn tail and is truncated.
//! Anything else that does not decode, or a sequence that is not exactly one
//! more than the previous, is corruption and an error naming file and offset.
//!
//! A batch that fails (no space, a read-only file, a failed write or fsync)
//! is never acknowledged: it is refused before a byte is written when it
//! cannot fit, or cut back off the file, and the next append reopens and
//! re-checks the segment first ("When a write fails" in `docs/storage.md`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

use super::frame::{
    FRAME_HEADER_LEN, FrameError, LogOp, LogOpRef, check_frame, decode_frame, encode_frame,
};
use super::record::RecordError;
use super::{create_dir_durable, sync_dir};

/// Magic bytes at the start of every segment file.
pub const SEGMENT_MAGIC: &[u8; 8] = b"ULOADLOG";
/// Segment format version this build writes: its put frames may hold link
/// encoding v2. Builds from before v2 refuse such a segment (a bad header)
/// instead of taking its frames for a torn tail.
pub const SEGMENT_VERSION: u32 = 2;
/// The earlier segment format version, still read (frames written by
/// earlier builds hold link encoding v1). The writer appends to such a
/// segment only while it holds no frame; otherwise it rolls over first.
pub const SEGMENT_VERSION_V1: u32 = 1;
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
    /// The log read back ends before records the writer acknowledged: its
    /// files were changed outside the writer.
    #[error(
        "{path}: the log ends at sequence {last}, but the writer acknowledged up to {durable}: records are missing"
    )]
    Short {
        path: PathBuf,
        last: u64,
        durable: u64,
    },
    #[error("invalid record: {0}")]
    Invalid(#[from] RecordError),
    #[error("the log writer failed earlier and refuses further appends: {0}")]
    Poisoned(String),
    /// A [`LogTail`] returned records that the writer then cut off (a batch
    /// whose fsync failed) and replaced: the reader holds records that are
    /// not in the log. Reported once; the tail then continues after its last
    /// sequence (it does not return the records written in place of the ones
    /// it returned: only loading a newer snapshot corrects that).
    #[error(
        "{path}: the log was cut back below offset {offset}, under records this reader already returned (up to sequence {last_seq}): the writer dropped a batch whose fsync failed"
    )]
    Rewound {
        path: PathBuf,
        offset: u64,
        last_seq: u64,
    },
    /// A batch could not be written, synced, or the segment recovered after
    /// an earlier failure. Nothing of the append is in the log.
    #[error("{path}: {stage} failed: {source}")]
    WriteFailed {
        path: PathBuf,
        stage: &'static str,
        source: io::Error,
    },
}

impl LogError {
    /// The operating system's error behind this one, if any: its `kind()`
    /// and `raw_os_error()` say whether the disk is full (ENOSPC, EDQUOT,
    /// EFBIG) or read-only (EROFS, EPERM, EACCES).
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Self::Io { source, .. } | Self::WriteFailed { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A callback told each fsync's duration.
type FsyncObserver = Box<dyn Fn(std::time::Duration) + Send + Sync>;

/// Name of the segment whose first record has sequence `first_seq`.
pub fn segment_file_name(first_seq: u64) -> String {
    format!("{first_seq:020}.log")
}

/// The header of a segment file (the current format version).
pub fn encode_segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_LEN] {
    encode_segment_header_version(first_seq, SEGMENT_VERSION)
}

/// The header of a segment file of format `version`; version 1 is what
/// earlier builds wrote, for tests and tools.
pub fn encode_segment_header_version(first_seq: u64, version: u32) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h[12..16].copy_from_slice(&(SEGMENT_HEADER_LEN as u32).to_le_bytes());
    h[16..24].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Parses a segment header, returning the first sequence number it declares.
pub fn decode_segment_header(buf: &[u8]) -> Result<u64, String> {
    decode_segment_header_version(buf).map(|(first_seq, _)| first_seq)
}

/// Parses a segment header, returning the first sequence number it declares
/// and its format version (1 or 2).
pub fn decode_segment_header_version(buf: &[u8]) -> Result<(u64, u32), String> {
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
    if version != SEGMENT_VERSION && version != SEGMENT_VERSION_V1 {
        return Err(format!(
            "format version {version} is not supported (this build reads {SEGMENT_VERSION_V1} and {SEGMENT_VERSION})"
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
    Ok((first_seq, version))
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
    /// Format version of its header (1 or 2).
    pub version: u32,
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
    visit: impl FnMut(u64, LogOpRef<'a>),
) -> Result<SegmentScan, String> {
    scan_segment_after(buf, 0, visit).map(|(scan, _)| scan)
}

/// [`scan_segment`] for a reader that already holds every record up to
/// `covered` (a snapshot's sequence): frames with a sequence at or below it
/// are checked ([`check_frame`]: length, checksum, sequence in order) but
/// their operation is neither decoded nor validated, and `visit` is called
/// only for the frames above it, which are decoded in full. The reader still
/// stops at the first frame that is cut short, fails its checksum or is out
/// of sequence. Also returns the offset of the first frame above `covered`
/// (the end of the valid frames when there is none).
///
/// Writers do not use this: their recovery validates every frame
/// (`docs/storage.md`, "Reading and recovery rules").
pub fn scan_segment_after<'a>(
    buf: &'a [u8],
    covered: u64,
    mut visit: impl FnMut(u64, LogOpRef<'a>),
) -> Result<(SegmentScan, usize), String> {
    let (first_seq, version) = decode_segment_header_version(buf)?;
    let mut pos = SEGMENT_HEADER_LEN;
    let mut next = first_seq;
    let mut frames = 0;
    let mut first_new = None;
    let end = loop {
        if pos == buf.len() {
            break SegmentEnd::Clean;
        }
        let rest = &buf[pos..];
        let frame = if next <= covered {
            // A record the reader holds already: checksum and sequence only.
            check_frame(rest).map(|(seq, used)| (seq, None, used))
        } else {
            first_new.get_or_insert(pos);
            decode_frame(rest).map(|(seq, op, used)| (seq, Some(op), used))
        };
        match frame {
            Ok((seq, op, used)) if seq == next => {
                if let Some(op) = op {
                    visit(seq, op);
                }
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
    let first_new = first_new.unwrap_or(pos);
    Ok((
        SegmentScan {
            first_seq,
            version,
            last_seq: next - 1,
            frames,
            valid_len: pos as u64,
            file_len: buf.len() as u64,
            end,
        },
        first_new,
    ))
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
    /// Each segment's bytes, cut to the end of its last valid frame, with
    /// the offset of its first record above `after_seq`.
    buffers: Vec<(Vec<u8>, usize)>,
    after_seq: u64,
    pub summary: ReplaySummary,
}

impl LogRead {
    /// Every record above `after_seq`, in sequence order.
    pub fn records(&self) -> impl Iterator<Item = (u64, LogOpRef<'_>)> + '_ {
        self.buffers.iter().flat_map(move |(buf, start)| {
            let mut pos = *start;
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
///
/// Segments wholly at or below `after_seq` are not read when a later segment
/// shows where they end. In a segment that is read, the frames at or below
/// `after_seq` are checked (length, checksum, sequence) but not decoded
/// ([`scan_segment_after`]): the caller holds those records already.
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
        let (scan, first_new) = scan_segment_after(&buf, after_seq, |seq, _| {
            applied += u64::from(seq > after_seq)
        })
        .map_err(|reason| LogError::BadHeader {
            path: seg.path.clone(),
            reason,
        })?;
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
        if applied > 0 {
            read.buffers.push((buf, first_new));
        }
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

/// Whether `path` now names another file than the one opened from it
/// (whose metadata is `open`). A name that names nothing is not "another
/// file": whether its records were compacted away is for the directory
/// listing to say.
fn replaced(open: &fs::Metadata, path: &Path) -> Result<bool, LogError> {
    use std::os::unix::fs::MetadataExt;
    match fs::metadata(path) {
        Ok(now) => Ok((now.dev(), now.ino()) != (open.dev(), open.ino())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(path)(e)),
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
///
/// A failed write or fsync is never acknowledged: every append of the batch
/// (and every append queued behind it) gets the error, the segment is cut
/// back to its last durable frame and its descriptor closed, and the next
/// append first reopens the segment, truncates it to the last durable frame,
/// fsyncs that, and checks the last frame (see `docs/storage.md`, "When a
/// write fails"). Appends then work again once the cause (a full disk, a
/// read-only mount) is gone, without reopening the log.
pub struct LinkLog {
    dir: PathBuf,
    opts: LogOptions,
    state: Mutex<WriterState>,
    durable: Condvar,
    /// The file being appended to; locked only by the thread doing a flush.
    active: Mutex<ActiveSegment>,
    /// fsyncs done so far (appends ÷ syncs is the group-commit batch size).
    syncs: std::sync::atomic::AtomicU64,
    /// Batches that failed to write or sync.
    failures: std::sync::atomic::AtomicU64,
    /// Faults a test asked for (see [`LinkLog::inject_fault`]).
    faults: Mutex<Vec<InjectedFault>>,
    any_fault: std::sync::atomic::AtomicBool,
    /// Told how long each group commit's fsync took (metrics), if set.
    fsync_observer: std::sync::OnceLock<FsyncObserver>,
}

struct WriterState {
    /// Sequence the next appended record gets.
    next_seq: u64,
    /// Encoded frames waiting for the next flush.
    pending: Vec<u8>,
    /// Offset in `pending` where its last frame starts.
    pending_last_frame: usize,
    /// Tickets of the appends whose frames are in `pending`.
    pending_tickets: Vec<u64>,
    /// Ticket of the next append.
    next_ticket: u64,
    /// Every record up to here is on disk.
    durable_seq: u64,
    /// A thread is writing and syncing a batch.
    flushing: bool,
    /// Appends whose batch failed, by ticket; each appender removes its own
    /// entry. Sequences above `durable_seq` are handed out again after a
    /// failure, so an appender must learn of its failure from here, never by
    /// comparing sequences.
    failed: std::collections::HashMap<u64, Failure>,
    /// Set when a flush panicked: appends stop for good.
    poisoned: Option<String>,
    /// The last failure, cleared by the next batch that is written and synced.
    last_failure: Option<Failure>,
}

/// Why a batch was not written: enough to rebuild the `io::Error` (kind and
/// OS error number) for every appender of the batch.
#[derive(Debug, Clone)]
struct Failure {
    path: PathBuf,
    stage: &'static str,
    kind: io::ErrorKind,
    raw_os_error: Option<i32>,
    message: String,
}

impl Failure {
    fn new(path: &Path, stage: &'static str, e: &io::Error) -> Self {
        Self {
            path: path.to_owned(),
            stage,
            kind: e.kind(),
            raw_os_error: e.raw_os_error(),
            message: e.to_string(),
        }
    }

    fn to_error(&self) -> LogError {
        let source = match self.raw_os_error {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(self.kind, self.message.clone()),
        };
        LogError::WriteFailed {
            path: self.path.clone(),
            stage: self.stage,
            source,
        }
    }
}

/// A fault for tests to inject into the writer's next batch (the real
/// faults, ENOSPC, EFBIG or a read-only file, are injected by
/// `tests/disk_fault.rs` from outside the process).
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InjectedFault {
    /// The next batch's write stops after `written` bytes and fails with
    /// the OS error `errno`: a partial frame is left at the end of the file.
    WriteCut { written: usize, errno: i32 },
    /// The next batch is written whole, then its fsync fails with `errno`
    /// (the frames are complete in the file, but not durable).
    SyncFails { errno: i32 },
    /// The next `times` recoveries fail with `errno` before reopening.
    RecoveryFails { errno: i32, times: u32 },
}

struct ActiveSegment {
    /// `None` after a failure, until a recovery reopens the file.
    file: Option<File>,
    path: PathBuf,
    /// First sequence of the segment (its header's).
    first_seq: u64,
    /// Its header's format version: a version 1 segment that holds a frame
    /// is rolled over before the next batch (see [`SEGMENT_VERSION_V1`]).
    version: u32,
    /// Everything before this offset was fsynced: the segment's length as of
    /// the last successful batch (or open). Writes go to this offset.
    durable_len: u64,
    /// Offset of the last durable frame; `None` while the segment has none.
    last_frame_at: Option<u64>,
    /// A write or fsync failed: the file past `durable_len` is unknown and
    /// the descriptor is closed; recover before writing again.
    needs_recovery: bool,
    /// A roll after a compaction failed part-way (a new segment may exist
    /// on disk, or not): the next batch starts a new segment first, which
    /// replaces that file, whatever the active segment's size.
    roll_pending: bool,
}

impl LinkLog {
    /// Opens (or creates) the log in `dir` for writing, recovering a torn tail.
    /// `base_seq` is the sequence the current snapshot holds: an empty log
    /// starts right after it, and a log that starts later has lost records.
    ///
    /// The caller must hold the data dir's writer lock.
    pub fn open(dir: &Path, base_seq: u64, opts: LogOptions) -> Result<(Self, Recovery), LogError> {
        create_dir_durable(dir).map_err(io_err(dir))?;
        remove_temp_files(dir)?;
        let segments = list_segments(dir)?;
        let mut recovery = Recovery {
            last_seq: base_seq,
            truncated: None,
        };
        let mut expected: Option<u64> = None;
        let mut last_scanned = 0;
        let mut last_frame_at = None;
        let mut last_version = SEGMENT_VERSION;
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
            if is_last {
                last_frame_at = last_frame_offset(&buf[..scan.valid_len as usize]);
                last_version = scan.version;
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
                create_segment(dir, recovery.last_seq + 1).map_err(|f| f.to_error())?
            }
            Some(seg) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&seg.path)
                    .map_err(io_err(&seg.path))?;
                // What a previous writer wrote but did not sync (it died
                // first) is served from now on: make it durable, and so is
                // the segment's name (a writer that died between renaming a
                // new segment in and fsyncing the directory left it unsynced,
                // and this writer's appends go into that segment).
                file.sync_all().map_err(io_err(&seg.path))?;
                sync_dir(dir).map_err(io_err(dir))?;
                let len = file.metadata().map_err(io_err(&seg.path))?.len();
                ActiveSegment {
                    file: Some(file),
                    path: seg.path.clone(),
                    first_seq: seg.first_seq,
                    version: last_version,
                    durable_len: len,
                    last_frame_at,
                    needs_recovery: false,
                    roll_pending: false,
                }
            }
            None => create_segment(dir, recovery.last_seq + 1).map_err(|f| f.to_error())?,
        };
        let log = Self {
            dir: dir.to_owned(),
            opts,
            state: Mutex::new(WriterState {
                next_seq: recovery.last_seq + 1,
                pending: Vec::new(),
                pending_last_frame: 0,
                pending_tickets: Vec::new(),
                next_ticket: 0,
                durable_seq: recovery.last_seq,
                flushing: false,
                failed: Default::default(),
                poisoned: None,
                last_failure: None,
            }),
            durable: Condvar::new(),
            active: Mutex::new(active),
            syncs: Default::default(),
            failures: Default::default(),
            faults: Mutex::new(Vec::new()),
            any_fault: Default::default(),
            fsync_observer: std::sync::OnceLock::new(),
        };
        Ok((log, recovery))
    }

    /// The directory holding the segments.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Calls `observe` with the duration of every group commit's fsync from
    /// now on (once per log; later calls are ignored).
    pub fn observe_fsync(&self, observe: impl Fn(std::time::Duration) + Send + Sync + 'static) {
        let _ = self.fsync_observer.set(Box::new(observe));
    }

    /// Number of fsyncs done by appends since open.
    pub fn sync_count(&self) -> u64 {
        self.syncs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Tests only: how many appends have their frames queued for the next
    /// batch (behind the one being written), so that a test can tell when
    /// the appends it started all wait to share one fsync.
    #[doc(hidden)]
    pub fn queued_appends(&self) -> usize {
        lock(&self.state).pending_tickets.len()
    }

    /// Number of batches whose write, fsync or recovery failed since open.
    pub fn failure_count(&self) -> u64 {
        self.failures.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sequence of the last record on disk.
    pub fn durable_seq(&self) -> u64 {
        lock(&self.state).durable_seq
    }

    /// The error of the last batch, if it failed and none was written since:
    /// appends are expected to fail until the cause is gone (the next append
    /// retries the disk).
    pub fn last_failure(&self) -> Option<LogError> {
        lock(&self.state)
            .last_failure
            .as_ref()
            .map(Failure::to_error)
    }

    /// Makes the next batch fail as `fault` says (tests only).
    #[doc(hidden)]
    pub fn inject_fault(&self, fault: InjectedFault) {
        lock(&self.faults).push(fault);
        self.any_fault
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Appends `ops` as consecutive records and returns the sequence of the
    /// last one once all of them are on disk. Every op is validated first; an
    /// invalid one fails the whole call before anything is written.
    ///
    /// An error means none of `ops` is in the log: the batch was cut off the
    /// file (a later append may get the same sequences).
    pub fn append(&self, ops: &[LogOp]) -> Result<u64, LogError> {
        for op in ops {
            op.validate()?;
        }
        let mut st = lock(&self.state);
        if let Some(why) = &st.poisoned {
            return Err(LogError::Poisoned(why.clone()));
        }
        if ops.is_empty() {
            return Ok(st.durable_seq);
        }
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        for op in ops {
            let seq = st.next_seq;
            st.pending_last_frame = st.pending.len();
            encode_frame(seq, op, &mut st.pending);
            st.next_seq += 1;
        }
        st.pending_tickets.push(ticket);
        let mine = st.next_seq - 1;
        loop {
            // First: a failure of this append's batch (its sequences may
            // have been handed out again and made durable since).
            if let Some(failure) = st.failed.remove(&ticket) {
                return Err(failure.to_error());
            }
            if st.durable_seq >= mine {
                return Ok(mine);
            }
            if let Some(why) = &st.poisoned {
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
            let tickets = std::mem::take(&mut st.pending_tickets);
            let last_frame = st.pending_last_frame;
            let batch_first = st.durable_seq + 1;
            let batch_last = st.next_seq - 1;
            drop(st);
            // If the write panics, the guard poisons the log and wakes the
            // waiters, so that no append blocks forever on `flushing`.
            let guard = FlushGuard { log: self };
            let result = self.write_batch(&batch, batch_first, last_frame);
            std::mem::forget(guard);
            st = lock(&self.state);
            st.flushing = false;
            match result {
                Ok(()) => {
                    st.durable_seq = batch_last;
                    st.last_failure = None;
                }
                Err(failure) => {
                    self.failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(
                        path = %failure.path.display(),
                        stage = failure.stage,
                        error = %failure.message,
                        first_seq = batch_first,
                        last_seq = batch_last,
                        "link log: a batch was not written; its appends and those queued behind it fail"
                    );
                    // The frames queued meanwhile carry sequences after the
                    // failed ones: they fail too, and sequences restart
                    // right after the last durable record.
                    let queued = std::mem::take(&mut st.pending_tickets);
                    for t in tickets.into_iter().chain(queued) {
                        st.failed.insert(t, failure.clone());
                    }
                    st.pending.clear();
                    st.next_seq = st.durable_seq + 1;
                    st.last_failure = Some(failure);
                }
            }
            if st.pending.capacity() == 0 {
                let mut reuse = batch;
                reuse.clear();
                st.pending = reuse;
            }
            self.durable.notify_all();
        }
    }

    /// After a compaction that holds every record up to `covered`: when that
    /// is every durable record and the active segment holds a frame, starts
    /// a new, empty segment at `covered + 1`, so that the old one is no
    /// longer the last and the compaction's trim (`remove_segments_upto`)
    /// deletes it. Otherwise the last segment would be kept (it is never
    /// deleted) and every reader would read its covered frames on start.
    ///
    /// Waits for a batch being written to finish, and holds appends off
    /// while it rolls (it takes the flusher's place). Returns whether it
    /// rolled. Appends that arrived since `covered` leave the log as it is
    /// (their segment holds records the snapshot does not). If creating the
    /// segment fails, the error is returned and the next batch starts a new
    /// segment before writing, which replaces any file left by the attempt.
    pub fn roll_after_compaction(&self, covered: u64) -> Result<bool, LogError> {
        let mut st = lock(&self.state);
        while st.flushing {
            st = self
                .durable
                .wait(st)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        if st.poisoned.is_some() || st.durable_seq != covered || !st.pending.is_empty() {
            return Ok(false);
        }
        // Hold the flusher's place: no batch is written while we roll, and
        // appends queue behind us as they would behind a flush.
        st.flushing = true;
        drop(st);
        // As for a flush: a panic here poisons the log rather than leaving
        // appends waiting for `flushing` to clear.
        let guard = FlushGuard { log: self };
        let result = {
            let mut active = lock(&self.active);
            if active.needs_recovery || active.file.is_none() || active.last_frame_at.is_none() {
                // A failed batch is recovered by the next append first; a
                // segment without a frame holds nothing covered.
                Ok(false)
            } else {
                match create_segment(&self.dir, covered + 1) {
                    Ok(new) => {
                        *active = new;
                        Ok(true)
                    }
                    Err(failure) => {
                        active.roll_pending = true;
                        Err(failure.to_error())
                    }
                }
            }
        };
        std::mem::forget(guard);
        let mut st = lock(&self.state);
        st.flushing = false;
        drop(st);
        self.durable.notify_all();
        result
    }

    /// Takes the next injected fault matching `pick`, if any.
    fn take_fault(&self, pick: impl Fn(&InjectedFault) -> bool) -> Option<InjectedFault> {
        if !self.any_fault.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let mut faults = lock(&self.faults);
        let at = faults.iter().position(pick)?;
        let fault = match &mut faults[at] {
            InjectedFault::RecoveryFails { errno, times } if *times > 1 => {
                *times -= 1;
                InjectedFault::RecoveryFails {
                    errno: *errno,
                    times: 1,
                }
            }
            _ => faults.remove(at),
        };
        Some(fault)
    }

    /// Writes and fsyncs one batch at the end of the active segment. On
    /// failure nothing of the batch may stay in the file: see
    /// [`LinkLog::abandon`].
    fn write_batch(&self, batch: &[u8], first_seq: u64, last_frame: usize) -> Result<(), Failure> {
        let mut active = lock(&self.active);
        if active.needs_recovery || active.file.is_none() {
            self.recover(&mut active, first_seq - 1)?;
        }
        // Roll over when the segment is full, when a compaction asked for
        // it, or when it is of the earlier format and holds frames (written
        // by an earlier build): frames of link encoding v2 go to segments of
        // format 2 only, which earlier builds refuse rather than truncate as
        // a torn tail.
        if active.last_frame_at.is_some()
            && (active.durable_len >= self.opts.segment_bytes
                || active.roll_pending
                || active.version != SEGMENT_VERSION)
        {
            *active = create_segment(&self.dir, first_seq)?;
        }
        let at = active.durable_len;
        let Some(file) = active.file.as_ref() else {
            return Err(Failure::new(
                &active.path,
                "writing",
                &io::Error::other("the segment is not open"),
            ));
        };
        // Space first: a batch that does not fit is refused before a byte
        // is written, so that no complete frame of it is ever in the file
        // for a reader to see.
        if let Err(e) = reserve_space(file, at, batch.len() as u64) {
            return Err(self.abandon(&mut active, "reserving space", &e, false));
        }
        let written = match self.take_fault(|f| matches!(f, InjectedFault::WriteCut { .. })) {
            Some(InjectedFault::WriteCut { written, errno }) => file
                .write_all_at(&batch[..written.min(batch.len())], at)
                .and(Err(io::Error::from_raw_os_error(errno))),
            _ => file.write_all_at(batch, at),
        };
        if let Err(e) = written {
            return Err(self.abandon(&mut active, "writing", &e, true));
        }
        let sync_started = std::time::Instant::now();
        let synced = match self.take_fault(|f| matches!(f, InjectedFault::SyncFails { .. })) {
            Some(InjectedFault::SyncFails { errno }) => Err(io::Error::from_raw_os_error(errno)),
            _ => file.sync_data(),
        };
        if let Some(observe) = self.fsync_observer.get() {
            observe(sync_started.elapsed());
        }
        if let Err(e) = synced {
            return Err(self.abandon(&mut active, "fsync", &e, true));
        }
        active.last_frame_at = Some(at + last_frame as u64);
        active.durable_len = at + batch.len() as u64;
        self.syncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// After a failed batch: when bytes may have been written, cuts the
    /// segment back to its last durable frame at once (best effort: the
    /// recovery before the next write does it again and must succeed); in
    /// any case closes the descriptor (a read-only mount can then be
    /// remounted, and the next append starts from a fresh one). After a
    /// failed fsync the page cache may not match the disk (and a second
    /// fsync could report success for pages the kernel dropped), so the
    /// failed bytes are never synced again: they are cut off.
    fn abandon(
        &self,
        active: &mut ActiveSegment,
        stage: &'static str,
        e: &io::Error,
        wrote: bool,
    ) -> Failure {
        let failure = Failure::new(&active.path, stage, e);
        if let Some(file) = active.file.take()
            && wrote
        {
            // The cut is synced at once (a crash before the next append's
            // recovery must not bring the refused batch back as whole
            // frames); when the disk refuses even that, recovery retries.
            if let Err(te) = file
                .set_len(active.durable_len)
                .and_then(|()| file.sync_data())
            {
                tracing::warn!(
                    path = %active.path.display(),
                    error = %te,
                    "link log: cannot cut the failed batch off yet; the next append retries"
                );
            }
        }
        active.needs_recovery = true;
        failure
    }

    /// Makes the active segment writable again after a failure: reopens it,
    /// truncates it to the last durable frame, fsyncs the truncation and
    /// checks that the last frame before it decodes with the expected
    /// sequence. Any failure leaves the log refusing appends (each append
    /// retries the recovery first).
    fn recover(&self, active: &mut ActiveSegment, last_seq: u64) -> Result<(), Failure> {
        active.file = None;
        active.needs_recovery = true;
        let path = active.path.clone();
        let fail = |stage: &'static str| {
            let path = &path;
            move |e: io::Error| Failure::new(path, stage, &e)
        };
        if let Some(InjectedFault::RecoveryFails { errno, .. }) =
            self.take_fault(|f| matches!(f, InjectedFault::RecoveryFails { .. }))
        {
            return Err(fail("reopening")(io::Error::from_raw_os_error(errno)));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&active.path)
            .map_err(fail("reopening"))?;
        file.set_len(active.durable_len)
            .map_err(fail("truncating to the last durable frame"))?;
        file.sync_all().map_err(fail("fsync after truncating"))?;
        verify_tail(&file, active, last_seq).map_err(|reason| {
            fail("verifying")(io::Error::new(io::ErrorKind::InvalidData, reason))
        })?;
        tracing::warn!(
            path = %active.path.display(),
            durable_len = active.durable_len,
            last_seq,
            "link log: recovered after a failed write; appending again"
        );
        active.file = Some(file);
        active.needs_recovery = false;
        Ok(())
    }
}

/// Checks that the reopened segment ends with the frame the writer last
/// synced (or, without one, is a bare header): the writer's idea of the
/// durable end matches the file.
fn verify_tail(file: &File, active: &ActiveSegment, last_seq: u64) -> Result<(), String> {
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    if len != active.durable_len {
        return Err(format!(
            "length {len} after truncating to {}",
            active.durable_len
        ));
    }
    match active.last_frame_at {
        Some(at) => {
            let mut buf = vec![0u8; (active.durable_len - at) as usize];
            file.read_exact_at(&mut buf, at)
                .map_err(|e| e.to_string())?;
            match decode_frame(&buf) {
                Ok((seq, _, used)) if seq == last_seq && used == buf.len() => Ok(()),
                Ok((seq, _, used)) => Err(format!(
                    "the frame at {at} has sequence {seq} and {used} bytes, expected {last_seq} and {}",
                    buf.len()
                )),
                Err(e) => Err(format!("the frame at {at} does not decode: {e}")),
            }
        }
        None => {
            let mut header = [0u8; SEGMENT_HEADER_LEN];
            file.read_exact_at(&mut header, 0)
                .map_err(|e| e.to_string())?;
            match decode_segment_header(&header) {
                Ok(first) if first == active.first_seq && first == last_seq + 1 => Ok(()),
                Ok(first) => Err(format!(
                    "segment starts at {first}, expected {} after {last_seq}",
                    active.first_seq
                )),
                Err(reason) => Err(reason),
            }
        }
    }
}

/// Offset of the last frame in `buf` (a segment read up to the end of its
/// last valid frame), `None` when it has no frame.
fn last_frame_offset(buf: &[u8]) -> Option<u64> {
    let mut pos = SEGMENT_HEADER_LEN;
    let mut last = None;
    while let Some(rest) = buf.get(pos..).filter(|r| !r.is_empty()) {
        let (_, _, used) = decode_frame(rest).ok()?;
        last = Some(pos as u64);
        pos += used;
    }
    last
}

/// Makes sure `len` bytes can be written at `at`, without writing them:
/// refuses a write that would cross `RLIMIT_FSIZE` (the kernel would cut it
/// short with EFBIG) and asks the file system for the blocks
/// (`fallocate(FALLOC_FL_KEEP_SIZE)`: ENOSPC or EDQUOT now rather than in the
/// middle of the write). File systems without `fallocate` skip the second
/// check; their write can still fail part-way, and is then cut back.
fn reserve_space(file: &File, at: u64, len: u64) -> io::Result<()> {
    let end = at.saturating_add(len);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit) } == 0
        && limit.rlim_cur != libc::RLIM_INFINITY
        && end > limit.rlim_cur
    {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(size)) = (libc::off_t::try_from(at), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        };
        for _ in 0..8 {
            // SAFETY: a plain syscall on a descriptor we own.
            let r = unsafe {
                libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, offset, size)
            };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP | libc::ENOSYS) => return Ok(()),
                _ => return Err(e),
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
    Ok(())
}

/// Clears `flushing` and poisons the log if a flush unwinds.
struct FlushGuard<'a> {
    log: &'a LinkLog,
}

impl Drop for FlushGuard<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.log.state);
        st.flushing = false;
        st.poisoned = Some("a log write panicked".into());
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
/// whole header. On failure before the rename the temporary file is removed.
fn create_segment(dir: &Path, first_seq: u64) -> Result<ActiveSegment, Failure> {
    let path = dir.join(segment_file_name(first_seq));
    let tmp = dir.join(format!("{}.tmp", segment_file_name(first_seq)));
    let written = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(&encode_segment_header(first_seq))?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(Failure::new(&tmp, "creating a segment", &e));
    }
    if let Err(e) = fs::rename(&tmp, &path) {
        let _ = fs::remove_file(&tmp);
        return Err(Failure::new(&path, "creating a segment", &e));
    }
    sync_dir(dir).map_err(|e| Failure::new(dir, "creating a segment", &e))?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Failure::new(&path, "creating a segment", &e))?;
    Ok(ActiveSegment {
        file: Some(file),
        path,
        first_seq,
        version: SEGMENT_VERSION,
        durable_len: SEGMENT_HEADER_LEN as u64,
        last_frame_at: None,
        needs_recovery: false,
        roll_pending: false,
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
    /// Offset and 8-byte header (length and checksum) of the last frame
    /// returned from the current segment, and the file's stamp when they
    /// were last checked: a writer that cut back a batch whose fsync failed
    /// (after we read it) is seen when the file changes and that frame is no
    /// longer there, and before we leave the segment (a batch of the same
    /// length written in its place may leave length and times unchanged).
    last_frame: Option<(u64, [u8; FRAME_HEADER_LEN], FileStamp)>,
    /// Where the last poll stopped at damage: while the file is unchanged,
    /// polls return the same error without reading it again.
    stopped: Option<Stopped>,
}

/// What `stat` says of a file that changes when it does: a write or a
/// truncation moves its length or its times, a replacement its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(m: &fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// A poll that stopped at damage: the file (kept open, so that its inode
/// number cannot be reused by a new file under the same name while we
/// compare), its stamp taken before it was read, and the error.
struct Stopped {
    _file: File,
    stamp: FileStamp,
    path: PathBuf,
    offset: u64,
    reason: String,
}

/// Whether the frame last returned from `file` (at `at`, with `header`) is
/// gone: the file is shorter than `end`, where we read up to, or holds
/// another frame there. One 8-byte `pread`.
fn frame_gone(file: &File, len: u64, end: u64, at: u64, header: &[u8; FRAME_HEADER_LEN]) -> bool {
    let mut now = [0u8; FRAME_HEADER_LEN];
    len < end || file.read_exact_at(&mut now, at).is_err() || now != *header
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
            last_frame: None,
            stopped: None,
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
        // Stopped by damage: the same answer, for one `stat`, until the file
        // changes (repaired, replaced, removed). Reading it again would cost
        // the whole segment per poll, and give the same error.
        if let Some(s) = &self.stopped {
            if fs::metadata(&s.path).is_ok_and(|m| FileStamp::of(&m) == s.stamp) {
                return Err(LogError::Corrupt {
                    path: s.path.clone(),
                    offset: s.offset,
                    reason: s.reason.clone(),
                });
            }
            self.stopped = None;
        }
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
            // Taken before the read, so that a change after it is seen next time.
            let stamp = FileStamp::of(&file.metadata().map_err(io_err(&path))?);
            let len = stamp.len;
            // The `fstat` gives the times with the length: a batch cut back
            // and replaced by one of the same length moves them.
            if let Some((at, header, checked)) = self.last_frame
                && checked != stamp
            {
                if frame_gone(file, len, *offset, at, &header) {
                    let offset = *offset;
                    return Err(self.rewound(path, offset));
                }
                self.last_frame = Some((at, header, stamp));
            }
            let base = *offset;
            self.buf.clear();
            if len > *offset {
                self.buf.resize((len - *offset) as usize, 0);
                file.read_exact_at(&mut self.buf, *offset)
                    .map_err(io_err(&path))?;
            }
            let mut pos = 0usize;
            let mut stop: Option<FrameError> = None;
            let mut bad_seq = None;
            let mut last_at = None;
            while pos < self.buf.len() {
                match decode_frame(&self.buf[pos..]) {
                    Ok((seq, op, used)) if seq == self.last_seq + 1 => {
                        visit(seq, op);
                        self.last_seq = seq;
                        last_at = Some(pos);
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
            if let Some(p) = last_at {
                let mut header = [0u8; FRAME_HEADER_LEN];
                header.copy_from_slice(&self.buf[p..p + FRAME_HEADER_LEN]);
                self.last_frame = Some((base + p as u64, header, stamp));
            }
            *offset += pos as u64;
            let at = *offset;
            let read_end = len;
            // The file grew while we decoded (a write finished): read on.
            let grew = || -> Result<bool, LogError> {
                Ok(file.metadata().map_err(io_err(&path))?.len() != read_end)
            };
            if pos == self.buf.len() {
                // One `fstat` for both questions: grown, and replaced.
                let open = file.metadata().map_err(io_err(&path))?;
                if open.len() != read_end {
                    continue;
                }
                // Clean end of a complete read. The writer finishes a segment
                // before it starts the next, which begins at our next record.
                let next = self.dir.join(segment_file_name(self.last_seq + 1));
                if next != path && next.exists() {
                    // Check the last frame we returned from this file once
                    // more: it may have been cut back and replaced by a batch
                    // of the same length within the times' resolution, which
                    // nothing above saw, and after this we never look back.
                    if let Some((at, header, _)) = self.last_frame
                        && frame_gone(file, read_end, read_end, at, &header)
                    {
                        return Err(self.rewound(path, read_end));
                    }
                    self.current = None;
                    self.last_frame = None;
                    continue;
                }
                // The name may hold another file by now: a segment whose
                // creation failed after its rename is created again, over
                // the bare file we may have opened. Read the new one.
                if replaced(&open, &path)? {
                    self.current = None;
                    self.last_frame = None;
                    continue;
                }
                // A later segment but not ours: our next records were
                // compacted away, unless the writer wrote a last batch into
                // ours after the `fstat` above and then started that later
                // segment (seen through this order: the listing, then the
                // size again). Then that batch is read first.
                if self.segment_after_exists()? {
                    if let Some((file, path, _)) = &self.current
                        && file.metadata().map_err(io_err(path))?.len() != read_end
                    {
                        continue;
                    }
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
            // Until the file changes, later polls return this error without
            // reading it; then they reopen it from the directory (it may have
            // been repaired, replaced or removed).
            if let Some((file, _, _)) = self.current.take() {
                self.stopped = Some(Stopped {
                    _file: file,
                    stamp,
                    path: path.clone(),
                    offset: at,
                    reason: reason.clone(),
                });
            }
            return Err(LogError::Corrupt {
                path,
                offset: at,
                reason,
            });
        }
    }

    /// Records we returned were cut off (a batch whose fsync failed) and
    /// others may be written in their place: drops the segment and says so,
    /// once. The next poll carries on after our last sequence.
    fn rewound(&mut self, path: PathBuf, offset: u64) -> LogError {
        self.current = None;
        self.last_frame = None;
        LogError::Rewound {
            path,
            offset,
            last_seq: self.last_seq,
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
        let first =
            decode_segment_header(&header[..have]).map_err(|reason| LogError::BadHeader {
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
            // Checksum and sequence only: these records are not used.
            while seq_here < self.last_seq {
                match check_frame(&buf[pos..]) {
                    Ok((seq, used)) if seq == seq_here + 1 => {
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
        self.last_frame = None;
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
        assert_eq!(&h[8..12], &2u32.to_le_bytes(), "version");
        assert_eq!(&h[12..16], &32u32.to_le_bytes(), "header length");
        assert_eq!(
            &h[16..24],
            &0x0102_0304_0506_0708u64.to_le_bytes(),
            "first seq"
        );
        assert_eq!(&h[24..28], &[0; 4], "reserved");
        assert_eq!(&h[28..32], &crc32c::crc32c(&h[0..28]).to_le_bytes(), "crc");
        assert_eq!(decode_segment_header(&h), Ok(0x0102_0304_0506_0708));
        assert_eq!(
            decode_segment_header_version(&h),
            Ok((0x0102_0304_0506_0708, 2))
        );
        // Version 1 (written by earlier builds) is still read.
        let v1 = encode_segment_header_version(9, 1);
        assert_eq!(&v1[8..12], &1u32.to_le_bytes());
        assert_eq!(decode_segment_header_version(&v1), Ok((9, 1)));
    }

    #[test]
    fn each_bad_segment_header_field_is_refused() {
        let resign = |mut h: [u8; SEGMENT_HEADER_LEN]| {
            let crc = crc32c::crc32c(&h[0..28]);
            h[28..32].copy_from_slice(&crc.to_le_bytes());
            h
        };
        let good = encode_segment_header(7);
        let cases: [(usize, u8, &str); 6] = [
            (0, b'X', "magic"),
            (8, 3, "version"),
            (8, 0, "version"),
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
