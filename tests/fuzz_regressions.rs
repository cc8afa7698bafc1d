//! Replays the saved fuzz inputs in `tests/fuzz-regressions/<target>/`
//! through the same checks the fuzz targets run (`fuzz/fuzz_targets/checks.rs`),
//! so a crash the fuzzer found stays fixed without nightly or libFuzzer.
//! See `docs/fuzzing.md`.
//!
//! Files named `written-*` in `snapshot_open/` were produced by
//! `write_snapshot`, so they also get its stronger invariants.
//!
//! The ignored test `write_seed_corpus` writes the fuzzers' seed corpora:
//! `cargo test --test fuzz_regressions write_seed_corpus -- --ignored`.

#[path = "../fuzz/fuzz_targets/checks.rs"]
mod checks;

use std::convert::Infallible;
use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use uload::store::frame::{LogOp, encode_frame};
use uload::store::log::{encode_segment_header, segment_file_name};
use uload::store::record::{FLAG_DISABLED, FLAG_FORWARD_QUERY, Link, RedirectStatus};
use uload::store::snapshot::{Snapshot, write_snapshot};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_owned()
}

/// Every file in `tests/fuzz-regressions/<target>/`, sorted by name.
fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = root().join("tests/fuzz-regressions").join(target);
    let mut out: Vec<(String, Vec<u8>)> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, fs::read(&path).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "{} holds no inputs", dir.display());
    out
}

/// How long one input may take before it counts as a hang (a fuzz timeout).
const HANG: Duration = Duration::from_secs(30);

/// Runs `check` on one input on its own thread, so that a panic or a hang
/// is reported with the input's name. Returns what went wrong.
fn run_one(name: &str, data: Vec<u8>, check: fn(&str, &[u8])) -> Option<String> {
    let (tx, rx) = mpsc::channel();
    let input = name.to_owned();
    thread::spawn(move || {
        let ok = catch_unwind(AssertUnwindSafe(|| check(&input, &data))).is_ok();
        checks::remove_scratch_dir();
        let _ = tx.send(ok);
    });
    match rx.recv_timeout(HANG) {
        Ok(true) => None,
        Ok(false) => Some(format!("{name}: panicked")),
        Err(_) => Some(format!("{name}: still running after {HANG:?}")),
    }
}

/// Runs `check` on every input of `target`, reporting all failures at once.
fn replay_all(target: &str, check: fn(&str, &[u8])) {
    let failed: Vec<String> = inputs(target)
        .into_iter()
        .filter_map(|(name, data)| run_one(&name, data, check))
        .collect();
    assert!(failed.is_empty(), "{target}: failing inputs: {failed:#?}");
}

#[test]
fn log_reader_regressions() {
    replay_all("log_reader", |_, data| checks::check_log_segment(data));
}

#[test]
fn snapshot_open_regressions() {
    replay_all("snapshot_open", |name, data| {
        checks::check_snapshot(data);
        if name.starts_with("written-") {
            let snap = Snapshot::from_bytes(data, true).expect("a written snapshot opens");
            let links: Vec<_> = snap.iter().map(Result::unwrap).collect();
            checks::check_written(&snap, &links);
        }
    });
}

/// The seed corpora pass the checks too (they are what the fuzzers start from).
#[test]
fn seeds_pass_the_checks() {
    let log = seed_segments()
        .into_iter()
        .filter_map(|(name, data)| run_one(&name, data, |_, d| checks::check_log_segment(d)));
    let snap = seed_snapshots()
        .into_iter()
        .filter_map(|(name, data)| run_one(&name, data, |_, d| checks::check_snapshot(d)));
    let failed: Vec<String> = log.chain(snap).collect();
    assert!(failed.is_empty(), "failing seeds: {failed:#?}");
}

/// Writes the seed corpora into `fuzz/corpus/<target>/` (gitignored).
#[test]
#[ignore = "writes fuzz/corpus; run by hand before fuzzing"]
fn write_seed_corpus() {
    for (target, seeds) in [
        ("log_reader", seed_segments()),
        ("snapshot_open", seed_snapshots()),
    ] {
        let dir = root().join("fuzz/corpus").join(target);
        fs::create_dir_all(&dir).unwrap();
        for (name, data) in seeds {
            fs::write(dir.join(format!("seed-{name}")), data).unwrap();
        }
    }
}

