//! The checks the request-path and file-format fuzz targets run on each
//! input (`request_path`, `manifest`, `import_tsv`, `import_csv`,
//! `import_jsonl`, `config`), shared with `tests/fuzz_regressions.rs` (which
//! includes this file with `#[path]`) so that a saved input is replayed
//! through exactly the code that found it. The store's binary readers have
//! theirs in `checks.rs`.
//!
//! Everything here must hold for arbitrary bytes: nothing may panic, and each
//! assertion is a property the code promises for any input. No check touches
//! the disk. See `docs/fuzzing.md`.

use uload::admin::{is_reserved, normalize_target};
use uload::config::Config;
use uload::edge::fast_path::differs_from_pingora;
use uload::edge::redirect::{Route, location_into, route, split_target};
use uload::interchange::{Format, LinkJson, ReadError, RowDefaults, read_links};
use uload::store::datadir::Manifest;
use uload::store::frame::{LogOp, decode_frame, encode_frame};
use uload::store::record::{Link, RedirectStatus, validate_code, validate_target};

// ---------------------------------------------------------------------------
// request_path
// ---------------------------------------------------------------------------

/// Link targets merged with the request's query when the input names none
/// (holds no NUL byte): with and without a query, a `?` or `&` at the end, a
/// fragment, a fragment holding `#` and `?`, no path, non-ASCII.
pub const TARGETS: &[&str] = &[
    "https://example.com/p",
    "https://example.com/p?t=1",
    "https://example.com/p?",
    "https://example.com/p?t&",
    "https://example.com/p#frag",
    "https://example.com/p?t=1#f?g#h",
    "http://h",
    "https://例え.jp/パス?q=値#断片",
];

/// Everything the `request_path` target runs on one input: `target NUL
/// request-target`, where the link's target is the bytes before the first
/// NUL, and the request target (`/path?query`, arbitrary bytes) those after
/// it. Without a NUL the whole input is the request target and the link's
/// target is one of [`TARGETS`].
pub fn check_request(data: &[u8]) {
    check_route(data);
    // The whole input as a request head: what the fast path takes, Pingora
    // (and httparse, its parser) reads the same way.
    if let Some(difference) = differs_from_pingora(data) {
        panic!("{difference}");
    }
    let (target, request) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (TARGETS[data.len() % TARGETS.len()].as_bytes(), data),
    };
    let (path, query) = split_target(request);
    assert!(!path.contains(&b'?'), "the path holds a '?'");
    match query {
        Some(q) => assert_eq!([path, b"?", q].concat(), request),
        None => assert_eq!(path, request),
    }
    check_route(path);
    check_location(target, query);
    check_location(target, None);
    check_location(target, Some(request));
}

/// `route` is exactly its documentation: `/api` and `/api/...` are the API,
/// `/health` and `/health/ready` the health checks, `/` followed by a valid
/// code (per the store's `validate_code`) a redirect for that code, anything
/// else not found.
fn check_route(path: &[u8]) {
    let rest = path.strip_prefix(b"/");
    let want = match rest {
        Some(r) if r == b"api" || r.starts_with(b"api/") => Route::Api,
        Some(b"health") => Route::Health,
        Some(b"health/ready") => Route::Ready,
        Some(r) if validate_code(r).is_ok() => Route::Redirect(r),
        _ => Route::NotFound,
    };
    let got = route(path);
    assert_eq!(got, want, "route({path:?})");
    if let Route::Redirect(code) = got {
        assert!(validate_code(code).is_ok(), "redirect for an invalid code");
    }
}

/// Whether `b` may go into a `Location` header as is: not a control
/// character, not a space (HTTP would split or reject the header).
fn header_safe(b: u8) -> bool {
    b > b' ' && b != 0x7f
}

