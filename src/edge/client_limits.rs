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

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, HttpServerOptions, ServerApp};
use pingora::protocols::ALPN;
use pingora::protocols::Stream;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use pingora::server::configuration::ServerConf;
use pingora::services::listening::Service;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::fast_path::RedirectFastPath;
use crate::config::EdgeConfig;

/// Reading stops here (Pingora's own limit is 1 MiB - 1); Pingora then
/// refuses the oversized header with a 400.
const MAX_HEAD: usize = 1 << 20;

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
}

impl<A> ClientLimits<A> {
    pub fn new(inner: A, header_timeout: Duration, keepalive_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(inner),
            header_timeout,
            keepalive_timeout,
            fast: None,
        }
    }
}

/// The edge's listening service: the proxy wrapped in [`ClientLimits`].
pub fn service<SV>(
    conf: &Arc<ServerConf>,
    proxy: SV,
    edge: &EdgeConfig,
    fast: Option<Arc<RedirectFastPath>>,
) -> Service<ClientLimits<pingora::proxy::HttpProxy<SV>>>
where
    SV: pingora::proxy::ProxyHttp + Send + Sync + 'static,
    SV::CTX: Send + Sync,
{
    let mut app = pingora::proxy::http_proxy(conf, proxy);
    let mut options = HttpServerOptions::default();
    options.h2_idle_timeout = Some(edge.keepalive_timeout);
    app.server_options = Some(options);
    let mut limits = ClientLimits::new(app, edge.client_header_timeout, edge.keepalive_timeout);
    limits.fast = fast;
    Service::new("Pingora HTTP Proxy Service".into(), limits)
}

/// How reading a request header ended.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// A complete header (maybe followed by body bytes), or more than
    /// [`MAX_HEAD`] bytes without one: Pingora takes it from here.
    Ready(BytesMut),
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
struct HeaderScan {
    /// Where the request line starts, once a byte other than CR/LF came.
    start: Option<usize>,
    /// Bytes already looked at.
    scanned: usize,
}

