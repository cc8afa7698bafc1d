//! uLoad's configuration: `conf/uload.yaml`, every key documented in
//! `docs/configuration.md`, every key overridable by an environment variable.
//!
//! The file is parsed into [`RawConfig`] (serde, defaults for every key) and
//! then validated into [`Config`]; the rest of the program only sees `Config`.
//! Errors name the file, the key and what is wrong.
//!
//! ```
//! let config = uload::config::Config::from_yaml_str("edge:\n  listen: 127.0.0.1:9000\n", "inline", &[]).unwrap();
//! assert_eq!(config.edge.listen.port(), 9000);
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::store::record::RedirectStatus;

mod env;
pub use env::ENV_OVERRIDES;
use env::apply_env;

/// A configuration problem: which file, which key, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {key}: {problem}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub problem: String,
}

/// The file as written; every key has a default.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// Data directory: link log, snapshots, manifest. Env: `ULOAD_DATA_DIR`.
    pub data_dir: PathBuf,
    /// Base of the short URLs the admin returns, e.g. `https://ulo.ad`.
    /// Env: `ULOAD_PUBLIC_BASE_URL`.
    pub public_base_url: String,
    pub edge: RawEdge,
    pub admin: RawAdmin,
    pub metrics: RawMetrics,
    pub rate_limit: RawRateLimit,
    pub tls: RawTls,
    pub access_log: RawAccessLog,
    /// Scheduled backups of the data dir, taken by the admin
    /// (`docs/operations.md`, "Backups and restore").
    #[serde(default)]
    pub backup: RawBackup,
}

/// The `backup:` section.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawBackup {
    /// Directory the admin writes scheduled backups into, one
    /// `<UTC time>-seq<S>` directory each; empty: no scheduled backups.
    pub dir: String,
    /// Seconds between scheduled backups (from the newest one in `dir`).
    pub interval_secs: u64,
    /// Backups older than this many days are deleted after each scheduled
    /// backup, failed ones included; the newest complete one is always kept.
    pub keep_days: u64,
}

impl Default for RawBackup {
    fn default() -> Self {
        Self {
            dir: String::new(),
            interval_secs: 86_400,
            keep_days: 7,
        }
    }
}

/// Validated `backup:` settings.
#[derive(Debug, Clone)]
pub struct BackupConfig {
    /// `None`: scheduled backups are off.
    pub dir: Option<PathBuf>,
    pub interval: Duration,
    pub keep: Duration,
}

/// The `access_log:` section.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawAccessLog {
    /// File the edge appends JSON lines to; empty: no access log.
    /// Env: `ULOAD_ACCESS_LOG`.
    pub path: String,
    /// Lines queued for the writer thread before new ones are dropped.
    pub buffer_lines: usize,
}

impl Default for RawAccessLog {
    fn default() -> Self {
        Self {
            path: String::new(),
            buffer_lines: 65_536,
        }
    }
}

/// Validated `access_log:` settings.
#[derive(Debug, Clone)]
pub struct AccessLogConfig {
    pub path: Option<PathBuf>,
    pub buffer_lines: usize,
}

/// The `rate_limit:` section. A rate of 0 turns that limit off (the default
/// when a config leaves it out; the shipped conf/uload.yaml turns them on).
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawRateLimit {
    /// Where limiter state is kept (memory-mapped files that survive restarts
    /// and upgrades). Env: `ULOAD_STATE_DIR`.
    pub state_dir: PathBuf,
    /// Clients (or API keys) tracked at once, per process.
    pub slots: usize,
    /// Requests per second per client address at the edge.
    pub client_requests_per_second: u64,
    /// Requests a client may send at once.
    pub client_burst: u64,
    /// Unknown-code answers per minute per client (scanning). Over it, every
    /// short-code request of that client gets 429, known codes included, so
    /// that a scanner learns nothing.
    pub client_misses_per_minute: u64,
    /// Unknown-code answers a client may get at once.
    pub client_miss_burst: u64,
    /// Writes (POST, PATCH, PUT, DELETE) per second per API key at the admin.
    pub api_key_writes_per_second: u64,
    /// Writes an API key may send at once.
    pub api_key_write_burst: u64,
    /// Peers (addresses or CIDR blocks) whose `client_ip_header` is believed;
    /// from anyone else, the header is ignored and the peer address counts.
    pub trusted_proxies: Vec<String>,
    /// Header carrying the client address when the peer is a trusted proxy.
    pub client_ip_header: String,
}

impl Default for RawRateLimit {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("state"),
            slots: 1 << 16,
            client_requests_per_second: 0,
            client_burst: 200,
            client_misses_per_minute: 0,
            client_miss_burst: 30,
            api_key_writes_per_second: 0,
            api_key_write_burst: 100,
            trusted_proxies: Vec::new(),
            client_ip_header: "x-forwarded-for".into(),
        }
    }
}

/// The `tls:` section: an HTTPS listener (HTTP/1.1 and HTTP/2) beside the
/// plain one. Off unless `listen` is set.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawTls {
    /// Address of the HTTPS listener; empty: no HTTPS. Env: `ULOAD_TLS_LISTEN`.
    pub listen: String,
    /// PEM certificate chain, leaf first; relative to this file's directory.
    /// Re-read on SIGHUP and by a graceful upgrade. Env: `ULOAD_TLS_CERT_PATH`.
    pub cert_path: PathBuf,
    /// PEM private key of the leaf (PKCS#8, PKCS#1 or SEC1); relative to this
    /// file's directory. Env: `ULOAD_TLS_KEY_PATH`.
    pub key_path: PathBuf,
    /// Offer HTTP/2 (ALPN `h2`, then `http/1.1`); false: HTTP/1.1 only.
    pub http2: bool,
    /// Answer every plain-HTTP request except `/health` and `/health/ready`
    /// with a 308 to the same path and query on `https://`.
    pub redirect_http: bool,
    /// Port put in those redirects; 0: the port of `listen` (443 is left out
    /// of the URL). Set it when the public port differs (NAT, a load balancer).
    pub redirect_port: u16,
    /// `Strict-Transport-Security: max-age=` sent on every HTTPS response;
    /// 0: no header.
    pub hsts_max_age_secs: u64,
    /// Adds `; includeSubDomains` to that header.
    pub hsts_include_subdomains: bool,
}

impl Default for RawTls {
    fn default() -> Self {
        Self {
            listen: String::new(),
            cert_path: PathBuf::new(),
            key_path: PathBuf::new(),
            http2: true,
            redirect_http: false,
            redirect_port: 0,
            hsts_max_age_secs: 31_536_000,
            hsts_include_subdomains: false,
        }
    }
}

