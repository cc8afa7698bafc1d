//! The checks the fuzz targets run on each input, shared with
//! `tests/fuzz_regressions.rs` (which includes this file with `#[path]`) so
//! that a saved input is replayed through exactly the code that found it.
//!
//! Everything here must hold for arbitrary bytes: nothing may panic, and each
//! assertion is a property the store promises for any input, not only for
//! files it wrote itself (those get the stronger checks of [`check_written`]).
//! See `docs/fuzzing.md`.

use std::cell::RefCell;
use std::convert::Infallible;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use uload::store::frame::{
    FRAME_HEADER_LEN, LogOp, LogOpRef, MIN_PAYLOAD_LEN, decode_frame, encode_frame_as,
};
use uload::store::log::{
    LogTail, SEGMENT_HEADER_LEN, SegmentEnd, decode_segment_header, replay, scan_segment,
    scan_segment_after, segment_file_name, valid_frame_follows,
};
use uload::store::record::{LinkEncoding, LinkRef, RecordError};
use uload::store::snapshot::{Snapshot, SnapshotError, write_snapshot_as};

thread_local! {
    /// This thread's scratch directory, made once and reused for every input
    /// (files in it are overwritten), so that a run stays fast.
    static SCRATCH: RefCell<Option<PathBuf>> = const { RefCell::new(None) };
}

