//! The command line's input, through the real binary on real files: what
//! `uload import` accepts is what the admin API would accept, and a refusal
//! names the file, the line and the field; `uload check-config` refuses what
//! the servers could not use, naming the file, the key (and the variable).

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

fn uload(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_uload"))
        .args(args)
        .env_remove("ULOAD_DATA_DIR")
        .output()
        .unwrap()
}

fn import(file: &Path, data: &Path) -> Output {
    uload(&[
        "import",
        file.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ])
}

/// The links `uload export` writes for the data dir, in code order.
fn export_lines(data: &Path) -> Vec<serde_json::Value> {
    let out = uload(&["export", "--data-dir", data.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The codes and URLs `uload export` writes for the data dir, in code order.
fn exported(data: &Path) -> Vec<(String, String)> {
    export_lines(data)
        .iter()
        .map(|v| {
            (
                v["code"].as_str().unwrap().to_owned(),
                v["url"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// What `uload import` made of a file.
struct Imported {
    /// The file as the messages name it.
    name: String,
    /// The data dir it was imported into.
    data: std::path::PathBuf,
    status: Option<i32>,
    stderr: String,
}

impl Imported {
    /// Asserts an import that refused some rows and took the rest (exit
    /// status 3): stderr names each of `refusals` (`line N: field: ...`,
    /// after the file's name), and the data dir holds `kept` (code, URL).
    fn assert_partial(&self, refusals: &[String], kept: &[(&str, &str)]) {
        let (name, stderr) = (&self.name, &self.stderr);
        assert_eq!(self.status, Some(3), "{stderr}");
        for refusal in refusals {
            let want = format!("{name}: {refusal}");
            assert!(stderr.contains(&want), "no {want:?} in {stderr}");
        }
        let kept: Vec<(String, String)> = kept
            .iter()
            .map(|&(code, url)| (code.to_owned(), url.to_owned()))
            .collect();
        assert_eq!(exported(&self.data), kept);
    }
}

/// Writes `text` as `dir/file_name` and imports it into `dir/data`.
fn import_text(dir: &Path, file_name: &str, text: &str) -> Imported {
    let file = dir.join(file_name);
    fs::write(&file, text).unwrap();
    let data = dir.join("data");
    let out = import(&file, &data);
    Imported {
        name: file.display().to_string(),
        data,
        status: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Rows the admin API refuses (`POST /api/links` answers reserved_code or
/// invalid_url) are refused by the import too, each on its own line with
/// its field, and the rest are imported: a link named `api` or `health`
/// would be shadowed by the edge's own routes, and a target with
/// credentials, a right-to-left override or a look-alike host is what the
/// URL policy exists to keep out of `Location` headers.
#[test]
fn import_refuses_rows_the_api_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let imported = import_text(
        dir.path(),
        "links.tsv",
        "api\thttps://a.example/\n\
         health\thttps://a.example/\n\
         creds\thttps://bank.example@evil.example/\n\
         bidi\thttps://example.com/\u{202E}gpj.exe\n\
         homograph\thttps://\u{430}pple.com/\n\
         good\thttps://example.com/ok\n",
    );
    let refusals: Vec<String> = [(1, "code"), (2, "code"), (3, "url"), (4, "url"), (5, "url")]
        .iter()
        .map(|(line, field)| format!("line {line}: {field}: "))
        .collect();
    imported.assert_partial(&refusals, &[("good", "https://example.com/ok")]);
    let stderr = &imported.stderr;
    assert!(stderr.contains("5 rows refused"), "{stderr}");
}

/// Rows without a status get `--default-status` (the API gives such links
/// `edge.default_status`; an import used to give them 302 whatever the
/// edge's setting); rows with one keep theirs; a status that is not a
/// redirect is refused before anything is read.
#[test]
fn import_default_status_applies_to_rows_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("links.csv");
    fs::write(
        &file,
        "code,url,status\na,https://example.com/a,\nb,https://example.com/b,307\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let (file_arg, data_arg) = (file.to_str().unwrap(), data.to_str().unwrap());
    let out = uload(&[
        "import",
        file_arg,
        "--data-dir",
        data_arg,
        "--default-status",
        "200",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("\"200\" is not 301, 302, 307 or 308"),
        "{stderr}"
    );
    assert!(!data.exists(), "a refused command created the data dir");
    let out = uload(&[
        "import",
        file_arg,
        "--data-dir",
        data_arg,
        "--default-status",
        "301",
    ]);
    assert!(out.status.success(), "{out:?}");
    let statuses: Vec<(String, u64)> = export_lines(&data)
        .iter()
        .map(|v| {
            (
                v["code"].as_str().unwrap().to_owned(),
                v["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(statuses, [("a".to_owned(), 301), ("b".to_owned(), 307)]);
}

/// A file that starts with a UTF-8 byte order mark (as Windows editors and
/// spreadsheet exports write them) imports like one without: the CSV reader
/// already skips it, TSV and JSON lines must too, instead of refusing line 1
/// for a code that starts with byte 0xef or for not being JSON.
#[test]
fn a_byte_order_mark_does_not_cost_the_first_row() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        (
            "links.tsv",
            "\u{feff}first\thttps://example.com/1\r\nsecond\thttps://example.com/2\r\n",
        ),
        (
            "links.jsonl",
            "\u{feff}{\"code\":\"first\",\"url\":\"https://example.com/1\"}\r\n\
             {\"code\":\"second\",\"url\":\"https://example.com/2\"}\r\n",
        ),
        (
            "links.csv",
            "\u{feff}code,url\r\nfirst,https://example.com/1\r\nsecond,https://example.com/2\r\n",
        ),
    ] {
        let file = dir.path().join(name);
        fs::write(&file, text).unwrap();
        let data = dir.path().join(format!("data-{name}"));
        let out = import(&file, &data);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let codes: Vec<String> = exported(&data).into_iter().map(|(c, _)| c).collect();
        assert_eq!(codes, ["first", "second"], "{name}");
    }
}

/// `uload check-config` on one file: (exit status, stdout + stderr).
fn check_config(file: &Path, env: &[(&str, &std::ffi::OsStr)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uload"));
    cmd.arg("check-config").arg(file);
    for (var, _) in uload::config::ENV_OVERRIDES {
        cmd.env_remove(var);
    }
    for (var, value) in env {
        cmd.env(var, value);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// Writes `text` as `dir/uload.yaml`; `uload check-config` on it must fail
/// (exit 1) with a line starting `<file>: <want>`.
fn check_config_refuses(dir: &Path, text: &str, want: &str) {
    let file = dir.join("uload.yaml");
    fs::write(&file, text).unwrap();
    let (status, out) = check_config(&file, &[]);
    assert_eq!(status, Some(1), "{text}: {out}");
    let want = format!("{}: {want}", file.display());
    assert!(out.contains(&want), "{text}: no {want:?} in {out}");
}

/// Writes `text` as `dir/name`; `uload check-config` on it must pass.
fn check_config_accepts(dir: &Path, name: &str, text: &str) {
    let file = dir.join(name);
    fs::write(&file, text).unwrap();
    let (status, out) = check_config(&file, &[]);
    assert_eq!(status, Some(0), "{text}: {out}");
}

/// Two listeners of one process on the same address: the edge binds
/// `edge.listen`, `tls.listen` and `metrics.listen`, the admin
/// `admin.listen` and `metrics.admin_listen`. Each address on its own can be
/// bound, so only the configuration shows the clash; the second bind fails
/// once the server runs. check-config must say so, naming the key.
#[test]
fn check_config_refuses_listeners_that_collide() {
    let dir = tempfile::tempdir().unwrap();
    for (text, key) in [
        (
            "edge:\n  listen: 127.0.0.1:18080\nmetrics:\n  listen: 127.0.0.1:18080\n",
            "metrics.listen",
        ),
        (
            "edge:\n  listen: 0.0.0.0:18080\nmetrics:\n  listen: 127.0.0.1:18080\n",
            "metrics.listen",
        ),
        (
            "admin:\n  listen: 127.0.0.1:18081\nmetrics:\n  admin_listen: 127.0.0.1:18081\n",
            "metrics.admin_listen",
        ),
    ] {
        check_config_refuses(dir.path(), text, &format!("{key}: "));
    }
    check_config_accepts(
        dir.path(),
        "ok.yaml",
        "edge:\n  listen: 127.0.0.1:18080\nadmin:\n  listen: 127.0.0.1:18081\n\
         metrics:\n  listen: 127.0.0.1:19090\n  admin_listen: 127.0.0.1:19091\n",
    );
}

/// Edge and admin sharing a socket is a valid file for an edge on one host
/// and an admin on another, so check-config passes it, with a warning; but
/// `uload up` runs both in one process and refuses it before it starts
/// anything (it used to start, and fail, or have one listener served by one
/// of the two only, depending on which bound first).
#[test]
fn uload_up_refuses_edge_and_admin_listeners_that_collide() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = dir.path().join("uload.yaml");
    fs::write(
        &file,
        format!(
            "data_dir: {}\nedge:\n  listen: 127.0.0.1:18080\nadmin:\n  listen: 127.0.0.1:18081\n\
             metrics:\n  listen: 127.0.0.1:19091\n  admin_listen: 127.0.0.1:19091\n",
            data.display()
        ),
    )
    .unwrap();
    let (status, out) = check_config(&file, &[]);
    assert_eq!(status, Some(0), "{out}");
    assert!(
        out.contains(&format!("warning: {}: metrics.listen: ", file.display()))
            && out.contains("metrics.admin_listen"),
        "{out}"
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uload"));
    cmd.arg("up").arg("--config").arg(&file);
    for (var, _) in uload::config::ENV_OVERRIDES {
        cmd.env_remove(var);
    }
    // Bounded: were it to start, it would serve until killed.
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("uload up started with edge and admin on one metrics socket");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let up = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&up.stderr);
    assert_eq!(up.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{}: metrics.listen: ", file.display())),
        "{err}"
    );
    assert!(
        !data.exists(),
        "uload up created its data dir before refusing"
    );
}

/// An override that is not UTF-8 is an error naming the variable, not
/// silently ignored (which left the file's value, e.g. its data dir, in
/// force while the operator believed the variable applied).
#[test]
fn check_config_refuses_an_override_that_is_not_utf8() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("uload.yaml");
    fs::write(&file, "edge:\n  listen: 127.0.0.1:18080\n").unwrap();
    let (status, out) = check_config(&file, &[]);
    assert_eq!(status, Some(0), "{out}");
    for var in ["ULOAD_EDGE_LISTEN", "ULOAD_DATA_DIR"] {
        let value = std::ffi::OsStr::from_bytes(b"/srv/uload-\xff");
        let (status, out) = check_config(&file, &[(var, value)]);
        assert_eq!(status, Some(1), "{var}: {out}");
        assert!(
            out.contains(&file.display().to_string()) && out.contains(var),
            "{var}: {out}"
        );
    }
}

/// Refusals in a CSV file name the line the row is on, whatever the line
/// endings (CRLF, as spreadsheets write), blank lines, or a quoted field
/// holding a line break before it.
#[test]
fn csv_refusals_name_the_right_line() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        (
            "lf.csv",
            "code,url\n\nok,https://a.example/\n\nbad x,https://b.example/\n",
        ),
        (
            "crlf.csv",
            "code,url\r\n\r\nok,https://a.example/\r\n\r\nbad x,https://b.example/\r\n",
        ),
        (
            "quoted.csv",
            "code,url\r\nok,\"https://a.example/\r\n\"\r\n\r\nbad x,https://b.example/",
        ),
        (
            "cr.csv",
            "code,url\r\rok,https://a.example/\r\rbad x,https://b.example/\r",
        ),
        // A stray CR in a file with LFs does not end a line (it ended the
        // record and counted as a line break, so this said line 6).
        (
            "stray-cr.csv",
            "code,url\nok,https://a.example/p\rq\n\n\nbad x,https://b.example/\n",
        ),
    ] {
        let file = dir.path().join(name);
        fs::write(&file, text).unwrap();
        let out = import(&file, &dir.path().join(format!("data-{name}")));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let want = format!("{}: line 5: code: ", file.display());
        assert!(stderr.contains(&want), "{name}: no {want:?} in {stderr}");
    }
}

/// A CSV header the import refuses (an unknown column, the empty last
/// column a spreadsheet writes after a trailing comma, no `url` column)
/// refuses the file: exit status 1 and nothing imported, naming the line
/// the header is on (after blank lines too). It was reported as one refused
/// row of line 1 with exit status 3, the status of an import that left out
/// some rows and took the rest.
#[test]
fn a_refused_csv_header_is_not_a_partial_import() {
    let dir = tempfile::tempdir().unwrap();
    let refused = |text: &str, want: &str| {
        let Imported {
            name,
            data,
            status,
            stderr,
        } = import_text(dir.path(), "links.csv", text);
        let want = format!("{name}: {want}");
        assert!(stderr.contains(&want), "{text:?}: no {want:?} in {stderr}");
        assert!(
            stderr.contains("nothing was imported"),
            "{text:?}: {stderr}"
        );
        assert!(!stderr.contains("the rest were imported"), "{stderr}");
        assert_eq!(status, Some(1), "{text:?}: {stderr}");
        assert_eq!(exported(&data), [], "{text:?}");
    };
    refused(
        "code,url,title\na,https://a.example/,A\nb,https://b.example/,B\n",
        "line 1: header: unknown column \"title\"",
    );
    // The empty last column a spreadsheet writes.
    refused(
        "code,url,\r\na,https://a.example/,\r\n",
        "line 1: header: column 3 has no name",
    );
    // The header's own line, after blank lines.
    refused(
        "\n\ncode\na\n",
        "line 3: header: missing the \"url\" column",
    );
}

/// A CSV quote that is never closed takes the rest of the file into one
/// field. The file is refused, naming the line the quote opened on and how
/// far it ran: the rows after it were lost without a word, and the only
/// refusal blamed whitespace in a URL.
#[test]
fn an_unclosed_csv_quote_refuses_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let Imported {
        name,
        data,
        status,
        stderr,
    } = import_text(
        dir.path(),
        "links.csv",
        "code,url\nfirst,https://a.example/\nsecond,\"https://b.example/\n\
         third,https://c.example/\nfourth,https://d.example/\n",
    );
    let want = format!(
        "{name}: line 3: url: the quote opened on this line is never closed: \
         it takes the 2 lines after it, to the end of the file, into one field; \
         nothing was imported",
    );
    assert!(stderr.contains(&want), "no {want:?} in {stderr}");
    assert_eq!(status, Some(1), "{stderr}");
    assert_eq!(exported(&data), []);
}

/// A code given on three rows: the second and third are refused, each
/// naming the row that was kept (the third named the second, itself
/// refused).
#[test]
fn a_repeated_code_names_the_row_that_was_kept() {
    let dir = tempfile::tempdir().unwrap();
    import_text(
        dir.path(),
        "links.tsv",
        "a\thttps://a.example/1\na\thttps://a.example/2\na\thttps://a.example/3\n",
    )
    .assert_partial(
        &[2, 3].map(|line| format!("line {line}: code: \"a\" repeats line 1")),
        &[("a", "https://a.example/1")],
    );
}

/// Links stored before the URL policy tightened (credentials in the URL, a
/// reserved code) are exported, but `uload import` refuses them: export
/// says so on stderr, naming how many, the first 20 by code with the
/// reason, and still exits 0. The export warned of nothing, so a migration
/// through export and import lost them unannounced.
#[test]
fn export_names_the_links_import_would_refuse() {
    use uload::store::record::Link;
    use uload::store::{LogOp, Store};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut ops = vec![LogOp::Put(
        Link::new("fine", "https://example.com/").unwrap(),
    )];
    ops.extend((0..24).map(|i| {
        LogOp::Put(
            Link::new(
                &format!("creds{i:02}"),
                "https://bank.example@evil.example/",
            )
            .unwrap(),
        )
    }));
    ops.push(LogOp::Put(
        Link::new("api", "https://example.com/").unwrap(),
    ));
    Store::open(&data, Default::default())
        .unwrap()
        .append(&ops)
        .unwrap();
    let file = dir.path().join("links.jsonl");
    let out = uload(&[
        "export",
        "--data-dir",
        data.to_str().unwrap(),
        "-o",
        file.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("25 of the 26 exported links would be refused by `uload import`"),
        "{stderr}"
    );
    let name = file.display().to_string();
    // Code order: "api" (line 1), then creds00.. (lines 2..).
    assert!(
        stderr.contains(&format!("{name}: line 1: \"api\": code: ")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{name}: line 20: \"creds18\": url: ")),
        "{stderr}"
    );
    assert!(!stderr.contains("\"creds19\""), "{stderr}");
    assert!(stderr.contains("and 5 more"), "{stderr}");
    // What the warning said is what the import does.
    let out = import(&file, &dir.path().join("again"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("25 rows refused"), "{stderr}");
}

/// `uload export -o FILE` that cannot finish (here: the file size limit, as
/// a full disk would) fails, and leaves FILE as it was: the last whole
/// export, never part of a new one that looks like a smaller export.
#[test]
fn an_export_that_cannot_finish_leaves_the_last_one_whole() {
    let dir = tempfile::tempdir().unwrap();
    let tsv = dir.path().join("links.tsv");
    let rows: String = (0..2000)
        .map(|i| format!("code{i}\thttps://example.com/landing/{i}\n"))
        .collect();
    fs::write(&tsv, rows).unwrap();
    let data = dir.path().join("data");
    assert!(import(&tsv, &data).status.success());
    let out = dir.path().join("links.jsonl");
    let args = [
        "export",
        "--data-dir",
        data.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    assert!(uload(&args).status.success());
    let whole = fs::read(&out).unwrap();
    assert_eq!(whole.iter().filter(|&&b| b == b'\n').count(), 2000);

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uload"));
    cmd.args(args).env_remove("ULOAD_DATA_DIR");
    // A write past 16 KiB fails with EFBIG, as on a full disk.
    common::limit_file_size(&mut cmd, 16 * 1024, libc::SIG_IGN);
    let failed = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success(), "{stderr}");
    assert!(stderr.contains("links.jsonl"), "{stderr}");
    assert!(fs::read(&out).unwrap() == whole, "the last export was cut");
    let names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
}

/// An import whose write fails partway (the file size limit, as a full disk
/// would) exits 1 and says how many links it left in the data dir, and
/// which sequences: the batches appended before the failure are on disk
/// and live (it used to print only the I/O error, so a rerun refused every
/// one of them as "already exists", unexplained).
#[test]
fn a_failed_import_says_how_many_links_it_left_in_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let tsv = dir.path().join("links.tsv");
    let rows: String = (0..30_000)
        .map(|i| format!("code{i}\thttps://example.com/landing/{i}\n"))
        .collect();
    fs::write(&tsv, rows).unwrap();
    let data = dir.path().join("data");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uload"));
    cmd.args([
        "import",
        tsv.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ])
    .env_remove("ULOAD_DATA_DIR");
    // Room in the log for the first batch of 10,000 frames, not the second.
    common::limit_file_size(&mut cmd, 1_000_000, libc::SIG_IGN);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let left = exported(&data).len();
    assert_eq!(left, 10_000, "{stderr}");
    assert!(
        stderr.contains("the first 10000 of 30000 links (sequences 1..=10000) were written"),
        "{stderr}"
    );
}

/// check-config refuses what the edge could not start with, naming file,
/// key and problem (each passed as "ok" and then the edge panicked, aborted
/// or ran on settings the operator did not give): a Pingora conf with
/// `threads: 0` (Pingora panics on it), an `access_log.buffer_lines` whose
/// queue cannot be allocated, and an `edge.pingora_conf` that names a file
/// that is not there (the edge ran on Pingora's defaults: another pid file,
/// upgrade socket and grace periods); also an `edge.admin_retries` that
/// would keep a client waiting minutes for its 503. Unset, a missing
/// `pingora.yaml` is still fine: Pingora's defaults, as documented.
#[test]
fn check_config_refuses_what_the_edge_cannot_run_with() {
    let dir = tempfile::tempdir().unwrap();
    let pingora = dir.path().join("zero-threads.yaml");
    fs::write(&pingora, "---\nversion: 1\nthreads: 0\n").unwrap();
    for (text, want) in [
        (
            "edge:\n  pingora_conf: zero-threads.yaml\n".to_owned(),
            format!(
                "edge.pingora_conf: {}: threads: must be at least 1",
                pingora.display()
            ),
        ),
        (
            "access_log:\n  buffer_lines: 100000000000000\n".to_owned(),
            "access_log.buffer_lines: must be between 1 and 4194304".to_owned(),
        ),
        (
            "edge:\n  admin_retries: 1000000\n".to_owned(),
            "edge.admin_retries: must be at most 10".to_owned(),
        ),
        (
            "edge:\n  pingora_conf: typo.yaml\n".to_owned(),
            format!(
                "edge.pingora_conf: {}: no such file",
                dir.path().join("typo.yaml").display()
            ),
        ),
    ] {
        check_config_refuses(dir.path(), &text, &want);
    }
    check_config_accepts(
        dir.path(),
        "defaults.yaml",
        "access_log:\n  buffer_lines: 4194304\n",
    );
}

/// `compact`, `export` and `inspect` of a data dir that does not exist (a
/// mistyped `--data-dir`) fail naming it, and make nothing there: `compact`
/// used to create an empty data dir and say "nothing new to compact".
#[test]
fn commands_on_a_missing_data_dir_fail_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo");
    for command in ["compact", "export", "inspect"] {
        let out = uload(&[command, "--data-dir", missing.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command}: {stderr}");
        assert!(
            stderr.contains(&format!("{}: not a directory", missing.display())),
            "{command}: {stderr}"
        );
        assert!(!missing.exists(), "{command} made {}", missing.display());
    }
}

/// With no config file (no `--config`, no `conf/uload.yaml` where it runs),
/// `ULOAD_EDGE_PINGORA_CONF` still names the Pingora conf: a missing one is
/// an error naming the key and the variable, and one the edge cannot run
/// with (`threads: 0`) is refused. Both used to be ignored: the edge ran on
/// Pingora's defaults (another pid file and upgrade socket).
#[test]
fn the_pingora_conf_variable_counts_without_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("zero.yaml"),
        "---\nversion: 1\nthreads: 0\n",
    )
    .unwrap();
    for (conf, want) in [
        (
            "missing.yaml",
            "edge.pingora_conf: missing.yaml: no such file (set by ULOAD_EDGE_PINGORA_CONF)",
        ),
        ("zero.yaml", "threads"),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_uload"));
        cmd.arg("edge").current_dir(dir.path());
        for (var, _) in uload::config::ENV_OVERRIDES {
            cmd.env_remove(var);
        }
        let mut child = cmd
            .env_remove("ULOAD_CONFIG")
            .env("ULOAD_EDGE_PINGORA_CONF", conf)
            .env(
                "ULOAD_EDGE_LISTEN",
                format!("127.0.0.1:{}", common::free_port()),
            )
            .env("ULOAD_DATA_DIR", dir.path().join("data"))
            .env("ULOAD_STATE_DIR", dir.path().join("state"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Bounded: an edge that ignored the variable would run on.
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > std::time::Duration::from_secs(30) {
                child.kill().unwrap();
                child.wait().unwrap();
                panic!("{conf}: the edge ran, ignoring ULOAD_EDGE_PINGORA_CONF");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "{conf}: {stderr}");
        assert!(stderr.contains(want), "{conf}: {stderr}");
    }
}

/// An error in a value a variable set names the variable: with a config
/// file too, a missing Pingora conf named by `ULOAD_EDGE_PINGORA_CONF` (the
/// file may name none, or one that exists). It was reported as the file's
/// own `edge.pingora_conf` (found by review).
#[test]
fn a_missing_pingora_conf_from_the_variable_names_it_with_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("uload.yaml");
    fs::write(&file, "edge:\n  listen: 127.0.0.1:9\n").unwrap();
    let (status, out) = check_config(
        &file,
        &[(
            "ULOAD_EDGE_PINGORA_CONF",
            std::ffi::OsStr::new("missing.yaml"),
        )],
    );
    assert_eq!(status, Some(1), "{out}");
    assert!(out.contains("no such file"), "{out}");
    assert!(
        out.contains("ULOAD_EDGE_PINGORA_CONF"),
        "the error does not name the variable that set the value: {out}"
    );
}