/// The `edge:` section.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawEdge {
    /// Address the edge listens on for HTTP. Env: `ULOAD_EDGE_LISTEN`.
    pub listen: String,
    /// Status for links that do not say (301, 302, 307, 308).
    pub default_status: u16,
    /// Where unknown, disabled or expired codes redirect (302); empty: a 404.
    pub not_found_url: String,
    /// How often the log follower polls the data dir, in milliseconds.
    pub follow_interval_ms: u64,
    /// Admin upstreams (`host:port`) that `/api/...` is proxied to.
    /// Env: `ULOAD_ADMIN_UPSTREAMS` (comma-separated).
    pub admin_upstreams: Vec<String>,
    /// Connect timeout to an admin upstream, in milliseconds.
    pub admin_connect_timeout_ms: u64,
    /// Read timeout for an admin response, in milliseconds.
    pub admin_read_timeout_ms: u64,
    /// Retries of an idempotent `/api` request on another attempt.
    pub admin_retries: u32,
    /// First retry backoff in milliseconds (doubles per retry, with jitter).
    pub admin_retry_backoff_ms: u64,
    /// Health check interval of the admin upstreams, in milliseconds.
    pub health_check_interval_ms: u64,
    /// Seconds clients are told to wait (`Retry-After`) when no admin is up.
    pub retry_after_secs: u64,
    /// Answer plain `GET`/`HEAD /{code}` requests over cleartext HTTP/1.1
    /// straight from the request bytes, without Pingora's per-request
    /// objects (same answers, less CPU). Anything else always goes through
    /// Pingora.
    pub fast_path: bool,
    /// Accept and serve cleartext connections on threads of their own (one
    /// epoll loop per Pingora worker thread) instead of tokio tasks; a
    /// request the fast path does not answer hands its connection to
    /// Pingora.
    pub redirect_loop: bool,
    /// Microseconds a redirect loop that holds connections keeps polling
    /// for their next events (`epoll_wait` with no wait) before it sleeps;
    /// 0: it sleeps at once. For virtual machines whose host is slow to
    /// run a vCPU again after it went idle (HAProxy's `busy-polling`, for
    /// the same reason): a shorter latency tail for CPU spent polling.
    pub busy_poll_us: u64,
    /// Seconds the log follower may be stuck (a bad file, records it cannot
    /// find) before `/health/ready` answers 503.
    pub follower_stall_secs: u64,
    /// Time a client has to send a whole request header, in milliseconds:
    /// from connecting (first request) or from the request's first byte (a
    /// later request on a kept-alive connection). A partial header then gets
    /// a 408 and the connection is closed; a connection that sent nothing is
    /// closed. Bounds slowloris senders (Pingora only bounds each read).
    pub client_header_timeout_ms: u64,
    /// How long a kept-alive client connection may sit idle between two
    /// requests, in milliseconds, before the edge closes it.
    pub keepalive_timeout_ms: u64,
    /// How many links with a click budget (`max_clicks`) the edge can count
    /// clicks for (the click table in `rate_limit.state_dir`, 16 bytes each).
    pub click_slots: usize,
    /// Pingora's own server conf (threads, pid file, upgrade socket, grace
    /// periods), relative to this file's directory. Unset: `pingora.yaml`
    /// there if it exists, else Pingora's defaults; set: it must exist.
    pub pingora_conf: Option<PathBuf>,
}

/// The `admin:` section.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawAdmin {
    /// Address the admin API listens on. Env: `ULOAD_ADMIN_LISTEN`.
    pub listen: String,
    /// SHA-256 hashes (`sha256:<64 hex>`) of the API keys that may manage links.
    pub api_key_hashes: Vec<String>,
    /// A bootstrap key in plain text (hashed at start-up, never stored).
    /// Prefer the environment: `ULOAD_API_KEY`.
    pub api_key: String,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Length of generated codes (base62).
    pub code_length: usize,
    /// Links per `POST /api/links/bulk` request, at most.
    pub max_bulk: usize,
    /// Compact after this many log records since the last snapshot.
    pub compact_every_records: u64,
}

/// The `metrics:` section. Both listeners are off unless configured: two
/// processes on one machine must not race for a default port. The shipped
/// conf/uload.yaml turns both on.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawMetrics {
    /// Address of the edge's Prometheus listener; empty: none.
    /// Env: `ULOAD_METRICS_LISTEN`.
    pub listen: String,
    /// Address of the admin's Prometheus listener; empty: none.
    /// Env: `ULOAD_ADMIN_METRICS_LISTEN`.
    pub admin_listen: String,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            public_base_url: "http://127.0.0.1:8080".into(),
            edge: RawEdge::default(),
            admin: RawAdmin::default(),
            metrics: RawMetrics::default(),
            rate_limit: RawRateLimit::default(),
            tls: RawTls::default(),
            access_log: RawAccessLog::default(),
            backup: RawBackup::default(),
        }
    }
}

impl Default for RawEdge {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            default_status: 302,
            not_found_url: String::new(),
            follow_interval_ms: 2,
            admin_upstreams: vec!["127.0.0.1:8081".into()],
            admin_connect_timeout_ms: 500,
            admin_read_timeout_ms: 5_000,
            admin_retries: 2,
            admin_retry_backoff_ms: 50,
            health_check_interval_ms: 1_000,
            retry_after_secs: 5,
            follower_stall_secs: 30,
            fast_path: true,
            redirect_loop: true,
            busy_poll_us: 0,
            client_header_timeout_ms: 10_000,
            keepalive_timeout_ms: 60_000,
            click_slots: 1 << 18,
            pingora_conf: None,
        }
    }
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8081".into(),
            api_key_hashes: Vec::new(),
            api_key: String::new(),
            max_body_bytes: 1 << 20,
            code_length: 7,
            max_bulk: 1_000,
            compact_every_records: 100_000,
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the file was read from (for messages), or "defaults".
    pub source: String,
    pub data_dir: PathBuf,
    pub public_base_url: String,
    pub edge: EdgeConfig,
    pub admin: AdminConfig,
    /// The edge's metrics listener, if any.
    pub metrics_listen: Option<SocketAddr>,
    /// The admin's metrics listener, if any.
    pub admin_metrics_listen: Option<SocketAddr>,
    pub rate_limit: RateLimitConfig,
    /// The HTTPS listener, if any.
    pub tls: Option<TlsConfig>,
    pub access_log: AccessLogConfig,
    pub backup: BackupConfig,
}

/// Validated `rate_limit:` settings.
#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    pub state_dir: PathBuf,
    pub slots: usize,
    /// Per client address, all requests at the edge.
    pub client_requests: Option<crate::ratelimit::Limit>,
    /// Per client address, unknown-code answers at the edge.
    pub client_misses: Option<crate::ratelimit::Limit>,
    /// Per API key, writes at the admin.
    pub api_key_writes: Option<crate::ratelimit::Limit>,
    pub trusted_proxies: Vec<IpNet>,
    /// Lower-case header name.
    pub client_ip_header: String,
}