/// The calling thread's scratch directory under `std::env::temp_dir()`
/// (set `TMPDIR=/dev/shm` to keep fuzzing off the disk). It is created if
/// missing, so it may be removed at any time with [`remove_scratch_dir`].
pub fn scratch_dir() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = SCRATCH.with(|s| {
        s.borrow_mut()
            .get_or_insert_with(|| {
                std::env::temp_dir().join(format!(
                    "uload-fuzz-{}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                ))
            })
            .clone()
    });
    fs::create_dir_all(dir.join("log")).expect("create the scratch directory");
    dir
}

/// Removes the calling thread's scratch directory, if it made one.
pub fn remove_scratch_dir() {
    if let Some(dir) = SCRATCH.with(|s| s.borrow_mut().take()) {
        let _ = fs::remove_dir_all(dir);
    }
}

// ---------------------------------------------------------------------------
// log_reader
// ---------------------------------------------------------------------------

/// Everything the `log_reader` target runs on one input: the bytes of a
/// segment file.
pub fn check_log_segment(data: &[u8]) {
    check_raw_frames(data);
    let frames = check_scan(data);
    check_on_disk(data, &frames);
}

/// Decodes frames straight from the input (at its start and after where a
/// segment header would end) and checks `valid_frame_follows` on it.
fn check_raw_frames(data: &[u8]) {
    for start in [0, SEGMENT_HEADER_LEN.min(data.len())] {
        let buf = &data[start..];
        match decode_frame(buf) {
            Ok((seq, op, used)) => {
                assert!(
                    (FRAME_HEADER_LEN + MIN_PAYLOAD_LEN..=buf.len()).contains(&used),
                    "decode_frame used {used} of {} bytes",
                    buf.len()
                );
                check_reencode(seq, op, &buf[..used]);
            }
            Err(e) => {
                let _ = (e.to_string(), e.is_incomplete());
            }
        }
    }
    let _ = valid_frame_follows(data, 0);
    // It counts a frame that decodes at offset 0 whatever its sequence, and
    // later frames above `after_seq`; none is above u64::MAX.
    assert_eq!(
        valid_frame_follows(data, u64::MAX),
        decode_frame(data).is_ok()
    );
}

/// An accepted frame: its sequence, its operation and its exact bytes.
type Frame = (u64, LogOp, Vec<u8>);

/// Runs `scan_segment` and checks what it reports against the bytes. Returns
/// the frames it accepted (none when the header is refused).
fn check_scan(data: &[u8]) -> Vec<Frame> {
    let mut visited: Vec<(u64, LogOpRef<'_>)> = Vec::new();
    let scan = match scan_segment(data, |seq, op| visited.push((seq, op))) {
        Ok(scan) => scan,
        Err(reason) => {
            assert!(visited.is_empty(), "frames visited under a bad header");
            assert_eq!(decode_segment_header(data), Err(reason));
            return Vec::new();
        }
    };
    let first = decode_segment_header(data).expect("scan_segment accepted this header");
    assert_eq!(scan.first_seq, first);
    assert_eq!(scan.frames, visited.len() as u64);
    assert_eq!(scan.file_len, data.len() as u64);
    assert_eq!(scan.last_seq, first - 1 + scan.frames);
    let mut frames = Vec::with_capacity(visited.len());
    let mut pos = SEGMENT_HEADER_LEN;
    for (i, &(seq, op)) in visited.iter().enumerate() {
        assert_eq!(seq, first + i as u64, "sequences are consecutive");
        let (dseq, dop, used) = decode_frame(&data[pos..]).expect("scan accepted this frame");
        assert_eq!((dseq, dop), (seq, op));
        let bytes = &data[pos..pos + used];
        frames.push((seq, check_reencode(seq, op, bytes), bytes.to_vec()));
        pos += used;
    }
    assert_eq!(pos as u64, scan.valid_len);
    match &scan.end {
        SegmentEnd::Clean => assert_eq!(scan.valid_len, scan.file_len),
        SegmentEnd::Stopped { offset, reason } => {
            assert_eq!(*offset, scan.valid_len);
            assert!(scan.valid_len < scan.file_len);
            assert!(!reason.is_empty());
            let _ = valid_frame_follows(&data[pos..], scan.last_seq);
        }
    }
    frames
}

/// The re-encoding invariant: a decoded operation, made owned and encoded
/// again with its sequence (a put in the link encoding the frame used, v1 or
/// v2), gives back exactly the frame's bytes: each encoding has one form per
/// link. Returns the owned operation.
fn check_reencode(seq: u64, op: LogOpRef<'_>, original: &[u8]) -> LogOp {
    let owned = op
        .to_owned_op()
        .expect("a decoded operation converts to an owned one");
    assert_eq!(owned.code().as_bytes(), op.code());
    // The link encoding alone round-trips whatever the URL policy says:
    // payload = seq (8 bytes) | op (1 byte) | link encoding.
    let link_bytes = &original[FRAME_HEADER_LEN + 9..];
    let encoding = match op {
        LogOpRef::Put(_) => {
            LinkEncoding::of(link_bytes).expect("a decoded put has a known version")
        }
        LogOpRef::Delete(_) => LinkEncoding::CURRENT,
    };
    if let LogOpRef::Put(link) = op {
        let mut again = Vec::new();
        link.encode_as(encoding, &mut again);
        assert_eq!(again.len(), link.encoded_len_as(encoding));
        assert_eq!(
            again,
            original[FRAME_HEADER_LEN + 9..],
            "link of frame {seq}"
        );
    }
    match owned.validate() {
        Ok(()) => {
            let mut again = Vec::with_capacity(original.len());
            encode_frame_as(seq, &owned, encoding, &mut again);
            assert_eq!(again, original, "frame {seq} re-encodes to other bytes");
        }
        // The reader enforces the record format (code charset, status,
        // flags, reserved byte, UTF-8 target) but not the writer's URL policy
        // (http(s) scheme, a host, no control characters, 2 KiB), so a frame
        // with a checksum-valid but policy-breaking target decodes. Such an
        // op cannot be re-encoded: `encode_frame_as` requires a validated op and
        // debug-asserts it. Anything but the target failing is a reader bug.
        Err(e) => assert!(
            matches!(
                e,
                RecordError::TargetLength(_)
                    | RecordError::TargetControl(_)
                    | RecordError::TargetScheme
                    | RecordError::TargetHost
            ),
            "the reader accepted an op that fails validation on a field it checks: {e}"
        ),
    }
    owned
}

/// Writes the input into a log directory and reads it with `replay` and
/// `LogTail::poll`, which must visit exactly the frames `scan_segment`
/// accepted (those after their starting sequence).
///
/// As `00000000000000000001.log`, read from the start (sequence 0); and when
/// the header declares another first sequence `F`, also under its own name
/// `F.log`, read from `F - 1` and from `F` (the tail's skip path).
fn check_on_disk(data: &[u8], frames: &[Frame]) {
    let log = scratch_dir().join("log");
    let declared = decode_segment_header(data).ok();
    let mut runs = vec![(1, 0)];
    if let Some(first) = declared.filter(|&f| f != 1) {
        runs.extend([(first, first - 1), (first, first)]);
    }
    let mut written = None;
    for (name_seq, after_seq) in runs {
        if written != Some(name_seq) {
            for entry in fs::read_dir(&log).expect("read the scratch log dir") {
                fs::remove_file(entry.expect("list the scratch log dir").path())
                    .expect("clear the scratch log dir");
            }
            fs::write(log.join(segment_file_name(name_seq)), data).expect("write the segment");
            written = Some(name_seq);
        }
        let covered = check_scan_after(data, after_seq, frames);
        let after: Vec<&Frame> = covered.iter().collect();
        check_replay(&log, after_seq, &after);
        // The tail reads the segment only if its header agrees with its name
        // and it does not start after the next wanted record (else it asks
        // for a snapshot instead).
        let readable =
            declared == Some(name_seq) && u128::from(name_seq) <= u128::from(after_seq) + 1;
        check_tail(&log, after_seq, if readable { &after } else { &[] });
    }
}

/// Runs `scan_segment_after` (what readers do with frames a snapshot holds:
/// checksum and sequence only) and returns the frames above `after_seq` it
/// accepts. Those `scan_segment` accepted are a prefix of them: skipping
/// the contents of covered frames can only let a reader read further (past
/// a checksum-valid frame whose contents are bad), never less far.
fn check_scan_after(data: &[u8], after_seq: u64, full: &[Frame]) -> Vec<Frame> {
    let mut visited = Vec::new();
    let Ok((scan, first_new)) = scan_segment_after(data, after_seq, |seq, op| {
        visited.push((seq, op));
    }) else {
        assert!(
            full.is_empty(),
            "scan_segment_after refused a header scan_segment accepted"
        );
        return Vec::new();
    };
    let first = decode_segment_header(data).expect("scan_segment_after accepted this header");
    assert_eq!(scan.last_seq, first - 1 + scan.frames);
    assert!(first_new >= SEGMENT_HEADER_LEN && first_new as u64 <= scan.valid_len);
    let mut frames = Vec::with_capacity(visited.len());
    let mut pos = first_new;
    for (i, &(seq, op)) in visited.iter().enumerate() {
        assert_eq!(
            seq,
            after_seq.max(first - 1) + 1 + i as u64,
            "consecutive above {after_seq}"
        );
        let (dseq, dop, used) = decode_frame(&data[pos..]).expect("scan accepted this frame");
        assert_eq!((dseq, dop), (seq, op));
        let bytes = &data[pos..pos + used];
        frames.push((seq, check_reencode(seq, op, bytes), bytes.to_vec()));
        pos += used;
    }
    assert_eq!(pos as u64, scan.valid_len);
    let above: Vec<&Frame> = full.iter().filter(|f| f.0 > after_seq).collect();
    assert!(
        above.len() <= frames.len(),
        "the covered scan stopped earlier"
    );
    for (a, b) in above.iter().zip(&frames) {
        assert_eq!((a.0, &a.2), (b.0, &b.2));
    }
    frames
}

fn check_replay(log: &Path, after_seq: u64, want: &[&Frame]) {
    let mut got = Vec::new();
    let result = replay(log, after_seq, |seq, op| got.push((seq, op.to_owned_op())));
    if let Err(e) = &result {
        let _ = e.to_string();
    }
    // Whether records before an error are visited is the reader's choice;
    // what it visits must be what the scanner accepted, all of it on success.
    assert!(
        got.len() <= want.len(),
        "replay from {after_seq}: {result:?}"
    );
    for ((seq, op), frame) in got.iter().zip(want) {
        assert_eq!((*seq, op.as_ref()), (frame.0, Ok(&frame.1)));
    }
    if let Ok(summary) = result {
        assert_eq!(got.len(), want.len(), "replay from {after_seq}");
        assert_eq!(summary.applied, want.len() as u64);
        if let Some(last) = want.last() {
            assert_eq!(summary.last_seq, last.0);
        }
    }
}

fn check_tail(log: &Path, after_seq: u64, want: &[&Frame]) {
    let mut tail = LogTail::new(log, after_seq);
    let mut got = Vec::new();
    let result = tail.poll(|seq, op| got.push((seq, op.to_owned_op())));
    if let Err(e) = &result {
        let _ = e.to_string();
    }
    assert_eq!(got.len(), want.len(), "tail from {after_seq}: {result:?}");
    for ((seq, op), frame) in got.into_iter().zip(want) {
        assert_eq!((seq, op.as_ref()), (frame.0, Ok(&frame.1)));
    }
    assert_eq!(tail.last_seq(), want.last().map_or(after_seq, |f| f.0));
}

// ---------------------------------------------------------------------------
// snapshot_open
// ---------------------------------------------------------------------------

/// Codes looked up in every snapshot besides its own records' codes.
const PROBES: &[&[u8]] = &[
    b"",
    b"a",
    b"abc",
    b"c00001",
    b"zzzzzzzz",
    b"A-_9",
    &[0xff; 3],
];

/// Everything the `snapshot_open` target runs on one input: the bytes of a
/// snapshot file.
pub fn check_snapshot(data: &[u8]) {
    let unverified = Snapshot::from_bytes(data, false);
    let verified = Snapshot::from_bytes(data, true);
    match (&unverified, &verified) {
        (Ok(snap), verified) => {
            assert_eq!(snap.verify_checksums().is_ok(), verified.is_ok());
        }
        (Err(_), Ok(_)) => panic!("opens verified but not unverified"),
        (Err(e), Err(_)) => {
            let _ = e.to_string();
        }
    }
    if let Ok(snap) = &unverified {
        exercise(snap, data.len());
    }
    if let Ok(snap) = &verified
        && let Some(links) = exercise(snap, data.len())
    {
        check_rewrite(snap, &links);
    }
}

/// Iterates every record and looks codes up. Returns the records when the
/// iteration yielded every one of them without error.
fn exercise(snap: &Snapshot, file_len: usize) -> Option<Vec<LinkRef<'_>>> {
    let h = *snap.header();
    assert_eq!(
        h.records_offset + h.records_len + h.index_len,
        file_len as u64
    );
    assert_eq!(
        (snap.len(), snap.is_empty()),
        (h.link_count, h.link_count == 0)
    );
    assert_eq!(snap.seq(), h.seq);
    let mut links = Vec::new();
    let mut complete = true;
    for item in snap.iter() {
        match item {
            Ok(link) => links.push(link),
            Err(e) => {
                let _ = e.to_string();
                complete = false;
            }
        }
    }
    assert!(links.len() as u64 <= h.link_count);
    if complete {
        assert_eq!(links.len() as u64, h.link_count);
    }
    // Arbitrary bytes with valid checksums can hold a lying index, so a
    // lookup may miss here; but what it finds must be the code asked for.
    for code in links.iter().map(|l| l.code).chain(PROBES.iter().copied()) {
        if let Some(found) = snap.get(code) {
            assert_eq!(found.code, code, "get returned another code");
            let _ = (found.to_link(), found.is_expired_at(0), found.code_str());
        }
    }
    for link in &links {
        let _ = (link.to_link(), link.is_disabled(), link.forwards_query());
    }
    complete.then_some(links)
}

/// Rewrites a snapshot that opened verified with `write_snapshot` (when its
/// codes are strictly ascending, as the writer requires), in the current
/// format and in the old one (`write_snapshot_as` with link encoding v1), and
/// checks each rewritten file with [`check_written`]. The writer may refuse a
/// record the reader accepted (a target that is not UTF-8), but nothing else.
fn check_rewrite(snap: &Snapshot, links: &[LinkRef<'_>]) {
    if !links.windows(2).all(|w| w[0].code < w[1].code) {
        return;
    }
    for encoding in [LinkEncoding::CURRENT, LinkEncoding::V1] {
        let path = scratch_dir().join("rewritten.snap");
        let written = write_snapshot_as(
            &path,
            snap.seq(),
            links.iter().map(|&l| Ok::<_, Infallible>(l)),
            encoding,
        );
        match written {
            Ok(info) => assert_eq!(info.header.link_count, links.len() as u64),
            Err(SnapshotError::Record { .. }) => return,
            Err(e) => panic!("write_snapshot of a valid snapshot's records: {e}"),
        }
        let again = Snapshot::open(&path, true).expect("a written snapshot opens verified");
        assert_eq!(again.seq(), snap.seq());
        check_written(&again, links);
    }
}

/// The invariants of a snapshot that `write_snapshot` produced from `links`:
/// it iterates back exactly those links, and `get` finds every one of them.
pub fn check_written(snap: &Snapshot, links: &[LinkRef<'_>]) {
    assert_eq!(snap.len(), links.len() as u64);
    let back: Vec<LinkRef<'_>> = snap
        .iter()
        .map(|r| r.expect("a written record decodes"))
        .collect();
    assert_eq!(back, links);
    for link in links {
        let found = snap
            .get(link.code)
            .unwrap_or_else(|| panic!("written code {:?} is not found", link.code_str()));
        assert_eq!(found, *link);
    }
}
