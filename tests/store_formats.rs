//! Data dirs written before link encoding v2 (log segments of format 1 with
//! v1 frames, snapshots of format 1 with v1 records), against real files:
//! this build reads them exactly, appends v2 frames after them (in a new
//! segment of format 2), compacts them into a v2 snapshot, and `uload
//! inspect` / `export` / `import` work on them. See "Link encoding v2" and
//! "Reading v1" in `docs/storage.md`.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use common::uload_ok;
use uload::store::datadir::{Manifest, snapshot_file_name};
use uload::store::frame::{FRAME_HEADER_LEN, LogOp, encode_frame_as};
use uload::store::log::{
    LogTail, SEGMENT_HEADER_LEN, decode_segment_header_version, encode_segment_header_version,
    list_segments, scan_segment, segment_file_name,
};
use uload::store::record::{FLAG_DISABLED, FLAG_FORWARD_QUERY, Link, LinkEncoding, RedirectStatus};
use uload::store::snapshot::{Snapshot, SnapshotInfo, write_snapshot_as};
use uload::store::{DataDir, LogOptions, Store};

/// Links covering every field: each status, both flags, each optional
/// field, a creation time past 48 bits (every fifth).
fn varied(i: usize) -> Link {
    let mut l = dated(i);
    if i.is_multiple_of(5) {
        l.created_at_ms = u64::MAX - i as u64;
    }
    l
}

/// [`varied`] with creation times that are dates (the export's JSON writes
/// them as RFC 3339 text).
fn dated(i: usize) -> Link {
    let mut l = Link::new(
        &format!("old{i:03}"),
        &format!("https://example.com/old/{i}?q={i}"),
    )
    .unwrap();
    l.status = [
        RedirectStatus::MovedPermanently,
        RedirectStatus::Found,
        RedirectStatus::TemporaryRedirect,
        RedirectStatus::PermanentRedirect,
    ][i % 4];
    l.flags = [0, FLAG_DISABLED, FLAG_FORWARD_QUERY, 3][i % 4];
    l.created_at_ms = 1_700_000_000_000 + i as u64;
    l.expires_at_ms = i.is_multiple_of(2).then_some(1_900_000_000_000 + i as u64);
    l.max_clicks = i.is_multiple_of(3).then_some(i as u64 + 1);
    l.owner_key_id = (i % 7) as u64;
    l
}

fn put(link: Link) -> LogOp {
    LogOp::Put(link)
}

/// Writes `log/<first>.log` of format 1 holding `ops` as v1 frames, as a
/// build before v2 wrote it. Returns its bytes.
fn write_v1_segment(log_dir: &Path, first: u64, ops: &[LogOp]) -> Vec<u8> {
    fs::create_dir_all(log_dir).unwrap();
    let mut bytes = encode_segment_header_version(first, 1).to_vec();
    for (i, op) in ops.iter().enumerate() {
        encode_frame_as(first + i as u64, op, LinkEncoding::V1, &mut bytes);
    }
    fs::write(log_dir.join(segment_file_name(first)), &bytes).unwrap();
    bytes
}

/// Applies `ops` to the model.
fn apply(model: &mut BTreeMap<String, Link>, ops: &[LogOp]) {
    for op in ops {
        match op {
            LogOp::Put(l) => {
                model.insert(l.code.clone(), l.clone());
            }
            LogOp::Delete(c) => {
                model.remove(c);
            }
        }
    }
}

/// What a reader of the data dir sees, in code order.
fn view(dir: &Path) -> Vec<Link> {
    let view = DataDir::new(dir).load_view(true).unwrap();
    view.iter().map(|l| l.unwrap().to_link().unwrap()).collect()
}

fn model_links(model: &BTreeMap<String, Link>) -> Vec<Link> {
    model.values().cloned().collect()
}

