//! `uload edge`: the Pingora proxy that fronts the domain.
//!
//! - `GET`/`HEAD /{code}`: answered from the hot table ([`redirect`]), never
//!   touching the network.
//! - `/api/...`: proxied to the admin upstreams ([`proxy`]).
//! - `/health`: answered locally ([`health`]).
//! - HTTPS (HTTP/1.1 and HTTP/2) beside plain HTTP when `tls.listen` is set;
//!   certificates reload on SIGHUP ([`tls`]).
//! - The log follower runs as a background service ([`follower_service`]).
//!
//! Run it: `uload edge --config conf/uload.yaml` then
//! `curl -i 127.0.0.1:8080/health`.

pub mod access_log;
pub mod clicks;
pub mod client_limits;
pub mod fast_path;
pub mod follower_service;
pub mod health;
pub mod loop_listener;
pub mod metrics;
pub mod proxy;
pub mod rate_limit;
pub mod redirect;
pub mod redirect_loop;
pub mod request_head;
pub mod tls;

use std::sync::{Arc, Mutex};

use pingora::lb::LoadBalancer;
use pingora::lb::health_check::HttpHealthCheck;
use pingora::lb::selection::RoundRobin;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server};
use pingora::services::background::GenBackgroundService;

use crate::config::Config;
use crate::store::LogFollower;
use follower_service::FollowerService;
use metrics::{EdgeMetrics, MetricsApp};
use proxy::EdgeProxy;

