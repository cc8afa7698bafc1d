//! Time limits on clients that are slow to send a request: slowloris
//! senders, silent connections and idle keep-alive connections.
//!
//! Pingora 0.9 bounds each *read* of a request header (60 s), not the header
//! as a whole: a client that sends a byte every 59 s keeps its connection
//! (and a header buffer of up to 1 MiB) for as long as it likes. After a
//! first HTTP/1.1 request, the wait for the next one on the same connection
//! has no limit at all (its keep-alive status is "infinite").
//!
//! [`ClientLimits`] wraps the proxy application and reads each request
//! header itself, under two limits (`edge.client_header_timeout_ms`,
//! `edge.keepalive_timeout_ms`), before handing the connection to Pingora.
//! The bytes read are given to Pingora as the start of the request
//! (`set_pipelined_prefix`), so Pingora parses them exactly as if it had
//! read them, with its own limits (1 MiB of header, 256 header lines, the
//! smuggling checks). HTTP/1.x is served this way, in clear or over TLS
//! (the edge has no h2c). An HTTP/2 connection (ALPN `h2`, TLS listener
//! only) goes to Pingora's own HTTP/2 loop once its client preface has come
//! within `edge.client_header_timeout_ms` (`tls::h2_preface`); its idle limit
//! is `edge.keepalive_timeout_ms` (`h2_idle_timeout`).
//!
//! When the redirect loops run ([`super::redirect_loop`]), they accept the
//! cleartext connections and apply the same two limits themselves; a
//! connection whose request the fast path does not answer comes here
//! (`ClientLimits::serve` with the bytes read).

use std::future::Future;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, HttpServerOptions, ServerApp};
use pingora::protocols::ALPN;
use pingora::protocols::GetSocketDigest;
use pingora::protocols::Stream;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use pingora::server::configuration::ServerConf;
use pingora::services::listening::Service;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

use super::fast_path::RedirectFastPath;
use super::redirect_loop::{HandBack, RedirectLoops};
use crate::config::EdgeConfig;

/// Reading stops here (Pingora's own limit is 1 MiB - 1); Pingora then
/// refuses the oversized header with a 400.
pub(super) const MAX_HEAD: usize = 1 << 20;

/// The proxy application with header and keep-alive time limits.
pub struct ClientLimits<A> {
    inner: Arc<A>,
    /// From accepting a connection (first request) or from the first byte
    /// of a later request, to the end of its header.
    header_timeout: Duration,
    /// Idle time allowed between two requests on a kept-alive connection.
    keepalive_timeout: Duration,
    /// Answers plain redirects without Pingora's session (`fast_path.rs`).
    fast: Option<Arc<RedirectFastPath>>,
    /// Accept and serve the cleartext connections (`redirect_loop.rs`,
    /// `loop_listener.rs`).
    loops: Option<RedirectLoops>,
    /// The `Strict-Transport-Security` value (`tls.hsts_max_age_secs`),
    /// for the 408 written here to a TLS client: Pingora's modules, which
    /// add it to every other answer, never see that one.
    hsts: Option<String>,
}

impl<A> ClientLimits<A> {
    pub fn new(inner: A, header_timeout: Duration, keepalive_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(inner),
            header_timeout,
            keepalive_timeout,
            fast: None,
            loops: None,
            hsts: None,
        }
    }
}

/// The proxy wrapped in [`ClientLimits`], for Pingora's listening service
/// ([`Shared`]) and the redirect loops' listener (`loop_listener.rs`).
pub fn limits<SV>(
    conf: &Arc<ServerConf>,
    proxy: SV,
    edge: &EdgeConfig,
    fast: Option<Arc<RedirectFastPath>>,
    hsts: Option<&str>,
) -> Arc<ClientLimits<pingora::proxy::HttpProxy<SV>>>
where
    SV: pingora::proxy::ProxyHttp + Send + Sync + 'static,
    SV::CTX: Send + Sync,
{
    let mut app = pingora::proxy::http_proxy(conf, proxy);
    let mut options = HttpServerOptions::default();
    options.h2_idle_timeout = Some(edge.keepalive_timeout);
    app.server_options = Some(options);
    let mut limits = ClientLimits::new(app, edge.client_header_timeout, edge.keepalive_timeout);
    if edge.redirect_loop {
        limits.loops = fast.clone().map(|fast| {
            RedirectLoops::new(
                fast,
                edge.client_header_timeout,
                edge.keepalive_timeout,
                edge.busy_poll,
                conf.threads,
            )
        });
    }
    limits.fast = fast;
    limits.hsts = hsts.map(str::to_owned);
    Arc::new(limits)
}