/// An address block (`10.0.0.0/8`, `::1/128`; a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl IpNet {
    pub fn parse(text: &str) -> Option<Self> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a.parse().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (text.parse().ok()?, None),
        };
        let max = if matches!(addr, std::net::IpAddr::V4(_)) {
            32
        } else {
            128
        };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return None;
        }
        // An IPv4 network written IPv4-mapped (`::ffff:10.0.0.0/104`) is
        // that IPv4 network: `contains` reads a mapped peer as IPv4.
        if let std::net::IpAddr::V6(v6) = addr
            && let Some(v4) = v6.to_ipv4_mapped()
            && prefix >= 96
        {
            return Some(Self {
                addr: std::net::IpAddr::V4(v4),
                prefix: prefix - 96,
            });
        }
        Some(Self { addr, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        let ip = match ip {
            V6(v6) => v6.to_ipv4_mapped().map_or(V6(v6), V4),
            v4 => v4,
        };
        let (a, b, bits) = match (self.addr, ip) {
            (V4(a), V4(b)) => (u128::from(a.to_bits()), u128::from(b.to_bits()), 32),
            (V6(a), V6(b)) => (a.to_bits(), b.to_bits(), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || (a >> shift) == (b >> shift)
    }
}

/// The most `edge.busy_poll_us`: polling longer than a scheduler tick
/// only burns the CPU.
const MAX_BUSY_POLL_US: u64 = 10_000;

/// The most `edge.click_slots` (a 1 GiB click table).
const MAX_CLICK_SLOTS: usize = 1 << 26;
/// Most `edge.admin_retries`.
const MAX_ADMIN_RETRIES: u32 = 10;
/// Most `access_log.buffer_lines`: the queue's slots are allocated when the
/// edge starts (a few dozen bytes each), so a typo must not ask for more
/// memory than the machine has.
const MAX_ACCESS_LOG_BUFFER_LINES: usize = 1 << 22;

/// Validated `edge:` settings.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    pub listen: SocketAddr,
    pub default_status: RedirectStatus,
    pub not_found_url: Option<String>,
    pub follow_interval: Duration,
    pub admin_upstreams: Vec<SocketAddr>,
    pub admin_connect_timeout: Duration,
    pub admin_read_timeout: Duration,
    pub admin_retries: u32,
    pub admin_retry_backoff: Duration,
    pub health_check_interval: Duration,
    pub retry_after_secs: u64,
    /// `edge.follower_stall_secs`.
    pub follower_stall: Duration,
    /// `edge.fast_path`.
    pub fast_path: bool,
    /// `edge.redirect_loop`.
    pub redirect_loop: bool,
    /// `edge.busy_poll_us`.
    pub busy_poll: Duration,
    /// Time limit on a whole request header (`edge.client_header_timeout_ms`).
    pub client_header_timeout: Duration,
    /// Idle limit between requests on a kept-alive connection.
    pub keepalive_timeout: Duration,
    /// `edge.click_slots`.
    pub click_slots: usize,
    /// The Pingora conf to load; `None`: Pingora's defaults (the key was
    /// not set and no `pingora.yaml` is next to the config file).
    pub pingora_conf: Option<PathBuf>,
    /// Whether `edge.pingora_conf` was set (then the file must exist).
    pub pingora_conf_given: bool,
}

/// Validated `tls:` settings (present only when `tls.listen` is set).
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    /// Relative to the config file's directory once [`Config::load`] has run.
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub http2: bool,
    pub redirect_http: bool,
    /// The port of the `https://` redirects (`tls.redirect_port`, or the
    /// port of `tls.listen`).
    pub redirect_port: u16,
    /// The `Strict-Transport-Security` value; `None` when the max-age is 0.
    pub hsts: Option<String>,
}

/// Validated `admin:` settings.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// SHA-256 digests of the accepted API keys.
    pub api_key_hashes: Vec<[u8; 32]>,
    pub max_body_bytes: usize,
    pub code_length: usize,
    pub max_bulk: usize,
    pub compact_every_records: u64,
}

/// The longest duration in seconds a key takes: 100 years.
const MAX_SECS: u64 = 100 * 365 * 86_400;

impl Config {
    /// Makes every relative path absolute against `dir`, for a process that
    /// is about to change its working directory (`uload edge -d`: Pingora's
    /// daemon changes to its `working_directory`, `/` by default, when it
    /// forks, after some files are open and before others are read).
    pub fn resolve_paths(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = dir.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        fix(&mut self.rate_limit.state_dir);
        if let Some(p) = &mut self.access_log.path {
            fix(p);
        }
        if let Some(p) = &mut self.edge.pingora_conf {
            fix(p);
        }
        if let Some(t) = &mut self.tls {
            fix(&mut t.cert_path);
            fix(&mut t.key_path);
        }
        if let Some(d) = &mut self.backup.dir {
            fix(d);
        }
    }

