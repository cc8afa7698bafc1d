//! Fault-injection helpers for `tests/chaos_*.rs` and `tests/deploy.rs`:
//! edges with their own config and per-test pid file and upgrade socket,
//! a bounded multi-threaded redirect load with latency figures, stand-in
//! admins that hang or answer late, a keep-alive HTTP/1.1 connection, signals,
//! and a seeded random generator. Include with
//! `#[path = "common/chaos.rs"] mod chaos;` next to `mod common;`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::{Response, free_port, request, uload_command, wait_until};

/// A loopback address nobody listens on right now.
pub fn free_addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

// ---------------------------------------------------------------------------
// Processes and signals

/// Whether `pid` runs (a zombie does not: it exited and waits to be reaped).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(") ")
                .and_then(|(_, rest)| rest.split(' ').next()),
            Some("Z") | Some("X") | None
        ),
        Err(_) => false,
    }
}

/// Sends `sig` (`TERM`, `QUIT`, `KILL`, ...) to `pid`.
pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig} {pid}");
}

/// Polls until `pid` is gone (bounded); returns how long that took.
pub fn wait_gone(pid: u32, limit: Duration) -> Duration {
    let start = Instant::now();
    wait_until(limit, &format!("pid {pid} to exit"), || !alive(pid));
    start.elapsed()
}

/// A child process that is SIGKILLed (and reaped) when dropped.
pub struct Proc(pub Option<Child>);

impl Proc {
    pub fn id(&self) -> u32 {
        self.0.as_ref().expect("process taken").id()
    }

