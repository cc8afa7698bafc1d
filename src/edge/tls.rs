//! HTTPS at the edge (the `tls:` section): a TLS listener beside the plain
//! one, served by the same proxy, through rustls.
//!
//! - HTTP/2 and HTTP/1.1 are offered by ALPN (`h2`, then `http/1.1`).
//! - The certificate is handed to rustls by [`CertStore`], a
//!   `ResolvesServerCert` over an `ArcSwap`: SIGHUP ([`ReloadOnHangup`])
//!   re-reads the certificate and key files and swaps them in. Handshakes
//!   after the swap get the new certificate; connections already open keep
//!   the session they negotiated and are not touched. A file that cannot be
//!   read or does not parse, or a key that does not match the certificate,
//!   is logged and the previous certificate stays. So is a certificate
//!   outside its validity period (expired, or not valid yet): serving it
//!   would fail every handshake that the current one still passes. A graceful
//!   upgrade (`uload edge -u`) also reads the files afresh, in the new
//!   process.
//! - At start-up an expired certificate is served, with an error in the log:
//!   refusing to start would take the plain-HTTP redirects down with it, and
//!   HTTPS clients refuse it either way. `uload check-config` reports it as
//!   an error. The leaf's `notAfter` is exported as
//!   `tls_certificate_not_after_timestamp_seconds` (alerts
//!   `UloadCertificateExpiresSoon` and `UloadCertificateExpiryImminent`);
//!   refused reloads are counted in `tls_certificate_reload_failures_total`,
//!   and `tls_certificate_reload_failing` is 1 from a refused reload to the
//!   next good one (alert `UloadCertificateReloadRefused`).
//! - A `notBefore` up to [`NOT_BEFORE_SKEW_SECS`] ahead of this machine's
//!   clock counts as valid: CAs date certificates from the moment of issue
//!   (some a little before), and a deploy hook's one SIGHUP must not be
//!   refused because this clock is a few seconds behind the CA's.
//! - `Strict-Transport-Security` goes on every response written to a TLS
//!   client ([`HstsBuilder`], a downstream module: redirects, 404s, health,
//!   429s, proxied `/api` answers and error pages alike), never on plain
//!   HTTP.
//! - With `tls.redirect_http`, plain-HTTP requests other than the health
//!   checks get a 308 to [`https_location`] (in `proxy.rs`).

use std::any::Any;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::http::ResponseHeader;
use pingora::listeners::ALPN;
use pingora::listeners::tls::TlsSettings;
use pingora::modules::http::compression::ResponseCompressionBuilder;
use pingora::modules::http::{HttpModule, HttpModuleBuilder, HttpModules, Module};
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType,
};
use pingora::proxy::Session;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, CryptoProvider, ResolvesServerCert};
use prometheus::{IntCounter, IntGauge};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::config::{ConfigError, TlsConfig};

/// How far ahead of this machine's clock a certificate's `notBefore` may be
/// and still be accepted (clock skew between the CA and this machine).
pub const NOT_BEFORE_SKEW_SECS: i64 = 300;

/// The certificate the TLS listener presents, swappable while it runs.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
    /// The served leaf's validity period.
    validity: std::sync::Mutex<Validity>,
    cert_path: std::path::PathBuf,
    key_path: std::path::PathBuf,
    /// The config file, for error messages.
    source: String,
    /// `tls_certificate_not_after_timestamp_seconds`.
    not_after: IntGauge,
    /// `tls_certificate_reload_failures_total`.
    reload_failures: IntCounter,
    /// `tls_certificate_reload_failing`: whether the last reload was refused.
    reload_failing: IntGauge,
}

/// When a certificate is valid: `notBefore` and `notAfter`, in seconds
/// since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

impl Validity {
    /// Why a certificate with this validity cannot be served at `now`
    /// (seconds since the epoch), or `None` when it can.
    pub fn problem_at(&self, now: i64) -> Option<String> {
        let date = |s: i64| {
            u64::try_from(s).map_or_else(
                |_| format!("{s} s before 1970"),
                |s| crate::interchange::format_time(s.saturating_mul(1000)),
            )
        };
        if now > self.not_after {
            Some(format!(
                "the certificate expired at {}",
                date(self.not_after)
            ))
        } else if now.saturating_add(NOT_BEFORE_SKEW_SECS) < self.not_before {
            Some(format!(
                "the certificate is not valid before {}",
                date(self.not_before)
            ))
        } else {
            None
        }
    }
}