/// Links covering every field: each status, both flags, optional fields set
/// and unset, short and long codes and targets, non-ASCII targets.
fn sample_links() -> Vec<Link> {
    let statuses = [
        RedirectStatus::MovedPermanently,
        RedirectStatus::Found,
        RedirectStatus::TemporaryRedirect,
        RedirectStatus::PermanentRedirect,
    ];
    let targets = [
        "https://example.com/".to_owned(),
        "http://a".to_owned(),
        "https://example.com/path?q=1&r=two#frag".to_owned(),
        "https://例え.jp/パス".to_owned(),
        format!("https://long.example/{}", "x".repeat(300)),
    ];
    let codes = ["a", "abc", "Z-_9", "c00001", &"x".repeat(63)];
    (0..12u64)
        .map(|i| {
            let code = format!("{}{i}", codes[i as usize % codes.len()]);
            let mut link = Link::new(&code, &targets[i as usize % targets.len()]).unwrap();
            link.status = statuses[i as usize % statuses.len()];
            link.flags = [0, FLAG_DISABLED, FLAG_FORWARD_QUERY][i as usize % 3];
            link.created_at_ms = 1_700_000_000_000 + i;
            link.expires_at_ms = (i % 2 == 1).then_some(1_800_000_000_000 + i);
            link.max_clicks = (i % 3 == 2).then_some(i * 10);
            link.owner_key_id = i % 4;
            link
        })
        .collect()
}

fn segment(first_seq: u64, ops: &[LogOp]) -> Vec<u8> {
    let mut buf = encode_segment_header(first_seq).to_vec();
    for (i, op) in ops.iter().enumerate() {
        encode_frame(first_seq + i as u64, op, &mut buf);
    }
    buf
}

/// Segment files: empty, puts and deletes, a torn tail, a later first
/// sequence, a damaged frame followed by valid ones.
fn seed_segments() -> Vec<(String, Vec<u8>)> {
    let links = sample_links();
    let mut ops: Vec<LogOp> = links.iter().cloned().map(LogOp::Put).collect();
    ops.insert(3, LogOp::Delete("abc1".into()));
    ops.push(LogOp::Delete("a0".into()));
    let full = segment(1, &ops);
    let mut torn = segment(1, &ops[..4]);
    torn.truncate(torn.len() - 5);
    let mut damaged = segment(1, &ops[..5]);
    let second_frame = 32 + (u32::from_le_bytes(damaged[32..36].try_into().unwrap()) as usize + 8);
    damaged[second_frame + 20] ^= 0x40;
    vec![
        ("empty.log".into(), segment(1, &[])),
        ("one-put.log".into(), segment(1, &ops[..1])),
        (
            "one-delete.log".into(),
            segment(1, &[LogOp::Delete("x".into())]),
        ),
        ("mixed.log".into(), full),
        ("torn-tail.log".into(), torn),
        ("damaged-middle.log".into(), damaged),
        (segment_file_name(1000), segment(1000, &ops[2..6])),
    ]
}

/// Snapshots written by `write_snapshot`: empty, one link, a dozen, a few
/// hundred (so the index has collisions and wraps).
fn seed_snapshots() -> Vec<(String, Vec<u8>)> {
    let dir = tempfile::tempdir().unwrap();
    let mut links = sample_links();
    links.sort_by(|a, b| a.code.cmp(&b.code));
    let many: Vec<Link> = (0..300)
        .map(|i| {
            let mut l = Link::new(&format!("m{i:04}"), "https://example.com/m").unwrap();
            l.created_at_ms = 1_700_000_000_000;
            l
        })
        .collect();
    [
        ("empty.snap", &links[..0], 0),
        ("one.snap", &links[..1], 1),
        ("twelve.snap", &links[..], 42),
        ("many.snap", &many[..], 7),
    ]
    .into_iter()
    .map(|(name, links, seq)| {
        let path = dir.path().join(name);
        write_snapshot(
            &path,
            seq,
            links.iter().map(|l| Ok::<_, Infallible>(l.as_ref())),
        )
        .unwrap();
        (name.to_owned(), fs::read(&path).unwrap())
    })
    .collect()
}
