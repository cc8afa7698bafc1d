//! A full or read-only disk under the admin (issue 5, fault 7).
//!
//! What must hold: a create gets 201 only once its record is on disk; on a
//! full disk (ENOSPC, EDQUOT, EFBIG) it gets `507 insufficient_storage`, on
//! a read-only or failing one `503 storage_error`, both with `Retry-After`
//! and the stable JSON error body; nothing acknowledged is lost; the edge
//! keeps serving every acknowledged link; writes work again once space
//! returns, without restarting the admin; no link that got an error shows
//! up later unless a retry created it; a background compaction that fails
//! for lack of space is logged and retried, never fatal.
//!
//! - Store level, in process, with the log's injected faults (a failed
//!   fsync, a write cut short, a recovery that fails): the recovery rules of
//!   `docs/storage.md`, "When a write fails".
//! - The admin's answers for each errno, in process.
//! - Real faults on real `uload admin` and `uload edge` processes:
//!   `RLIMIT_FSIZE` lowered in the admin (EFBIG; always runs), a tiny tmpfs
//!   filled up (ENOSPC), and a read-only data dir (the immutable attribute,
//!   EPERM, and a tmpfs remounted read-only, EROFS). The last two need
//!   `mount`; without it they record a skip (`common::skip`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use uload::store::frame::encode_frame;
use uload::store::log::{InjectedFault, replay};
use uload::store::{DataDir, LogOp, LogOptions, Store, record::Link};

const KEY: &str = "test-key-0123456789abcdef";

// ---------------------------------------------------------------- store level

fn link(code: &str) -> Link {
    Link::new(code, &format!("https://example.com/{code}")).unwrap()
}

fn put(code: &str) -> LogOp {
    LogOp::Put(link(code))
}

/// (sequence, code) of every record in the log of the data dir `root`.
fn records(root: &Path) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    replay(&root.join("log"), 0, |seq, op| {
        out.push((seq, String::from_utf8_lossy(op.code()).into_owned()));
    })
    .unwrap();
    out
}

/// Length of the newest log segment.
fn active_len(root: &Path) -> u64 {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(root.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segs.sort();
    std::fs::metadata(segs.last().unwrap()).unwrap().len()
}

/// Opens the store again (a lock a child process holds for an instant
/// between its fork and exec is waited for by `Store::open` itself).
fn reopen(root: &Path) -> Store {
    Store::open(root, LogOptions::default())
        .unwrap_or_else(|e| panic!("reopening {}: {e}", root.display()))
}

fn os_error(e: &uload::store::StoreError) -> i32 {
    e.io_error()
        .and_then(std::io::Error::raw_os_error)
        .unwrap_or_else(|| panic!("no OS error in {e}"))
}

#[test]
fn a_failed_fsync_is_not_acknowledged_and_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), LogOptions::default()).unwrap();
    for i in 0..5 {
        store.append(&[put(&format!("ok{i}"))]).unwrap();
    }
    let len = active_len(dir.path());
    store
        .log()
        .inject_fault(InjectedFault::SyncFails { errno: libc::EIO });
    let err = store.append(&[put("lost1"), put("lost2")]).unwrap_err();
    assert_eq!(os_error(&err), libc::EIO, "{err}");
    assert!(err.to_string().contains("fsync"), "{err}");
    assert_eq!(store.log().durable_seq(), 5);
    // The frames were written whole, then their fsync failed: they are cut
    // off, never synced again and claimed.
    assert_eq!(active_len(dir.path()), len);
    assert!(store.log().last_failure().is_some());
    // The next append reopens the segment, truncates and fsyncs it, checks
    // its last frame, and takes the sequence the failed batch had.
    assert_eq!(store.append(&[put("after")]).unwrap(), 6);
    assert!(store.log().last_failure().is_none());
    assert_eq!(store.log().failure_count(), 1);
    drop(store);
    let store = reopen(dir.path());
    assert_eq!(store.recovery().truncated, None);
    let want: Vec<(u64, String)> = (1..=5)
        .map(|i| (i, format!("ok{}", i - 1)))
        .chain([(6, "after".to_owned())])
        .collect();
    assert_eq!(records(dir.path()), want);
}

#[test]
fn a_write_cut_short_is_cut_back_before_the_next_frame() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), LogOptions::default()).unwrap();
    for i in 0..3 {
        store.append(&[put(&format!("ok{i}"))]).unwrap();
    }
    let len = active_len(dir.path());
    let mut one = Vec::new();
    encode_frame(4, &put("cutAAA"), &mut one);
    // A partial frame; then two whole frames and a partial third: the
    // whole ones belong to a failed batch and must go too.
    for (written, errno) in [(20, libc::ENOSPC), (2 * one.len() + 5, libc::EFBIG)] {
        store
            .log()
            .inject_fault(InjectedFault::WriteCut { written, errno });
        let err = store
            .append(&[put("cutAAA"), put("cutBBB"), put("cutCCC")])
            .unwrap_err();
        assert_eq!(os_error(&err), errno, "{err}");
        assert_eq!(active_len(dir.path()), len, "cut back at once");
        assert_eq!(store.log().durable_seq(), 3);
    }
    assert_eq!(store.append(&[put("good")]).unwrap(), 4);
    drop(store);
    let store = reopen(dir.path());
    // No torn tail: nothing of the failed batches was left behind the good
    // frame.
    assert_eq!(store.recovery().truncated, None);
    let codes: Vec<String> = records(dir.path()).into_iter().map(|(_, c)| c).collect();
    assert_eq!(codes, ["ok0", "ok1", "ok2", "good"]);
}