impl CertStore {
    /// Reads and checks the certificate and key named by `tls`; the error
    /// names the config file, the key and the file at fault. A certificate
    /// outside its validity period is accepted here (see the module's
    /// documentation); [`CertStore::validity_problem`] says so.
    pub fn open(tls: &TlsConfig, source: &str) -> Result<Self, ConfigError> {
        let (key, validity) = load(&tls.cert_path, &tls.key_path, source)?;
        let not_after = IntGauge::new(
            "tls_certificate_not_after_timestamp_seconds",
            "When the certificate the HTTPS listener serves expires (its notAfter), in Unix seconds.",
        )
        .map_err(|e| metric_error(source, e))?;
        not_after.set(validity.not_after);
        let reload_failures = IntCounter::new(
            "tls_certificate_reload_failures_total",
            "Certificate reloads refused (unreadable or mismatched files, or a certificate outside its validity period); the previous certificate stayed.",
        )
        .map_err(|e| metric_error(source, e))?;
        let reload_failing = IntGauge::new(
            "tls_certificate_reload_failing",
            "1 from a refused certificate reload until a reload succeeds; the previous certificate is being served meanwhile.",
        )
        .map_err(|e| metric_error(source, e))?;
        Ok(Self {
            current: ArcSwap::from_pointee(key),
            validity: std::sync::Mutex::new(validity),
            cert_path: tls.cert_path.clone(),
            key_path: tls.key_path.clone(),
            source: source.to_owned(),
            not_after,
            reload_failures,
            reload_failing,
        })
    }

    /// Re-reads the files and, when they are good and the certificate is
    /// within its validity period, serves them from the next handshake on.
    /// On error the current certificate stays.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let loaded = load(&self.cert_path, &self.key_path, &self.source)
            .and_then(|(key, v)| self.validity_error(v).map_or(Ok((key, v)), Err));
        let (key, validity) = loaded.inspect_err(|_| {
            self.reload_failures.inc();
            self.reload_failing.set(1);
        })?;
        let mut served = self.validity.lock().unwrap_or_else(|p| p.into_inner());
        self.current.store(Arc::new(key));
        *served = validity;
        self.not_after.set(validity.not_after);
        self.reload_failing.set(0);
        Ok(())
    }

    /// Why the certificate being served should not be (expired, or not
    /// valid yet), naming the config file, key and file; `None` when it is
    /// within its validity period.
    pub fn validity_problem(&self) -> Option<ConfigError> {
        let served = *self.validity.lock().unwrap_or_else(|p| p.into_inner());
        self.validity_error(served)
    }

    /// The error naming this store's certificate file when `validity` does
    /// not cover the present.
    fn validity_error(&self, validity: Validity) -> Option<ConfigError> {
        validity.problem_at(unix_now()).map(|problem| ConfigError {
            file: self.source.clone(),
            key: "tls.cert_path".into(),
            problem: format!("{}: {problem}", self.cert_path.display()),
        })
    }

    /// The series this store keeps up to date, for the edge's registry.
    pub fn metrics(&self) -> [Box<dyn prometheus::core::Collector>; 3] {
        [
            Box::new(self.not_after.clone()),
            Box::new(self.reload_failures.clone()),
            Box::new(self.reload_failing.clone()),
        ]
    }

    /// SHA-256 of the leaf certificate being served, in hex (for logs).
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.current.load())
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn fingerprint(key: &CertifiedKey) -> String {
    key.cert
        .first()
        .map(|c| pingora::tls::hash_certificate(c))
        .unwrap_or_default()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn metric_error(source: &str, e: prometheus::Error) -> ConfigError {
    ConfigError {
        file: source.to_owned(),
        key: "tls".into(),
        problem: format!("registering the certificate's metrics: {e}"),
    }
}

fn unix_now() -> i64 {
    i64::try_from(crate::store::record::now_ms() / 1000).unwrap_or(i64::MAX)
}

/// The validity period of a DER certificate.
fn validity_of(der: &[u8]) -> Result<Validity, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the certificate does not parse as X.509: {e}"))?;
    let v = cert.validity();
    Ok(Validity {
        not_before: v.not_before.timestamp(),
        not_after: v.not_after.timestamp(),
    })
}