impl HeaderScan {
    /// True when `buf` (which only ever grows) holds a whole header.
    fn complete(&mut self, buf: &[u8]) -> bool {
        let start = match self.start {
            Some(start) => start,
            None => {
                let skip = buf[self.scanned..]
                    .iter()
                    .position(|&b| b != b'\r' && b != b'\n');
                let Some(skip) = skip else {
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
        (from..buf.len()).any(|i| {
            buf[i] == b'\n'
                && match buf.get(i + 1) {
                    Some(b'\n') => true,
                    Some(b'\r') => buf.get(i + 2) == Some(&b'\n'),
                    _ => false,
                }
        })
    }
}

/// Reads one request header from `stream`. `idle` bounds the wait for its
/// first byte; `header` bounds the whole header, from `header_start` (the
/// connection's accept) or, when `None`, from the first byte. When
/// `shutdown` is given, a wait for the first byte ends when the edge shuts
/// down (a kept-alive connection between requests).
async fn read_head<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    idle: Duration,
    header: Duration,
    header_start: Option<Instant>,
    mut shutdown: Option<ShutdownWatch>,
) -> Head {
    let mut buf = BytesMut::with_capacity(4096);
    let mut scan = HeaderScan::default();
    let mut deadline = Instant::now() + idle;
    if let Some(start) = header_start {
        deadline = deadline.min(start + header);
    }
    loop {
        if scan.complete(&buf) || buf.len() > MAX_HEAD {
            return Head::Ready(buf);
        }
        let before = buf.len();
        let read = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf));
        let read = match shutdown.as_mut() {
            Some(watch) if before == 0 => {
                if *watch.borrow() {
                    return Head::Closed;
                }
                tokio::select! {
                    r = read => r,
                    _ = watch.changed() => return Head::Closed,
                }
            }
            _ => read.await,
        };
        match read {
            Err(_) => return Head::TimedOut(!buf.is_empty()),
            Ok(Ok(0)) | Ok(Err(_)) => return Head::Closed,
            // The first byte of a later request starts its header's clock.
            Ok(Ok(_)) if before == 0 && header_start.is_none() => {
                deadline = Instant::now() + header;
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// The answer to a request whose header did not arrive in time.
fn timeout_response() -> Vec<u8> {
    let body = super::proxy::error_body(
        "request_timeout",
        "the request header did not arrive in time",
    );
    let mut out = format!(
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

#[async_trait]
impl<A> ServerApp for ClientLimits<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // HTTP/2 is framed differently: Pingora's loop serves it, once the
        // client preface has come within the header timeout.
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            let stream = super::tls::h2_preface(stream, self.header_timeout).await?;
            return self.inner.process_new(stream, shutdown).await;
        }
        // What Pingora's own HTTP/1 loop does, with the header read first.
        let accepted = Instant::now();
        let mut first = true;
        // The fast path serves cleartext only (HSTS and TLS details stay
        // with Pingora); it needs the peer for rate limits and logs.
        let fast = self
            .fast
            .as_ref()
            .filter(|_| stream.get_ssl_digest().is_none());
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let mut answer = Vec::new();
        let mut settings: Option<HttpPersistentSettings> = None;
        loop {
            let head = if first {
                // First request: the header timeout runs from the accept.
                let (idle, header) = (self.header_timeout, self.header_timeout);
                read_head(&mut stream, idle, header, Some(accepted), None).await
            } else {
                let (idle, header) = (self.keepalive_timeout, self.header_timeout);
                read_head(&mut stream, idle, header, None, Some(shutdown.clone())).await
            };
            let head = match head {
                Head::Ready(head) => head,
                Head::Closed | Head::TimedOut(false) => return None,
                Head::TimedOut(true) => {
                    let answer = async {
                        stream.write_all(&timeout_response()).await?;
                        stream.flush().await?;
                        stream.shutdown().await
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
                    return None;
                }
            };
            if let Some(fast) = fast
                && settings.is_none()
                && let Some(keepalive) =
                    fast.answer(&head, peer, Instant::now().into_std(), &mut answer)
            {
                if stream.write_all(&answer).await.is_err() || stream.flush().await.is_err() {
                    return None;
                }
                if !keepalive || *shutdown.borrow() {
                    let _ = stream.shutdown().await;
                    return None;
                }
                first = false;
                continue;
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
            session.set_pipelined_prefix(head);
            let reused = self.inner.process_new_http(session, shutdown).await?;
            (stream, settings) = reused.consume();
            first = false;
        }
    }

    async fn cleanup(&self) {
        self.inner.http_cleanup().await;
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

    async fn head_of(input: &[u8], close: bool, shutdown: Option<ShutdownWatch>) -> Head {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        client.write_all(input).await.unwrap();
        if close {
            drop(client);
            let ms = Duration::from_millis(50);
            return read_head(&mut server, ms, ms, None, shutdown).await;
        }
        let ms = Duration::from_millis(50);
        let head = read_head(&mut server, ms, ms, Some(Instant::now()), shutdown).await;
        drop(client);
        head
    }

    #[tokio::test]
    async fn reads_a_header_or_gives_up() {
        let req = b"GET /abc HTTP/1.1\r\nHost: x\r\n\r\nrest";
        assert_eq!(head_of(req, false, None).await, Head::Ready(req[..].into()));
        assert_eq!(
            head_of(b"GET /abc HT", false, None).await,
            Head::TimedOut(true)
        );
        assert_eq!(head_of(b"", false, None).await, Head::TimedOut(false));
        assert_eq!(head_of(b"GET /abc HT", true, None).await, Head::Closed);
        // Between requests, a shut-down edge stops waiting at once, and one
        // that shuts down while waiting stops then.
        let (_client, mut server) = tokio::io::duplex(64);
        let long = Duration::from_secs(600);
        let (_tx, rx) = tokio::sync::watch::channel(true);
        let head = read_head(&mut server, long, long, None, Some(rx.clone())).await;
        assert_eq!(head, Head::Closed);
        let (tx, rx) = tokio::sync::watch::channel(false);
        let waiting = read_head(&mut server, long, long, None, Some(rx));
        let (head, _) = tokio::join!(waiting, async { tx.send(true).unwrap() });
        assert_eq!(head, Head::Closed);
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
