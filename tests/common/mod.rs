//! Test support: real `uload` processes on free loopback ports, a tiny
//! HTTP/1.1 client, and readiness polling (never a fixed sleep).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const KEY: &str = "test-key-0123456789abcdef";

/// A response, as read off the wire.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// The body as an API error (see [`api_error`]): (code, field).
    pub fn api_error(&self) -> (String, Option<String>) {
        api_error(&self.json())
    }
}

/// Asserts the one error shape every JSON error has, whether the admin or
/// the edge answers (`docs/api.md`, "Errors"): `{"error": {"code",
/// "message", "field"}}` and nothing else, a lower-case `code`, a non-empty
/// `message`, a string or null `field`. Returns (code, field).
pub fn api_error(json: &serde_json::Value) -> (String, Option<String>) {
    use serde_json::Value;
    let obj = json
        .as_object()
        .unwrap_or_else(|| panic!("error body is not an object: {json}"));
    assert_eq!(obj.len(), 1, "only \"error\": {json}");
    let e = obj
        .get("error")
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("\"error\" is not an object: {json}"));
    let mut keys: Vec<&str> = e.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "field", "message"], "{json}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{json}"
    );
    let code = e["code"].as_str().expect("code is a string").to_owned();
    assert!(
        !code.is_empty() && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
        "{code}"
    );
    let field = match &e["field"] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => panic!("field is {other}"),
    };
    (code, field)
}

/// Runs `cmd` with a soft `RLIMIT_FSIZE` of `limit` bytes (the hard limit
/// stays unlimited) and SIGXFSZ set to `sigxfsz`: `libc::SIG_DFL` kills
/// the process at the limit (an interruption at a known point),
/// `libc::SIG_IGN` makes the write past it fail with EFBIG (a full disk).
pub fn limit_file_size(cmd: &mut Command, limit: u64, sigxfsz: libc::sighandler_t) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls (signal, setrlimit) between fork
    // and exec. The signal is set either way: exec keeps an ignored signal,
    // and a test process that opened a store ignores SIGXFSZ.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, sigxfsz);
            let lim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: libc::RLIM_INFINITY,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends one request (`Connection: close`) and reads the whole response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PATCH" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw, method == "HEAD").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad response: {:?}", String::from_utf8_lossy(&raw)),
        )
    })
}

fn parse_response(raw: &[u8], head: bool) -> Option<Response> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let text = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = text.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked && !head {
        body = dechunk(&body)?;
    }
    Some(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(
            std::str::from_utf8(&data[..line_end])
                .ok()?
                .split(';')
                .next()?
                .trim(),
            16,
        )
        .ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, &[], b"").unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

pub fn api(addr: SocketAddr, method: &str, path: &str, body: &str) -> Response {
    let auth = format!("Bearer {KEY}");
    request(
        addr,
        method,
        path,
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    )
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// `uload` as a test runs it, its files in the test's temp dir `dir`: no
/// `ULOAD_*` variable inherited from the test's environment (those of
/// `uload::config::ENV_OVERRIDES` and `ULOAD_CONFIG` would override the
/// test's config; a developer's shell or CI may set any of them),
/// `ULOAD_STATE_DIR` in `dir/state` and `RUST_LOG=warn`. Without a state
/// dir an edge keeps its rate-limit and click tables in `./state`, the
/// crate's directory: shared by every test running at the time, and kept
/// from one run to the next. Every test that starts an edge or an admin
/// starts it from here; set variables after this call.
pub fn uload_command(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uload"));
    test_env(&mut cmd, dir);
    cmd
}

/// The environment of [`uload_command`], for a command that runs `uload`
/// through another program (`setpriv`).
pub fn test_env(cmd: &mut Command, dir: &Path) {
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("ULOAD_") {
            cmd.env_remove(var);
        }
    }
    cmd.env("ULOAD_STATE_DIR", dir.join("state"))
        .env("RUST_LOG", "warn");
}

/// Records that `test` (its function's name) skipped its real checks, and
/// why (needs root, `mount`, `setpriv`...): the test passes, as it must
/// where CI cannot give it those, but not silently. The line is printed,
/// and when `ULOAD_TEST_SKIPS` names a directory (`scripts/test.sh` makes
/// one) a file there says so; the script lists them after the run.
pub fn skip(test: &str, why: &str) {
    let line = format!("{test}: skipped its real checks: {why}");
    eprintln!("{line}");
    let Some(dir) = std::env::var_os("ULOAD_TEST_SKIPS") else {
        return;
    };
    // The test binary's name without cargo's hash: `disk_fault-0a1b...`.
    let exe = std::env::current_exe().unwrap();
    let stem = exe.file_stem().unwrap().to_string_lossy().into_owned();
    let binary = stem.rsplit_once('-').map_or(stem.as_str(), |(b, _)| b);
    let name: String = format!("{binary}::{test}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    std::fs::write(
        Path::new(&dir).join(name),
        format!("{binary}::{test}: {why}\n"),
    )
    .unwrap_or_else(|e| panic!("ULOAD_TEST_SKIPS={dir:?}: {e}"));
}