/// Reads a PEM certificate chain and its private key, checks that they
/// belong together, and reads the leaf's validity period.
fn load(
    cert_path: &Path,
    key_path: &Path,
    source: &str,
) -> Result<(CertifiedKey, Validity), ConfigError> {
    let err = |key: &str, path: &Path, problem: String| ConfigError {
        file: source.to_owned(),
        key: key.to_owned(),
        problem: format!("{}: {problem}", path.display()),
    };
    let cert_err = |p: String| err("tls.cert_path", cert_path, p);
    let key_err = |p: String| err("tls.key_path", key_path, p);
    // Plain reads first, so that a missing or unreadable file is named with
    // the operating system's reason.
    std::fs::read(cert_path).map_err(|e| cert_err(e.to_string()))?;
    std::fs::read(key_path).map_err(|e| key_err(e.to_string()))?;
    let (cert_str, key_str) = (
        cert_path.display().to_string(),
        key_path.display().to_string(),
    );
    match pingora::tls::load_pem_file_ca(&cert_str) {
        Ok(first) if !first.is_empty() => {}
        Ok(_) => {
            return Err(cert_err(
                "no PEM certificate (BEGIN CERTIFICATE) in it".into(),
            ));
        }
        Err(e) => return Err(cert_err(format!("not a PEM certificate file: {e}"))),
    }
    match pingora::tls::load_pem_file_private_key(&key_str) {
        Ok(first) if !first.is_empty() => {}
        Ok(_) => {
            return Err(key_err(
                "no PEM private key (PKCS#8, PKCS#1 or SEC1) in it".into(),
            ));
        }
        Err(e) => return Err(key_err(format!("not a PEM private key file: {e}"))),
    }
    let (certs, key) = match pingora::tls::load_certs_and_key_files(&cert_str, &key_str) {
        Ok(Some(pair)) => pair,
        Ok(None) => return Err(cert_err("no certificate or no key could be read".into())),
        Err(e) => return Err(cert_err(e.to_string())),
    };
    let leaf = certs
        .first()
        .ok_or_else(|| cert_err("no certificate in it".into()))?;
    let validity = validity_of(leaf.as_ref()).map_err(cert_err)?;
    pingora::tls::install_default_crypto_provider();
    let provider = CryptoProvider::get_default()
        .ok_or_else(|| cert_err("no rustls crypto provider installed".into()))?;
    let key = CertifiedKey::from_der(certs, key, provider).map_err(|e| {
        key_err(format!(
            "unusable with the certificate in {}: {e}",
            cert_path.display()
        ))
    })?;
    Ok((key, validity))
}

/// The TLS settings of the HTTPS listener: certificates from `store`,
/// ALPN `h2` + `http/1.1` (or `http/1.1` alone).
pub fn settings(store: Arc<CertStore>, http2: bool) -> TlsSettings {
    // The paths are unused: a resolver is set, and `build` then ignores them.
    let mut settings = TlsSettings::intermediate("", "").expect("infallible for rustls");
    settings.set_cert_resolver(store);
    if http2 {
        settings.enable_h2();
    } else {
        settings.set_alpn(ALPN::H1);
    }
    settings
}

/// Bounds the start of a TLS handshake by `edge.client_header_timeout_ms`:
/// the client's first record (its ClientHello) must arrive whole within it,
/// or the connection is dropped. Pingora allows a handshake a fixed 60 s and
/// the edge's header time starts only after it, so a client that connected
/// to the HTTPS port and sent nothing (or a ClientHello a byte at a time)
/// held its connection for 60 s whatever the setting. What follows the
/// ClientHello (the client's answer to the server's flight) keeps Pingora's
/// 60 s: by then the client has sent a whole ClientHello and had a key
/// exchange computed for it.
pub struct ClientHelloDeadline {
    pub limit: Duration,
}

/// Largest TLS record (2^14 bytes of plaintext, plus room for the
/// expansion a record may carry) and its 5-byte header.
const MAX_TLS_RECORD: usize = 5 + (1 << 14) + 2048;

#[async_trait]
impl pingora::listeners::PreTlsProcess for ClientHelloDeadline {
    async fn process(
        &self,
        stream: &mut pingora::protocols::l4::stream::Stream,
    ) -> pingora::Result<()> {
        use pingora::protocols::Peek;
        let whole_first_record = async {
            let mut header = [0u8; 5];
            stream.try_peek(&mut header).await?;
            // Not a handshake record: rustls refuses it at once.
            if header[0] != 0x16 {
                return Ok(());
            }
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            let mut record = vec![0u8; (5 + len).min(MAX_TLS_RECORD)];
            stream.try_peek(&mut record).await.map(|_| ())
        };
        match tokio::time::timeout(self.limit, whole_first_record).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(pingora::Error::because(
                pingora::ErrorType::ReadError,
                "reading the TLS ClientHello",
                e,
            )),
            Err(_) => Err(pingora::Error::explain(
                pingora::ErrorType::ReadTimedout,
                "no whole TLS ClientHello within edge.client_header_timeout_ms",
            )),
        }
    }
}

/// Whether the request came over TLS (HTTP/1.1 or HTTP/2).
pub fn is_tls(session: &Session) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