/// Pingora's listening service for shared [`ClientLimits`].
pub fn service<A>(limits: &Arc<ClientLimits<A>>) -> Service<Shared<A>>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    Service::new("Pingora HTTP Proxy Service".into(), Shared(limits.clone()))
}

/// [`ClientLimits`] as Pingora's application: Pingora's service owns its
/// application, and the loops' listener serves the same one.
pub struct Shared<A>(Arc<ClientLimits<A>>);

#[async_trait]
impl<A> ServerApp for Shared<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        self.0.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.0.cleanup().await;
    }
}

/// How reading a request header ended.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// The buffer holds a complete header (maybe followed by body bytes), or
    /// more than [`MAX_HEAD`] bytes without one: Pingora takes it from here.
    Ready,
    /// The client closed, or the edge is shutting down between requests.
    Closed,
    /// The time ran out; `true` when part of a request had arrived.
    TimedOut(bool),
}

/// Finds the end of a request header by httparse's rules (empty lines
/// before the request line are skipped, lines end in LF or CRLF, an empty
/// line ends the header), incrementally: each byte is looked at about once,
/// however the header is split into reads.
#[derive(Debug, Default)]
pub(super) struct HeaderScan {
    /// Where the request line starts, once a byte other than CR/LF came.
    start: Option<usize>,
    /// Bytes already looked at.
    scanned: usize,
    /// Bytes looked at over all calls, for the test that each call's work
    /// is bounded by what came since the last one.
    #[cfg(test)]
    looked_at: usize,
}

impl HeaderScan {
    /// True when `buf` (which only ever grows) holds a whole header.
    pub(super) fn complete(&mut self, buf: &[u8]) -> bool {
        // The usual case, a request that came whole in one read, starts with
        // its request line and ends with an empty line: no byte-by-byte
        // scan. (When this says yes, the scan below would too. It looks at
        // the first byte, not for any byte that is not CR or LF: a buffer of
        // empty lines, which a client can grow two bytes at a time, must not
        // be looked through on every read.)
        let tail = self.look(&buf[buf.len().saturating_sub(4)..]);
        if (tail.ends_with(b"\r\n\r\n") || tail.ends_with(b"\n\n"))
            && self
                .look(&buf[..buf.len().min(1)])
                .first()
                .is_some_and(|&b| b != b'\r' && b != b'\n')
        {
            return true;
        }
        let start = match self.start {
            Some(start) => start,
            None => {
                let new = self.look(&buf[self.scanned..]);
                let Some(skip) = new.iter().position(|&b| b != b'\r' && b != b'\n') else {
                    self.scanned = buf.len();
                    return false;
                };
                self.scanned += skip;
                *self.start.insert(self.scanned)
            }
        };
        // An end (`\n\n` or `\n\r\n`) may straddle the previous read.
        let from = self.scanned.saturating_sub(2).max(start);
        self.scanned = buf.len();
        let new = self.look(&buf[from..]);
        (0..new.len()).any(|i| {
            new[i] == b'\n'
                && match new.get(i + 1) {
                    Some(b'\n') => true,
                    Some(b'\r') => new.get(i + 2) == Some(&b'\n'),
                    _ => false,
                }
        })
    }

    /// The bytes `complete` looks at, every one of them through here (so
    /// that a test can count them).
    #[inline(always)]
    fn look<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        #[cfg(test)]
        {
            self.looked_at += bytes.len();
        }
        bytes
    }
}

/// Capacity of a connection's header buffer (grown when a header is longer).
const HEAD_BUF: usize = 4096;
/// A header buffer grown past this is dropped after its request, not kept
/// for the next one on the connection.
const HEAD_BUF_KEEP: usize = 16 * 1024;