    /// SIGKILL now, and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits (bounded) for the process to exit by itself; returns its status.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        let child = self.0.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.0 = None;
                return Some(status);
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Processes this test started indirectly (through a script), by pid:
/// SIGKILLed when dropped if they still run a `uload` binary.
#[derive(Default)]
pub struct Pids(pub Mutex<Vec<u32>>);

impl Pids {
    pub fn add(&self, pid: u32) {
        self.0.lock().unwrap().push(pid);
    }
}

impl Drop for Pids {
    fn drop(&mut self) {
        for &pid in self.0.lock().unwrap().iter() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if alive(pid) && String::from_utf8_lossy(&cmdline).contains("uload") {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Edges with their own config

/// Pingora's grace settings for a test edge.
#[derive(Debug, Clone, Copy)]
pub struct Grace {
    pub grace_period_seconds: u64,
    pub graceful_shutdown_timeout_seconds: u64,
}

impl Default for Grace {
    fn default() -> Self {
        Self {
            grace_period_seconds: 1,
            graceful_shutdown_timeout_seconds: 1,
        }
    }
}

/// A temp dir with a data dir, `uload.yaml` and `pingora.yaml` (pid file and
/// upgrade socket inside the temp dir), for edges run by the test itself.
pub struct EdgeSetup {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub addr: SocketAddr,
    pub admin_upstreams: Vec<SocketAddr>,
}

impl EdgeSetup {
    /// `edge_extra`: lines appended to the `edge:` section, indented two
    /// spaces (e.g. `"  admin_read_timeout_ms: 300\n"`).
    pub fn new(admin_upstreams: &[SocketAddr], edge_extra: &str, grace: Grace) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("uload-chaos.")
            .tempdir_in(
                std::env::var_os("CHAOS_TMPDIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(std::env::temp_dir),
            )
            .unwrap();
        let addr = free_addr();
        let config = dir.path().join("uload.yaml");
        std::fs::write(
            dir.path().join("pingora.yaml"),
            format!(
                "---\nversion: 1\nthreads: 2\npid_file: {0}/edge.pid\nupgrade_sock: {0}/upgrade.sock\n\
                 grace_period_seconds: {1}\ngraceful_shutdown_timeout_seconds: {2}\n",
                dir.path().display(),
                grace.grace_period_seconds,
                grace.graceful_shutdown_timeout_seconds,
            ),
        )
        .unwrap();
        let upstreams: Vec<String> = admin_upstreams.iter().map(|a| format!("\"{a}\"")).collect();
        std::fs::write(
            &config,
            format!(
                "data_dir: {data}\npublic_base_url: http://{addr}\nedge:\n  listen: {addr}\n  \
                 admin_upstreams: [{upstreams}]\n  health_check_interval_ms: 100\n  \
                 pingora_conf: pingora.yaml\n{edge_extra}",
                data = dir.path().join("data").display(),
                upstreams = upstreams.join(", "),
            ),
        )
        .unwrap();
        Self {
            dir,
            config,
            addr,
            admin_upstreams: admin_upstreams.to_vec(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn upgrade_sock(&self) -> PathBuf {
        self.dir.path().join("upgrade.sock")
    }

    /// `uload edge [extra...] --config ...`, stderr to `edge-N.log` in the
    /// temp dir (see [`EdgeSetup::logs`]).
    pub fn spawn_edge(&self, extra: &[&str]) -> Proc {
        let log = self.new_log("edge");
        Proc(Some(
            uload_command(self.path())
                .arg("edge")
                .args(extra)
                .arg("--config")
                .arg(&self.config)
                .env(
                    "RUST_LOG",
                    std::env::var("CHAOS_RUST_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        ))
    }

    /// Starts an edge and waits (bounded) until its /health answers 200.
    pub fn start_edge(&self) -> Proc {
        let mut edge = self.spawn_edge(&[]);
        let addr = self.addr;
        let start = Instant::now();
        while !request(addr, "GET", "/health", &[], b"").is_ok_and(|r| r.status == 200) {
            if let Some(status) = edge.wait_exit(Duration::ZERO) {
                panic!("edge exited: {status}\n{}", self.logs());
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "edge /health\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        edge
    }

    /// A new log file in the temp dir, opened for appending.
    pub fn new_log(&self, what: &str) -> std::fs::File {
        let n = std::fs::read_dir(self.path()).unwrap().count();
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join(format!("{what}-{n}.log")))
            .unwrap()
    }

    /// Every `*.log` in the temp dir (for failure messages).
    pub fn logs(&self) -> String {
        let mut names: Vec<_> = std::fs::read_dir(self.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        names.sort();
        let mut out = String::new();
        for p in names {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("--- {} (last lines)\n", p.display()));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Bounded redirect load

/// What a redirect load saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub ok: u64,
    pub failed: u64,
    /// The first few failures, as text.
    pub failures: Vec<String>,
    /// Latency of every successful request, microseconds, sorted.
    pub latencies_us: Vec<u64>,
    pub elapsed: Duration,
}

impl LoadReport {
    /// The `p`-th percentile (0..=100) of the latencies, in microseconds.
    pub fn percentile_us(&self, p: f64) -> u64 {
        percentile(&self.latencies_us, p)
    }

    /// One line of figures.
    pub fn summary(&self) -> String {
        format!(
            "{} requests in {:.1?}, {} failed; latency p50 {} us, p90 {} us, p99 {} us, p99.9 {} us, max {} us",
            self.ok + self.failed,
            self.elapsed,
            self.failed,
            self.percentile_us(50.0),
            self.percentile_us(90.0),
            self.percentile_us(99.0),
            self.percentile_us(99.9),
            self.latencies_us.last().copied().unwrap_or(0),
        )
    }
}

/// The `p`-th percentile (0..=100) of sorted values (0 when empty).
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Threads requesting redirects (one connection per request, like a crowd
/// of browsers) and checking status and `Location`, until stopped, until
/// each made `per_thread` requests, or until `cap` passes.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    threads: Vec<JoinHandle<LoadReport>>,
    start: Instant,
}

impl Load {
    /// `links`: (path, expected status, expected Location); thread `i` starts
    /// at link `i` and walks the list.
    pub fn start(
        addr: SocketAddr,
        links: Arc<Vec<(String, u16, String)>>,
        threads: usize,
        per_thread: u64,
        cap: Duration,
    ) -> Self {
        assert!(!links.is_empty());
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let threads = (0..threads)
            .map(|t| {
                let (stop, ok, failed, links) =
                    (stop.clone(), ok.clone(), failed.clone(), links.clone());
                std::thread::spawn(move || {
                    let mut report = LoadReport::default();
                    for k in 0..per_thread {
                        if stop.load(Ordering::Relaxed) || start.elapsed() > cap {
                            break;
                        }
                        let (path, status, location) = &links[(t + k as usize) % links.len()];
                        let t0 = Instant::now();
                        let result = request(addr, "GET", path, &[], b"");
                        let took = t0.elapsed().as_micros() as u64;
                        match result {
                            Ok(r)
                                if r.status == *status
                                    && r.header("location") == Some(location.as_str()) =>
                            {
                                report.ok += 1;
                                report.latencies_us.push(took);
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => {
                                report.failed += 1;
                                failed.fetch_add(1, Ordering::Relaxed);
                                if report.failures.len() < 5 {
                                    report.failures.push(format!(
                                        "GET {path} after {:?}: {}",
                                        start.elapsed(),
                                        describe(&other)
                                    ));
                                }
                            }
                        }
                    }
                    report
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failed,
            threads,
            start,
        }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Waits (bounded) until `n` more requests have succeeded: the load
    /// went on meanwhile. Panics if they are not seen within `limit`, or if
    /// every thread has ended first (its count made or its time cap
    /// passed): a phase "under load" would have had none.
    #[track_caller]
    pub fn wait_more(&self, n: u64, limit: Duration) {
        let target = self.ok() + n;
        let start = Instant::now();
        while self.ok() < target {
            assert!(
                start.elapsed() < limit,
                "load: {} more successes not seen within {limit:?} ({} ok, {} failed)",
                n,
                self.ok(),
                self.failed()
            );
            let finished = self.threads.iter().all(|t| t.is_finished());
            assert!(
                !finished || self.ok() >= target,
                "load: every thread ended ({:.1?} after the start) before {n} more successes \
                 ({} ok, {} failed): raise its count or its time cap",
                self.start.elapsed(),
                self.ok(),
                self.failed()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops the threads and merges what they saw.
    pub fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        self.join()
    }

    /// Waits until every thread made its requests (or the cap passed) and
    /// merges what they saw.
    pub fn join(mut self) -> LoadReport {
        let mut all = LoadReport::default();
        for t in std::mem::take(&mut self.threads) {
            let r = t.join().unwrap();
            all.ok += r.ok;
            all.failed += r.failed;
            all.failures.extend(r.failures);
            all.latencies_us.extend(r.latencies_us);
        }
        all.elapsed = self.start.elapsed();
        all.latencies_us.sort_unstable();
        all
    }
}

/// A load dropped without [`Load::stop`] or [`Load::join`] (a test that
/// failed halfway) stops its threads rather than run on to their cap.
impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn describe(r: &std::io::Result<Response>) -> String {
    match r {
        Ok(r) => format!(
            "{} location={:?} body={:?}",
            r.status,
            r.header("location"),
            String::from_utf8_lossy(&r.body)
        ),
        Err(e) => format!("error: {e}"),
    }
}

// ---------------------------------------------------------------------------
// Stand-in admins

/// How a [`FakeAdmin`] treats requests.
#[derive(Debug, Clone, Copy)]
pub enum FakeMode {
    /// Reads the request and never answers (until the fake is dropped).
    Hung,
    /// Answers `200 {}` after this long.
    Slow(Duration),
}

/// A stand-in admin on a loopback port: `GET /api/health` is answered at
/// once with 200 when `health_ok`, else treated like every other request,
/// per `mode`. Bounded: at most 10,000 connections, 120 s.
pub struct FakeAdmin {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Requests other than the health check that have arrived.
    pub requests: Arc<AtomicU64>,
    /// Health checks that have arrived.
    pub health_checks: Arc<AtomicU64>,
}

impl FakeAdmin {
    pub fn start(mode: FakeMode, health_ok: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let health_checks = Arc::new(AtomicU64::new(0));
        {
            let (stop, requests, health_checks) =
                (stop.clone(), requests.clone(), health_checks.clone());
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut accepted = 0;
                while !stop.load(Ordering::Relaxed)
                    && accepted < 10_000
                    && start.elapsed() < Duration::from_secs(120)
                {
                    let stream = match listener.accept() {
                        Ok((s, _)) => s,
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(2));
                            continue;
                        }
                    };
                    accepted += 1;
                    let (stop, requests, health_checks) =
                        (stop.clone(), requests.clone(), health_checks.clone());
                    std::thread::spawn(move || {
                        serve_fake(stream, mode, health_ok, &stop, &requests, &health_checks)
                    });
                }
            });
        }
        Self {
            addr,
            stop,
            requests,
            health_checks,
        }
    }
}

impl Drop for FakeAdmin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_fake(
    stream: TcpStream,
    mode: FakeMode,
    health_ok: bool,
    stop: &AtomicBool,
    requests: &AtomicU64,
    health_checks: &AtomicU64,
) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    // Requests on one connection, one after another (the edge reuses them).
    for _ in 0..1000 {
        let mut first = String::new();
        if reader.read_line(&mut first).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((n, v)) = line.split_once(':')
                && n.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let health = first.starts_with("GET /api/health ");
        if health {
            health_checks.fetch_add(1, Ordering::Relaxed);
        } else {
            requests.fetch_add(1, Ordering::Relaxed);
        }
        if !(health && health_ok) {
            let wait = match mode {
                FakeMode::Hung => Duration::from_secs(120),
                FakeMode::Slow(d) => d,
            };
            let start = Instant::now();
            while start.elapsed() < wait {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let answer = if health {
            &b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{\"status\":\"ok\"}"[..]
        } else {
            &b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"[..]
        };
        if stream.write_all(answer).is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// A keep-alive HTTP/1.1 connection

/// How reading an answer on a kept-alive connection ended.
#[derive(Debug)]
pub enum Reply {
    /// A whole response.
    Whole(Response),
    /// The server closed the connection before sending any byte of a response.
    ClosedBeforeAnswer,
    /// The connection was reset before any byte of a response came.
    ResetBeforeAnswer(String),
    /// Anything else: a reset, or a response cut short (with what was read).
    Broken(String),
}

/// How an idle kept-alive connection ended (see [`Conn::idle_end`]).
#[derive(Debug)]
pub enum IdleEnd {
    /// The server closed it cleanly (FIN).
    Closed,
    /// The server reset it.
    Reset(String),
    /// Still open after the wait.
    Open,
    /// The server sent bytes nobody asked for.
    Data(String),
}

/// One client connection, kept open across requests.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        Self::from_stream(stream)
    }

    /// A connection made by the caller (e.g. with socket options set
    /// before connecting).
    pub fn from_stream(stream: TcpStream) -> std::io::Result<Self> {
        stream.set_read_timeout(Some(Duration::from_secs(15)))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::new(),
        })
    }

    /// Writes raw bytes (a whole request, or a piece of one).
    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Shuts the client's sending side (a half-close), reading stays open.
    pub fn shut_write(&self) -> std::io::Result<()> {
        self.stream.shutdown(std::net::Shutdown::Write)
    }

    /// A keep-alive request head for `path` with extra header lines.
    pub fn head(method: &str, path: &str, extra: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: uload-test\r\n");
        for (n, v) in extra {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        bytes
    }

    /// Reads one response (Content-Length framed, as the edge and the admin
    /// answer), or says how the connection ended instead.
    pub fn read_answer(&mut self, head_request: bool) -> Reply {
        let mut chunk = [0u8; 8192];
        // Where the search for the end of the head goes on from (a long head
        // comes in many reads; each byte is looked at about once).
        let mut from = 0;
        let end = loop {
            if let Some(i) = self.buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
                break from + i;
            }
            from = self.buf.len().saturating_sub(3);
            match self.stream.read(&mut chunk) {
                Ok(0) if self.buf.is_empty() => return Reply::ClosedBeforeAnswer,
                Ok(0) => return Reply::Broken(format!("EOF in head: {:?}", self.text())),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if self.buf.is_empty() && e.kind() != std::io::ErrorKind::WouldBlock => {
                    return Reply::ResetBeforeAnswer(e.to_string());
                }
                Err(e) => return Reply::Broken(format!("{e} after {:?}", self.text())),
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let Some(status) = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
        else {
            return Reply::Broken(format!("bad status line: {head:?}"));
        };
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let length = if head_request {
            0
        } else {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0)
        };
        let start = end + 4;
        while self.buf.len() < start + length {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Reply::Broken(format!("EOF in body: {:?}", self.text())),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Reply::Broken(format!("{e} in body: {:?}", self.text())),
            }
        }
        let body = self.buf[start..start + length].to_vec();
        self.buf.drain(..start + length);
        Reply::Whole(Response {
            status,
            headers,
            body,
        })
    }

    /// With no request outstanding: waits up to `limit` for the server to
    /// close the connection, and says how it did.
    pub fn idle_end(&mut self, limit: Duration) -> IdleEnd {
        self.stream.set_read_timeout(Some(limit)).unwrap();
        let mut chunk = [0u8; 1024];
        let end = match self.stream.read(&mut chunk) {
            Ok(0) => IdleEnd::Closed,
            Ok(n) => IdleEnd::Data(String::from_utf8_lossy(&chunk[..n]).into_owned()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                IdleEnd::Open
            }
            Err(e) => IdleEnd::Reset(e.to_string()),
        };
        self.stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        end
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }
}

// ---------------------------------------------------------------------------
// Randomness

/// xorshift64*: seeded from `CHAOS_SEED` when set (to replay a run), else
/// from the clock; the seed is printed.
pub struct Rng(u64);

impl Rng {
    pub fn new(what: &str) -> Self {
        let seed = std::env::var("CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            })
            | 1;
        println!("{what}: CHAOS_SEED={seed}");
        Self(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

// ---------------------------------------------------------------------------
// Links in a data dir

/// The code and target of generated link `i` (codes sort like `i`).
pub fn link(i: usize) -> (String, String) {
    (
        format!("L{i:08}"),
        format!("https://example.com/articles/{i}?utm_source=chaos"),
    )
}

/// Writes links `0..n` (see [`link`]) as a `code<TAB>url` file.
pub fn write_links_tsv(path: &Path, n: usize) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..n {
        let (code, url) = link(i);
        writeln!(out, "{code}\t{url}").unwrap();
    }
    out.flush().unwrap();
}

/// `uload import FILE --data-dir DIR`; returns how long it took.
pub fn import(data_dir: &Path, file: &Path) -> Duration {
    let start = Instant::now();
    let out = uload_command(data_dir.parent().unwrap_or(data_dir))
        .arg("import")
        .arg(file)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "uload import: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    start.elapsed()
}

/// Imports links `0..n` into the setup's data dir; returns them as load
/// targets (`/code`, 302, url).
pub fn import_links(setup: &EdgeSetup, n: usize) -> Arc<Vec<(String, u16, String)>> {
    let tsv = setup.path().join("links.tsv");
    write_links_tsv(&tsv, n);
    import(&setup.data_dir(), &tsv);
    Arc::new(
        (0..n)
            .map(|i| {
                let (code, url) = link(i);
                (format!("/{code}"), 302, url)
            })
            .collect(),
    )
}