/// Turns the HSTS module of this request on when it came over TLS; returns
/// whether it did. Called first thing in `request_filter`.
pub fn mark_downstream(session: &mut Session) -> bool {
    let tls = is_tls(session);
    if tls && let Some(hsts) = session.downstream_modules_ctx.get_mut::<Hsts>() {
        hsts.on = true;
    }
    tls
}

/// The `https://` URL of a plain-HTTP request: its host (from an
/// absolute-form target, else the `Host` header) without its port, the
/// HTTPS port unless it is 443, and the path and query as received. `None`
/// when there is no host, or one that is not a plain DNS name, IPv4 or
/// bracketed IPv6 address (so that nothing else ends up in `Location`).
pub fn https_location(uri: &http::Uri, host_header: Option<&[u8]>, port: u16) -> Option<String> {
    let authority = match uri.authority() {
        Some(a) => a.as_str().as_bytes(),
        None => host_header?,
    };
    let authority = std::str::from_utf8(authority).ok()?.trim();
    let host = match authority.rsplit_once(':') {
        // `[::1]:80`, `host:80`; but `[::1]` alone has colons in it.
        Some((h, p)) if !authority.ends_with(']') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    };
    let valid = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    };
    if !valid {
        return None;
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let path = if path.starts_with('/') { path } else { "/" };
    Some(if port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{port}{path}")
    })
}

/// The edge's downstream modules: Pingora's default (response compression,
/// off) and, when `tls.hsts_max_age_secs` is not 0, [`Hsts`].
pub fn init_downstream_modules(modules: &mut HttpModules, tls: Option<&TlsConfig>) {
    modules.add_module(ResponseCompressionBuilder::enable(0));
    let hsts = tls
        .and_then(|t| t.hsts.as_deref())
        .and_then(|v| http::HeaderValue::from_str(v).ok());
    if let Some(value) = hsts {
        modules.add_module(Box::new(HstsBuilder { value }));
    }
}

/// Length of the HTTP/2 client connection preface (`PRI * HTTP/2.0...`).
const H2_PREFACE_LEN: usize = 24;

/// Waits at most `limit` for the first 24 bytes of an HTTP/2 connection (the
/// client preface) and returns the stream with them put back in front, for
/// Pingora's HTTP/2 loop to read; `None` (close) when they do not come in
/// time. Pingora 0.9 itself waits for them without a limit, so a client that
/// completes a TLS handshake with ALPN `h2` and then says nothing would hold
/// its connection for ever.
pub async fn h2_preface(mut stream: Stream, limit: Duration) -> Option<Stream> {
    let mut head = [0u8; H2_PREFACE_LEN];
    let mut filled = 0;
    let read = async {
        while filled < head.len() {
            match stream.read(&mut head[filled..]).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => filled += n,
            }
        }
        true
    };
    if !matches!(tokio::time::timeout(limit, read).await, Ok(true)) {
        return None;
    }
    Some(Box::new(Prefaced {
        head,
        pos: 0,
        inner: stream,
    }))
}

/// A stream whose first bytes were already read: they are read again first.
#[derive(Debug)]
struct Prefaced {
    head: [u8; H2_PREFACE_LEN],
    pos: usize,
    inner: Stream,
}

