//! What a reader does on start (issue 4, start-up at 10M links): frames the
//! snapshot already holds are checked (checksum, sequence) but not decoded,
//! and `compact`/`import` leave no covered log segment behind for it to read.
//! Real files in temporary directories; the CLI tests run the `uload` binary.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::uload_ok;
use uload::store::frame::{FRAME_HEADER_LEN, frame_crc};
use uload::store::log::{SEGMENT_HEADER_LEN, list_segments, read_log};
use uload::store::record::LINK_V2_FIXED_LEN;
use uload::store::{DataDir, LogError, LogFollower, LogOp, LogOptions, Store, record::Link};

fn put(code: &str) -> LogOp {
    LogOp::Put(Link::new(code, &format!("https://example.com/{code}")).unwrap())
}

fn log_dir(dir: &Path) -> PathBuf {
    dir.join("log")
}

/// Offsets of the frames of a segment file, in order.
fn frame_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut at = SEGMENT_HEADER_LEN;
    let mut out = Vec::new();
    while at + FRAME_HEADER_LEN <= bytes.len() {
        out.push(at);
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        at += FRAME_HEADER_LEN + len;
    }
    out
}

/// A data dir whose log holds records 1..=n in one segment, read as if a
/// snapshot held everything up to `covered` (the log is not compacted, so
/// the covered frames are there to be skipped).
fn log_of(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), LogOptions::default()).unwrap();
    for i in 0..n {
        store.append(&[put(&format!("c{i:03}"))]).unwrap();
    }
    dir
}

#[test]
fn covered_frames_are_skipped_and_the_rest_are_read() {
    let dir = log_of(20);
    for covered in [0, 1, 7, 19, 20, 25] {
        let read = read_log(&log_dir(dir.path()), covered).unwrap();
        let seqs: Vec<u64> = read.records().map(|(seq, _)| seq).collect();
        let want: Vec<u64> = (covered + 1..=20).collect();
        assert_eq!(seqs, want, "after {covered}");
        assert_eq!(read.summary.applied, want.len() as u64);
        assert_eq!(read.summary.last_seq, covered.max(20));
        assert_eq!(read.summary.segments[0].1.frames, 20);
    }
}

/// A flipped byte in a frame the snapshot holds still stops the reader: with
/// valid frames after it, it is corruption naming the file and offset, as
/// before; the writer refuses it the same way.
#[test]
fn a_corrupt_covered_frame_is_still_reported() {
    let dir = log_of(20);
    let seg = list_segments(&log_dir(dir.path())).unwrap()[0].path.clone();
    let good = fs::read(&seg).unwrap();
    let offsets = frame_offsets(&good);
    assert_eq!(offsets.len(), 20);
    // Frame 5 (sequence 5): its length, its checksum, its sequence, its code.
    for delta in [
        0,
        5,
        FRAME_HEADER_LEN,
        FRAME_HEADER_LEN + 9 + LINK_V2_FIXED_LEN,
    ] {
        let at = offsets[4] + delta;
        let mut bad = good.clone();
        bad[at] ^= 0x01;
        fs::write(&seg, &bad).unwrap();
        for covered in [10, 20] {
            let err = read_log(&log_dir(dir.path()), covered).err().unwrap();
            let text = err.to_string();
            assert!(
                matches!(err, LogError::Corrupt { offset, .. } if offset == offsets[4] as u64),
                "byte {at}, after {covered}: {text}"
            );
            assert!(text.contains(&seg.display().to_string()), "{text}");
        }
        let err = DataDir::new(dir.path()).load_view(true).err().unwrap();
        assert!(
            err.to_string().contains(&format!("offset {}", offsets[4])),
            "{err}"
        );
    }
    // Cut inside a covered frame with nothing valid after it: a torn tail,
    // where the reader stops (the records up to it are all it has).
    fs::write(&seg, &good[..offsets[4] + 10]).unwrap();
    let read = read_log(&log_dir(dir.path()), 10).unwrap();
    assert_eq!(read.records().count(), 0);
    assert_eq!(read.summary.segments[0].1.last_seq, 4);
}

