//! Replays the saved fuzz inputs in `tests/fuzz-regressions/<target>/`
//! through the same checks the fuzz targets run (`fuzz/fuzz_targets/checks.rs`
//! for the store's binary readers, `format_checks.rs` for the request path
//! and the text formats), so a crash the fuzzer found stays fixed without
//! nightly or libFuzzer.
//! See `docs/fuzzing.md`.
//!
//! Files named `written-*` in `snapshot_open/` were produced by
//! `write_snapshot`, so they also get its stronger invariants.
//!
//! The ignored test `write_seed_corpus` writes the fuzzers' seed corpora:
//! `cargo test --test fuzz_regressions write_seed_corpus -- --ignored`.

#[path = "../fuzz/fuzz_targets/checks.rs"]
mod checks;
#[path = "../fuzz/fuzz_targets/format_checks.rs"]
mod format_checks;

use std::convert::Infallible;
use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use uload::interchange::{Format, LinkJson};
use uload::store::datadir::{Manifest, snapshot_file_name};
use uload::store::frame::{LogOp, encode_frame, encode_frame_as};
use uload::store::log::{encode_segment_header, encode_segment_header_version, segment_file_name};
use uload::store::record::{FLAG_DISABLED, FLAG_FORWARD_QUERY, Link, LinkEncoding, RedirectStatus};
use uload::store::snapshot::{Snapshot, write_snapshot_as};

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

#[test]
fn request_path_regressions() {
    replay_all("request_path", |_, data| format_checks::check_request(data));
}

#[test]
fn manifest_regressions() {
    replay_all("manifest", |_, data| format_checks::check_manifest(data));
}

#[test]
fn import_tsv_regressions() {
    replay_all("import_tsv", |_, data| {
        format_checks::check_import(Format::Tsv, data)
    });
}

#[test]
fn import_csv_regressions() {
    replay_all("import_csv", |_, data| {
        format_checks::check_import(Format::Csv, data)
    });
}

#[test]
fn import_jsonl_regressions() {
    replay_all("import_jsonl", |_, data| {
        format_checks::check_import(Format::JsonLines, data)
    });
}

#[test]
fn config_regressions() {
    replay_all("config", |_, data| format_checks::check_config(data));
}

/// The check a target runs on one input (named for messages).
type Check = fn(&str, &[u8]);
/// Named inputs: a seed corpus.
type Inputs = Vec<(String, Vec<u8>)>;

/// Every fuzz target's name, its seed corpus and the check it runs.
fn seed_corpora() -> Vec<(&'static str, Inputs, Check)> {
    vec![
        ("log_reader", seed_segments(), |_, d| {
            checks::check_log_segment(d)
        }),
        ("snapshot_open", seed_snapshots(), |_, d| {
            checks::check_snapshot(d)
        }),
        ("request_path", seed_requests(), |_, d| {
            format_checks::check_request(d)
        }),
        ("manifest", seed_manifests(), |_, d| {
            format_checks::check_manifest(d)
        }),
        ("import_tsv", seed_imports(Format::Tsv), |_, d| {
            format_checks::check_import(Format::Tsv, d)
        }),
        ("import_csv", seed_imports(Format::Csv), |_, d| {
            format_checks::check_import(Format::Csv, d)
        }),
        ("import_jsonl", seed_imports(Format::JsonLines), |_, d| {
            format_checks::check_import(Format::JsonLines, d)
        }),
        ("config", seed_configs(), |_, d| {
            format_checks::check_config(d)
        }),
    ]
}

/// The seed corpora pass the checks too (they are what the fuzzers start from).
#[test]
fn seeds_pass_the_checks() {
    let mut failed = Vec::new();
    for (target, seeds, check) in seed_corpora() {
        assert!(!seeds.is_empty(), "{target} has no seeds");
        failed.extend(
            seeds
                .into_iter()
                .filter_map(|(name, data)| run_one(&format!("{target}/{name}"), data, check)),
        );
    }
    assert!(failed.is_empty(), "failing seeds: {failed:#?}");
}