/// Errors starting the edge.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("loading the link table: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("access log {0}: {1}")]
    AccessLog(std::path::PathBuf, std::io::Error),
    #[error(transparent)]
    RateLimitState(#[from] crate::state_file::StateError),
    #[error("{0} {1}: {2}")]
    Listen(&'static str, std::net::SocketAddr, std::io::Error),
    #[error("pingora: {0}")]
    Pingora(String),
    /// A TLS certificate or key that cannot be used (names the file).
    #[error(transparent)]
    Tls(#[from] crate::config::ConfigError),
}

/// Command-line switches Pingora acts on.
#[derive(Debug, Clone, Default)]
pub struct EdgeOptions {
    /// Take over the listening sockets of a running edge (graceful upgrade).
    pub upgrade: bool,
    /// Detach into the background.
    pub daemon: bool,
}

/// Builds the edge server: loads the table, sets up the admin upstreams with
/// health checks, the proxy and the follower. Call `.run(...)` on the result.
pub fn build(config: &Config, options: &EdgeOptions) -> Result<Server, EdgeError> {
    // The certificate is checked first: a bad one stops the edge before it
    // takes anything over (a graceful upgrade's sockets included).
    let certs = match &config.tls {
        Some(t) => Some(Arc::new(tls::CertStore::open(t, &config.source)?)),
        None => None,
    };
    // SIGHUP's default action would end the edge: `systemctl reload` and a
    // certificate renewal hook send it. With TLS, `tls::ReloadOnHangup`
    // takes it over once the server runs; without, it does nothing.
    tls::ignore_hangup();
    if let Some(e) = certs.as_ref().and_then(|store| store.validity_problem()) {
        // A graceful upgrade stops here, before it takes any socket: the
        // running edge goes on serving HTTPS with its own certificate,
        // which clients still accept (as a SIGHUP reload refuses such a
        // one). A fresh start has no running edge to leave serving: it
        // serves it all the same, see `tls.rs`.
        if options.upgrade {
            return Err(e.into());
        }
        tracing::error!("tls: serving a certificate outside its validity period: {e}");
    }
    let pingora_err = |e: Box<pingora::Error>| EdgeError::Pingora(e.to_string());
    let conf = match &config.edge.pingora_conf {
        Some(path) => load_pingora_conf(path).map_err(|e| {
            EdgeError::Pingora(format!("edge.pingora_conf: {}: {e}", path.display()))
        })?,
        None => ServerConf::default(),
    };
    let opt = Opt {
        upgrade: options.upgrade,
        daemon: options.daemon,
        nocapture: false,
        test: false,
        conf: None, // loaded above
    };
    // The table is loaded before the server bootstraps: an edge that cannot
    // load it fails before taking a running edge's sockets over (`-u`).
    let follower = LogFollower::open(&config.data_dir)?;
    let table = follower.table();
    let stats = follower.stats();
    tracing::info!(
        seq = table.load().seq(),
        links = table.load().len(),
        "link table loaded from {}",
        config.data_dir.display()
    );
    // So is the rate-limit state (a state dir it cannot write, a directory
    // where the file should be).
    let limits = rate_limit::EdgeRateLimits::open(&config.rate_limit)?.map(Arc::new);
    // And the click counts (shared with a running edge during an upgrade).
    let clicks = Arc::new(clicks::ClickTable::open(
        &config.rate_limit.state_dir.join("edge-clicks.bin"),
        config.edge.click_slots,
    )?);
    // And the access log's file (its writer thread starts after Pingora's
    // start-up, which may fork into a daemon).
    let access_log_file = match &config.access_log.path {
        Some(path) => {
            Some(access_log::open_file(path).map_err(|e| EdgeError::AccessLog(path.clone(), e))?)
        }
        None => None,
    };
    if !options.upgrade {
        check_bindable(config)?;
    }
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let addrs: Vec<String> = config
        .edge
        .admin_upstreams
        .iter()
        .map(|a| a.to_string())
        .collect();
    let mut admins = LoadBalancer::<RoundRobin>::try_from_iter(addrs.iter().map(String::as_str))
        .map_err(|e| EdgeError::Pingora(e.to_string()))?;
    let mut check = HttpHealthCheck::new("uload-admin", false);
    check.req =
        pingora::http::RequestHeader::build("GET", b"/api/health", None).map_err(pingora_err)?;
    check
        .req
        .insert_header("host", "uload-admin")
        .map_err(pingora_err)?;
    check.peer_template.options.connection_timeout = Some(config.edge.admin_connect_timeout);
    check.peer_template.options.read_timeout = Some(config.edge.admin_read_timeout);
    // One slow answer (a busy disk, a GC-like pause) does not take the admin
    // out of rotation; two in a row do.
    check.consecutive_failure = 2;
    admins.set_health_check(Box::new(check));
    admins.health_check_frequency = Some(config.edge.health_check_interval);
    let health_service = GenBackgroundService::new("admin health check".into(), Arc::new(admins));
    let admins = health_service.task();

    // Measured once now, then by the follower's service (`health.rs`).
    let disk = Arc::new(health::DiskGauge::default());
    disk.refresh(&config.data_dir);
    let follower_service = GenBackgroundService::new(
        "log follower".into(),
        Arc::new(FollowerService {
            follower: Mutex::new(follower),
            stats: stats.clone(),
            interval: config.edge.follow_interval,
            watch_dirs: {
                let dir = crate::store::datadir::DataDir::new(&config.data_dir);
                vec![dir.root().to_owned(), dir.log_dir(), dir.snapshot_dir()]
            },
            disk: Some((disk.clone(), config.data_dir.clone())),
        }),
    );

    let metrics = Arc::new(
        EdgeMetrics::new(table.clone(), stats.clone(), admins.clone())
            .map_err(|e| EdgeError::Pingora(format!("registering metrics: {e}")))?,
    );
    let cert_metrics = certs.iter().flat_map(|c| c.metrics());
    for collector in std::iter::once(Box::new(clicks.full_counter()) as _).chain(cert_metrics) {
        metrics
            .registry
            .register(collector)
            .map_err(|e| EdgeError::Pingora(format!("registering metrics: {e}")))?;
    }
    let edge_config = Arc::new(config.edge.clone());
    // Its writer starts with the services, after any fork into a daemon.
    let access_log = access_log_file.map(|file| {
        let log = Arc::new(access_log::AccessLog::new(
            file,
            config.access_log.buffer_lines,
            metrics.access_log_dropped.clone(),
        ));
        server.add_service(GenBackgroundService::new(
            "access log".into(),
            Arc::new(access_log::WriterService(log.clone())),
        ));
        log
    });
    // Plain redirects skip Pingora's request machinery (fast_path.rs),
    // unless plain HTTP must be sent on to HTTPS.
    let redirect_http = config.tls.as_ref().is_some_and(|t| t.redirect_http);
    let fast = (config.edge.fast_path && !redirect_http).then(|| {
        Arc::new(fast_path::RedirectFastPath {
            table: table.clone(),
            config: edge_config.clone(),
            metrics: metrics.clone(),
            limits: limits.clone(),
            clicks: clicks.clone(),
            trusted_proxies: config.rate_limit.trusted_proxies.clone(),
            client_ip_header: config.rate_limit.client_ip_header.clone(),
            access_log: access_log.clone(),
        })
    });
    let proxy = EdgeProxy {
        table: table.clone(),
        admins: admins.clone(),
        config: edge_config,
        health: health::EdgeHealth {
            table: table.clone(),
            follower: stats,
            admins: admins.clone(),
            data_dir: config.data_dir.clone(),
            disk,
            follower_stall: config.edge.follower_stall,
        },
        metrics: metrics.clone(),
        limits,
        clicks,
        trusted_proxies: config.rate_limit.trusted_proxies.clone(),
        client_ip_header: config.rate_limit.client_ip_header.clone(),
        tls: config.tls.clone().map(Arc::new),
        access_log,
    };
    // Header and keep-alive time limits around Pingora's proxy loop.
    let hsts = config.tls.as_ref().and_then(|t| t.hsts.as_deref());
    let limits = client_limits::limits(&server.configuration, proxy, &config.edge, fast, hsts);
    let mut service = client_limits::service(&limits);
    // Cleartext connections: accepted by the redirect loops when they run
    // (`loop_listener.rs`), else by Pingora.
    let loops_listen = limits.loops().is_some();
    if loops_listen {
        server.add_service(loop_listener::LoopListener::new(
            config.edge.listen,
            limits.clone(),
        ));
    } else {
        // They get their write time limit from `ClientLimits`, only when
        // they need one (`client_limits::WriteLimit`), and no read buffer
        // of Pingora's: every read of theirs is `ClientLimits` reading a
        // request header into a buffer of its own (4 KiB) or Pingora
        // reading into its own buffers, so a 64 KiB buffer in front
        // (allocated zeroed per connection, its pages faulted in anew
        // whenever the allocator had given them back) only copied bytes
        // once more. TLS reads keep it.
        service.endpoints().add_listener(
            pingora::listeners::ListenerConfig::tcp(config.edge.listen.to_string())
                .l4_buffer(pingora::protocols::l4::stream::L4BufferSettings::default().read(0)),
        );
    }
    if let (Some(t), Some(store)) = (&config.tls, certs) {
        tracing::info!(
            sha256 = %store.fingerprint(),
            "HTTPS on {} (certificate {})",
            t.listen,
            t.cert_path.display()
        );
        let settings = tls::settings(store.clone(), t.http2);
        service.add_tls_with_settings(
            &t.listen.to_string(),
            Some(client_socket_options(&config.edge)),
            settings,
        );
        service
            .endpoints()
            .set_pre_tls_callback(Arc::new(tls::ClientHelloDeadline {
                limit: config.edge.client_header_timeout,
            }));
        server.add_service(GenBackgroundService::new(
            "tls certificate reload".into(),
            Arc::new(tls::ReloadOnHangup { store }),
        ));
    }
    // Pingora's service has a listener to serve unless the loops took the
    // only one (a service without any would end at once, and its ending
    // tells the proxy the edge is shutting down).
    if !loops_listen || config.tls.is_some() {
        server.add_service(service);
    }
    if let Some(listen) = config.metrics_listen {
        let mut metrics_service =
            pingora::services::listening::Service::new("metrics".into(), MetricsApp { metrics });
        metrics_service.add_tcp(&listen.to_string());
        server.add_service(metrics_service);
    }
    server.add_service(health_service);
    server.add_service(follower_service);
    Ok(server)
}

/// Fails when a listen address is taken. Pingora binds in its service
/// threads, where a failure panics the thread but leaves the process up and
/// serving nothing (so a supervisor would never restart it); checking here
/// turns that into an error and a non-zero exit. (With `-u` the sockets come
/// from the running edge instead.)
fn check_bindable(config: &Config) -> Result<(), EdgeError> {
    let mut addrs = vec![("edge.listen", config.edge.listen)];
    if let Some(m) = config.metrics_listen {
        addrs.push(("metrics.listen", m));
    }
    if let Some(t) = &config.tls {
        addrs.push(("tls.listen", t.listen));
    }
    for (key, addr) in addrs {
        std::net::TcpListener::bind(addr).map_err(|e| EdgeError::Listen(key, addr, e))?;
    }
    Ok(())
}

/// Runs the edge until SIGTERM/SIGINT (graceful) or SIGQUIT (graceful upgrade hand-over).
pub fn run(config: &Config, options: &EdgeOptions) -> Result<(), EdgeError> {
    // Pingora's daemon (`-d`, or `daemon: true` in its conf) changes to its
    // `working_directory`, `/` by default, when it forks: after the table
    // and some files are open, before the follower, a certificate reload or
    // the limiter read theirs. Relative paths are made absolute first, so
    // that they mean the same throughout: the directory the edge was
    // started in (without a fork, nothing changes).
    let cwd = std::env::current_dir()
        .map_err(|e| EdgeError::Pingora(format!("the current directory: {e}")))?;
    let mut config = config.clone();
    config.resolve_paths(&cwd);
    let server = build(&config, options)?;
    server.run(RunArgs::default());
    Ok(())
}

/// Loads Pingora's server conf from `path` and checks what Pingora itself
/// does not and would panic on (`threads: 0`); `uload check-config` and the
/// edge both read it through here.
pub fn load_pingora_conf(path: &std::path::Path) -> Result<ServerConf, String> {
    let conf = ServerConf::load_from_yaml(path.display().to_string()).map_err(|e| e.to_string())?;
    if conf.threads == 0 {
        return Err("threads: must be at least 1".into());
    }
    Ok(conf)
}

/// Socket options of every accepted TLS connection. `TCP_USER_TIMEOUT`
/// (through Pingora's keepalive settings) is the keep-alive time: a client
/// that does not read its answers (its window stays shut) or does not
/// acknowledge them is cut off by the kernel after that long, whichever
/// path (Pingora, the TLS handshake) is writing to it; Pingora sets no time
/// limit on writing a response header. The keepalive probes themselves
/// start only after the same idle time, by which the edge has closed an
/// idle connection anyway. Cleartext connections that Pingora serves get
/// the same `TCP_USER_TIMEOUT` (and only it) later, from `ClientLimits`,
/// before their first write that could wait on the client; the redirect
/// loops bound their own writes (an answer the socket does not take gets
/// the keep-alive time, then the connection is closed).
fn client_socket_options(edge: &crate::config::EdgeConfig) -> pingora::listeners::TcpSocketOptions {
    let mut options = pingora::listeners::TcpSocketOptions::default();
    options.tcp_keepalive = Some(keepalive(edge.keepalive_timeout));
    options
}

/// The keepalive settings for a keep-alive time of `idle`, in the kernel's
/// ranges: `TCP_KEEPIDLE` is whole seconds from 1 to 32767 (0, from a
/// keep-alive under a second, is EINVAL, and Pingora then drops every
/// connection it accepts), `TCP_USER_TIMEOUT` milliseconds (at most a day
/// here, as the config allows).
fn keepalive(idle: std::time::Duration) -> pingora::protocols::TcpKeepalive {
    use std::time::Duration;
    pingora::protocols::TcpKeepalive {
        idle: Duration::from_secs(idle.as_secs().clamp(1, 32_767)),
        interval: Duration::from_secs(10),
        count: 3,
        user_timeout: Duration::from_millis(user_timeout_ms(idle).into()),
    }
}

/// `TCP_USER_TIMEOUT` for a keep-alive time of `idle`: milliseconds from 1
/// to a day (as the config allows; 0 would mean the system default).
pub(crate) fn user_timeout_ms(idle: std::time::Duration) -> u32 {
    idle.as_millis().clamp(1, 86_400_000) as u32
}

/// Sets the TCP-level option `option` (`TCP_NODELAY`, `TCP_USER_TIMEOUT`,
/// ...) of socket `fd` to `value`.
pub(crate) fn set_tcp_option(
    fd: std::os::fd::RawFd,
    option: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: setsockopt with a pointer to a live c_int and its size (a
    // closed fd is an EBADF error).
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// Every keep-alive time the config allows (1 ms to a day) gives values
    /// the kernel takes: a `TCP_KEEPIDLE` of 0 (from 300 ms) made every
    /// accept fail.
    #[test]
    fn keepalive_settings_stay_in_the_kernels_ranges() {
        for ms in [1, 300, 999, 1_000, 1_500, 60_000, 86_400_000] {
            let k = super::keepalive(Duration::from_millis(ms));
            assert!((1..=32_767).contains(&k.idle.as_secs()), "{ms}: {k:?}");
            assert_eq!(k.idle.subsec_nanos(), 0, "{ms}");
            assert_eq!(k.user_timeout, Duration::from_millis(ms), "{ms}");
            assert!(k.user_timeout.as_millis() <= i32::MAX as u128);
        }
    }
}