/// The link encoding (the version byte) of every put frame in a segment
/// file, which must be whole and valid.
fn put_encodings(segment: &[u8]) -> Vec<u8> {
    let scan = scan_segment(segment, |_, _| {}).unwrap();
    assert_eq!(scan.valid_len, segment.len() as u64);
    let mut encodings = Vec::new();
    let mut at = SEGMENT_HEADER_LEN;
    while at < segment.len() {
        let len = u32::from_le_bytes(segment[at..at + 4].try_into().unwrap()) as usize;
        let payload = &segment[at + FRAME_HEADER_LEN..at + FRAME_HEADER_LEN + len];
        if payload[8] == 1 {
            encodings.push(payload[9]);
        }
        at += FRAME_HEADER_LEN + len;
    }
    encodings
}

/// A log of v1 frames (format 1 segment), then appends by this build: the v1
/// segment is left exactly as it was, the appends go to a new format 2
/// segment as v2 frames, readers (the view, a log tail) see both, and a
/// compaction writes a format 2 snapshot of v2 records holding them all.
#[test]
fn v1_log_then_v2_appends_opens_and_compacts() {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("log");
    let mut old_ops: Vec<LogOp> = (0..30).map(|i| put(varied(i))).collect();
    old_ops.push(LogOp::Delete("old004".into()));
    old_ops.push(put(varied(5)));
    let v1_bytes = write_v1_segment(&log_dir, 1, &old_ops);
    assert!(put_encodings(&v1_bytes).iter().all(|&v| v == 1));
    let mut model = BTreeMap::new();
    apply(&mut model, &old_ops);
    let n_old = old_ops.len() as u64;

    // Read as it is, by a reader and by a writer.
    assert_eq!(view(dir.path()), model_links(&model));
    let store = Store::open(dir.path(), LogOptions::default()).unwrap();
    assert_eq!(store.recovery().last_seq, n_old);
    assert_eq!(store.recovery().truncated, None);

    // Appends: new links, an overwrite and a delete of v1 links.
    let mut changed = varied(7);
    changed.target = "https://example.com/changed".into();
    changed.max_clicks = None;
    let new_ops = vec![
        put(Link::new("new1", "https://example.com/new1").unwrap()),
        put(changed),
        LogOp::Delete("old010".into()),
        put(varied(31)),
    ];
    assert_eq!(store.append(&new_ops[..2]).unwrap(), n_old + 2);
    assert_eq!(store.append(&new_ops[2..]).unwrap(), n_old + 4);
    apply(&mut model, &new_ops);

    let segments = list_segments(&log_dir).unwrap();
    assert_eq!(
        segments.iter().map(|s| s.first_seq).collect::<Vec<_>>(),
        [1, n_old + 1],
        "appends start a new segment after a format 1 one"
    );
    assert_eq!(fs::read(&segments[0].path).unwrap(), v1_bytes, "untouched");
    let new_seg = fs::read(&segments[1].path).unwrap();
    assert_eq!(decode_segment_header_version(&new_seg), Ok((n_old + 1, 2)));
    assert_eq!(put_encodings(&new_seg), [2, 2, 2]);

    assert_eq!(view(dir.path()), model_links(&model));
    let mut tail = LogTail::new(&log_dir, 0);
    let mut seen = Vec::new();
    tail.poll(|seq, op| seen.push((seq, op.to_owned_op().unwrap())))
        .unwrap();
    let all_ops: Vec<LogOp> = old_ops.iter().chain(&new_ops).cloned().collect();
    assert_eq!(
        seen,
        all_ops
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, op)| (i as u64 + 1, op))
            .collect::<Vec<_>>()
    );

    // Compaction: one format 2 snapshot of v2 records, the same links.
    store.compact().unwrap();
    let snap_path = dir
        .path()
        .join("snapshots")
        .join(snapshot_file_name(n_old + 4));
    let snap = Snapshot::open(&snap_path, true).unwrap();
    assert_eq!(snap.header().version, 2);
    assert_eq!(snap.seq(), n_old + 4);
    let raw = fs::read(&snap_path).unwrap();
    assert_eq!(raw[128], 2, "first record is link encoding v2");
    let back: Vec<Link> = snap.iter().map(|l| l.unwrap().to_link().unwrap()).collect();
    assert_eq!(back, model_links(&model));
    for l in model.values() {
        assert_eq!(snap.get(l.code.as_bytes()).unwrap().to_link().unwrap(), *l);
    }
    assert!(snap.get(b"old004").is_none() && snap.get(b"old010").is_none());
    drop(store);

    // Reopened, it serves the same and goes on appending.
    let store = Store::open(dir.path(), LogOptions::default()).unwrap();
    assert_eq!(store.recovery().last_seq, n_old + 4);
    store.append(&[put(varied(40))]).unwrap();
    apply(&mut model, &[put(varied(40))]);
    assert_eq!(view(dir.path()), model_links(&model));
}