#[test]
fn a_failing_recovery_refuses_appends_until_it_works() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), LogOptions::default()).unwrap();
    store.append(&[put("first")]).unwrap();
    let len = active_len(dir.path());
    store
        .log()
        .inject_fault(InjectedFault::SyncFails { errno: libc::EIO });
    store.log().inject_fault(InjectedFault::RecoveryFails {
        errno: libc::EROFS,
        times: 3,
    });
    assert_eq!(os_error(&store.append(&[put("a")]).unwrap_err()), libc::EIO);
    for attempt in 0..3 {
        let err = store.append(&[put("b")]).unwrap_err();
        assert_eq!(os_error(&err), libc::EROFS, "attempt {attempt}: {err}");
        assert!(err.to_string().contains("reopening"), "{err}");
        assert_eq!(active_len(dir.path()), len);
    }
    assert_eq!(store.append(&[put("c")]).unwrap(), 2);
    assert_eq!(store.log().failure_count(), 4);
    drop(store);
    let codes: Vec<String> = records(dir.path()).into_iter().map(|(_, c)| c).collect();
    assert_eq!(codes, ["first", "c"]);
}

#[test]
fn a_failed_batch_fails_every_append_in_it_and_behind_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), LogOptions::default()).unwrap());
    let results = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (store, results) = (store.clone(), results.clone());
            std::thread::spawn(move || {
                for i in 0..60 {
                    if t == 0 && i % 20 == 10 {
                        let fault = if i == 10 {
                            InjectedFault::SyncFails { errno: libc::EIO }
                        } else {
                            InjectedFault::WriteCut {
                                written: 30,
                                errno: libc::ENOSPC,
                            }
                        };
                        store.log().inject_fault(fault);
                    }
                    let code = format!("t{t}n{i}");
                    let r = store.append(&[put(&code)]).map_err(|e| e.to_string());
                    results.lock().unwrap().push((code, r));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let results = results.lock().unwrap();
    let acked: BTreeMap<u64, String> = results
        .iter()
        .filter_map(|(c, r)| r.as_ref().ok().map(|s| (*s, c.clone())))
        .collect();
    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    assert!(failed >= 2, "the injected faults failed {failed} appends");
    // Every sequence was acknowledged to exactly one append: failed ones
    // were handed out again, never twice as a success.
    assert_eq!(acked.len(), results.len() - failed);
    assert!(acked.keys().copied().eq(1..=acked.len() as u64));
    drop(results);
    drop(Arc::into_inner(store).unwrap());
    let on_disk: BTreeMap<u64, String> = records(dir.path()).into_iter().collect();
    assert_eq!(on_disk, acked, "exactly the acknowledged records, in order");
    println!(
        "group commit under faults: {} appends, {} acknowledged, {failed} refused",
        acked.len() + failed,
        acked.len()
    );
}

#[test]
fn a_follower_reports_records_cut_off_under_it() {
    use uload::store::log::{LogTail, TailStatus};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), LogOptions::default()).unwrap();
    for code in ["a1", "a2", "a3"] {
        store.append(&[put(code)]).unwrap();
    }
    let three = active_len(dir.path());
    for code in ["x4", "x5"] {
        store.append(&[put(code)]).unwrap();
    }
    let mut tail = LogTail::new(&dir.path().join("log"), 0);
    let mut seen = Vec::new();
    let poll = |tail: &mut LogTail, seen: &mut Vec<(u64, String)>| {
        tail.poll(|seq, op| seen.push((seq, String::from_utf8_lossy(op.code()).into_owned())))
    };
    assert_eq!(poll(&mut tail, &mut seen).unwrap(), TailStatus::CaughtUp);
    assert_eq!(seen.len(), 5);
    // What the writer does when the fsync of x4 and x5 fails after the tail
    // read them: cut them off, and write other records with their
    // sequences (done here by hand, the writer being closed).
    drop(store);
    let segment = newest_segment(dir.path());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(three)
        .unwrap();
    let store = reopen(dir.path());
    for code in ["y4", "y5", "y6"] {
        store.append(&[put(code)]).unwrap();
    }
    let err = poll(&mut tail, &mut seen).unwrap_err();
    assert!(
        matches!(err, uload::store::LogError::Rewound { last_seq: 5, .. }),
        "{err}"
    );
    // Reported once; the tail goes on after its last sequence.
    assert_eq!(poll(&mut tail, &mut seen).unwrap(), TailStatus::CaughtUp);
    assert_eq!(seen.last().unwrap(), &(6, "y6".to_owned()));
    assert_eq!(seen.len(), 6);
}

// ---------------------------------------------------- the admin, in process