/// `location_into`, against its documentation: without a (non-empty) query
/// the target unchanged; with one, the target's part before its first `#`,
/// then `?` (the target has no query), `&` (it has one, the part after its
/// first `?`, that is not empty and does not end with `&`) or nothing, then the request's query with every byte
/// that is not a visible ASCII character other than `#` percent-encoded as
/// `%XX` (upper-case hex), then the target's fragment. So the merged part
/// can never hold a control character, a space or a fragment of its own;
/// the output is deterministic (and does not depend on what the buffer held);
/// and a target the store accepts gives a `Location` the store would accept
/// too (but for its length, which the query may push past the limit).
fn check_location(target: &[u8], query: Option<&[u8]>) {
    let mut out = b"stale bytes\r\n".to_vec();
    location_into(&mut out, target, query);
    let mut again = Vec::with_capacity(out.len() / 2);
    location_into(&mut again, target, query);
    assert_eq!(out, again, "location_into is not deterministic");

    let query = query.filter(|q| !q.is_empty());
    let hash = target.iter().position(|&b| b == b'#');
    let (base, fragment) = target.split_at(hash.unwrap_or(target.len()));
    match query {
        None => assert_eq!(out, target, "no query: the target unchanged"),
        Some(query) => {
            assert!(out.starts_with(base), "the target's base is not first");
            assert!(out.ends_with(fragment), "the fragment is not last");
            assert!(out.len() >= base.len() + fragment.len());
            let merged = &out[base.len()..out.len() - fragment.len()];
            let sep: &[u8] = match base.iter().position(|&b| b == b'?') {
                None => b"?",
                Some(i) if base[i + 1..].is_empty() || base.ends_with(b"&") => b"",
                Some(_) => b"&",
            };
            let encoded = merged
                .strip_prefix(sep)
                .unwrap_or_else(|| panic!("merged query {merged:?} does not start with {sep:?}"));
            assert!(
                encoded
                    .iter()
                    .all(|&b| header_safe(b) && b.is_ascii() && b != b'#'),
                "merged query {encoded:?} holds a control, space, non-ASCII byte or '#'"
            );
            let mut want = Vec::with_capacity(query.len() * 3);
            for &b in query {
                if b.is_ascii_graphic() && b != b'#' {
                    want.push(b);
                } else {
                    want.extend_from_slice(format!("%{b:02X}").as_bytes());
                }
            }
            assert_eq!(encoded, want, "query {query:?} encoded as {encoded:?}");
            // The fragment starts where the target's did: the query cannot
            // add one, nor move it.
            assert_eq!(
                out.iter().position(|&b| b == b'#'),
                hash.map(|_| out.len() - fragment.len())
            );
        }
    }
    if target.iter().copied().all(header_safe) {
        assert!(out.iter().copied().all(header_safe), "{out:?}");
    }
    if let Ok(t) = std::str::from_utf8(target)
        && validate_target(t).is_ok()
    {
        let out = std::str::from_utf8(&out).expect("a valid target merges into UTF-8");
        assert!(
            !out.chars().any(|c| c.is_control() || c.is_whitespace()),
            "{out:?}"
        );
        match validate_target(out) {
            Ok(()) => {}
            Err(e) => assert!(
                out.len() > t.len()
                    && matches!(e, uload::store::record::RecordError::TargetLength(_)),
                "{t:?} merged into {out:?}, which the store refuses: {e}"
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// manifest
// ---------------------------------------------------------------------------

/// Everything the `manifest` target runs on one input: the bytes of a
/// `MANIFEST` file. `DataDir::read_manifest` refuses non-UTF-8 and hands the
/// text to `Manifest::decode`, so the check does the same, on the text as is
/// and on the text re-signed: its body (everything before the last
/// `crc32c `) followed by a correct `crc32c` line, so that mutations reach
/// the field parsing behind the checksum (the fuzzer cannot forge CRC32Cs).
/// If the text as is decodes, the re-signed text decodes to the same value.
pub fn check_manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let as_is = check_manifest_text(text);
    let body = text.rfind("crc32c ").map_or(text, |i| &text[..i]);
    let signed = format!("{body}crc32c {:08x}\n", crc32c::crc32c(body.as_bytes()));
    let resigned = check_manifest_text(&signed);
    if as_is.is_some() {
        assert_eq!(resigned, as_is, "re-signed {signed:?}");
    }
}

/// Decodes one manifest text. An accepted manifest names a file inside
/// `snapshots/`, and its encoding decodes to the same value (the encoding is
/// canonical: encoding that again gives the same text).
fn check_manifest_text(text: &str) -> Option<Manifest> {
    let manifest = match Manifest::decode(text) {
        Ok(m) => m,
        Err(reason) => {
            assert!(!reason.is_empty());
            return None;
        }
    };
    assert!(
        !manifest.snapshot.contains('/') && manifest.snapshot.ends_with(".snap"),
        "accepted snapshot name {:?}",
        manifest.snapshot
    );
    let encoded = manifest.encode();
    let again = Manifest::decode(&encoded)
        .unwrap_or_else(|e| panic!("{manifest:?} encodes to {encoded:?}, refused: {e}"));
    assert_eq!(again, manifest, "{encoded:?}");
    assert_eq!(again.encode(), encoded);
    Some(manifest)
}

// ---------------------------------------------------------------------------
// import_tsv, import_csv, import_jsonl
// ---------------------------------------------------------------------------

/// The creation time of rows that give none.
const NOW_MS: u64 = 1_764_000_000_000;

/// Everything the `import_*` targets run on one input: the bytes of an
/// import file in `format`.
///
/// - `read_links` never fails with an I/O error on bytes in memory; only a
///   CSV file is refused whole (a header the import cannot use, a quote
///   never closed), naming a line between 1 and the file's line count (1
///   for a file without lines, whose missing header is refused on line 1).
/// - Every row it reports is either a link or a refusal carrying the same
///   line number, between 1 and the file's line count. CSV and TSV lines
///   end alike (LF or CRLF, and CR only in a file without a single LF); CSV
///   rows come in file order, each on a line that is not blank; TSV and
///   JSON-lines rows are exactly the lines that are not skipped (blank, or
///   a `#` comment in TSV), one each, in order.
/// - An accepted link is one the store accepts (`validate_code`,
///   `validate_target`, `Link::validate`), survives a log frame round trip,
///   and its export line (`uload export`'s `LinkJson::from_link` as JSON)
///   re-imports as exactly the same link: "an export re-imports as is".
/// - An accepted link is one `POST /api/links` would take: its code is not
///   reserved, and its target is in the admin's normal form.
/// - A TSV row's link is its two columns (the URL normalised), with the
///   defaults.
pub fn check_import(format: Format, data: &[u8]) {
    let mut rows = Vec::new();
    let read = read_links(data, format, RowDefaults::at(NOW_MS), |line, row| {
        rows.push((line, row))
    });
    let lines = file_lines(data, format != Format::JsonLines);
    let last_line = lines.len().max(1) as u64;
    match read {
        Ok(()) => {}
        Err(ReadError::FileRefused(e)) => {
            assert_eq!(format, Format::Csv, "a file refused whole: {e}");
            assert!(
                (1..=last_line).contains(&e.line),
                "a file refused on line {} of {}: {e}",
                e.line,
                lines.len()
            );
            assert!(!e.message.is_empty(), "{e:?}");
        }
        Err(ReadError::Io(e)) => panic!("reading from memory failed: {e}"),
    }
    for (line, row) in &rows {
        assert!(
            (1..=last_line).contains(line),
            "row on line {line} of a {}-line file: {row:?}",
            lines.len()
        );
        match row {
            Ok(link) => check_imported_link(link),
            Err(e) => {
                assert_eq!(e.line, *line, "{e}");
                // The field may be empty: a JSON object's unknown key `""`
                // is named as it is (fuzz input import_jsonl/crash-6e9a6499...).
                assert!(!e.message.is_empty(), "{e:?}");
                let _ = e.to_string();
            }
        }
    }
    let visited: Vec<u64> = rows.iter().map(|(line, _)| *line).collect();
    let skipped = |text: &str| match format {
        Format::Tsv => text.trim().is_empty() || text.starts_with('#'),
        Format::JsonLines => text.trim().is_empty(),
        Format::Csv => unreachable!(),
    };
    match format {
        Format::Csv => {
            assert!(
                visited.windows(2).all(|w| w[0] <= w[1]),
                "rows out of order: {visited:?}"
            );
            // A row is named by the line it starts on, which is never blank
            // (CRLF and blank lines once made it an earlier one).
            for (line, row) in &rows {
                assert!(
                    lines.get(*line as usize - 1).is_none_or(|l| !l.is_empty()),
                    "a row on blank line {line}: {row:?}"
                );
            }
        }
        Format::Tsv | Format::JsonLines => {
            let want: Vec<u64> = (1..)
                .zip(&lines)
                .filter(|(_, text)| !std::str::from_utf8(text).is_ok_and(skipped))
                .map(|(n, _)| n)
                .collect();
            assert_eq!(visited, want, "the lines visited");
        }
    }
    if format == Format::Tsv {
        for (line, row) in &rows {
            if let Ok(link) = row {
                let text = std::str::from_utf8(lines[*line as usize - 1]).unwrap();
                let mut want = Link::new(&link.code, &link.target).unwrap();
                want.created_at_ms = NOW_MS;
                assert_eq!(*link, want);
                // The URL column in the admin's normal form.
                let (code, url) = text.split_once('\t').unwrap();
                assert_eq!(code, link.code);
                assert_eq!(normalize_target(url).ok().as_ref(), Some(&link.target));
            }
        }
    }
}

/// The file's lines as `read_links` sees them: split at `\n`, without
/// trailing `\r`s; a final `\n` does not start another line; with
/// `lone_cr_ends_line` (TSV and CSV) and no `\n` in the whole file, split at
/// every `\r` left instead; a UTF-8 byte order mark at the start of the file
/// is not part of the first line. A CSV line holding only `\r`s is blank, as
/// here; a quoted field may run over several lines.
fn file_lines(data: &[u8], lone_cr_ends_line: bool) -> Vec<&[u8]> {
    if data.is_empty() {
        return Vec::new();
    }
    let cr_lines = lone_cr_ends_line && !data.contains(&b'\n');
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    let mut lines: Vec<&[u8]> = body
        .split(|&b| b == b'\n')
        .flat_map(|l| {
            let end = l.iter().rposition(|&b| b != b'\r').map_or(0, |i| i + 1);
            l[..end].split(move |&b| cr_lines && b == b'\r')
        })
        .collect();
    lines[0] = lines[0].strip_prefix(b"\xEF\xBB\xBF").unwrap_or(lines[0]);
    lines
}

/// An imported link is one the store takes, and what `uload export` writes
/// for it imports back as the same link.
pub fn check_imported_link(link: &Link) {
    validate_code(link.code.as_bytes()).expect("an imported code is valid");
    validate_target(&link.target).expect("an imported target is valid");
    link.validate().expect("an imported link is valid");
    assert!(!is_reserved(&link.code), "imported a reserved code");
    assert_eq!(
        normalize_target(&link.target).as_ref().ok(),
        Some(&link.target),
        "an imported target is one the API stores as is"
    );
    RedirectStatus::from_code(link.status.code()).expect("a redirect status");
    let op = LogOp::Put(link.clone());
    let mut frame = Vec::new();
    encode_frame(1, &op, &mut frame);
    let (seq, decoded, used) = decode_frame(&frame).expect("an imported link's frame decodes");
    assert_eq!((seq, used), (1, frame.len()));
    assert_eq!(decoded.to_owned_op().as_ref(), Ok(&op));

    let export =
        serde_json::to_string(&LinkJson::from_link(&link.as_ref())).expect("a link serializes");
    let mut back = Vec::new();
    read_links(
        format!("{export}\n").as_bytes(),
        Format::JsonLines,
        RowDefaults::at(NOW_MS + 1),
        |line, row| back.push((line, row)),
    )
    .unwrap();
    match &back[..] {
        [(1, Ok(again))] => assert_eq!(again, link, "export line {export}"),
        other => panic!("export line {export} of {link:?} re-imports as {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// config
// ---------------------------------------------------------------------------

/// Everything the `config` target runs on one input: the bytes of a YAML
/// configuration file (`Config::load` refuses a file that is not UTF-8, so
/// only UTF-8 text goes further). `Config::from_yaml_str` may refuse it,
/// naming the file; what it accepts holds the invariants its validation
/// promises.
pub fn check_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match Config::from_yaml_str(text, "fuzz.yaml", &[]) {
        Ok(c) => c,
        Err(e) => {
            assert_eq!(e.file, "fuzz.yaml");
            assert!(!e.key.is_empty() && !e.problem.is_empty(), "{e:?}");
            let _ = e.to_string();
            return;
        }
    };
    assert_eq!(config.source, "fuzz.yaml");
    assert!(!config.data_dir.as_os_str().is_empty());
    assert!(!config.public_base_url.ends_with('/'));
    validate_target(&config.public_base_url).expect("public_base_url is a valid URL");
    let e = &config.edge;
    if let Some(url) = &e.not_found_url {
        validate_target(url).expect("not_found_url is a valid URL");
    }
    assert!(!e.admin_upstreams.is_empty());
    for d in [
        e.follow_interval,
        e.admin_connect_timeout,
        e.admin_read_timeout,
        e.health_check_interval,
    ] {
        assert!(!d.is_zero());
    }
    assert!(e.retry_after_secs > 0);
    let a = &config.admin;
    assert!((4..=64).contains(&a.code_length));
    assert!(a.max_body_bytes > 0 && a.max_bulk > 0 && a.compact_every_records > 0);
}