/// Reads one request header from `stream` into `buf` (empty on entry).
///
/// `deadline` bounds the wait: for a connection's first request it is the
/// accept plus the header timeout; between requests it is the end of the
/// keep-alive time, and `header` then restarts the clock at the request's
/// first byte. `shutdown`, when given, ends a wait for the first byte when
/// the edge shuts down (a kept-alive connection between requests).
///
/// `timer` lives as long as the connection and runs at or ahead of the
/// deadline: it is moved on lazily, only when it fires before the deadline,
/// so a request that arrives whole in one read costs no timer work at all
/// (tokio's `Sleep::reset` costs a few hundred instructions).
async fn read_head<S, F>(
    stream: &mut S,
    buf: &mut BytesMut,
    mut timer: Pin<&mut Sleep>,
    deadline: Instant,
    header: Option<Duration>,
    mut shutdown: Option<Pin<&mut F>>,
) -> Head
where
    S: tokio::io::AsyncRead + Unpin,
    F: Future<Output = ()>,
{
    if buf.capacity() < HEAD_BUF {
        buf.reserve(HEAD_BUF);
    }
    let mut deadline = deadline;
    if timer.deadline() > deadline {
        timer.as_mut().reset(deadline);
    }
    let mut scan = HeaderScan::default();
    // Set once the first byte of a later request came.
    let mut first_byte = false;
    loop {
        if scan.complete(buf) || buf.len() > MAX_HEAD {
            return Head::Ready;
        }
        // The header is not whole yet: its clock runs from its first byte.
        if std::mem::take(&mut first_byte)
            && let Some(header) = header
        {
            deadline = Instant::now() + header;
            if timer.deadline() > deadline {
                timer.as_mut().reset(deadline);
            }
        }
        let before = buf.len();
        let idle = before == 0;
        let read = stream.read_buf(buf);
        tokio::pin!(read);
        let read = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = read.as_mut().poll(cx) {
                return Poll::Ready(Some(Ok(r)));
            }
            if idle
                && let Some(stop) = shutdown.as_mut()
                && stop.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(None);
            }
            while timer.as_mut().poll(cx).is_ready() {
                if Instant::now() >= deadline {
                    return Poll::Ready(Some(Err(())));
                }
                // Ahead of the deadline: move it on (this registers it).
                timer.as_mut().reset(deadline);
            }
            Poll::Pending
        })
        .await;
        match read {
            None => return Head::Closed,
            Some(Err(())) => return Head::TimedOut(before > 0),
            Some(Ok(Ok(0)) | Ok(Err(_))) => return Head::Closed,
            // The first byte of a later request starts its header's clock.
            Some(Ok(Ok(_))) => first_byte = idle,
        }
    }
}

/// Resolves when the edge starts shutting down (or can no longer say).
pub(super) async fn shutdown_signal(mut watch: ShutdownWatch) {
    while !*watch.borrow_and_update() {
        if watch.changed().await.is_err() {
            return;
        }
    }
}

/// [`shutdown_signal`] for a connection's waits between requests, cheap to
/// poll again and again: after its first poll has registered the
/// connection task's waker with the watch, a poll is one atomic load of the
/// watch's version until that changes. It must only ever be polled from
/// the one task (the connection's), whose wakers are all alike.
struct Stop {
    watch: ShutdownWatch,
    wait: Pin<Box<dyn Future<Output = ()> + Send>>,
    armed: bool,
    done: bool,
}

impl Stop {
    fn new(watch: &ShutdownWatch) -> Self {
        Self {
            watch: watch.clone(),
            wait: Box::pin(shutdown_signal(watch.clone())),
            armed: false,
            done: false,
        }
    }
}

impl Future for Stop {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(());
        }
        if this.armed && !this.watch.has_changed().unwrap_or(true) {
            return Poll::Pending;
        }
        this.armed = true;
        let polled = this.wait.as_mut().poll(cx);
        this.done = polled.is_ready();
        polled
    }
}

/// The answer to a request whose header did not arrive in time.
pub(super) fn timeout_response() -> Vec<u8> {
    timeout_response_with(None)
}