    /// Whether edge and admin can run on one host with this config, as
    /// `uload up` runs them in one process (and the shipped systemd units
    /// on one machine): every listener of either needs its own socket.
    /// [`Config::load`] checks each one's own listeners; this checks them
    /// against each other's, which a file used only for an edge on one
    /// host and an admin on another may share.
    pub fn check_one_host(&self) -> Result<(), ConfigError> {
        let sockets: Vec<(&str, SocketAddr)> = [
            ("edge.listen", Some(self.edge.listen)),
            ("tls.listen", self.tls.as_ref().map(|t| t.listen)),
            ("metrics.listen", self.metrics_listen),
            ("admin.listen", Some(self.admin.listen)),
            ("metrics.admin_listen", self.admin_metrics_listen),
        ]
        .into_iter()
        .filter_map(|(key, addr)| Some((key, addr?)))
        .collect();
        for (i, &(key, a)) in sockets.iter().enumerate() {
            for &(other, b) in &sockets[i + 1..] {
                if same_socket(a, b) {
                    return Err(ConfigError {
                        file: self.source.clone(),
                        key: key.to_owned(),
                        problem: format!(
                            "{a} is also {other} ({b}); edge and admin on one host need a port each"
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Reads `path` (if given) and applies the process environment.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        // A variable that is set but not UTF-8 is an error: skipping it would
        // leave the file's value in force while the operator believes the
        // override applies (a data dir, a listen address).
        let mut env: Vec<(String, String)> = Vec::new();
        for (var, key) in ENV_OVERRIDES {
            match std::env::var(var) {
                Ok(value) => env.push(((*var).to_owned(), value)),
                Err(std::env::VarError::NotPresent) => {}
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(ConfigError {
                        file: path.map_or_else(|| "defaults".into(), |p| p.display().to_string()),
                        key: (*key).to_owned(),
                        problem: format!("{var} is set but is not valid UTF-8"),
                    });
                }
            }
        }
        let missing_pingora_conf = |file: &str, conf: &Path| {
            let problem = format!("{}: no such file", conf.display());
            config_error(file, "edge.pingora_conf", problem, &env)
        };
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError {
                    file: p.display().to_string(),
                    key: "(file)".into(),
                    problem: e.to_string(),
                })?;
                let mut config = Self::from_yaml_str(&text, &p.display().to_string(), &env)?;
                // Relative paths in the file are relative to the file.
                let base = p.parent().unwrap_or(Path::new("."));
                let conf = base.join(
                    config
                        .edge
                        .pingora_conf
                        .take()
                        .unwrap_or_else(|| PathBuf::from("pingora.yaml")),
                );
                if conf.exists() {
                    config.edge.pingora_conf = Some(conf);
                } else if config.edge.pingora_conf_given {
                    // Named, but missing: not Pingora's defaults in its place
                    // (another pid file, upgrade socket and grace periods).
                    return Err(missing_pingora_conf(&p.display().to_string(), &conf));
                }
                if let Some(tls) = &mut config.tls {
                    for path in [&mut tls.cert_path, &mut tls.key_path] {
                        if path.is_relative() {
                            *path = base.join(&*path);
                        }
                    }
                }
                Ok(config)
            }
            None => {
                // Without a file only `ULOAD_EDGE_PINGORA_CONF` can name a
                // Pingora conf (relative to the working directory); named,
                // it must exist, as when a file names it.
                let config = Self::from_yaml_str("{}", "defaults", &env)?;
                match &config.edge.pingora_conf {
                    Some(conf) if !conf.exists() => Err(missing_pingora_conf("defaults", conf)),
                    _ => Ok(config),
                }
            }
        }
    }

    /// Parses and validates YAML text; `env` holds `(variable, value)` overrides.
    pub fn from_yaml_str(
        text: &str,
        file: &str,
        env: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        // A key an environment variable set is reported with the variable:
        // the file's own value may be fine.
        let err = |key: &str, problem: String| config_error(file, key, problem, env);
        let mut raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| {
                let problem = e.to_string();
                // serde names unknown keys and wrong types in its message;
                // point at the location it gives.
                let key = e
                    .location()
                    .map(|l| format!("line {} column {}", l.line(), l.column()))
                    .unwrap_or_else(|| "(document)".into());
                err(&key, problem)
            })?
        };
        // Two variables for one key (its own name and the older one) that
        // disagree: neither silently wins.
        let mut set_by: Vec<(&str, &str, &str)> = Vec::new();
        for (var, value) in env {
            let key = apply_env(&mut raw, var, value).map_err(|(key, p)| err(key, p))?;
            if let Some(key) = key {
                if let Some((other, _, _)) = set_by
                    .iter()
                    .find(|(_, k, v)| *k == key && *v != value.as_str())
                {
                    return Err(err(
                        key,
                        format!("{other} and {var} are both set, to different values"),
                    ));
                }
                set_by.push((var, key, value));
            }
        }
        let addr = |key: &str, v: &str| {
            v.parse::<SocketAddr>()
                .map_err(|_| err(key, format!("{v:?} is not an address like 127.0.0.1:8080")))
        };
        let optional_addr = |key: &str, v: &str| match v.trim() {
            "" => Ok(None),
            v => addr(key, v).map(Some),
        };
        let positive = |key: &str, v: u64| {
            if v == 0 {
                Err(err(key, "must be greater than 0".into()))
            } else {
                Ok(v)
            }
        };
        // Client time limits are added to instants: a day is plenty, and
        // no sum can overflow.
        let at_most_a_day = |key: &str, ms: u64| {
            if ms > 86_400_000 {
                Err(err(key, format!("{ms} ms is more than a day (86400000)")))
            } else {
                Ok(ms)
            }
        };
        // Durations in seconds are added to instants (the backup task adds
        // `backup.interval` after each backup) and compared in milliseconds
        // as u64 (`follower_stall`): a century fits both.
        let at_most_a_century = |key: &str, secs: u64| {
            if secs > MAX_SECS {
                Err(err(
                    key,
                    format!("{secs} s is more than 100 years ({MAX_SECS})"),
                ))
            } else {
                Ok(secs)
            }
        };
        if raw.data_dir.as_os_str().is_empty() {
            return Err(err("data_dir", "must not be empty".into()));
        }
        let base = raw.public_base_url.trim_end_matches('/').to_owned();
        crate::store::record::validate_target(&base)
            .map_err(|e| err("public_base_url", e.to_string()))?;
        let e = &raw.edge;
        let default_status = RedirectStatus::from_code(e.default_status).map_err(|_| {
            err(
                "edge.default_status",
                format!("{} is not 301, 302, 307 or 308", e.default_status),
            )
        })?;
        let not_found_url = if e.not_found_url.is_empty() {
            None
        } else {
            crate::store::record::validate_target(&e.not_found_url)
                .map_err(|x| err("edge.not_found_url", x.to_string()))?;
            Some(e.not_found_url.clone())
        };
        if e.admin_upstreams.is_empty() {
            return Err(err(
                "edge.admin_upstreams",
                "needs at least one host:port".into(),
            ));
        }
        let admin_upstreams = e
            .admin_upstreams
            .iter()
            .map(|u| addr("edge.admin_upstreams", u))
            .collect::<Result<Vec<_>, _>>()?;
        let edge = EdgeConfig {
            listen: addr("edge.listen", &e.listen)?,
            default_status,
            not_found_url,
            follow_interval: Duration::from_millis(positive(
                "edge.follow_interval_ms",
                e.follow_interval_ms,
            )?),
            admin_upstreams,
            admin_connect_timeout: Duration::from_millis(positive(
                "edge.admin_connect_timeout_ms",
                e.admin_connect_timeout_ms,
            )?),
            admin_read_timeout: Duration::from_millis(positive(
                "edge.admin_read_timeout_ms",
                e.admin_read_timeout_ms,
            )?),
            // Each retry waits for a backoff (up to 2 s) and another attempt:
            // more than a few only keep a client waiting for its 503.
            admin_retries: within(
                &err,
                "edge.admin_retries",
                e.admin_retries,
                0,
                MAX_ADMIN_RETRIES,
            )?,
            admin_retry_backoff: Duration::from_millis(e.admin_retry_backoff_ms),
            health_check_interval: Duration::from_millis(positive(
                "edge.health_check_interval_ms",
                e.health_check_interval_ms,
            )?),
            retry_after_secs: positive("edge.retry_after_secs", e.retry_after_secs)?,
            fast_path: e.fast_path,
            redirect_loop: e.redirect_loop,
            busy_poll: Duration::from_micros(within(
                &err,
                "edge.busy_poll_us",
                e.busy_poll_us,
                0,
                MAX_BUSY_POLL_US,
            )?),
            follower_stall: Duration::from_secs(at_most_a_century(
                "edge.follower_stall_secs",
                positive("edge.follower_stall_secs", e.follower_stall_secs)?,
            )?),
            client_header_timeout: Duration::from_millis(at_most_a_day(
                "edge.client_header_timeout_ms",
                positive("edge.client_header_timeout_ms", e.client_header_timeout_ms)?,
            )?),
            keepalive_timeout: Duration::from_millis(at_most_a_day(
                "edge.keepalive_timeout_ms",
                positive("edge.keepalive_timeout_ms", e.keepalive_timeout_ms)?,
            )?),
            click_slots: within(&err, "edge.click_slots", e.click_slots, 64, MAX_CLICK_SLOTS)?,
            pingora_conf: e.pingora_conf.clone(),
            pingora_conf_given: e.pingora_conf.is_some(),
        };
        let a = &raw.admin;
        let mut api_key_hashes = Vec::new();
        for (i, h) in a.api_key_hashes.iter().enumerate() {
            let key = format!("admin.api_key_hashes[{i}]");
            api_key_hashes.push(parse_key_hash(h).map_err(|p| err(&key, p))?);
        }
        if !a.api_key.is_empty() {
            check_api_key(&a.api_key).map_err(|p| err("admin.api_key", p))?;
            api_key_hashes.push(hash_api_key(&a.api_key));
        }
        if !(4..=64).contains(&a.code_length) {
            return Err(err(
                "admin.code_length",
                format!("{} is outside 4..=64", a.code_length),
            ));
        }
        let admin = AdminConfig {
            listen: addr("admin.listen", &a.listen)?,
            api_key_hashes,
            max_body_bytes: positive("admin.max_body_bytes", a.max_body_bytes as u64)? as usize,
            code_length: a.code_length,
            max_bulk: positive("admin.max_bulk", a.max_bulk as u64)? as usize,
            compact_every_records: positive(
                "admin.compact_every_records",
                a.compact_every_records,
            )?,
        };
        let tls = tls(&raw.tls, edge.listen, &err)?;
        let metrics_listen = optional_addr("metrics.listen", &raw.metrics.listen)?;
        let admin_metrics_listen =
            optional_addr("metrics.admin_listen", &raw.metrics.admin_listen)?;
        // The listeners one process binds must not share a socket: each one
        // binds on its own (so the edge's bind check passes), and then
        // Pingora serves both services on one socket, each taking some of
        // the connections (and the process aborts at shutdown, closing the
        // socket twice); the admin fails to bind its metrics.
        let edge_sockets = [
            Some(("edge.listen", edge.listen)),
            tls.as_ref().map(|t| ("tls.listen", t.listen)),
        ];
        let clashes = [
            (metrics_listen, "metrics.listen", &edge_sockets[..]),
            (
                admin_metrics_listen,
                "metrics.admin_listen",
                &[Some(("admin.listen", admin.listen))][..],
            ),
        ];
        for (addr, key, others) in clashes {
            let Some(addr) = addr else { continue };
            if let Some((other, at)) = others.iter().flatten().find(|(_, a)| same_socket(addr, *a))
            {
                return Err(err(
                    key,
                    format!("{addr} is also {other} ({at}); each listener needs its own port"),
                ));
            }
        }
        Ok(Self {
            source: file.to_owned(),
            tls,
            data_dir: raw.data_dir,
            public_base_url: base,
            edge,
            admin,
            metrics_listen,
            admin_metrics_listen,
            rate_limit: rate_limit(&raw.rate_limit, &err)?,
            backup: BackupConfig {
                dir: Some(raw.backup.dir.trim())
                    .filter(|d| !d.is_empty())
                    .map(PathBuf::from),
                interval: Duration::from_secs(at_most_a_century(
                    "backup.interval_secs",
                    positive("backup.interval_secs", raw.backup.interval_secs)?,
                )?),
                keep: Duration::from_secs(raw.backup.keep_days.saturating_mul(86_400)),
            },
            access_log: AccessLogConfig {
                path: Some(raw.access_log.path.trim())
                    .filter(|p| !p.is_empty())
                    .map(PathBuf::from),
                buffer_lines: within(
                    &err,
                    "access_log.buffer_lines",
                    raw.access_log.buffer_lines,
                    1,
                    MAX_ACCESS_LOG_BUFFER_LINES,
                )?,
            },
        })
    }
}