/// Writes the seed corpora into `fuzz/corpus/<target>/` (gitignored).
#[test]
#[ignore = "writes fuzz/corpus; run by hand before fuzzing"]
fn write_seed_corpus() {
    for (target, seeds, _) in seed_corpora() {
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
            // One creation time past 48 bits (v2's optional created_at_high).
            link.created_at_ms = if i == 7 {
                u64::MAX - i
            } else {
                1_700_000_000_000 + i
            };
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

/// A segment as builds before link encoding v2 wrote it: format 1, v1 frames.
fn segment_v1(first_seq: u64, ops: &[LogOp]) -> Vec<u8> {
    let mut buf = encode_segment_header_version(first_seq, 1).to_vec();
    for (i, op) in ops.iter().enumerate() {
        encode_frame_as(first_seq + i as u64, op, LinkEncoding::V1, &mut buf);
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
        ("v1-mixed.log".into(), segment_v1(1, &ops)),
        ("v1-empty.log".into(), segment_v1(1, &[])),
    ]
}

/// Snapshots written by `write_snapshot`: empty, one link, a dozen, a few
/// hundred (so the index has collisions and wraps); and a dozen in the
/// format builds before link encoding v2 wrote (format 1, v1 records).
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
        ("empty.snap", &links[..0], 0, LinkEncoding::CURRENT),
        ("one.snap", &links[..1], 1, LinkEncoding::CURRENT),
        ("twelve.snap", &links[..], 42, LinkEncoding::CURRENT),
        ("many.snap", &many[..], 7, LinkEncoding::CURRENT),
        ("v1-twelve.snap", &links[..], 42, LinkEncoding::V1),
    ]
    .into_iter()
    .map(|(name, links, seq, encoding)| {
        let path = dir.path().join(name);
        write_snapshot_as(
            &path,
            seq,
            links.iter().map(|l| Ok::<_, Infallible>(l.as_ref())),
            encoding,
        )
        .unwrap();
        (name.to_owned(), fs::read(&path).unwrap())
    })
    .collect()
}

/// Request inputs (`target NUL /path?query`, or a request target alone):
/// codes, the API and health paths, queries to merge into targets with and
/// without a query or a fragment, bytes that must be percent-encoded.
fn seed_requests() -> Vec<(String, Vec<u8>)> {
    let inputs: &[&[u8]] = &[
        b"/abc",
        b"/abc?a=1&b=2",
        b"/A-b_9?utm_source=x#y",
        b"/api/links/abc?x=1",
        b"/health",
        b"/%41?q",
        b"/a/b",
        b"https://x/p?t=1#frag\0/abc?a=1",
        b"https://x/p?\0/c?a=%20b",
        b"https://x/p?t&\0/c?a",
        b"https://x/p#f?g#h\0/c?a=\r\n x\x7f\xff#z",
        b"https://\xe4\xbe\x8b.jp/\0/c?\xe5\x80\xa4=1",
        b"\0/c?a",
        // Whole request heads, for the fast path's head parser.
        b"GET /abc1234?x=1 HTTP/1.1\r\nHost: ulo.ad\r\nUser-Agent: curl/8\r\nConnection: close\r\n\r\n",
        b"HEAD /a HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.1\r\nX-E:\t \r\n\r\n",
        b"GET /abc HTTP/1.1\r\nHost: a\r\nhost: b@c\r\n\r\n",
        b"GET /abc?q=%22 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n",
        b"GET /abc HTTP/1.1\r\nhost: x\r\nX-Forwarded-For: 10.0.0.1\r\nx-forwarded-for: 10.0.0.2\r\n\r\n",
        b"GET /abc HTTP/1.1\r\nUser-Agent: no-host\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: x\r\n y\r\n\r\n",
    ];
    inputs
        .iter()
        .enumerate()
        .map(|(i, data)| (format!("{i:02}.req"), data.to_vec()))
        .collect()
}

/// Manifests as the store writes them (note that `encode` produces the
/// canonical text), and a few refused ones.
fn seed_manifests() -> Vec<(String, Vec<u8>)> {
    let m = |seq: u64, links: u64| Manifest {
        snapshot: snapshot_file_name(seq),
        seq,
        links,
    };
    let valid = m(12, 9).encode();
    vec![
        ("zero.manifest".into(), m(0, 0).encode().into_bytes()),
        ("twelve.manifest".into(), valid.clone().into_bytes()),
        (
            "large.manifest".into(),
            m(1 << 62, u64::MAX).encode().into_bytes(),
        ),
        (
            "crlf.manifest".into(),
            valid.replace('\n', "\r\n").into_bytes(),
        ),
        (
            "bad-checksum.manifest".into(),
            valid.replace("seq 12", "seq 13").into_bytes(),
        ),
        (
            "no-crc.manifest".into(),
            b"uload-manifest v1\nsnapshot a.snap\nseq 1\nlinks 1\n".to_vec(),
        ),
    ]
}