/// [`timeout_response`], with `Strict-Transport-Security: {hsts}` (to a
/// TLS client).
fn timeout_response_with(hsts: Option<&str>) -> Vec<u8> {
    let body = super::proxy::error_body(
        "request_timeout",
        "the request header did not arrive in time",
    );
    let hsts = hsts
        .map(|v| format!("strict-transport-security: {v}\r\n"))
        .unwrap_or_default();
    let mut out = format!(
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{hsts}connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

impl<A> ClientLimits<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    /// What Pingora's own HTTP/1 loop does, with each header read first,
    /// until the connection ends (nothing is left to hand back to Pingora).
    /// `handed_back`: a whole header (or more than [`MAX_HEAD`] bytes)
    /// that a redirect loop read from this connection and did not answer.
    async fn serve(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
        handed_back: Option<BytesMut>,
    ) {
        let accepted = Instant::now();
        // Nothing read yet (a loop could not take the connection): a first
        // request, its header clock running from now.
        let handed_back = handed_back.filter(|head| !head.is_empty());
        let mut first = handed_back.is_none();
        // The fast path serves cleartext only (HSTS and TLS details stay
        // with Pingora); it needs the peer for rate limits and logs.
        let fast = self
            .fast
            .as_ref()
            .filter(|_| stream.get_ssl_digest().is_none());
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        // Per connection, reused by every request on it: the header buffer
        // (unless Pingora takes it), the answer buffer, the header timer and
        // the shutdown signal.
        let mut ready = handed_back.is_some();
        let mut buf = handed_back.unwrap_or_default();
        let mut answer = Vec::new();
        let timer = tokio::time::sleep_until(accepted + self.header_timeout);
        tokio::pin!(timer);
        let mut stop = Stop::new(shutdown);
        // When the wait for the next request began.
        let mut idle_from = accepted;
        let mut settings: Option<HttpPersistentSettings> = None;
        // TLS connections get theirs at accept.
        let mut limit = WriteLimit::of(&stream);
        loop {
            let head = if std::mem::take(&mut ready) {
                Head::Ready
            } else if first {
                // First request: the header timeout runs from the accept.
                let deadline = accepted + self.header_timeout;
                let no_stop: Option<Pin<&mut std::future::Pending<()>>> = None;
                read_head(
                    &mut stream,
                    &mut buf,
                    timer.as_mut(),
                    deadline,
                    None,
                    no_stop,
                )
                .await
            } else {
                let deadline = idle_from + self.keepalive_timeout;
                let header = Some(self.header_timeout);
                read_head(
                    &mut stream,
                    &mut buf,
                    timer.as_mut(),
                    deadline,
                    header,
                    Some(Pin::new(&mut stop)),
                )
                .await
            };
            match head {
                Head::Ready => {}
                Head::Closed | Head::TimedOut(false) => return,
                Head::TimedOut(true) => {
                    let hsts = self
                        .hsts
                        .as_deref()
                        .filter(|_| stream.get_ssl_digest().is_some());
                    let response = timeout_response_with(hsts);
                    let answer = async {
                        stream.write_all(&response).await?;
                        stream.flush().await?;
                        stream.shutdown().await
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
                    return;
                }
            }
            let started = Instant::now();
            let closing = *shutdown.borrow();
            if let Some(fast) = fast
                && settings.is_none()
                && let Some(keepalive) =
                    fast.answer(&buf, peer, started.into_std(), closing, &mut answer)
            {
                if (keepalive || answer.len() > FITS_SEND_BUFFER)
                    && !limit.set(&stream, self.keepalive_timeout)
                {
                    return;
                }
                if stream.write_all(&answer).await.is_err() || stream.flush().await.is_err() {
                    return;
                }
                if !keepalive || *shutdown.borrow() {
                    return;
                }
                // A connection keeps its buffer, but not one a huge header
                // grew: idle connections must not pin megabytes.
                if buf.capacity() > HEAD_BUF_KEEP {
                    buf = BytesMut::new();
                } else {
                    buf.clear();
                }
                // The keep-alive clock starts at this request, microseconds
                // before its answer went out: no second clock read.
                idle_from = started;
                first = false;
                continue;
            }
            if !limit.set(&stream, self.keepalive_timeout) {
                return;
            }
            let mut session = ServerSession::new_http1(stream);
            if first || settings.is_none() {
                // Pingora's defaults for a new connection.
                session.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
                session.set_keepalive_reuses_remaining(
                    self.inner
                        .server_options()
                        .and_then(|o| o.keepalive_request_limit),
                );
            } else if let Some(s) = settings.take() {
                s.apply_to_session(&mut session);
            }
            // The edge does not enable pipelining, so no prefix is carried
            // over from the previous request: the header read is the prefix.
            session.set_pipelined_prefix(std::mem::take(&mut buf));
            let Some(reused) = self.inner.process_new_http(session, shutdown).await else {
                return;
            };
            (stream, settings) = reused.consume();
            idle_from = Instant::now();
            first = false;
        }
    }
}

/// An answer of at most this many bytes, written to a connection that has
/// sent nothing before, fits in its socket's send buffer (at least
/// `SOCK_MIN_SNDBUF`, about 4.5 KiB, and 16 KiB by default): writing it
/// never waits on the client, so it needs no write time limit.
const FITS_SEND_BUFFER: usize = 2048;

/// Whether a cleartext connection has its write time limit:
/// `TCP_USER_TIMEOUT` = the keep-alive time, so that the kernel cuts off a
/// client that reads none of its answers (or acknowledges nothing) for that
/// long, whatever is writing to it (Pingora sets no time limit on writing).
/// It is set before the first write that could wait on the client: an
/// answer larger than [`FITS_SEND_BUFFER`], anything Pingora serves, or
/// any answer after which the connection is kept. A one-click client,
/// whose request the fast path answers and whose connection then closes,
/// never needs it, and setting it at accept (with Pingora's five keepalive
/// options) was five of the fourteen system calls such a connection cost.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WriteLimit {
    Set,
    NotYet,
}

impl WriteLimit {
    /// `NotYet` for Pingora's plain TCP stream; TLS streams got theirs at
    /// accept (through the listener's keepalive settings).
    fn of(stream: &Stream) -> Self {
        if stream.as_any().is::<L4Stream>() {
            Self::NotYet
        } else {
            Self::Set
        }
    }

    /// Sets the limit unless it is set; false when the socket refused it
    /// (the connection is then closed rather than written to unbounded).
    fn set(&mut self, stream: &Stream, keepalive: Duration) -> bool {
        if *self == Self::Set {
            return true;
        }
        let Some(l4) = stream.as_any().downcast_ref::<L4Stream>() else {
            return false;
        };
        let ms = super::user_timeout_ms(keepalive) as libc::c_int;
        if super::set_tcp_option(l4.as_raw_fd(), libc::TCP_USER_TIMEOUT, ms).is_err() {
            return false;
        }
        *self = Self::Set;
        true
    }
}

impl<A> ClientLimits<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    /// Serves a connection Pingora accepted (Pingora's `ServerApp`, through
    /// [`Shared`]).
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // HTTP/2 is framed differently: Pingora's loop serves it, once the
        // client preface has come within the header timeout.
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            let stream = super::tls::h2_preface(stream, self.header_timeout).await?;
            return self.inner.process_new(stream, shutdown).await;
        }
        self.serve(stream, shutdown, None).await;
        // Served to its end here: nothing for Pingora to reuse.
        None
    }

    /// What Pingora's service does once it stops listening (the loops'
    /// listener does it too).
    pub async fn cleanup(&self) {
        self.inner.http_cleanup().await;
    }

    /// The redirect loops, when they serve this edge's connections.
    pub fn loops(&self) -> Option<&RedirectLoops> {
        self.loops.as_ref()
    }

    /// How the loops give a connection to Pingora.
    pub fn back(self: &Arc<Self>, shutdown: &ShutdownWatch) -> Arc<dyn HandBack> {
        Arc::new(BackToPingora {
            limits: Arc::downgrade(self),
            shutdown: shutdown.clone(),
        })
    }
}