/// A data dir as a build before v2 left it: a format 1 snapshot (v1
/// records) named by the manifest, and a format 1 segment after it. It opens,
/// serves, compacts into format 2, and the CLI inspects and exports it; the
/// export imports back into a fresh data dir as the same links.
#[test]
fn v1_snapshot_and_log_data_dir_with_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut model = BTreeMap::new();
    let snap_links: Vec<Link> = (0..20).map(dated).collect();
    apply(
        &mut model,
        &snap_links.iter().cloned().map(put).collect::<Vec<_>>(),
    );
    fs::create_dir_all(root.join("snapshots")).unwrap();
    let name = snapshot_file_name(20);
    let info = write_snapshot_as(
        &root.join("snapshots").join(&name),
        20,
        snap_links
            .iter()
            .map(|l| Ok::<_, std::convert::Infallible>(l.as_ref())),
        LinkEncoding::V1,
    )
    .unwrap();
    assert_eq!(info.header.version, 1);
    let manifest = Manifest {
        snapshot: name,
        seq: 20,
        links: 20,
    };
    fs::write(root.join("MANIFEST"), manifest.encode()).unwrap();
    let log_ops = vec![
        put(dated(20)),
        LogOp::Delete("old003".into()),
        put(dated(21)),
    ];
    write_v1_segment(&root.join("log"), 21, &log_ops);
    apply(&mut model, &log_ops);
    assert_eq!(view(root), model_links(&model));

    let data = root.to_str().unwrap();
    let report = uload_ok(&["inspect", "--data-dir", data]);
    assert!(report.contains("format      v1"), "{report}");
    assert!(report.contains("status        ok"), "{report}");
    let json = uload_ok(&["inspect", "--data-dir", data, "--json"]);
    assert!(json.contains("\"format_version\": 1") || json.contains("\"format_version\":1"));

    let exported = root.join("export.jsonl");
    uload_ok(&[
        "export",
        "--data-dir",
        data,
        "-o",
        exported.to_str().unwrap(),
    ]);
    assert_eq!(
        fs::read_to_string(&exported).unwrap().lines().count(),
        model.len()
    );

    // `uload compact`: format 2, v2 records, same links.
    let out = uload_ok(&["compact", "--data-dir", data]);
    assert!(out.contains("(21 links, sequence 23)"), "{out}");
    assert_eq!(view(root), model_links(&model));
    let report = uload_ok(&["inspect", "--data-dir", data]);
    assert!(report.contains("format      v2"), "{report}");
    assert!(report.contains("status        ok"), "{report}");

    // export -> import into a fresh data dir: the same links, as v2.
    let fresh = tempfile::tempdir().unwrap();
    let fresh_data = fresh.path().join("data");
    let out = uload_ok(&[
        "import",
        exported.to_str().unwrap(),
        "--data-dir",
        fresh_data.to_str().unwrap(),
    ]);
    assert!(
        out.contains(&format!("imported {} links", model.len())),
        "{out}"
    );
    assert_eq!(view(&fresh_data), model_links(&model));
    let again = fresh.path().join("again.jsonl");
    uload_ok(&[
        "export",
        "--data-dir",
        fresh_data.to_str().unwrap(),
        "-o",
        again.to_str().unwrap(),
    ]);
    assert_eq!(
        fs::read_to_string(&again).unwrap(),
        fs::read_to_string(&exported).unwrap()
    );
}