/// The one thing a reader no longer checks in a covered frame is its
/// contents under a good checksum (only a broken writer writes those): it
/// does not use that record. The writer, on open, still validates every
/// frame and refuses it.
#[test]
fn covered_contents_are_not_validated_but_the_writer_still_refuses_them() {
    let dir = log_of(20);
    let seg = list_segments(&log_dir(dir.path())).unwrap()[0].path.clone();
    let mut bytes = fs::read(&seg).unwrap();
    let at = frame_offsets(&bytes)[4];
    let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    // The code's first byte becomes '/', which the link encoding refuses;
    // the frame is re-checksummed so that only its contents are wrong.
    let code_at = at + FRAME_HEADER_LEN + 9 + LINK_V2_FIXED_LEN;
    bytes[code_at] = b'/';
    let payload = &bytes[at + FRAME_HEADER_LEN..at + FRAME_HEADER_LEN + len];
    let crc = frame_crc((len as u32).to_le_bytes(), payload);
    bytes[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
    fs::write(&seg, &bytes).unwrap();
    // Covered: skipped, and everything after it is read.
    let read = read_log(&log_dir(dir.path()), 10).unwrap();
    assert_eq!(
        read.records().map(|(s, _)| s).collect::<Vec<_>>(),
        (11..=20).collect::<Vec<_>>()
    );
    // Not covered: decoded, and refused as before.
    let err = read_log(&log_dir(dir.path()), 2).err().unwrap();
    assert!(
        matches!(err, LogError::Corrupt { offset, .. } if offset == at as u64),
        "{err}"
    );
    let err = Store::open(dir.path(), LogOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains(&format!("offset {at}")), "{err}");
}

/// After a compaction the log holds one empty segment that starts right
/// after the snapshot: a reader starting from the snapshot reads no frame.
#[test]
fn compaction_leaves_no_covered_segment() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), LogOptions::default()).unwrap();
    for i in 0..50 {
        store.append(&[put(&format!("c{i:03}"))]).unwrap();
    }
    let report = store.compact().unwrap();
    assert_eq!(report.snapshot.unwrap().header.seq, 50);
    let segments = list_segments(&log_dir(dir.path())).unwrap();
    assert_eq!(segments.len(), 1, "{segments:?}");
    assert_eq!(segments[0].first_seq, 51);
    assert_eq!(
        fs::metadata(&segments[0].path).unwrap().len(),
        SEGMENT_HEADER_LEN as u64
    );
    let read = read_log(&log_dir(dir.path()), 50).unwrap();
    assert_eq!(read.summary.segments.len(), 1);
    assert_eq!(read.summary.segments[0].1.frames, 0);
    // Appends go on in the new segment, across a reopen too.
    assert_eq!(store.append(&[put("after")]).unwrap(), 51);
    drop(store);
    let store = Store::open(dir.path(), LogOptions::default()).unwrap();
    assert_eq!(store.append(&[put("again")]).unwrap(), 52);
    let view = DataDir::new(dir.path()).load_view(true).unwrap();
    assert_eq!(view.len(), 52);
    assert!(view.get(b"c000").is_some() && view.get(b"again").is_some());
    // Compacting again with appends since: rolled and trimmed again.
    store.compact().unwrap();
    let segments = list_segments(&log_dir(dir.path())).unwrap();
    assert_eq!(
        segments.iter().map(|s| s.first_seq).collect::<Vec<_>>(),
        [53]
    );
    // Nothing new to compact and nothing in the active segment: no roll.
    store.compact().unwrap();
    let segments = list_segments(&log_dir(dir.path())).unwrap();
    assert_eq!(
        segments.iter().map(|s| s.first_seq).collect::<Vec<_>>(),
        [53]
    );
}

/// A crash after the roll but before the trim leaves the covered segment
/// and the new empty one: readers and the writer skip the covered one
/// unread, and the next compaction deletes it.
#[test]
fn a_crash_between_the_roll_and_the_trim_is_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), LogOptions::default()).unwrap();
    for i in 0..30 {
        store.append(&[put(&format!("c{i:03}"))]).unwrap();
    }
    let old = list_segments(&log_dir(dir.path())).unwrap()[0].clone();
    let old_bytes = fs::read(&old.path).unwrap();
    store.compact().unwrap();
    drop(store);
    // Put the covered segment back, as if the process died before deleting it.
    fs::write(&old.path, &old_bytes).unwrap();
    assert_eq!(list_segments(&log_dir(dir.path())).unwrap().len(), 2);
    let read = read_log(&log_dir(dir.path()), 30).unwrap();
    assert_eq!(
        read.summary.segments.len(),
        1,
        "the covered segment is not read"
    );
    let follower = LogFollower::open(dir.path()).unwrap();
    assert_eq!(follower.table().load().len(), 30);
    let store = Store::open(dir.path(), LogOptions::default()).unwrap();
    assert_eq!(store.append(&[put("next")]).unwrap(), 31);
    store.compact().unwrap();
    let segments = list_segments(&log_dir(dir.path())).unwrap();
    assert_eq!(
        segments.iter().map(|s| s.first_seq).collect::<Vec<_>>(),
        [32]
    );
    assert_eq!(DataDir::new(dir.path()).load_view(true).unwrap().len(), 31);
}

/// A data dir left by an older build (the last segment wholly covered by
/// the snapshot) is fixed by the next compaction, even with nothing new.
#[test]
fn compacting_with_nothing_new_removes_a_covered_last_segment() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), LogOptions::default()).unwrap();
    for i in 0..10 {
        store.append(&[put(&format!("c{i:03}"))]).unwrap();
    }
    let old = list_segments(&log_dir(dir.path())).unwrap()[0].clone();
    let old_bytes = fs::read(&old.path).unwrap();
    store.compact().unwrap();
    drop(store);
    // What an older build left: the covered segment is the only one.
    for s in list_segments(&log_dir(dir.path())).unwrap() {
        fs::remove_file(s.path).unwrap();
    }
    fs::write(&old.path, &old_bytes).unwrap();
    let store = Store::open(dir.path(), LogOptions::default()).unwrap();
    let report = store.compact().unwrap();
    assert!(report.snapshot.is_none());
    assert_eq!(report.removed, vec![old.path.clone()]);
    let segments = list_segments(&log_dir(dir.path())).unwrap();
    assert_eq!(
        segments.iter().map(|s| s.first_seq).collect::<Vec<_>>(),
        [11]
    );
}