/// Pingora's plain TCP stream, the one kind of stream a loop can take.
type L4Stream = pingora::protocols::l4::stream::Stream;

/// A connection from a redirect loop goes on as a task on the loops'
/// listener's runtime.
struct BackToPingora<A> {
    limits: Weak<ClientLimits<A>>,
    shutdown: ShutdownWatch,
}

impl<A> HandBack for BackToPingora<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    fn hand_back(&self, fd: OwnedFd, head: BytesMut, runtime: &tokio::runtime::Handle) {
        let Some(limits) = self.limits.upgrade() else {
            return;
        };
        let shutdown = self.shutdown.clone();
        runtime.spawn(async move {
            let tcp = match tokio::net::TcpStream::from_std(std::net::TcpStream::from(fd)) {
                Ok(tcp) => tcp,
                Err(e) => {
                    tracing::debug!("a connection back from a redirect loop: {e}");
                    return;
                }
            };
            // TCP_NODELAY came with the socket, from the listener
            // (`loop_listener.rs`).
            let mut l4 = L4Stream::from(tcp);
            let digest = pingora::protocols::SocketDigest::from_raw_fd(l4.as_raw_fd());
            l4.set_socket_digest(digest);
            limits.serve(Box::new(l4), &shutdown, Some(head)).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whole, and fed in every split into two reads, and a byte at a time.
    fn complete(buf: &[u8]) -> bool {
        let whole = HeaderScan::default().complete(buf);
        for cut in 0..=buf.len() {
            let mut scan = HeaderScan::default();
            let early = scan.complete(&buf[..cut]);
            assert_eq!(early || scan.complete(buf), whole, "cut at {cut}");
        }
        let mut scan = HeaderScan::default();
        let bytewise = (0..=buf.len()).any(|n| scan.complete(&buf[..n]));
        assert_eq!(bytewise, whole);
        whole
    }

    /// Each call looks at what came since the last one (and a few bytes
    /// more), whatever the buffer holds: a header grown two bytes at a time
    /// costs its length, not its length squared.
    #[test]
    fn each_byte_is_looked_at_about_once() {
        let request = &b"GET /abc HTTP/1.1\r\nHost: x\r\n"[..];
        for (prefix, piece) in [
            (&b""[..], &b"\r\n"[..]),
            (b"\r\n", b"X-A: b\r\n"),
            (request, b"X-A: b\r\n"),
            (request, b"X"),
        ] {
            let mut buf = prefix.to_vec();
            let mut scan = HeaderScan::default();
            let calls = 4000;
            for _ in 0..calls {
                buf.extend_from_slice(piece);
                assert!(!scan.complete(&buf));
            }
            assert!(
                scan.looked_at <= buf.len() + 8 * calls,
                "{} bytes looked at in {calls} calls for {} bytes ({:?} then {:?}s)",
                scan.looked_at,
                buf.len(),
                prefix.escape_ascii().to_string(),
                piece.escape_ascii().to_string(),
            );
        }
    }

    #[test]
    fn header_end_as_httparse_sees_it() {
        for full in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/1.1\n\n",
            b"GET / HTTP/1.1\r\nHost: x\n\r\n",
            b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\nbody",
            b"\n\nGET / HTTP/1.1\r\n\n",
            b"GARBAGE\r\n\r\n",
        ] {
            assert!(complete(full), "{:?}", full.escape_ascii());
        }
        for partial in [
            &b""[..],
            b"\r\n\r\n\r\n",
            b"\n\n\n",
            b"GET / HTTP/1.1\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r",
            b"GET / HTTP/1.1\r\nX: a\rb\r\n",
            b"GET / HTTP/1.1\r\nX: a\r\n\rb",
        ] {
            assert!(!complete(partial), "{:?}", partial.escape_ascii());
        }
    }

    /// Reads one header as a connection's first request (`stop: None`) or
    /// as a later one; returns how it ended and what was read.
    async fn read_one<S: tokio::io::AsyncRead + Unpin>(
        server: &mut S,
        wait: Duration,
        stop: Option<ShutdownWatch>,
    ) -> (Head, BytesMut) {
        let mut buf = BytesMut::new();
        let deadline = Instant::now() + wait;
        let timer = tokio::time::sleep_until(deadline);
        tokio::pin!(timer);
        let head = match stop {
            None => {
                let none: Option<Pin<&mut std::future::Pending<()>>> = None;
                read_head(server, &mut buf, timer.as_mut(), deadline, None, none).await
            }
            Some(watch) => {
                let mut stop = Stop::new(&watch);
                let (t, s) = (timer.as_mut(), Some(Pin::new(&mut stop)));
                read_head(server, &mut buf, t, deadline, Some(wait), s).await
            }
        };
        (head, buf)
    }

    async fn head_of(input: &[u8], close: bool) -> (Head, BytesMut) {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        client.write_all(input).await.unwrap();
        let _open = (!close).then_some(client);
        read_one(&mut server, Duration::from_millis(50), None).await
    }

    #[tokio::test]
    async fn reads_a_header_or_gives_up() {
        let req = b"GET /abc HTTP/1.1\r\nHost: x\r\n\r\nrest";
        assert_eq!(head_of(req, false).await, (Head::Ready, req[..].into()));
        assert_eq!(head_of(b"GET /abc HT", false).await.0, Head::TimedOut(true));
        assert_eq!(head_of(b"", false).await.0, Head::TimedOut(false));
        assert_eq!(head_of(b"GET /abc HT", true).await.0, Head::Closed);
        // Between requests, a shut-down edge stops waiting at once, and one
        // that shuts down while waiting stops then.
        let (_client, mut server) = tokio::io::duplex(64);
        let long = Duration::from_secs(600);
        let (_tx, rx) = tokio::sync::watch::channel(true);
        let head = read_one(&mut server, long, Some(rx.clone())).await.0;
        assert_eq!(head, Head::Closed);
        let (tx, rx) = tokio::sync::watch::channel(false);
        let waiting = read_one(&mut server, long, Some(rx));
        let (head, _) = tokio::join!(waiting, async { tx.send(true).unwrap() });
        assert_eq!(head.0, Head::Closed);
    }

    /// The same shutdown signal over several waits of one connection: after
    /// its first wait it is only re-checked, and still ends a later wait.
    #[tokio::test]
    async fn a_later_wait_still_ends_on_shutdown() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let (tx, rx) = tokio::sync::watch::channel(false);
        let long = Duration::from_secs(600);
        let timer = tokio::time::sleep(long);
        tokio::pin!(timer);
        let mut stop = Stop::new(&rx);
        let mut buf = BytesMut::new();
        for _ in 0..3 {
            buf.clear();
            let deadline = Instant::now() + long;
            let (t, s) = (timer.as_mut(), Some(Pin::new(&mut stop)));
            let reading = read_head(&mut server, &mut buf, t, deadline, Some(long), s);
            let sending = async {
                tokio::task::yield_now().await;
                client.write_all(b"GET /a HTTP/1.1\r\n\r\n").await.unwrap();
            };
            let (head, ()) = tokio::join!(reading, sending);
            assert_eq!(head, Head::Ready);
        }
        assert!(stop.armed, "the waits above polled it");
        buf.clear();
        let deadline = Instant::now() + long;
        let (t, s) = (timer.as_mut(), Some(Pin::new(&mut stop)));
        let waiting = read_head(&mut server, &mut buf, t, deadline, Some(long), s);
        let shut = async {
            tokio::task::yield_now().await;
            tx.send(true).unwrap()
        };
        // A lost wake-up would leave the wait to its 600 s deadline.
        let both = async { tokio::join!(waiting, shut) };
        let (head, _) = tokio::time::timeout(Duration::from_secs(60), both)
            .await
            .expect("the shutdown ended the wait");
        assert_eq!(head, Head::Closed);
    }