/// `value` if it is in `lo..=hi`; otherwise the error for `key` that says
/// the range ("at most" when `lo` is 0).
/// A problem with `key` of `file`; when one of the variables in `env`
/// set that key, the problem says so: the file's own value may be fine,
/// and "conf/uload.yaml: edge.listen: ..." alone sends the operator to the
/// wrong place.
fn config_error(file: &str, key: &str, problem: String, env: &[(String, String)]) -> ConfigError {
    let var = ENV_OVERRIDES
        .iter()
        .find(|(var, k)| {
            // `admin.api_key_hashes[2]` is set by the list's variable.
            let of_key = key
                .strip_prefix(*k)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('['));
            of_key && env.iter().any(|(v, _)| v == var)
        })
        .map(|(var, _)| *var);
    let problem = match var {
        Some(var) if !problem.contains(var) => format!("{problem} (set by {var})"),
        _ => problem,
    };
    ConfigError {
        file: file.to_owned(),
        key: key.to_owned(),
        problem,
    }
}

fn within<T: PartialOrd + std::fmt::Display + Default + Copy>(
    err: &dyn Fn(&str, String) -> ConfigError,
    key: &str,
    value: T,
    lo: T,
    hi: T,
) -> Result<T, ConfigError> {
    if (lo..=hi).contains(&value) {
        return Ok(value);
    }
    Err(err(
        key,
        if lo == T::default() {
            format!("must be at most {hi}")
        } else {
            format!("must be between {lo} and {hi}")
        },
    ))
}