async fn call(
    app: &axum::Router,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value, Option<String>) {
    use tower::ServiceExt;
    let mut req = axum::http::Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {KEY}"));
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let body = body.map_or_else(String::new, |b| b.to_string());
    let res = app
        .clone()
        .oneshot(req.body(axum::body::Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = res.status().as_u16();
    let retry = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap();
    let json = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (status, json, retry)
}

fn assert_error_shape(body: &Value, code: &str) {
    assert_eq!(common::api_error(body), (code.to_owned(), None), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nothing was saved")
    );
}

#[tokio::test]
async fn the_admin_answers_507_when_full_and_503_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "data_dir: {}\npublic_base_url: https://ulo.ad/\nadmin:\n  api_key: {KEY}\n",
        dir.path().display()
    );
    let config = uload::config::Config::from_yaml_str(&yaml, "test", &[]).unwrap();
    let state = uload::admin::AdminState::open(&config).unwrap();
    let app = uload::admin::app(state.clone());
    let (status, _, _) = call(
        &app,
        "POST",
        "/api/links",
        Some(json!({"url": "https://example.com/keep", "code": "keep"})),
    )
    .await;
    assert_eq!(status, 201);
    let log = state.store().log();
    let cases = [
        (
            InjectedFault::WriteCut {
                written: 0,
                errno: libc::ENOSPC,
            },
            None,
            507,
        ),
        (
            InjectedFault::SyncFails {
                errno: libc::EDQUOT,
            },
            None,
            507,
        ),
        (
            InjectedFault::WriteCut {
                written: 7,
                errno: libc::EFBIG,
            },
            None,
            507,
        ),
        (InjectedFault::SyncFails { errno: libc::EIO }, None, 503),
        (
            InjectedFault::WriteCut {
                written: 0,
                errno: libc::EACCES,
            },
            None,
            503,
        ),
        // A failure, then a recovery that finds the file system read-only.
        (
            InjectedFault::SyncFails { errno: libc::EPERM },
            Some(InjectedFault::RecoveryFails {
                errno: libc::EROFS,
                times: 1,
            }),
            503,
        ),
    ];
    for (i, (fault, then, want)) in cases.into_iter().enumerate() {
        let before = (log.durable_seq(), state.view().len());
        let code = if want == 507 {
            "insufficient_storage"
        } else {
            "storage_error"
        };
        log.inject_fault(fault.clone());
        let (status, body, retry) = call(
            &app,
            "POST",
            "/api/links",
            Some(json!({"url": "https://example.com/x", "code": format!("f{i}")})),
        )
        .await;
        assert_eq!(status, want, "{fault:?}: {body}");
        assert_error_shape(&body, code);
        assert!(retry.is_some(), "{fault:?}: Retry-After");
        if let Some(then) = then {
            log.inject_fault(then);
            let (status, body, _) = call(
                &app,
                "PATCH",
                "/api/links/keep",
                Some(json!({"status": 301})),
            )
            .await;
            assert_eq!(status, want, "{body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("Read-only file system"),
                "{body}"
            );
        }
        let (status, health, _) = call(&app, "GET", "/api/health", None).await;
        assert_eq!(status, 200, "reads still work: the edge keeps routing here");
        assert_eq!(health["status"], "degraded");
        assert_eq!(health["writable"], false);
        assert_eq!(health["error"], code);
        assert_eq!((log.durable_seq(), state.view().len()), before);
        let (status, _, _) = call(&app, "GET", &format!("/api/links/f{i}"), None).await;
        assert_eq!(status, 404, "an error means not created");
    }
    // Bulk, PATCH and DELETE under a full disk: refused whole.
    for (method, path, body) in [
        (
            "POST",
            "/api/links/bulk",
            Some(
                json!({"links": [{"url": "https://example.com/b1"}, {"url": "https://example.com/b2"}]}),
            ),
        ),
        ("PATCH", "/api/links/keep", Some(json!({"disabled": true}))),
        ("DELETE", "/api/links/keep", None),
    ] {
        log.inject_fault(InjectedFault::WriteCut {
            written: 0,
            errno: libc::ENOSPC,
        });
        let before = log.durable_seq();
        let (status, body, retry) = call(&app, method, path, body).await;
        assert_eq!(status, 507, "{method} {path}: {body}");
        assert_error_shape(&body, "insufficient_storage");
        assert!(retry.is_some());
        assert_eq!(log.durable_seq(), before);
    }
    let (_, kept, _) = call(&app, "GET", "/api/links/keep", None).await;
    assert_eq!(
        (kept["status"].as_u64(), kept["disabled"].as_bool()),
        (Some(302), Some(false))
    );
    // Space is back: the next write works, without a restart.
    let (status, _, _) = call(
        &app,
        "POST",
        "/api/links",
        Some(json!({"url": "https://example.com/x", "code": "f0"})),
    )
    .await;
    assert_eq!(status, 201);
    let (status, health, _) = call(&app, "GET", "/api/health", None).await;
    assert_eq!(
        (status, health),
        (
            200,
            json!({"status": "ok", "seq": 2, "links": 2, "writable": true})
        )
    );
}