/// Import files of each format: valid rows with every optional field, and
/// rows refused for each reason the importer names.
fn seed_imports(format: Format) -> Vec<(String, Vec<u8>)> {
    let files: Vec<(&str, String)> = match format {
        Format::Tsv => vec![
            (
                "mixed.tsv",
                "# comment\nabc\thttps://a.example/\n\nbad code\thttps://b/\nonly\n\
                 x\thttps://c/\textra\nok\tjavascript:alert(1)\r\n\
                 y\thttps://\u{4f8b}.jp/\u{30d1}?q#f\n"
                    .into(),
            ),
            ("one.tsv", "a\thttp://h".into()),
        ],
        Format::Csv => vec![
            (
                "mixed.csv",
                "code,url,status,created_at,expires_at,max_clicks,forward_query,disabled,owner_key_id\n\
                 a,\"https://x/?a=1,2\",301,2026-11-26T18:00:00.000Z,2030-01-01T00:00:00+02:00,5,true,no,7\n\
                 b,https://y/,303,,,,,,\n\
                 c,https://z/,302,,,many,,,\n\
                 d,https://w/\n\
                 \"e\",\"https://v/\"\"q\"\"\",308,,,0,yes,1,\n"
                    .into(),
            ),
            (
                "reordered.csv",
                " url , code \r\nhttps://x/,x1\r\nhttps://y/,\"y\r\n2\"\r\n".into(),
            ),
            ("unknown-column.csv", "code,target\na,https://x/\n".into()),
        ],
        Format::JsonLines => {
            let mut full = Link::new("Zz9", "https://example.com/p?q#f").unwrap();
            full.status = RedirectStatus::PermanentRedirect;
            full.created_at_ms = 1_700_000_000_123;
            full.expires_at_ms = Some(1_900_000_000_456);
            full.max_clicks = Some(3);
            full.flags = FLAG_DISABLED | FLAG_FORWARD_QUERY;
            full.owner_key_id = 12;
            let export = serde_json::to_string(&LinkJson::from_link(&full.as_ref())).unwrap();
            vec![
                (
                    "export.jsonl",
                    format!("{export}\n{{\"code\":\"a\",\"url\":\"http://h\"}}\n"),
                ),
                (
                    "errors.jsonl",
                    "{\"code\":\"a\"}\n{\"code\":\"a\",\"url\":\"https://x/\",\"status\":\"301\"}\n\
                     {\"code\":\"a\",\"url\":\"https://x/\",\"colour\":1}\nnot json\n[1]\n\
                     {\"code\":\"a\",\"url\":\"https://x/\",\"expires_at\":\"tomorrow\"}\n\
                     {\"code\":\"a\",\"url\":\"https://x/\",\"max_clicks\":0,\"owner_key_id\":-1}\n"
                        .into(),
                ),
            ]
        }
    };
    files
        .into_iter()
        .map(|(name, text)| (name.to_owned(), text.into_bytes()))
        .collect()
}

/// Configuration files: the shipped one, an empty one, every key set, and
/// a few refused ones.
fn seed_configs() -> Vec<(String, Vec<u8>)> {
    let shipped = fs::read(root().join("conf/uload.yaml")).unwrap();
    let full = "data_dir: /var/lib/uload\n\
        public_base_url: https://ulo.ad/\n\
        edge:\n  listen: \"[::1]:8080\"\n  default_status: 308\n  not_found_url: https://ulo.ad/404\n\
        \x20 follow_interval_ms: 5\n  admin_upstreams: [\"127.0.0.1:8081\", \"10.0.0.2:8081\"]\n\
        \x20 admin_connect_timeout_ms: 100\n  admin_read_timeout_ms: 1000\n  admin_retries: 0\n\
        \x20 admin_retry_backoff_ms: 0\n  health_check_interval_ms: 500\n  retry_after_secs: 1\n\
        \x20 pingora_conf: pingora.yaml\n\
        admin:\n  listen: 0.0.0.0:8081\n\
        \x20 api_key_hashes: [\"sha256:2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b\"]\n\
        \x20 api_key: a-long-enough-secret\n  max_body_bytes: 65536\n  code_length: 8\n\
        \x20 max_bulk: 10\n  compact_every_records: 1000\n";
    vec![
        ("shipped.yaml".into(), shipped),
        ("empty.yaml".into(), Vec::new()),
        ("full.yaml".into(), full.as_bytes().to_vec()),
        (
            "refused.yaml".into(),
            b"edge:\n  listen: nowhere\n  lisen: 1\nadmin:\n  api_key_hashes: [\"md5:00\"]\n".to_vec(),
        ),
        (
            "anchors.yaml".into(),
            b"edge: &e\n  admin_upstreams: &u [\"127.0.0.1:1\"]\nadmin: {listen: \"127.0.0.1:2\"}\n".to_vec(),
        ),
    ]
}