fn rate_limit(
    r: &RawRateLimit,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<RateLimitConfig, ConfigError> {
    use crate::ratelimit::Limit;
    let burst = |key: &str, rate: u64, burst: u64| {
        if rate > 0 && burst == 0 {
            Err(err(key, "must be at least 1 when its rate is set".into()))
        } else {
            Ok(burst)
        }
    };
    let limit = |rate: u64, window_ms: u64, burst: u64| {
        (rate > 0).then(|| Limit::per_window(rate, window_ms, burst))
    };
    let mut trusted = Vec::new();
    for (i, t) in r.trusted_proxies.iter().enumerate() {
        trusted.push(IpNet::parse(t.trim()).ok_or_else(|| {
            err(
                &format!("rate_limit.trusted_proxies[{i}]"),
                format!("{t:?} is not an address or CIDR block like 10.0.0.0/8"),
            )
        })?);
    }
    let header = r.client_ip_header.trim().to_ascii_lowercase();
    if header.is_empty() || http::HeaderName::from_bytes(header.as_bytes()).is_err() {
        return Err(err(
            "rate_limit.client_ip_header",
            format!("{:?} is not a header name", r.client_ip_header),
        ));
    }
    if r.state_dir.as_os_str().is_empty() {
        return Err(err("rate_limit.state_dir", "must not be empty".into()));
    }
    if r.slots == 0 {
        return Err(err("rate_limit.slots", "must be greater than 0".into()));
    }
    Ok(RateLimitConfig {
        state_dir: r.state_dir.clone(),
        slots: r.slots,
        client_requests: limit(
            r.client_requests_per_second,
            1_000,
            burst(
                "rate_limit.client_burst",
                r.client_requests_per_second,
                r.client_burst,
            )?,
        ),
        client_misses: limit(
            r.client_misses_per_minute,
            60_000,
            burst(
                "rate_limit.client_miss_burst",
                r.client_misses_per_minute,
                r.client_miss_burst,
            )?,
        ),
        api_key_writes: limit(
            r.api_key_writes_per_second,
            1_000,
            burst(
                "rate_limit.api_key_write_burst",
                r.api_key_writes_per_second,
                r.api_key_write_burst,
            )?,
        ),
        trusted_proxies: trusted,
        client_ip_header: header,
    })
}

fn tls(
    t: &RawTls,
    edge_listen: SocketAddr,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Option<TlsConfig>, ConfigError> {
    let listen = t.listen.trim();
    if listen.is_empty() {
        if t.redirect_http {
            return Err(err(
                "tls.redirect_http",
                "needs tls.listen: there is no HTTPS listener to redirect to".into(),
            ));
        }
        return Ok(None);
    }
    let listen: SocketAddr = listen.parse().map_err(|_| {
        err(
            "tls.listen",
            format!("{listen:?} is not an address like 0.0.0.0:8443"),
        )
    })?;
    if same_socket(listen, edge_listen) {
        return Err(err(
            "tls.listen",
            format!("{listen} is also edge.listen ({edge_listen}); HTTPS needs its own port"),
        ));
    }
    for (key, path) in [
        ("tls.cert_path", &t.cert_path),
        ("tls.key_path", &t.key_path),
    ] {
        if path.as_os_str().is_empty() {
            return Err(err(key, "must be set when tls.listen is".into()));
        }
    }
    let hsts = (t.hsts_max_age_secs > 0).then(|| {
        let sub = if t.hsts_include_subdomains {
            "; includeSubDomains"
        } else {
            ""
        };
        format!("max-age={}{sub}", t.hsts_max_age_secs)
    });
    Ok(Some(TlsConfig {
        listen,
        cert_path: t.cert_path.clone(),
        key_path: t.key_path.clone(),
        http2: t.http2,
        redirect_http: t.redirect_http,
        redirect_port: if t.redirect_port == 0 {
            listen.port()
        } else {
            t.redirect_port
        },
        hsts,
    }))
}

/// Whether two listen addresses take the same socket: the same port (not
/// 0, which picks a free one each time) on addresses that overlap: the same
/// one (an IPv4-mapped IPv6 address is its IPv4 address), `[::]` and any
/// other (Linux's `[::]` takes IPv4 too unless `bindv6only` is set), or
/// `0.0.0.0` and any IPv4 address. `0.0.0.0` and an IPv6 address other
/// than `[::]` bind side by side.
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    use std::net::IpAddr;
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    let (x, y) = (a.ip().to_canonical(), b.ip().to_canonical());
    let any_v6 = |ip: IpAddr| ip.is_ipv6() && ip.is_unspecified();
    let any_v4 = |ip: IpAddr| ip.is_ipv4() && ip.is_unspecified();
    x == y || any_v6(x) || any_v6(y) || (any_v4(x) && y.is_ipv4()) || (any_v4(y) && x.is_ipv4())
}

/// What an API key must be: at least 16 bytes of visible ASCII (spaces and
/// tabs inside it too), without whitespace at either end: a presented key
/// is read from the `Authorization` header as such text and trimmed, so a
/// key with any other byte (a non-ASCII letter, a control) could never be
/// matched.
pub fn check_api_key(key: &str) -> Result<(), String> {
    if key.len() < 16 {
        return Err("must be at least 16 bytes".into());
    }
    if key.trim() != key {
        return Err("must not begin or end with whitespace".into());
    }
    if let Some(c) = key
        .chars()
        .find(|&c| !(c.is_ascii_graphic() || c == ' ' || c == '\t'))
    {
        return Err(format!(
            "must be visible ASCII characters only (it holds {c:?}, which a request header does not carry as text)"
        ));
    }
    Ok(())
}

/// SHA-256 of an API key, as stored and compared.
pub fn hash_api_key(key: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// The `sha256:<hex>` form of a key's hash (what goes into the config file).
pub fn format_key_hash(hash: &[u8; 32]) -> String {
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn parse_key_hash(text: &str) -> Result<[u8; 32], String> {
    let hex = text
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("{text:?} does not start with sha256:"))?;
    if hex.len() != 64 {
        return Err(format!(
            "expected 64 hex digits after sha256:, found {}",
            hex.len()
        ));
    }
    // Only hex digits: slicing pairs below needs ASCII (64 bytes holding a
    // multi-byte character panicked, fuzz input config/api-key-hash-multibyte),
    // and `from_str_radix` would take a '+' sign.
    if let Some(bad) = hex.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(format!("{bad:?} is not a hex digit"));
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("{:?} is not hex", &hex[2 * i..2 * i + 2]))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml_str(text, "test.yaml", &[])
    }

    #[test]
    fn backup_keys() {
        let c = parse("").unwrap();
        assert!(c.backup.dir.is_none());
        assert_eq!(c.backup.interval, Duration::from_secs(86_400));
        assert_eq!(c.backup.keep, Duration::from_secs(7 * 86_400));
        let c =
            parse("backup:\n  dir: /var/backups/uload\n  interval_secs: 3600\n  keep_days: 2\n")
                .unwrap();
        assert_eq!(c.backup.dir, Some(PathBuf::from("/var/backups/uload")));
        assert_eq!(c.backup.interval, Duration::from_secs(3600));
        assert_eq!(c.backup.keep, Duration::from_secs(2 * 86_400));
        let e = parse("backup:\n  interval_secs: 0\n").unwrap_err();
        assert_eq!(e.key, "backup.interval_secs");
        assert!(parse("backup:\n  every: 1\n").is_err());
    }

    /// Durations in seconds are refused past a century: the backup task
    /// adds `backup.interval` to an `Instant` after each backup (which
    /// panics past `i64::MAX` seconds), and the readiness check compares
    /// `follower_stall` in milliseconds as a `u64` (which wrapped: 2^64/1000
    /// seconds and a bit became 384 ms, so a follower stalled for a moment
    /// made `/health/ready` answer 503).
    #[test]
    fn durations_past_a_century_are_refused() {
        for (text, key) in [
            (
                "backup:\n  interval_secs: 18446744073709551615\n",
                "backup.interval_secs",
            ),
            (
                "edge:\n  follower_stall_secs: 18446744073709552\n",
                "edge.follower_stall_secs",
            ),
        ] {
            match parse(text) {
                Ok(c) => panic!(
                    "{text}: accepted; backup.interval + now: {:?}, follower_stall in ms as u64: {}",
                    std::time::Instant::now().checked_add(c.backup.interval),
                    c.edge.follower_stall.as_millis() as u64
                ),
                Err(e) => assert_eq!(e.key, key, "{e}"),
            }
        }
        let c = parse(
            "backup:\n  interval_secs: 3153600000\nedge:\n  follower_stall_secs: 3153600000\n",
        )
        .unwrap();
        assert!(
            std::time::Instant::now()
                .checked_add(c.backup.interval)
                .is_some()
        );
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse("").unwrap();
        assert_eq!(c.edge.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.edge.default_status, RedirectStatus::Found);
        assert!(c.admin.api_key_hashes.is_empty());
    }

    #[test]
    fn errors_name_file_key_and_problem() {
        let cases = [
            ("edge:\n  listen: nowhere\n", "edge.listen"),
            ("edge:\n  default_status: 200\n", "edge.default_status"),
            ("edge:\n  admin_upstreams: []\n", "edge.admin_upstreams"),
            (
                "edge:\n  follow_interval_ms: 0\n",
                "edge.follow_interval_ms",
            ),
            (
                "edge:\n  client_header_timeout_ms: 0\n",
                "edge.client_header_timeout_ms",
            ),
            (
                "edge:\n  keepalive_timeout_ms: 0\n",
                "edge.keepalive_timeout_ms",
            ),
            (
                "edge:\n  keepalive_timeout_ms: 86400001\n",
                "edge.keepalive_timeout_ms",
            ),
            ("edge:\n  click_slots: 0\n", "edge.click_slots"),
            ("edge:\n  busy_poll_us: 10001\n", "edge.busy_poll_us"),
            ("edge:\n  click_slots: 67108865\n", "edge.click_slots"),
            (
                "edge:\n  client_header_timeout_ms: 18446744073709551615\n",
                "edge.client_header_timeout_ms",
            ),
            (
                "admin:\n  api_key_hashes: [\"md5:00\"]\n",
                "admin.api_key_hashes[0]",
            ),
            ("admin:\n  api_key: short\n", "admin.api_key"),
            (
                "admin:\n  api_key: \"0123456789abcdef \"\n",
                "admin.api_key",
            ),
            ("public_base_url: javascript:x\n", "public_base_url"),
            (
                "edge:\n  not_found_url: \"https://x/\\r\\n\"\n",
                "edge.not_found_url",
            ),
            ("metrics:\n  listen: 127.0.0.1:8080\n", "metrics.listen"),
            ("metrics:\n  listen: 0.0.0.0:8080\n", "metrics.listen"),
            (
                "tls:\n  listen: 127.0.0.1:8443\n  cert_path: c\n  key_path: k\nmetrics:\n  listen: 127.0.0.1:8443\n",
                "metrics.listen",
            ),
            (
                "metrics:\n  admin_listen: 127.0.0.1:8081\n",
                "metrics.admin_listen",
            ),
        ];
        for (text, key) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!(
                (e.file.as_str(), e.key.as_str()),
                ("test.yaml", key),
                "{text}: {e}"
            );
        }
        let e = parse("edge:\n  lisen: 1\n").unwrap_err();
        assert!(e.problem.contains("lisen"), "{e}");
        assert!(e.key.contains("line 2"), "{e}");
    }

    #[test]
    fn environment_overrides() {
        let env = [
            ("ULOAD_EDGE_LISTEN".to_owned(), "127.0.0.1:1".to_owned()),
            (
                "ULOAD_ADMIN_UPSTREAMS".to_owned(),
                "127.0.0.1:2, 127.0.0.1:3".to_owned(),
            ),
            (
                "ULOAD_API_KEY".to_owned(),
                "a-long-enough-secret".to_owned(),
            ),
            ("ULOAD_DATA_DIR".to_owned(), "/tmp/x".to_owned()),
        ];
        let c = Config::from_yaml_str("edge:\n  listen: 127.0.0.1:9\n", "t", &env).unwrap();
        assert_eq!(c.edge.listen.port(), 1);
        assert_eq!(c.edge.admin_upstreams.len(), 2);
        assert_eq!(
            c.admin.api_key_hashes,
            [hash_api_key("a-long-enough-secret")]
        );
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
    }

    /// A bad value that came from the environment is reported with the
    /// variable that set it: the file's own value for that key may be
    /// fine, and "conf/uload.yaml: edge.listen: ..." alone sends the
    /// operator to the wrong place.
    #[test]
    fn errors_in_overrides_name_the_variable() {
        for (var, value, key) in [
            ("ULOAD_EDGE_LISTEN", "nowhere", "edge.listen"),
            ("ULOAD_ADMIN_LISTEN", "nowhere", "admin.listen"),
            ("ULOAD_METRICS_LISTEN", "nowhere", "metrics.listen"),
            ("ULOAD_ADMIN_UPSTREAMS", " , ", "edge.admin_upstreams"),
            (
                "ULOAD_ADMIN_UPSTREAMS",
                "127.0.0.1:1,x",
                "edge.admin_upstreams",
            ),
            ("ULOAD_API_KEY", "short", "admin.api_key"),
            ("ULOAD_DATA_DIR", "", "data_dir"),
            ("ULOAD_PUBLIC_BASE_URL", "javascript:x", "public_base_url"),
            // Not of the key's type, or of it but refused as the file's value would be.
            ("ULOAD_EDGE_ADMIN_RETRIES", "two", "edge.admin_retries"),
            ("ULOAD_EDGE_DEFAULT_STATUS", "70000", "edge.default_status"),
            ("ULOAD_BACKUP_KEEP_DAYS", "-1", "backup.keep_days"),
            ("ULOAD_TLS_HTTP2", "yes", "tls.http2"),
            ("ULOAD_EDGE_DEFAULT_STATUS", "200", "edge.default_status"),
            (
                "ULOAD_RATE_LIMIT_TRUSTED_PROXIES",
                "10.0.0.0/8,nowhere",
                "rate_limit.trusted_proxies[1]",
            ),
            (
                "ULOAD_ADMIN_API_KEY_HASHES",
                "md5:00",
                "admin.api_key_hashes[0]",
            ),
        ] {
            let env = [(var.to_owned(), value.to_owned())];
            let e = Config::from_yaml_str("edge:\n  listen: 127.0.0.1:9\n", "t.yaml", &env)
                .unwrap_err();
            assert_eq!((e.file.as_str(), e.key.as_str()), ("t.yaml", key), "{e}");
            assert!(e.to_string().contains(var), "{var}={value:?}: {e}");
        }
        // A bad value in the file names no variable.
        let e = parse("edge:\n  listen: nowhere\n").unwrap_err();
        assert!(!e.to_string().contains("ULOAD_"), "{e}");
    }

    #[test]
    fn boolean_environment_overrides() {
        let env = |var: &str, value: &str| [(var.to_owned(), value.to_owned())];
        let c = Config::from_yaml_str("", "t", &env("ULOAD_EDGE_REDIRECT_LOOP", "0")).unwrap();
        assert!(!c.edge.redirect_loop && c.edge.fast_path);
        let c = Config::from_yaml_str("", "t", &env("ULOAD_EDGE_FAST_PATH", "false")).unwrap();
        assert!(!c.edge.fast_path && c.edge.redirect_loop);
        for (var, key) in [
            ("ULOAD_EDGE_REDIRECT_LOOP", "edge.redirect_loop"),
            ("ULOAD_EDGE_FAST_PATH", "edge.fast_path"),
        ] {
            let e = Config::from_yaml_str("", "t", &env(var, "maybe")).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(
                e.problem.contains(var) && e.problem.contains("maybe"),
                "{e}"
            );
        }
    }

    /// A value is read as its key's type, then checked as the file's is.
    #[test]
    fn environment_values_are_typed() {
        let c = Config::from_yaml_str(
            "",
            "t",
            &[
                ("ULOAD_EDGE_DEFAULT_STATUS".to_owned(), "308".to_owned()),
                ("ULOAD_BACKUP_KEEP_DAYS".to_owned(), "30".to_owned()),
            ],
        )
        .unwrap();
        assert_eq!(c.edge.default_status, RedirectStatus::PermanentRedirect);
        assert_eq!(c.backup.keep, Duration::from_secs(30 * 86_400));
    }

    /// A key with two names (`ULOAD_API_KEY`, `ULOAD_ADMIN_API_KEY`): the
    /// same value under both is fine, different values are an error naming
    /// both, whichever order the environment lists them in.
    #[test]
    fn two_names_of_one_key_must_agree() {
        let key = |v: &str| ("ULOAD_API_KEY".to_owned(), v.to_owned());
        let own = |v: &str| ("ULOAD_ADMIN_API_KEY".to_owned(), v.to_owned());
        let c = Config::from_yaml_str(
            "",
            "t",
            &[key("a-long-enough-secret"), own("a-long-enough-secret")],
        )
        .unwrap();
        assert_eq!(
            c.admin.api_key_hashes,
            [hash_api_key("a-long-enough-secret")]
        );
        for env in [
            [key("a-long-enough-secret"), own("another-long-secret")],
            [own("another-long-secret"), key("a-long-enough-secret")],
        ] {
            let e = Config::from_yaml_str("", "t", &env).unwrap_err();
            assert_eq!(e.key, "admin.api_key", "{e}");
            assert!(
                e.problem.contains("ULOAD_API_KEY") && e.problem.contains("ULOAD_ADMIN_API_KEY"),
                "{e}"
            );
        }
    }

    #[test]
    fn tls_section() {
        let c = parse("").unwrap();
        assert!(c.tls.is_none(), "TLS is off by default");
        let c = parse(
            "edge:\n  listen: 127.0.0.1:8080\ntls:\n  listen: 0.0.0.0:8443\n  cert_path: c.pem\n  key_path: k.pem\n  redirect_http: true\n  hsts_include_subdomains: true\n",
        )
        .unwrap();
        let t = c.tls.unwrap();
        assert_eq!(t.listen.port(), 8443);
        assert_eq!(t.redirect_port, 8443);
        assert!(t.http2 && t.redirect_http);
        assert_eq!(
            t.hsts.as_deref(),
            Some("max-age=31536000; includeSubDomains")
        );
        let t = parse("tls:\n  listen: 127.0.0.1:8443\n  cert_path: c\n  key_path: k\n  hsts_max_age_secs: 0\n  redirect_port: 443\n")
            .unwrap()
            .tls
            .unwrap();
        assert_eq!((t.hsts, t.redirect_port), (None, 443));
        let cases = [
            ("tls:\n  redirect_http: true\n", "tls.redirect_http"),
            ("tls:\n  listen: nowhere\n", "tls.listen"),
            (
                "tls:\n  listen: 0.0.0.0:8080\n  cert_path: c\n  key_path: k\n",
                "tls.listen",
            ),
            (
                "tls:\n  listen: 127.0.0.1:8443\n  key_path: k\n",
                "tls.cert_path",
            ),
            (
                "tls:\n  listen: 127.0.0.1:8443\n  cert_path: c\n",
                "tls.key_path",
            ),
        ];
        for (text, key) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!(
                (e.file.as_str(), e.key.as_str()),
                ("test.yaml", key),
                "{text}: {e}"
            );
        }
    }
    #[test]
    fn key_hash_round_trip() {
        let h = hash_api_key("secret");
        assert_eq!(parse_key_hash(&format_key_hash(&h)).unwrap(), h);
        // Known answer: sha256("secret").
        assert_eq!(
            format_key_hash(&h),
            "sha256:2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
        );
        // 64 bytes that are not 64 hex digits: a sign, a multi-byte character.
        for bad in ["+f".repeat(32), format!("a\u{e9}{}", "a".repeat(61))] {
            assert!(parse_key_hash(&format!("sha256:{bad}")).is_err(), "{bad}");
        }
    }

    #[test]
    fn api_keys_must_be_text_a_header_carries() {
        assert!(check_api_key("a-long-enough-secret").is_ok());
        assert!(check_api_key("a long enough secret").is_ok());
        for bad in [
            "short",
            " leading-space-0123456",
            "schl\u{fc}ssel-f\u{fc}r-die-admin-api",
            "key\u{1}0123456789abcdef",
            "key\u{7f}0123456789abcdef",
        ] {
            assert!(check_api_key(bad).is_err(), "{bad:?}");
        }
        let e = Config::from_yaml_str(
            "admin:\n  api_key: \"schl\u{fc}ssel-f\u{fc}r-die-admin-api\"\n",
            "f.yaml",
            &[],
        )
        .unwrap_err();
        assert_eq!(
            (e.file.as_str(), e.key.as_str()),
            ("f.yaml", "admin.api_key")
        );
        assert!(e.problem.contains("visible ASCII"), "{e}");
    }

    #[test]
    fn edge_and_admin_on_one_host_need_a_socket_per_listener() {
        let one_host = |yaml: &str| {
            Config::from_yaml_str(yaml, "f.yaml", &[])
                .unwrap()
                .check_one_host()
        };
        assert!(one_host("{}").is_ok());
        let e = one_host("metrics:\n  listen: 127.0.0.1:9091\n  admin_listen: 127.0.0.1:9091\n")
            .unwrap_err();
        assert_eq!(e.key, "metrics.listen");
        assert!(e.problem.contains("metrics.admin_listen"), "{e}");
        let e = one_host("edge:\n  listen: 0.0.0.0:8081\nadmin:\n  listen: 127.0.0.1:8081\n")
            .unwrap_err();
        assert_eq!(e.key, "edge.listen");
        assert!(e.problem.contains("admin.listen"), "{e}");
        // Port 0 (a free port each time) never clashes.
        assert!(one_host("edge:\n  listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\n").is_ok());
    }

    #[test]
    fn same_socket_knows_which_addresses_overlap() {
        let s = |a: &str, b: &str| same_socket(a.parse().unwrap(), b.parse().unwrap());
        assert!(s("127.0.0.1:80", "127.0.0.1:80"));
        assert!(s("0.0.0.0:80", "127.0.0.1:80"));
        assert!(s("[::]:80", "127.0.0.1:80"));
        assert!(s("[::]:80", "[::1]:80"));
        assert!(s("[::ffff:127.0.0.1]:80", "127.0.0.1:80"));
        assert!(s("0.0.0.0:80", "[::ffff:10.0.0.1]:80"));
        assert!(!s("0.0.0.0:80", "[::1]:80"));
        assert!(!s("127.0.0.1:80", "127.0.0.2:80"));
        assert!(!s("127.0.0.1:80", "127.0.0.1:81"));
        assert!(!s("127.0.0.1:0", "127.0.0.1:0"));
    }
}