// ------------------------------------------------------- real processes

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad response");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad())?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    if headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"))
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let at = rest.windows(2).position(|w| w == b"\r\n").ok_or_else(bad)?;
            let size = usize::from_str_radix(
                std::str::from_utf8(&rest[..at]).map_err(|_| bad())?.trim(),
                16,
            )
            .map_err(|_| bad())?;
            rest = &rest[at + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body = out;
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn call_api(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Response {
    request(addr, method, path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn free_port() -> u16 {
    common::free_port()
}

fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A `uload admin` and a `uload edge` on free loopback ports, sharing the
/// data dir `data` (which may be on a test mount). The admin's stderr is
/// collected through a pipe (a file would itself be subject to the admin's
/// RLIMIT_FSIZE).
struct Procs {
    work: tempfile::TempDir,
    config: PathBuf,
    admin_addr: SocketAddr,
    edge_addr: SocketAddr,
    admin: Option<Child>,
    edge: Option<Child>,
    admin_log: Arc<Mutex<Vec<String>>>,
}

impl Procs {
    fn new(data: &Path, admin_extra: &str) -> Self {
        let work = tempfile::tempdir().unwrap();
        let port = || -> SocketAddr { format!("127.0.0.1:{}", free_port()).parse().unwrap() };
        let (edge_addr, admin_addr) = (port(), port());
        let config = work.path().join("uload.yaml");
        std::fs::write(
            work.path().join("pingora.yaml"),
            format!(
                "---\nversion: 1\nthreads: 2\npid_file: {0}/edge.pid\nupgrade_sock: {0}/upgrade.sock\ngrace_period_seconds: 1\ngraceful_shutdown_timeout_seconds: 1\n",
                work.path().display()
            ),
        )
        .unwrap();
        std::fs::write(
            &config,
            format!(
                "data_dir: {data}\npublic_base_url: http://{edge_addr}\nedge:\n  listen: {edge_addr}\n  admin_upstreams: [\"{admin_addr}\"]\n  health_check_interval_ms: 100\n  admin_connect_timeout_ms: 300\n  admin_read_timeout_ms: 2000\n  pingora_conf: pingora.yaml\nadmin:\n  listen: {admin_addr}\n  api_key: {KEY}\n  max_body_bytes: 1048576\n{admin_extra}metrics:\n  listen: {}\n  admin_listen: {}\naccess_log:\n  path: {}\n",
                port(),
                port(),
                work.path().join("access.log").display(),
                data = data.display(),
            ),
        )
        .unwrap();
        Self {
            work,
            config,
            admin_addr,
            edge_addr,
            admin: None,
            edge: None,
            admin_log: Arc::default(),
        }
    }

    fn command(&self, sub: &str) -> Command {
        let mut cmd = common::uload_command(self.work.path());
        cmd.args([sub, "--config"])
            .arg(&self.config)
            .stdout(Stdio::null());
        cmd
    }

    /// Starts the admin; with `fsize_limit`, its soft `RLIMIT_FSIZE` (the
    /// hard limit stays unlimited, so the test can raise it again).
    fn start_admin(&mut self, fsize_limit: Option<u64>) {
        let mut cmd = self.command("admin");
        cmd.stderr(Stdio::piped());
        if let Some(limit) = fsize_limit {
            // Writes past the limit fail with EFBIG, as on a full disk.
            common::limit_file_size(&mut cmd, limit, libc::SIG_IGN);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = self.admin_log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[admin] {line}");
                log.lock().unwrap().push(line);
            }
        });
        self.admin = Some(child);
        let addr = self.admin_addr;
        wait_until(Duration::from_secs(30), "admin /api/health", || {
            request(addr, "GET", "/api/health", None).is_ok_and(|r| r.status == 200)
        });
    }

    fn start_edge(&mut self) {
        let log = std::fs::File::create(self.work.path().join("edge.stderr")).unwrap();
        self.edge = Some(
            self.command("edge")
                .stderr(Stdio::from(log))
                .spawn()
                .unwrap(),
        );
        let addr = self.edge_addr;
        wait_until(Duration::from_secs(30), "edge /health", || {
            request(addr, "GET", "/health", None).is_ok_and(|r| r.status == 200)
        });
    }

    fn admin_pid(&self) -> libc::pid_t {
        self.admin.as_ref().unwrap().id() as libc::pid_t
    }

    /// Panics if the admin process has exited (killed by SIGXFSZ, say).
    fn assert_admin_alive(&mut self) {
        if let Some(status) = self.admin.as_mut().unwrap().try_wait().unwrap() {
            panic!("the admin exited: {status:?}");
        }
    }

    fn kill_admin(&mut self) {
        if let Some(mut c) = self.admin.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn kill_all(&mut self) {
        self.kill_admin();
        if let Some(mut c) = self.edge.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_lines(&self, needle: &str) -> usize {
        self.admin_log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    fn admin_seq(&self) -> u64 {
        call_api(self.admin_addr, "GET", "/api/health", None).json()["seq"]
            .as_u64()
            .unwrap()
    }

    /// Waits until the edge has applied everything the admin has.
    fn edge_caught_up(&self) {
        let want = self.admin_seq();
        let edge = self.edge_addr;
        wait_until(Duration::from_secs(30), "the edge to catch up", || {
            request(edge, "GET", "/health", None)
                .is_ok_and(|r| r.json()["table"]["seq"].as_u64() >= Some(want))
        });
    }

    /// Every link of the admin's listing: code → url.
    fn listing(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let mut cursor = String::new();
        for _ in 0..1000 {
            let page = call_api(
                self.admin_addr,
                "GET",
                &format!("/api/links?limit=1000&cursor={cursor}"),
                None,
            );
            assert_eq!(page.status, 200);
            let page = page.json();
            for l in page["links"].as_array().unwrap() {
                out.insert(
                    l["code"].as_str().unwrap().to_owned(),
                    l["url"].as_str().unwrap().to_owned(),
                );
            }
            match page["next_cursor"].as_str() {
                Some(c) => cursor = c.to_owned(),
                None => return out,
            }
        }
        panic!("the listing does not end");
    }

    /// Asserts that the edge redirects every link of `links` to its URL and
    /// answers 404 for every code of `absent`.
    fn edge_serves(&self, links: &BTreeMap<String, String>, absent: &BTreeSet<String>) {
        self.edge_caught_up();
        for (code, url) in links {
            let r = request(self.edge_addr, "GET", &format!("/{code}"), None).unwrap();
            assert_eq!(r.status, 302, "edge GET /{code}");
            assert_eq!(r.header("location"), Some(url.as_str()), "edge GET /{code}");
        }
        for code in absent {
            let r = request(self.edge_addr, "GET", &format!("/{code}"), None).unwrap();
            assert_eq!(
                r.status, 404,
                "edge GET /{code}: it got an error, it must not exist"
            );
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// What the creates of a test got.
#[derive(Default)]
struct Tally {
    attempted: usize,
    created: BTreeMap<String, String>,
    refused: BTreeMap<String, String>,
    /// Acknowledged deletes.
    deleted: BTreeSet<String>,
}

impl Tally {
    /// Codes the edge and the admin must not know.
    fn absent(&self) -> BTreeSet<String> {
        self.refused.keys().chain(&self.deleted).cloned().collect()
    }

    /// One create; `want_error` is the error code a refusal must have.
    fn create(&mut self, procs: &Procs, code: &str, want_error: &str) -> u16 {
        let url = format!("https://example.com/{code}");
        let r = call_api(
            procs.admin_addr,
            "POST",
            "/api/links",
            Some(&json!({"url": url, "code": code})),
        );
        self.attempted += 1;
        match r.status {
            201 => {
                self.created.insert(code.to_owned(), url);
            }
            507 | 503 => {
                let body = r.json();
                assert_eq!(body["error"]["code"], want_error, "{code}: {body}");
                assert_eq!(body["error"]["field"], Value::Null);
                assert!(r.header("retry-after").is_some(), "{code}: Retry-After");
                self.refused.insert(code.to_owned(), url);
            }
            other => panic!("{code}: {other} {:?}", String::from_utf8_lossy(&r.body)),
        }
        r.status
    }
}

/// Checks that writes fail without touching what exists: a bulk and a
/// PATCH (each a few KB: larger than any room left) of an acknowledged link
/// get `status`, and so does a DELETE unless `small_may_fit` (a full tmpfs
/// still has the rest of its last page for a record that small: then it
/// must have worked, and is recorded); the health check stays 200 but says
/// writes fail.
fn writes_refused(
    procs: &Procs,
    tally: &mut Tally,
    existing: &str,
    status: u16,
    code: &str,
    small_may_fit: bool,
) {
    let mut before = procs.listing();
    let long = "l".repeat(1500);
    for (method, path, body) in [
        (
            "PATCH",
            format!("/api/links/{existing}"),
            Some(json!({"url": format!("https://example.com/{long}")})),
        ),
        ("DELETE", format!("/api/links/{existing}"), None),
        (
            "POST",
            "/api/links/bulk".to_owned(),
            Some(json!({"links": [
                {"url": format!("https://example.com/{long}"), "code": "bulk1"},
                {"url": format!("https://example.com/{long}")},
            ]})),
        ),
    ] {
        let r = call_api(procs.admin_addr, method, &path, body.as_ref());
        if method == "DELETE" && small_may_fit && r.status == 204 {
            tally.created.remove(existing);
            tally.deleted.insert(existing.to_owned());
            before.remove(existing);
            continue;
        }
        assert_eq!(
            r.status,
            status,
            "{method} {path}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["error"]["code"], code);
        assert!(r.header("retry-after").is_some());
    }
    assert_eq!(procs.listing(), before);
    let health = call_api(procs.admin_addr, "GET", "/api/health", None);
    assert_eq!(health.status, 200);
    let health = health.json();
    assert_eq!(
        (health["status"].as_str(), health["error"].as_str()),
        (Some("degraded"), Some(code))
    );
    // The route needs no key: the probe's reason shows no server path.
    if let Some(reason) = health["write_probe"].as_str() {
        assert!(!reason.contains('/'), "{reason}");
    }
}

/// Creates links until compaction has run again (the manifest moves past
/// `after`), the admin having a compaction to retry.
fn until_compacted(procs: &Procs, tally: &mut Tally, data: &Path, after: u64, prefix: &str) {
    let dir = DataDir::new(data);
    let manifest_seq = || dir.read_manifest().unwrap().map_or(0, |m| m.seq);
    for i in 0..2000 {
        if manifest_seq() > after {
            return;
        }
        assert_eq!(tally.create(procs, &format!("{prefix}{i}"), "-"), 201);
        let start = Instant::now();
        // A compaction may be running: give it the time it takes.
        while manifest_seq() <= after && start.elapsed() < Duration::from_millis(50) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    panic!("compaction never ran again after {after}");
}

#[test]
fn rlimit_fsize_gives_507_and_writes_recover_without_a_restart() {
    let data_root = tempfile::tempdir().unwrap();
    let data = data_root.path().join("data");
    // Compactions are frequent, so that one runs (and fails) while the
    // admin is limited.
    let mut procs = Procs::new(&data, "  compact_every_records: 10\n");
    procs.start_admin(None);
    procs.start_edge();
    // 400 links (their snapshot's index has 1024 slots, so a snapshot of
    // them is some 3 KB larger than the log segment holding them), folded
    // into a snapshot.
    let mut tally = Tally::default();
    let items: Vec<Value> = (0..400)
        .map(|i| json!({"url": format!("https://example.com/pre{i}"), "code": format!("pre{i}")}))
        .collect();
    let r = call_api(
        procs.admin_addr,
        "POST",
        "/api/links/bulk",
        Some(&json!({"links": items})),
    );
    assert_eq!(r.status, 200);
    for i in 0..400 {
        tally
            .created
            .insert(format!("pre{i}"), format!("https://example.com/pre{i}"));
    }
    let dir = DataDir::new(&data);
    wait_until(Duration::from_secs(30), "the first compaction", || {
        dir.read_manifest().unwrap().is_some_and(|m| m.seq == 400)
    });
    procs.kill_admin();

    // The admin again, its files limited to just above the log segment
    // holding the 400 links (about the snapshot's size): appends fit for a
    // while, the next compaction's snapshot (more links) does not. If the
    // compaction rolled the log to an empty segment before the admin was
    // killed, the limit is the snapshot's size.
    let manifest = dir.read_manifest().unwrap().unwrap();
    let snapshot_len = std::fs::metadata(dir.snapshot_dir().join(&manifest.snapshot))
        .unwrap()
        .len();
    let segment = active_len(&data);
    let limit = segment.max(snapshot_len - 2000) + 2000;
    procs.start_admin(Some(limit));
    let pid = procs.admin_pid();
    let snapshot_before = dir.read_manifest().unwrap().unwrap().seq;

    // Creates from 4 threads until a dozen were refused.
    let shared = Arc::new(Mutex::new(tally));
    let admin = procs.admin_addr;
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let shared = shared.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    if shared.lock().unwrap().refused.len() >= 12 {
                        return;
                    }
                    let code = format!("fill{t}x{i}");
                    let url = format!("https://example.com/{code}");
                    let r = call_api(
                        admin,
                        "POST",
                        "/api/links",
                        Some(&json!({"url": url, "code": code})),
                    );
                    let mut tally = shared.lock().unwrap();
                    tally.attempted += 1;
                    match r.status {
                        201 => {
                            tally.created.insert(code, url);
                        }
                        507 => {
                            let body = r.json();
                            assert_eq!(body["error"]["code"], "insufficient_storage", "{body}");
                            assert!(r.header("retry-after").is_some());
                            tally.refused.insert(code, url);
                        }
                        other => panic!("{code}: {other} {:?}", String::from_utf8_lossy(&r.body)),
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let mut tally = Arc::into_inner(shared).unwrap().into_inner().unwrap();
    let (filled_201, filled_507) = (tally.created.len() - 400, tally.refused.len());
    assert!(filled_507 >= 1, "no create was refused under RLIMIT_FSIZE");
    assert!(filled_201 >= 1, "no create fit under the limit");
    procs.assert_admin_alive();
    assert!(active_len(&data) <= limit);
    // The limit down to the segment's length: not one more byte fits.
    let exact = libc::rlimit {
        rlim_cur: active_len(&data),
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit on a child we own, with a valid struct.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &exact, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    writes_refused(
        &procs,
        &mut tally,
        "pre0",
        507,
        "insufficient_storage",
        false,
    );
    // The edge serves every acknowledged link, none of the refused ones.
    let refused = tally.absent();
    procs.edge_serves(&tally.created, &refused);
    assert_eq!(procs.listing(), tally.created);
    // A compaction ran into the limit (EFBIG, and SIGXFSZ, ignored).
    let compaction_failures = procs.log_lines("background compaction failed");
    assert!(
        compaction_failures >= 1,
        "no compaction was tried while limited"
    );
    procs.assert_admin_alive();

    // Space returns: raise the running admin's soft limit.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit on a child we own, with a valid struct.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &unlimited, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    // Half the refused codes are retried (at once 201), the rest never.
    let retried: Vec<String> = tally.refused.keys().step_by(2).cloned().collect();
    for code in &retried {
        assert_eq!(
            tally.create(&procs, code, "-"),
            201,
            "{code} after space returned"
        );
        tally.refused.remove(code);
    }
    until_health_ok(&procs);
    // The compaction that failed runs again, and works.
    until_compacted(&procs, &mut tally, &data, snapshot_before, "post");
    let refused = tally.absent();
    assert_eq!(procs.listing(), tally.created);
    procs.edge_serves(&tally.created, &refused);

    // And after a restart, exactly the same.
    procs.kill_admin();
    procs.start_admin(None);
    let found = procs.listing();
    assert_eq!(found, tally.created);
    procs.edge_serves(&tally.created, &refused);
    println!(
        "RLIMIT_FSIZE: soft limit {limit} bytes (segment {segment}, snapshot {snapshot_len}); creates while limited: {} attempted from 4 threads, \
         201: {filled_201}, 507: {filled_507} (then bulk, PATCH, DELETE: 507); after raising the limit: {} retried (all 201), \
         {} more created; compactions failed while limited: {compaction_failures}; \
         links found after recovery and after a restart: {}/{} expected; refused and never retried, absent: {}",
        filled_201 + filled_507,
        retried.len(),
        tally.attempted - (filled_201 + filled_507) - retried.len(),
        found.len(),
        tally.created.len(),
        refused.len(),
    );
}

// ------------------------------------------------------------ mounts

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// Tmpfs mounts made by a test, unmounted (innermost first) when dropped.
/// Declare it before the processes using it, so that they are killed first.
struct Mounts(Vec<PathBuf>);

impl Mounts {
    /// Mounts a tmpfs of `size` bytes at `at`; `None` (and a "skipped" line)
    /// when mounting is not permitted here.
    fn tmpfs(&mut self, at: &Path, size: u64) -> std::io::Result<()> {
        std::fs::create_dir_all(at)?;
        let opts = CString::new(format!("size={size},mode=0755")).unwrap();
        // SAFETY: valid NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                cstr(at).as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.0.push(at.to_owned());
        Ok(())
    }

    fn remount(at: &Path, read_only: bool) -> std::io::Result<()> {
        let flags = libc::MS_REMOUNT | if read_only { libc::MS_RDONLY } else { 0 };
        // SAFETY: valid NUL-terminated path; no data.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                cstr(at).as_ptr(),
                std::ptr::null(),
                flags,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for at in self.0.iter().rev() {
            let _ = Self::remount(at, false);
            // SAFETY: valid NUL-terminated path.
            unsafe {
                if libc::umount2(cstr(at).as_ptr(), 0) != 0 {
                    libc::umount2(cstr(at).as_ptr(), libc::MNT_DETACH);
                }
            }
        }
    }
}

/// Polls the admin's `/api/health` until it says "ok" (bounded). Its write
/// probe runs in the background at most once a second and a health check
/// answers with the last probe's result, so the first checks after the disk
/// recovered may still report a probe made while it failed.
fn until_health_ok(procs: &Procs) {
    let start = Instant::now();
    loop {
        let health = call_api(procs.admin_addr, "GET", "/api/health", None).json();
        if health["status"] == "ok" {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the admin's health 30 s after the disk recovered: {health}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A mount guard, or `None` after recording that `test` (its function's
/// name) is skipped here (see [`common::skip`]).
fn mounts_or_skip(test: &str, probe_dir: &Path) -> Option<Mounts> {
    let mut probe = Mounts(Vec::new());
    match probe.tmpfs(&probe_dir.join("probe"), 64 * 1024) {
        Ok(()) => {
            drop(probe);
            Some(Mounts(Vec::new()))
        }
        Err(e) => {
            common::skip(test, &format!("mount not permitted ({e})"));
            None
        }
    }
}

#[test]
fn a_full_tmpfs_gives_507_and_writes_recover_when_space_is_freed() {
    let root = tempfile::tempdir().unwrap();
    let Some(mut mounts) = mounts_or_skip(
        "a_full_tmpfs_gives_507_and_writes_recover_when_space_is_freed",
        root.path(),
    ) else {
        return;
    };
    let mnt = root.path().join("mnt");
    mounts.tmpfs(&mnt, 1 << 20).unwrap();
    let data = mnt.join("data");
    let mut procs = Procs::new(&data, "  compact_every_records: 10\n");
    procs.start_admin(None);
    procs.start_edge();
    let mut tally = Tally::default();
    for i in 0..30 {
        assert_eq!(tally.create(&procs, &format!("pre{i}"), "-"), 201);
    }
    let dir = DataDir::new(&data);
    wait_until(Duration::from_secs(30), "a compaction", || {
        dir.read_manifest().unwrap().is_some_and(|m| m.seq >= 20)
    });
    let snapshot_before = dir.read_manifest().unwrap().unwrap().seq;

    // Fill the file system.
    let filler_path = mnt.join("filler");
    let mut filler = std::fs::File::create(&filler_path).unwrap();
    for chunk in [64 * 1024, 4096, 512, 1] {
        let buf = vec![0u8; chunk];
        for _ in 0..100_000 {
            if filler.write_all(&buf).is_err() {
                break;
            }
        }
    }
    drop(filler);
    let mut enospc = 0;
    let mut filled_201 = 0;
    for i in 0..500 {
        match tally.create(&procs, &format!("fill{i}"), "insufficient_storage") {
            201 => filled_201 += 1,
            _ => enospc += 1,
        }
        if enospc >= 10 {
            break;
        }
    }
    assert!(enospc >= 10, "the full tmpfs refused {enospc} creates");
    procs.assert_admin_alive();
    writes_refused(
        &procs,
        &mut tally,
        "pre0",
        507,
        "insufficient_storage",
        true,
    );
    let refused = tally.absent();
    procs.edge_serves(&tally.created, &refused);
    assert_eq!(procs.listing(), tally.created);

    // Space is freed.
    std::fs::remove_file(&filler_path).unwrap();
    let retried: Vec<String> = tally.refused.keys().step_by(2).cloned().collect();
    for code in &retried {
        assert_eq!(
            tally.create(&procs, code, "-"),
            201,
            "{code} after space returned"
        );
        tally.refused.remove(code);
    }
    until_compacted(&procs, &mut tally, &data, snapshot_before, "post");
    let compaction_failures = procs.log_lines("background compaction failed");
    let refused = tally.absent();
    assert_eq!(procs.listing(), tally.created);
    procs.edge_serves(&tally.created, &refused);
    procs.kill_admin();
    procs.start_admin(None);
    let found = procs.listing();
    assert_eq!(found, tally.created);
    procs.edge_serves(&tally.created, &refused);
    let leftovers: Vec<_> = std::fs::read_dir(data.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    println!(
        "ENOSPC (1 MiB tmpfs): creates attempted {}, 201 while full: {filled_201}, 507: {enospc}; \
         retried after freeing space: {} (all 201); compactions failed: {compaction_failures}; \
         links found after recovery and restart: {}/{}",
        tally.attempted,
        retried.len(),
        found.len(),
        tally.created.len()
    );
    drop(procs);
    drop(mounts);
}

/// Sets or clears the immutable attribute (`chattr +i`) of `path`.
fn set_immutable(path: &Path, on: bool) -> std::io::Result<()> {
    const FS_IMMUTABLE_FL: libc::c_int = 0x10;
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS/SETFLAGS read and write one int.
    unsafe {
        if libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if on {
            flags |= FS_IMMUTABLE_FL;
        } else {
            flags &= !FS_IMMUTABLE_FL;
        }
        if libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn newest_segment(data: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(data.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segs.sort();
    segs.pop().unwrap()
}

/// Creates links until a background compaction holds every record and has
/// rolled the log to an empty segment after it: from then on, with no
/// write, no compaction runs and the active segment (the newest) stays the
/// same.
fn until_log_at_rest(procs: &Procs, tally: &mut Tally, data: &Path, prefix: &str) {
    let dir = DataDir::new(data);
    for i in 0..200 {
        let start = Instant::now();
        loop {
            let seq = procs.admin_seq();
            let manifest = dir.read_manifest().unwrap().map_or(0, |m| m.seq);
            let segment = newest_segment(data);
            // The roll is the compaction's last change to the log.
            if manifest == seq && segment.ends_with(format!("{:020}.log", seq + 1)) {
                return;
            }
            // A compaction may be running: give it the time it takes.
            if start.elapsed() > Duration::from_millis(50) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(tally.create(procs, &format!("{prefix}{i}"), "-"), 201);
    }
    panic!(
        "no compaction caught up with the log: seq {}, manifest {:?}, newest segment {}",
        procs.admin_seq(),
        dir.read_manifest().unwrap(),
        newest_segment(data).display(),
    );
}

#[test]
fn a_read_only_data_dir_gives_503_and_writes_recover() {
    let root = tempfile::tempdir().unwrap();
    let Some(mut mounts) = mounts_or_skip(
        "a_read_only_data_dir_gives_503_and_writes_recover",
        root.path(),
    ) else {
        return;
    };
    // The data dir on a tmpfs, its log/ and snapshots/ each a tmpfs of
    // their own, so that each can be made read-only while the admin holds
    // its writer lock on the data dir.
    let data = root.path().join("mnt");
    mounts.tmpfs(&data, 8 << 20).unwrap();
    mounts.tmpfs(&data.join("log"), 8 << 20).unwrap();
    mounts.tmpfs(&data.join("snapshots"), 8 << 20).unwrap();
    let mut procs = Procs::new(&data, "  compact_every_records: 10\n");
    procs.start_admin(None);
    procs.start_edge();
    let mut tally = Tally::default();
    for i in 0..25 {
        assert_eq!(tally.create(&procs, &format!("pre{i}"), "-"), 201);
    }
    // The segment made immutable below must stay the active one: no
    // compaction may roll the log in between.
    until_log_at_rest(&procs, &mut tally, &data, "rest");
    let mut figures = Vec::new();

    // 1. Linux refuses to remount read-only a file system on which a file
    //    is open for writing: the admin's log segment.
    let busy = Mounts::remount(&data.join("log"), true);
    figures.push(format!(
        "remount,ro of log/ under a running admin: {busy:?}"
    ));
    let remounted_early = busy.is_ok();
    if remounted_early {
        // (Some kernel let it through: the admin then sees EROFS at once.)
        assert_eq!(tally.create(&procs, "early", "storage_error"), 503);
        Mounts::remount(&data.join("log"), false).unwrap();
    } else {
        assert_eq!(busy.unwrap_err().raw_os_error(), Some(libc::EBUSY));
    }

    // 2. The segment made immutable: every write is EPERM, 503.
    let segment = newest_segment(&data);
    let immutable = set_immutable(&segment, true);
    figures.push(format!("chattr +i on the segment: {immutable:?}"));
    let mut eperm = 0;
    if immutable.is_ok() {
        for i in 0..5 {
            assert_eq!(
                tally.create(&procs, &format!("ro{i}"), "storage_error"),
                503
            );
            eperm += 1;
        }
        let r = call_api(
            procs.admin_addr,
            "POST",
            "/api/links",
            Some(&json!({"url": "https://example.com/x", "code": "eperm"})),
        );
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("Operation not permitted"),
            "{:?}",
            String::from_utf8_lossy(&r.body)
        );
        tally
            .refused
            .insert("eperm".into(), "https://example.com/x".into());
        writes_refused(&procs, &mut tally, "pre0", 503, "storage_error", false);
        set_immutable(&segment, false).unwrap();
    }

    // 3. After a failed write the admin has closed the segment: log/ can
    //    now go read-only for real, and every write is EROFS, 503.
    let mut erofs = 0;
    let remount = Mounts::remount(&data.join("log"), true);
    figures.push(format!(
        "remount,ro of log/ after a failed write: {remount:?}"
    ));
    if immutable.is_ok() {
        remount.as_ref().unwrap();
    }
    if remount.is_ok() {
        for i in 0..5 {
            assert_eq!(
                tally.create(&procs, &format!("rofs{i}"), "storage_error"),
                503
            );
            erofs += 1;
        }
        let r = call_api(
            procs.admin_addr,
            "POST",
            "/api/links",
            Some(&json!({"url": "https://example.com/y", "code": "erofs"})),
        );
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("Read-only file system"),
            "{:?}",
            String::from_utf8_lossy(&r.body)
        );
        tally
            .refused
            .insert("erofs".into(), "https://example.com/y".into());
        writes_refused(&procs, &mut tally, "pre0", 503, "storage_error", false);
        procs.edge_serves(&tally.created, &tally.absent());
        Mounts::remount(&data.join("log"), false).unwrap();
    }
    if !remounted_early && eperm + erofs == 0 {
        // Mounts are permitted here, but neither fault could be made (no
        // CAP_LINUX_IMMUTABLE, say): no 503 was checked.
        common::skip(
            "a_read_only_data_dir_gives_503_and_writes_recover",
            &format!(
                "no read-only fault could be made (chattr +i: {immutable:?}; remount,ro: \
                 {remount:?}): no 503 checked"
            ),
        );
    }
    procs.assert_admin_alive();

    // 4. Writable again: the refused creates are retried, at once 201.
    let retried: Vec<String> = tally.refused.keys().cloned().collect();
    for code in &retried {
        assert_eq!(
            tally.create(&procs, code, "-"),
            201,
            "{code} after remount,rw"
        );
        tally.refused.remove(code);
    }
    until_health_ok(&procs);

    // 5. snapshots/ read-only (EROFS; nothing holds it open for writing):
    //    compactions fail, writes go on, nothing is lost.
    let dir = DataDir::new(&data);
    // (A compaction writing there would make it busy: poll.)
    wait_until(Duration::from_secs(30), "remount,ro of snapshots/", || {
        Mounts::remount(&data.join("snapshots"), true).is_ok()
    });
    let failed_before = procs.log_lines("background compaction failed");
    for i in 0..200 {
        assert_eq!(tally.create(&procs, &format!("snap{i}"), "-"), 201);
        // A compaction may be running: give it the time it takes.
        let start = Instant::now();
        while procs.log_lines("background compaction failed") == failed_before
            && start.elapsed() < Duration::from_millis(50)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        if procs.log_lines("background compaction failed") > failed_before {
            break;
        }
    }
    let compaction_failures = procs.log_lines("background compaction failed") - failed_before;
    assert!(
        compaction_failures >= 1,
        "no compaction ran into the read-only snapshots/"
    );
    // A failed compaction leaves a readable data dir that holds every link.
    let view = dir.load_view(true).unwrap();
    assert_eq!(view.len() as usize, tally.created.len());
    let snapshot_before = dir.read_manifest().unwrap().map_or(0, |m| m.seq);
    procs.assert_admin_alive();
    Mounts::remount(&data.join("snapshots"), false).unwrap();
    until_compacted(&procs, &mut tally, &data, snapshot_before, "later");

    let refused = tally.absent();
    assert!(refused.is_empty());
    assert_eq!(procs.listing(), tally.created);
    procs.edge_serves(&tally.created, &refused);
    procs.kill_admin();
    procs.start_admin(None);
    let found = procs.listing();
    assert_eq!(found, tally.created);
    procs.edge_serves(&tally.created, &BTreeSet::new());
    println!(
        "read-only: {}; 503 with EPERM: {eperm}, 503 with EROFS: {erofs}; retried after remount,rw: {} (all 201); \
         compactions failed on read-only snapshots/: {compaction_failures}; links found after recovery and restart: {}/{}",
        figures.join("; "),
        retried.len(),
        found.len(),
        tally.created.len()
    );
    drop(procs);
    drop(mounts);
}

/// The edge's access log on a disk that fills up in the middle of a long
/// line (a 100 KB user agent, which Pingora's 1 MiB header limit lets
/// through): the line is lost and counted in `access_log_dropped_total`,
/// and nothing of it stays in the file. Before, the part written stayed
/// without its newline and the next line, once there was room again, was
/// glued to it: a line that is not JSON (found by review). In process,
/// on a 256 KiB tmpfs; skipped without `mount`.
#[test]
fn an_access_log_on_a_full_disk_never_holds_part_of_a_line() {
    use uload::edge::access_log::{AccessLog, AccessRecord, open_file, timestamp};
    let root = tempfile::tempdir().unwrap();
    let Some(mut mounts) = mounts_or_skip(
        "an_access_log_on_a_full_disk_never_holds_part_of_a_line",
        root.path(),
    ) else {
        return;
    };
    let at = root.path().join("fs");
    mounts.tmpfs(&at, 256 * 1024).unwrap();
    let path = at.join("access.log");
    let file = open_file(&path).unwrap();
    // Fill the file system but for 32 KiB.
    let filler = at.join("filler");
    let _ = std::fs::File::create(&filler)
        .unwrap()
        .write_all(&vec![b'x'; 256 * 1024]);
    let full = std::fs::metadata(&filler).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap()
        .set_len(full - 32 * 1024)
        .unwrap();
    let dropped = prometheus::IntCounter::new("d", "d").unwrap();
    let log = AccessLog::start(file, 16, dropped.clone()).unwrap();
    let ts = timestamp(1_795_726_533_120);
    let record = |user_agent| AccessRecord {
        ts: &ts,
        client: "203.0.113.7",
        method: "GET",
        path: "/abc",
        status: 302,
        route: "redirect",
        duration_us: 41,
        user_agent: Some(user_agent),
    };
    let agent = "a".repeat(100_000);
    log.log(&record(&agent));
    common::wait_until(
        Duration::from_secs(10),
        "the long line counted as lost",
        || dropped.get() == 1,
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "part of a line");
    // Room again: the next request is logged, on a line of its own.
    std::fs::remove_file(&filler).unwrap();
    log.log(&record("curl/8"));
    let mut text = String::new();
    common::wait_until(Duration::from_secs(10), "the next line written", || {
        text = std::fs::read_to_string(&path).unwrap();
        text.ends_with('\n')
    });
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:.200}")))
        .collect();
    assert_eq!(lines.len(), 1, "{text:.300}");
    assert_eq!(lines[0]["user_agent"], "curl/8");
    assert_eq!(dropped.get(), 1);
}