/// Runs `uload ARGS` to the end and requires it to succeed; its stdout.
pub fn uload_ok(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_uload"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "uload {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A loopback port nobody listens on right now, picked below the kernel's
/// ephemeral range (32768 to 60999 by default). A port from `bind(0)` lies in
/// that range, where an outgoing connection of a test running alongside may
/// take it as its source port before the server under test binds it (seen
/// as "Address already in use" from an edge started by a test).
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    for _ in 0..1000 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(NEXT.fetch_add(1, Ordering::Relaxed));
        h.write_u32(std::process::id());
        let port = 20_000 + (h.finish() % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` until it returns true or `limit` passes.
pub fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// An edge and an admin on free ports, sharing a temp data dir.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub edge_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The edge's and the admin's Prometheus listeners.
    pub edge_metrics_addr: SocketAddr,
    pub admin_metrics_addr: SocketAddr,
    pub edge: Option<Child>,
    pub admin: Option<Child>,
}

impl Cluster {
    /// Writes a config and starts both processes, waiting until both answer.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Like `start`, with extra lines appended to the `admin:` section
    /// (indented two spaces, e.g. `"  compact_every_records: 50\n"`).
    pub fn start_with(admin_extra: &str) -> Self {
        Self::start_custom("", admin_extra, "")
    }

    /// Like `start`, with the edge's client header and keep-alive timeouts.
    pub fn with_client_timeouts(header_ms: u64, keepalive_ms: u64) -> Self {
        Self::with_client_timeouts_and_grace(header_ms, keepalive_ms, 1)
    }

    /// Like `with_client_timeouts`, with the edge's Pingora grace period
    /// (the time between SIGTERM and the end of the graceful shutdown; 1 s
    /// elsewhere).
    pub fn with_client_timeouts_and_grace(
        header_ms: u64,
        keepalive_ms: u64,
        grace_period_seconds: u64,
    ) -> Self {
        Self::start_full(
            &format!(
                "  client_header_timeout_ms: {header_ms}\n  keepalive_timeout_ms: {keepalive_ms}\n"
            ),
            "",
            "",
            grace_period_seconds,
        )
    }

    /// Like `start_with`, plus lines for the `edge:` section and whole
    /// top-level sections appended to the config (e.g.
    /// `"rate_limit:\n  client_burst: 5\n"`). The rate-limit state lives in
    /// the cluster's dir.
    pub fn start_custom(edge_extra: &str, admin_extra: &str, sections: &str) -> Self {
        Self::start_full(edge_extra, admin_extra, sections, 1)
    }

    /// Like `start_custom`, with the edge's Pingora `grace_period_seconds`.
    pub fn start_full(
        edge_extra: &str,
        admin_extra: &str,
        sections: &str,
        grace_period_seconds: u64,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let edge_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let edge_metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin_metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = dir.path().join("uload.yaml");
        let pingora = dir.path().join("pingora.yaml");
        std::fs::write(
            &pingora,
            format!(
                "---\nversion: 1\nthreads: 2\npid_file: {0}/edge.pid\nupgrade_sock: {0}/upgrade.sock\ngrace_period_seconds: {grace_period_seconds}\ngraceful_shutdown_timeout_seconds: 1\n",
                dir.path().display()
            ),
        )
        .unwrap();
        std::fs::write(
            &config,
            format!(
                "data_dir: {data}\npublic_base_url: http://{edge_addr}\nedge:\n  listen: {edge_addr}\n  admin_upstreams: [\"{admin_addr}\"]\n  health_check_interval_ms: 100\n  admin_connect_timeout_ms: 300\n  admin_read_timeout_ms: 2000\n  pingora_conf: pingora.yaml\n{edge_extra}admin:\n  listen: {admin_addr}\n  api_key: {KEY}\n  max_body_bytes: 65536\n{admin_extra}metrics:\n  listen: {edge_metrics_addr}\n  admin_listen: {admin_metrics_addr}\naccess_log:\n  path: {access}\n{sections}",
                data = dir.path().join("data").display(),
                access = dir.path().join("access.log").display(),
            ),
        )
        .unwrap();
        let mut cluster = Self {
            dir,
            config,
            edge_addr,
            admin_addr,
            edge_metrics_addr,
            admin_metrics_addr,
            edge: None,
            admin: None,
        };
        cluster.start_admin();
        cluster.start_edge();
        cluster.wait_api_ready();
        cluster
    }

    /// Starts `uload <sub>`; its stderr is appended to `<sub>.stderr` in the
    /// cluster's dir (see [`Cluster::log`]), and printed if the test fails.
    fn spawn(&self, sub: &str) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{sub}.stderr")))
            .unwrap();
        uload_command(self.path())
            .args([sub, "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap()
    }

    /// What `uload <sub>` ("edge" or "admin") has written to stderr so far.
    pub fn log(&self, sub: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{sub}.stderr"))).unwrap_or_default()
    }

    /// The edge's or the admin's `/metrics` text.
    pub fn metrics(&self, addr: SocketAddr) -> String {
        let r = get(addr, "/metrics");
        assert_eq!(r.status, 200, "{addr}/metrics");
        String::from_utf8(r.body).unwrap()
    }

    pub fn start_admin(&mut self) {
        self.admin = Some(self.spawn("admin"));
        let addr = self.admin_addr;
        wait_until(Duration::from_secs(30), "admin /api/health", || {
            request(addr, "GET", "/api/health", &[], b"").is_ok_and(|r| r.status == 200)
        });
    }

    pub fn start_edge(&mut self) {
        self.edge = Some(self.spawn("edge"));
        let addr = self.edge_addr;
        wait_until(Duration::from_secs(30), "edge /health", || {
            request(addr, "GET", "/health", &[], b"").is_ok_and(|r| r.status == 200)
        });
    }

    /// An upgrade (`uload edge -u`) expected to fail: the new edge is
    /// started on this cluster's config and, once it waits on the upgrade
    /// socket (not if it has already failed), the running edge is told to
    /// hand over (SIGQUIT), as an operator would. Asserts that the new edge
    /// exited with an error and that the running edge still serves (a
    /// failure found before taking the sockets leaves it serving; one found
    /// after leaves no edge at all); returns the new edge's stderr.
    pub fn failed_upgrade(&mut self) -> String {
        let mut new = uload_command(self.path())
            .args(["edge", "-u", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let sock = self.path().join("upgrade.sock");
        let mut exited = None;
        wait_until(
            Duration::from_secs(30),
            "the new edge on the upgrade socket, or its exit",
            || {
                exited = new.try_wait().unwrap();
                exited.is_some() || sock.exists()
            },
        );
        if exited.is_none() {
            let old = self.edge.as_ref().unwrap().id();
            let quit = Command::new("kill")
                .args(["-QUIT", &old.to_string()])
                .status()
                .unwrap();
            assert!(quit.success());
            self.edge.as_mut().unwrap().wait().unwrap();
            wait_until(Duration::from_secs(30), "the new edge's exit", || {
                exited = new.try_wait().unwrap();
                exited.is_some()
            });
        }
        let mut stderr = String::new();
        new.stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(!exited.unwrap().success(), "the new edge: {stderr}");
        let health = request(self.edge_addr, "GET", "/health", &[], b"");
        assert!(
            health.as_ref().is_ok_and(|r| r.status == 200),
            "the edge after a failed upgrade: {health:?}; new edge: {stderr}"
        );
        stderr
    }

    /// Waits until the edge's health check sees the admin and /api answers.
    pub fn wait_api_ready(&self) {
        let addr = self.edge_addr;
        wait_until(Duration::from_secs(30), "/api through the edge", || {
            request(addr, "GET", "/api/health", &[], b"").is_ok_and(|r| r.status == 200)
        });
    }

    pub fn kill_admin(&mut self) {
        if let Some(mut c) = self.admin.take() {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
    }

    pub fn kill_edge(&mut self) {
        if let Some(mut c) = self.edge.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The edge's table sequence, from /health.
    pub fn edge_seq(&self) -> u64 {
        get(self.edge_addr, "/health").json()["table"]["seq"]
            .as_u64()
            .unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_edge();
        self.kill_admin();
        if std::thread::panicking() {
            for sub in ["edge", "admin"] {
                eprintln!("---- {sub} stderr ----\n{}", self.log(sub));
            }
        }
    }
}

/// The value of the series `name{labels}` (exactly as exposed, e.g.
/// `link_redirects_total{result="served"}`) in a Prometheus text exposition;
/// 0 when the series is absent (a labelled series before its first count).
/// To assert a zero, use [`metric_exposed`]: absent reads as 0 here, so a
/// renamed metric would pass.
pub fn metric(text: &str, series: &str) -> f64 {
    find_metric(text, series).unwrap_or(0.0)
}

/// The value of the series `name{labels}`, which must be exposed: panics,
/// showing the exposition, when it is not.
#[track_caller]
pub fn metric_exposed(text: &str, series: &str) -> f64 {
    let Some(value) = find_metric(text, series) else {
        panic!("no series {series} in:\n{text}");
    };
    value
}

fn find_metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}