    /// A later request's header clock starts at its first byte: a header
    /// that starts near the end of the keep-alive time still gets its own
    /// full header time, and one that never ends times out as partial.
    #[tokio::test(start_paused = true)]
    async fn a_later_request_gets_the_header_time_from_its_first_byte() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let keepalive = Duration::from_secs(5);
        let header = Duration::from_secs(10);
        let mut buf = BytesMut::new();
        let timer = tokio::time::sleep_until(Instant::now() + keepalive);
        tokio::pin!(timer);
        let mut stop = Stop::new(&rx);
        // The header's end comes 12 s after the wait began (past the
        // keep-alive deadline, within the header time), or never.
        for (rest, ends) in [
            (Some(&b"Host: x\r\n\r\n"[..]), Head::Ready),
            (None, Head::TimedOut(true)),
        ] {
            buf.clear();
            let started = Instant::now();
            let deadline = started + keepalive;
            let (t, s) = (timer.as_mut(), Some(Pin::new(&mut stop)));
            let reading = read_head(&mut server, &mut buf, t, deadline, Some(header), s);
            let sending = async {
                tokio::time::sleep(Duration::from_secs(4)).await;
                client.write_all(b"GET /abc HTTP/1.1\r\n").await.unwrap();
                if let Some(rest) = rest {
                    tokio::time::sleep(Duration::from_secs(8)).await;
                    client.write_all(rest).await.unwrap();
                }
            };
            let (head, ()) = tokio::join!(reading, sending);
            assert_eq!(head, ends);
            if rest.is_some() {
                assert!(buf.ends_with(b"\r\n\r\n"));
                assert_eq!(started.elapsed(), Duration::from_secs(12));
            } else {
                assert_eq!(started.elapsed(), Duration::from_secs(14));
            }
        }
    }

    #[test]
    fn the_408_is_a_complete_response() {
        let text = String::from_utf8(timeout_response()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 408 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(head.contains("connection: close"));
    }
}