/// A format 1 segment that holds no frame yet (a data dir an earlier build
/// created and never wrote to) is appended to in place: the frames are v2.
#[test]
fn empty_v1_segment_is_appended_to() {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("log");
    write_v1_segment(&log_dir, 1, &[]);
    let store = Store::open(dir.path(), LogOptions::default()).unwrap();
    store.append(&[put(varied(1)), put(varied(2))]).unwrap();
    let segments = list_segments(&log_dir).unwrap();
    assert_eq!(segments.len(), 1);
    let bytes = fs::read(&segments[0].path).unwrap();
    assert_eq!(decode_segment_header_version(&bytes), Ok((1, 1)));
    assert_eq!(put_encodings(&bytes), [2, 2]);
    assert_eq!(view(dir.path()), vec![varied(1), varied(2)]);
}

/// A data dir of 50 links (sequence 50) in a format 1 snapshot named
/// `name` and a manifest naming it: the links in code order, and the file.
fn format_1_snapshot_of_50(root: &Path, name: &str) -> (Vec<Link>, SnapshotInfo) {
    let mut sorted: Vec<Link> = (0..50).map(varied).collect();
    sorted.sort_by(|a, b| a.code.cmp(&b.code));
    fs::create_dir_all(root.join("snapshots")).unwrap();
    let info = write_snapshot_as(
        &root.join("snapshots").join(name),
        50,
        sorted
            .iter()
            .map(|l| Ok::<_, std::convert::Infallible>(l.as_ref())),
        LinkEncoding::V1,
    )
    .unwrap();
    let manifest = Manifest {
        snapshot: name.to_owned(),
        seq: 50,
        links: 50,
    };
    fs::write(root.join("MANIFEST"), manifest.encode()).unwrap();
    (sorted, info)
}

/// A format 1 snapshot with nothing newer in the log is rewritten in the
/// current format by a compaction, at the same sequence and under the same
/// name (the manifest is unchanged); a second compaction has nothing to do.
#[test]
fn compaction_rewrites_a_format_1_snapshot_with_nothing_new() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let name = snapshot_file_name(50);
    let path = root.join("snapshots").join(&name);
    let (sorted, v1) = format_1_snapshot_of_50(root, &name);
    let manifest_bytes = fs::read(root.join("MANIFEST")).unwrap();

    let store = Store::open(root, LogOptions::default()).unwrap();
    let report = store.compact().unwrap();
    let info = report.snapshot.expect("rewritten");
    assert_eq!(info.path, path);
    assert_eq!((info.header.version, info.header.seq), (2, 50));
    assert!(info.header.records_len < v1.header.records_len);
    assert_eq!(fs::read(root.join("MANIFEST")).unwrap(), manifest_bytes);
    assert_eq!(view(root), sorted);
    assert!(store.compact().unwrap().snapshot.is_none(), "nothing to do");
    assert_eq!(
        fs::read_dir(root.join("snapshots")).unwrap().count(),
        1,
        "no other snapshot, no temporary file"
    );
}

/// The same with the manifest naming a file that is not `<seq>.snap` (a
/// snapshot restored or renamed by hand): the rewrite goes to `<seq>.snap`
/// and the manifest names it before the old file is deleted. It used to
/// keep the manifest as it was and delete the file it named, leaving a data
/// dir no reader could open.
#[test]
fn compaction_rewrite_of_a_renamed_format_1_snapshot_keeps_it_readable() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (sorted, _) = format_1_snapshot_of_50(root, &snapshot_file_name(40));
    assert_eq!(view(root), sorted, "readable as written");

    let store = Store::open(root, LogOptions::default()).unwrap();
    let report = store.compact().unwrap();
    let info = report.snapshot.expect("rewritten");
    assert_eq!(
        info.path,
        root.join("snapshots").join(snapshot_file_name(50))
    );
    assert_eq!(view(root), sorted, "readable after the rewrite");
    let names: Vec<String> = fs::read_dir(root.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [snapshot_file_name(50)],
        "the old file is gone, nothing else"
    );
    drop(store);
    assert_eq!(view(root), sorted, "and after the store is closed");
}