impl AsyncRead for Prefaced {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.head.len() {
            let n = (this.head.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.head[this.pos..this.pos + n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefaced {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// Everything else is the TLS stream's.
#[async_trait]
impl Shutdown for Prefaced {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await
    }
}

impl UniqueID for Prefaced {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Prefaced {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Prefaced {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Prefaced {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Prefaced {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

impl Peek for Prefaced {}

/// Registers [`Hsts`] for every request; it adds the header only once
/// [`mark_downstream`] has seen a TLS request.
pub struct HstsBuilder {
    pub value: http::HeaderValue,
}

impl HttpModuleBuilder for HstsBuilder {
    fn init(&self) -> Module {
        Box::new(Hsts {
            value: self.value.clone(),
            on: false,
        })
    }
}

/// Per request: adds `Strict-Transport-Security` to the response when on.
pub struct Hsts {
    value: http::HeaderValue,
    on: bool,
}

#[async_trait]
impl HttpModule for Hsts {
    async fn response_header_filter(
        &mut self,
        resp: &mut ResponseHeader,
        _end_of_stream: bool,
    ) -> pingora::Result<()> {
        if self.on {
            resp.insert_header("strict-transport-security", self.value.clone())?;
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Reloads the certificate on SIGHUP. While this service has not started,
/// SIGHUP is ignored rather than fatal (see [`ignore_hangup`]).
pub struct ReloadOnHangup {
    pub store: Arc<CertStore>,
}

#[async_trait]
impl BackgroundService for ReloadOnHangup {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(
                    "tls: cannot listen for SIGHUP ({e}); certificates reload only by a graceful upgrade"
                );
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                got = hangup.recv() => if got.is_none() { return },
            }
            // A few kilobytes of files; this service has its own runtime thread.
            match self.store.reload() {
                Ok(()) => tracing::info!(
                    sha256 = %self.store.fingerprint(),
                    "tls: certificate reloaded (SIGHUP)"
                ),
                Err(e) => tracing::error!(
                    "tls: certificate reload failed, still serving sha256 {}: {e}",
                    self.store.fingerprint()
                ),
            }
        }
    }
}

/// Makes SIGHUP harmless until [`ReloadOnHangup`] takes it over: its
/// default action would end the edge. Called before any listener opens.
pub fn ignore_hangup() {
    // SAFETY: installs the SIG_IGN disposition; no handler code runs.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(target: &str, host: Option<&str>, port: u16) -> Option<String> {
        let uri: http::Uri = target.parse().unwrap();
        https_location(&uri, host.map(str::as_bytes), port)
    }

    #[tokio::test]
    async fn the_h2_preface_is_read_again_or_the_connection_dropped() {
        use tokio::io::AsyncWriteExt;
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nrest";
        let (mut client, server) = tokio::io::duplex(1024);
        // Sent in pieces: it is gathered.
        client.write_all(&preface[..5]).await.unwrap();
        let sending = async {
            client.write_all(&preface[5..]).await.unwrap();
            client
        };
        let (stream, mut client) = tokio::join!(
            h2_preface(Box::new(server), Duration::from_secs(60)),
            sending
        );
        let mut stream = stream.expect("preface read");
        let mut got = vec![0u8; preface.len()];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..], &preface[..]);
        stream.write_all(b"back").await.unwrap();
        let mut back = [0u8; 4];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");

        // Silence, a partial preface, or a close: dropped.
        let ms = Duration::from_millis(20);
        let (_quiet, server) = tokio::io::duplex(64);
        assert!(h2_preface(Box::new(server), ms).await.is_none());
        let (mut partial, server) = tokio::io::duplex(64);
        partial.write_all(b"PRI * HTTP").await.unwrap();
        assert!(h2_preface(Box::new(server), ms).await.is_none());
        let (closed, server) = tokio::io::duplex(64);
        drop(closed);
        let long = Duration::from_secs(60);
        assert!(h2_preface(Box::new(server), long).await.is_none());
    }

    #[test]
    fn validity_allows_a_few_minutes_of_clock_skew_before_not_before() {
        let v = Validity {
            not_before: 10_000,
            not_after: 20_000,
        };
        assert_eq!(v.problem_at(15_000), None);
        assert_eq!(v.problem_at(20_000), None);
        assert_eq!(v.problem_at(10_000 - NOT_BEFORE_SKEW_SECS), None);
        let early = v.problem_at(10_000 - NOT_BEFORE_SKEW_SECS - 1).unwrap();
        assert!(
            early.contains("not valid before 1970-01-01T02:46:40.000Z"),
            "{early}"
        );
        let late = v.problem_at(20_001).unwrap();
        assert!(
            late.contains("expired at 1970-01-01T05:33:20.000Z"),
            "{late}"
        );
    }

    #[test]
    fn https_location_keeps_path_and_query_and_swaps_the_port() {
        let cases = [
            (
                "/abc?x=1&y",
                Some("ulo.ad"),
                443,
                Some("https://ulo.ad/abc?x=1&y"),
            ),
            ("/abc", Some("ulo.ad:80"), 443, Some("https://ulo.ad/abc")),
            (
                "/abc",
                Some("127.0.0.1:8080"),
                8443,
                Some("https://127.0.0.1:8443/abc"),
            ),
            ("/", Some("[::1]:8080"), 8443, Some("https://[::1]:8443/")),
            ("/", Some("[::1]"), 443, Some("https://[::1]/")),
            (
                "http://a.example:80/p?q",
                Some("b.example"),
                443,
                Some("https://a.example/p?q"),
            ),
            ("/", None, 443, None),
            ("/", Some(""), 443, None),
            ("/", Some("evil.example/x"), 443, None),
            ("/", Some("user@evil.example"), 443, None),
            ("/", Some("[zz]"), 443, None),
            ("/", Some("a b"), 443, None),
        ];
        for (target, host, port, want) in cases {
            assert_eq!(
                loc(target, host, port).as_deref(),
                want,
                "{target} {host:?}"
            );
        }
    }
}