/// A roll that fails (here: the new segment's temporary name is taken by a
/// directory) does not fail the compaction; the next batch starts the new
/// segment before it writes, and fails, changing nothing, while it cannot.
#[test]
fn a_failed_roll_is_done_by_the_next_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), LogOptions::default()).unwrap();
    for i in 0..10 {
        store.append(&[put(&format!("c{i:03}"))]).unwrap();
    }
    let blocker = log_dir(dir.path()).join("00000000000000000011.log.tmp");
    fs::create_dir(&blocker).unwrap();
    let report = store.compact().unwrap();
    assert_eq!(report.snapshot.unwrap().header.seq, 10);
    let firsts = |d: &Path| -> Vec<u64> {
        list_segments(&log_dir(d))
            .unwrap()
            .iter()
            .map(|s| s.first_seq)
            .collect()
    };
    assert_eq!(
        firsts(dir.path()),
        [1],
        "no roll, so the last segment stays"
    );
    let err = store.append(&[put("blocked")]).unwrap_err();
    assert!(err.to_string().contains("creating a segment"), "{err}");
    assert_eq!(firsts(dir.path()), [1]);
    fs::remove_dir(&blocker).unwrap();
    assert_eq!(store.append(&[put("next")]).unwrap(), 11);
    assert_eq!(firsts(dir.path()), [1, 11]);
    let read = read_log(&log_dir(dir.path()), 10).unwrap();
    assert_eq!(
        read.summary.segments.len(),
        1,
        "the covered segment is not read"
    );
    assert_eq!(read.records().map(|(s, _)| s).collect::<Vec<_>>(), [11]);
    store.compact().unwrap();
    assert_eq!(firsts(dir.path()), [12]);
    drop(store);
    let view = DataDir::new(dir.path()).load_view(true).unwrap();
    assert_eq!(view.len(), 11);
    assert!(view.get(b"blocked").is_none() && view.get(b"next").is_some());
}

/// `uload import`, then a restart: the reader finds nothing to replay.
#[test]
fn after_import_a_restart_replays_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let csv = dir.path().join("links.csv");
    let mut text = String::from("code,url,status\n");
    for i in 0..3000 {
        text.push_str(&format!("k{i:05},https://example.com/{i},301\n"));
    }
    fs::write(&csv, text).unwrap();
    let data_arg = data.to_str().unwrap();
    uload_ok(&["import", csv.to_str().unwrap(), "--data-dir", data_arg]);
    let segments = list_segments(&log_dir(&data)).unwrap();
    assert_eq!(
        segments.iter().map(|s| s.first_seq).collect::<Vec<_>>(),
        [3001]
    );
    let read = read_log(&log_dir(&data), 3000).unwrap();
    assert_eq!(read.summary.applied, 0);
    assert_eq!(read.summary.segments[0].1.frames, 0);
    let view = DataDir::new(&data).load_view(true).unwrap();
    assert_eq!((view.len(), view.seq()), (3000, 3000));
    assert_eq!(
        view.get(b"k02999").unwrap().target,
        b"https://example.com/2999"
    );
    // A second import continues the sequences and again leaves nothing.
    let csv2 = dir.path().join("more.csv");
    fs::write(&csv2, "code,url,status\nmore1,https://example.com/m,302\n").unwrap();
    uload_ok(&["import", csv2.to_str().unwrap(), "--data-dir", data_arg]);
    let segments = list_segments(&log_dir(&data)).unwrap();
    assert_eq!(
        segments.iter().map(|s| s.first_seq).collect::<Vec<_>>(),
        [3002]
    );
    // `uload compact` with nothing new keeps it that way.
    uload_ok(&["compact", "--data-dir", data_arg]);
    let segments = list_segments(&log_dir(&data)).unwrap();
    assert_eq!(
        segments.iter().map(|s| s.first_seq).collect::<Vec<_>>(),
        [3002]
    );
    assert_eq!(DataDir::new(&data).load_view(true).unwrap().len(), 3001);
}

/// A snapshot with a damaged byte is still refused on start, by readers and
/// by the writer; the manifest and files are left as they are.
#[test]
fn a_corrupt_snapshot_is_still_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), LogOptions::default()).unwrap();
    for i in 0..100 {
        store.append(&[put(&format!("c{i:03}"))]).unwrap();
    }
    let info = store.compact().unwrap().snapshot.unwrap();
    drop(store);
    let mut bytes = fs::read(&info.path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    fs::write(&info.path, &bytes).unwrap();
    let err = LogFollower::open(dir.path()).err().unwrap().to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(err.contains(&info.path.display().to_string()), "{err}");
    let err = Store::open(dir.path(), LogOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
}
