//! The redirect fast path: a plain `GET`/`HEAD /{code}` over cleartext
//! HTTP/1.1 is answered straight from the header bytes that
//! [`super::client_limits`] has already read, without building Pingora's
//! session, request and response objects. Everything else — and anything
//! unusual about such a request — goes on to Pingora exactly as before, so
//! this only ever changes how fast a redirect is, never what it is.
//!
//! It answers only when all of these hold (otherwise [`RedirectFastPath::answer`]
//! returns `None` and Pingora serves the request):
//! - the header is a plain HTTP/1.1 head as [`super::request_head`] reads
//!   it (a subset of what httparse reads, with a target Pingora's URI
//!   parser takes as it is), and nothing follows it in the buffer (no body,
//!   no pipelined request);
//! - the method is GET or HEAD, with no `Content-Length`,
//!   `Transfer-Encoding`, `Expect` or `Upgrade` header;
//! - the path is a short code (`route()` says `Redirect`);
//! - no header that Pingora would refuse or read otherwise: one `Host` at
//!   most and without `@`, one `Connection` line at most, one line of the
//!   client-address header at most ([`FastRequest::read`]);
//! - a `Host` line (RFC 9112, 3.2: an HTTP/1.1 request without one gets a
//!   400, which the Pingora path answers).
//!
//! [`differs_from_pingora`] runs Pingora's own request reading on the same
//! bytes and compares (a proptest here, the `request_path` fuzz target):
//! every head the fast path takes, Pingora takes and reads the same way.
//!
//! The answer — the redirect, the 404 (or fallback 302) of a miss, or the
//! 429 of a client over its rate limit — is byte for byte what the Pingora
//! path sends (`tests/fast_path.rs` compares them), with the limits checked
//! and charged the same way, and it is counted in the same metrics and
//! access log. `edge.fast_path: false`
//! turns it off.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use super::access_log::{AccessLog, AccessRecord, timestamp};
use super::metrics::{EdgeMetrics, LimitKind, RedirectResult};
use super::rate_limit::{EdgeRateLimits, client_ip};
use super::redirect::{Miss, Route, cache_control, location_into, resolve, route, split_target};
use super::request_head::{RequestHead, request_line, valid_host};
use crate::config::{EdgeConfig, IpNet};
use crate::metrics::{MethodLabel, RouteLabel};
use crate::ratelimit::Decision;
use crate::store::view::{HotTable, TableView};

/// What the fast path needs; every field is shared with the proxy.
pub struct RedirectFastPath {
    pub table: Arc<HotTable>,
    pub config: Arc<EdgeConfig>,
    pub metrics: Arc<EdgeMetrics>,
    pub limits: Option<Arc<EdgeRateLimits>>,
    pub clicks: Arc<super::clicks::ClickTable>,
    pub trusted_proxies: Vec<IpNet>,
    pub client_ip_header: String,
    pub access_log: Option<Arc<AccessLog>>,
}

/// What the fast path reads from a request head it answers.
#[derive(Debug, PartialEq, Eq)]
pub struct FastRequest<'a> {
    /// `HEAD` (true) or `GET`.
    pub head_only: bool,
    /// The target's path, `/` and the code.
    pub path: &'a [u8],
    pub code: &'a [u8],
    /// What follows the first `?` of the target, if there is one.
    pub query: Option<&'a [u8]>,
    /// Whether the connection stays open after the answer.
    pub keepalive: bool,
    /// The client-address header's value (its only line).
    pub forwarded: Option<&'a [u8]>,
    /// The first `User-Agent` line's value.
    pub user_agent: Option<&'a [u8]>,
}

impl<'a> FastRequest<'a> {
    /// Reads `head` (a whole request head, nothing after it) when the fast
    /// path answers it, calling `routed` with the code as soon as the request
    /// line is read; `None` leaves the request to Pingora. Besides what
    /// [`request_line`] refuses, that is a request with a body or an upgrade
    /// (`Content-Length`, `Transfer-Encoding`, `Expect`, `Upgrade`,
    /// `Connection: upgrade`), no `Host` line, a second one or one holding
    /// `@` (all answered 400 there), and a second `Connection` or
    /// client-address (`client_ip_header`) line (Pingora reads only the
    /// first of those or joins them: it decides). `differs_from_pingora`
    /// checks the rest against Pingora's own reading.
    pub fn read(
        head: &'a [u8],
        client_ip_header: &[u8],
        routed: impl FnOnce(&[u8]),
    ) -> Option<Self> {
        let RequestHead {
            head_only,
            target,
            headers,
        } = request_line(head)?;
        let (path, query) = split_target(target);
        let Route::Redirect(code) = route(path) else {
            return None;
        };
        routed(code);
        let mut request = FastRequest {
            head_only,
            path,
            code,
            query,
            keepalive: true,
            forwarded: None,
            user_agent: None,
        };
        let (mut host, mut connection) = (false, false);
        for h in headers {
            let (name, value) = h?;
            if name.eq_ignore_ascii_case(b"content-length")
                || name.eq_ignore_ascii_case(b"transfer-encoding")
                || name.eq_ignore_ascii_case(b"expect")
                || name.eq_ignore_ascii_case(b"upgrade")
            {
                return None;
            }
            if name.eq_ignore_ascii_case(b"host") {
                // Pingora's path answers the 400 to an invalid or second one.
                if host || !valid_host(value) {
                    return None;
                }
                host = true;
            } else if name.eq_ignore_ascii_case(b"connection") {
                if connection {
                    return None;
                }
                connection = true;
                for token in value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        request.keepalive = false;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        return None;
                    }
                }
            } else if name.eq_ignore_ascii_case(client_ip_header) {
                if request.forwarded.is_some() {
                    return None;
                }
                request.forwarded = Some(value);
            } else if name.eq_ignore_ascii_case(b"user-agent") && request.user_agent.is_none() {
                // Checked as text only if the access log wants it.
                request.user_agent = Some(value);
            }
        }
        host.then_some(request)
    }
}

impl RedirectFastPath {
    /// Answers the request in `head` into `out` (cleared first) when it is a
    /// plain redirect request; returns whether the connection stays open.
    /// `None`: not for the fast path; nothing was charged or counted.
    /// `closing`: the edge is shutting down, so the answer says
    /// `Connection: close` whatever the request asked (as Pingora's does).
    pub fn answer(
        &self,
        head: &[u8],
        peer: Option<IpAddr>,
        started: Instant,
        closing: bool,
        out: &mut Vec<u8>,
    ) -> Option<bool> {
        self.answer_at(head, peer, started, None, closing, out)
    }

    /// [`Self::answer`] with the wall clock (µs since the epoch, as
    /// [`crate::ratelimit::now_us`] reads it) already read, e.g. once for
    /// every request one `epoll_wait` returned; `None` reads it here.
    pub fn answer_at(
        &self,
        head: &[u8],
        peer: Option<IpAddr>,
        started: Instant,
        now_us: Option<u64>,
        closing: bool,
        out: &mut Vec<u8>,
    ) -> Option<bool> {
        // The code's index slot is on its way from memory while the header
        // lines are read.
        let mut view = None;
        let request = FastRequest::read(head, self.client_ip_header.as_bytes(), |code| {
            let loaded = self.table.load();
            loaded.prefetch(code);
            view = Some(loaded);
        })?;
        let view = view?; // loaded whenever the request was read
        let FastRequest {
            head_only,
            path,
            code,
            query,
            keepalive,
            forwarded,
            user_agent,
        } = request;
        let keepalive = keepalive && !closing;
        let method = if head_only {
            MethodLabel::Head
        } else {
            MethodLabel::Get
        };

        let peer = peer.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let client = if self.trusted_proxies.is_empty() {
            peer
        } else {
            client_ip(peer, forwarded, &self.trusted_proxies)
        };
        // One clock read: the limiter counts in µs, the rest in ms.
        let now_us = now_us.unwrap_or_else(crate::ratelimit::now_us);
        let now = now_us / 1000;
        out.clear();
        // The body after the header, for a 404 or 429 (not for HEAD).
        let mut body = None;
        let (status, route_label) = match self.refusal(client, now_us) {
            Some(decision) => {
                self.metrics.redirect_result(RedirectResult::RateLimited);
                let text = super::proxy::too_many_body();
                status_line(out, 429);
                out.extend_from_slice(
                    b"Content-Type: application/json\r\nCache-Control: no-store\r\nretry-after: ",
                );
                push_u64(out, decision.retry_after_secs);
                out.extend_from_slice(b"\r\nratelimit-limit: ");
                push_u64(out, decision.limit);
                out.extend_from_slice(b"\r\nratelimit-remaining: ");
                push_u64(out, decision.remaining);
                out.extend_from_slice(b"\r\nratelimit-reset: ");
                push_u64(out, decision.reset_secs);
                out.extend_from_slice(b"\r\nContent-Length: ");
                push_u64(out, text.len() as u64);
                out.extend_from_slice(b"\r\n");
                body = Some(text);
                (429, RouteLabel::RateLimited)
            }
            None => self.redirect(view, out, code, query, head_only, client, now_us, &mut body),
        };
        out.extend_from_slice(b"Date: ");
        out.extend_from_slice(&cached_date(now / 1000));
        out.extend_from_slice(if keepalive {
            b"\r\nConnection: keep-alive\r\n\r\n".as_slice()
        } else {
            b"\r\nConnection: close\r\n\r\n".as_slice()
        });
        if let Some(body) = body
            && !head_only
        {
            out.extend_from_slice(&body);
        }
        let elapsed = started.elapsed();
        self.metrics
            .http
            .record(method, route_label, status, elapsed);
        self.metrics.fast_path_answers.inc();
        if let Some(log) = &self.access_log {
            let ts = timestamp(now);
            let client = client.to_string();
            log.log(&AccessRecord {
                ts: &ts,
                client: &client,
                method: method.as_str(),
                path: std::str::from_utf8(path).unwrap_or(""),
                status,
                route: route_label.as_str(),
                duration_us: elapsed.as_micros() as u64,
                user_agent: user_agent.and_then(|ua| std::str::from_utf8(ua).ok()),
            });
        }
        Some(keepalive)
    }

    /// The client's rate limits, checked (and charged) as the Pingora path
    /// does: the request limit, then, for a code, the scanning limit.
    fn refusal(&self, client: IpAddr, now_us: u64) -> Option<Decision> {
        let limits = self.limits.as_ref()?;
        let refused = limits.request(client, now_us);
        self.metrics
            .limit_decision(LimitKind::ClientRequests, refused.is_none());
        refused.or_else(|| {
            let barred = limits.scanning(client, now_us);
            self.metrics
                .limit_decision(LimitKind::ClientMisses, barred.is_none());
            barred
        })
    }

    /// The redirect (or miss) answer's status line and headers, but for
    /// `date` and `connection`; a miss's body goes to `body`.
    #[allow(clippy::too_many_arguments)]
    fn redirect(
        &self,
        view: arc_swap::Guard<Arc<TableView>>,
        out: &mut Vec<u8>,
        code: &[u8],
        query: Option<&[u8]>,
        head_only: bool,
        client: IpAddr,
        now_us: u64,
        body: &mut Option<bytes::Bytes>,
    ) -> (u16, RouteLabel) {
        let now = now_us / 1000;
        match resolve(&view, code, now, Some((&self.clicks, !head_only))) {
            Ok(link) => {
                let status = link.status.code();
                status_line(out, status);
                out.extend_from_slice(b"location: ");
                let query = query.filter(|q| !q.is_empty() && link.forwards_query());
                match query {
                    Some(q) => {
                        let mut merged = Vec::new();
                        location_into(&mut merged, link.target, Some(q));
                        out.extend_from_slice(&merged);
                    }
                    None => out.extend_from_slice(link.target),
                }
                out.extend_from_slice(b"\r\nCache-Control: ");
                out.extend_from_slice(
                    cache_control(
                        link.status,
                        link.expires_at_ms,
                        link.max_clicks.is_some(),
                        now,
                    )
                    .value()
                    .as_bytes(),
                );
                out.extend_from_slice(b"\r\nContent-Length: 0\r\n");
                drop(view);
                self.metrics.redirect_result(RedirectResult::Served);
                (status, RouteLabel::Redirect)
            }
            Err(miss) => {
                drop(view);
                self.metrics.redirect_result(miss.into());
                if let Some(limits) = &self.limits {
                    limits.miss(client, now_us);
                }
                let (status, text) = self.not_found(out, miss);
                *body = text;
                (status, RouteLabel::NotFound)
            }
        }
    }

    /// The miss answer's status line and headers (not `date`/`connection`):
    /// a 302 to `edge.not_found_url`, or a JSON 404 and its body.
    fn not_found(&self, out: &mut Vec<u8>, miss: Miss) -> (u16, Option<bytes::Bytes>) {
        if let Some(url) = &self.config.not_found_url {
            status_line(out, 302);
            out.extend_from_slice(b"location: ");
            out.extend_from_slice(url.as_bytes());
            out.extend_from_slice(b"\r\nCache-Control: no-store\r\nContent-Length: 0\r\n");
            return (302, None);
        }
        let body = super::proxy::not_found_body(miss);
        status_line(out, 404);
        out.extend_from_slice(
            b"Content-Type: application/json\r\nCache-Control: no-store\r\nContent-Length: ",
        );
        push_u64(out, body.len() as u64);
        out.extend_from_slice(b"\r\n");
        (404, Some(body))
    }
}

/// For tests and fuzzing: when the fast path reads `head` (with
/// `X-Forwarded-For` as the client-address header), how Pingora's own reading
/// of the same bytes differs from it: the head refused, or read with another
/// method, version, path, query, keep-alive, client-address value (all its
/// lines, joined, as the Pingora path reads it) or first `User-Agent`; or
/// how httparse reads it differently. `None` when they agree or when the fast
/// path does not take `head`.
#[doc(hidden)]
pub fn differs_from_pingora(head: &[u8]) -> Option<String> {
    use pingora::protocols::http::v1::server::HttpSession;
    thread_local! {
        static RUNTIME: Option<tokio::runtime::Runtime> =
            tokio::runtime::Builder::new_current_thread().enable_all().build().ok();
    }
    let fast = FastRequest::read(head, b"x-forwarded-for", |_| {})?;
    if let Some(difference) = super::request_head::differs_from_httparse(head) {
        return Some(difference);
    }
    let shown = || head.escape_ascii().to_string();
    let stream: pingora::protocols::Stream = Box::new(std::io::Cursor::new(head.to_vec()));
    let mut session = HttpSession::new(stream);
    let read = RUNTIME.with(|rt| rt.as_ref().map(|rt| rt.block_on(session.read_request())));
    match read {
        Some(Ok(Some(n))) if n == head.len() => {}
        other => return Some(format!("Pingora reads {other:?} of {}", shown())),
    }
    let req = session.req_header();
    let lines: Vec<&[u8]> = req
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    let theirs = (
        req.method.as_str(),
        req.version,
        req.uri.path().as_bytes(),
        req.uri.query().map(str::as_bytes),
        session.will_keepalive(),
        (!lines.is_empty()).then(|| lines.join(&b", "[..])),
        req.headers.get("user-agent").map(|v| v.as_bytes()),
    );
    let ours = (
        if fast.head_only { "HEAD" } else { "GET" },
        http::Version::HTTP_11,
        fast.path,
        fast.query,
        fast.keepalive,
        fast.forwarded.map(<[u8]>::to_vec),
        fast.user_agent,
    );
    (theirs != ours).then(|| {
        format!(
            "Pingora reads {theirs:?}, the fast path {ours:?}, in {}",
            shown()
        )
    })
}

fn push_u64(out: &mut Vec<u8>, v: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut v = v;
    loop {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

thread_local! {
    /// The last `Date` value this thread formatted, and its second.
    static DATE: std::cell::Cell<(u64, [u8; 29])> = const { std::cell::Cell::new((u64::MAX, [0; 29])) };
}

/// The `Date` header value for `secs` since the epoch, formatted once per
/// second per thread (from the wall clock the request already read, so a
/// redirect reads no clock for it).
fn cached_date(secs: u64) -> [u8; 29] {
    DATE.with(|cell| {
        let (at, value) = cell.get();
        if at == secs {
            return value;
        }
        let value = http_date(secs);
        cell.set((secs, value));
        value
    })
}

/// An IMF-fixdate (RFC 9110, 5.6.7), e.g. `Sun, 06 Nov 1994 08:49:37 GMT`,
/// for `secs` since the Unix epoch (years up to 9999).
fn http_date(secs: u64) -> [u8; 29] {
    const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let days = secs / 86_400;
    let of_day = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = (yoe + era * 400 + u64::from(month <= 2)).min(9999);
    let mut out = *b"Thu, 01 Jan 1970 00:00:00 GMT";
    out[..3].copy_from_slice(DAYS[(days % 7) as usize]);
    let two = |out: &mut [u8; 29], at: usize, v: u64| {
        out[at] = b'0' + (v / 10 % 10) as u8;
        out[at + 1] = b'0' + (v % 10) as u8;
    };
    two(&mut out, 5, day);
    out[8..11].copy_from_slice(MONTHS[(month - 1) as usize]);
    two(&mut out, 12, year / 100);
    two(&mut out, 14, year % 100);
    two(&mut out, 17, of_day / 3600);
    two(&mut out, 20, of_day / 60 % 60);
    two(&mut out, 23, of_day % 60);
    out
}

fn status_line(out: &mut Vec<u8>, status: u16) {
    // The statuses this path sends, written out once; any other is built.
    let line: &[u8] = match status {
        301 => b"HTTP/1.1 301 Moved Permanently\r\n",
        302 => b"HTTP/1.1 302 Found\r\n",
        307 => b"HTTP/1.1 307 Temporary Redirect\r\n",
        308 => b"HTTP/1.1 308 Permanent Redirect\r\n",
        404 => b"HTTP/1.1 404 Not Found\r\n",
        429 => b"HTTP/1.1 429 Too Many Requests\r\n",
        _ => {
            out.extend_from_slice(b"HTTP/1.1 ");
            out.extend_from_slice(crate::metrics::status_str(status).as_bytes());
            out.push(b' ');
            let reason = http::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("");
            out.extend_from_slice(reason.as_bytes());
            out.extend_from_slice(b"\r\n");
            return;
        }
    };
    out.extend_from_slice(line);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::record::now_ms;
    use proptest::prelude::*;

    fn read(head: &[u8]) -> Option<FastRequest<'_>> {
        FastRequest::read(head, b"x-forwarded-for", |_| {})
    }

    fn agrees(head: &[u8]) {
        if let Some(difference) = differs_from_pingora(head) {
            panic!("{difference}");
        }
    }

    #[test]
    fn plain_requests_are_read_as_pingora_reads_them() {
        let taken: &[&[u8]] = &[
            b"GET /abc HTTP/1.1\r\nHost: ulo.ad\r\n\r\n",
            b"HEAD /abc?x=1&y=%20 HTTP/1.1\r\nHost: ulo.ad\r\nConnection: close\r\n\r\n",
            b"GET /abc? HTTP/1.1\r\nConnection: Keep-Alive\r\nUser-Agent: a\r\nUser-Agent: b\r\nHost: x\r\n\r\n",
            b"GET /a-b_C HTTP/1.1\r\nhost: x\r\nConnection: foo, close\r\nX-Forwarded-For: 10.0.0.1, 10.0.0.2\r\n\r\n",
            b"GET /abc?a={}|^`[]\\ HTTP/1.1\r\nHost: ulo.ad:8080\r\n\r\n",
        ];
        for head in taken {
            assert!(read(head).is_some(), "{}", head.escape_ascii());
            agrees(head);
        }
        let r = read(taken[2]).unwrap();
        assert_eq!(
            (r.code, r.query, r.keepalive, r.user_agent),
            (&b"abc"[..], Some(&b""[..]), true, Some(&b"a"[..]))
        );
        let r = read(taken[3]).unwrap();
        assert!(!r.keepalive);
        assert_eq!(r.forwarded, Some(&b"10.0.0.1, 10.0.0.2"[..]));
    }

    /// Heads Pingora answers with a 400, or reads in a way the fast path
    /// would not: left to Pingora.
    #[test]
    fn what_pingora_reads_otherwise_is_left_to_it() {
        let long = format!(
            "GET /abc?{} HTTP/1.1\r\nHost: x\r\n\r\n",
            "a".repeat(70_000)
        );
        let refused: &[&[u8]] = &[
            b"GET /abc?a=<b> HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /abc?q=\"x\" HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /abc?a=1#x HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /abc#x HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /abc HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET /abc HTTP/1.1\r\n\r\n",
            b"GET /abc HTTP/1.1\r\nUser-Agent: a\r\nX-Host: a\r\n\r\n",
            b"GET /abc HTTP/1.1\r\nHost: user@x\r\n\r\n",
            b"GET /abc HTTP/1.1\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n",
            b"GET /abc HTTP/1.1\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-For: 5.6.7.8\r\n\r\n",
            b"GET /abc HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
            b"GET /abc HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            b"GET /abc HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /abc HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            b"GET /api HTTP/1.1\r\n\r\n",
            b"GET /health HTTP/1.1\r\n\r\n",
            long.as_bytes(),
        ];
        for head in refused {
            assert!(read(head).is_none(), "{}", head.escape_ascii());
        }
    }

    /// Request heads for `takes_only_what_pingora_reads_the_same`: targets
    /// with the bytes a URI parser may refuse or cut, and header lines that
    /// Pingora validates, reads only the first of, or joins. The comparison
    /// runs only on heads the fast path takes, and one refused piece makes
    /// it leave a head to Pingora: drawn evenly from these pieces, 2% of
    /// heads were taken. So most pieces are what a plain redirect request
    /// has (a code's path, a plain query, one `Host`, one line of each
    /// common header) and the refused ones come now and then: about half
    /// the heads are taken, in all their variety.
    fn head() -> impl Strategy<Value = Vec<u8>> {
        let query_byte = prop_oneof![
            40 => prop::sample::select(&b"abcdefghijklmnopqrstuvwxyz0123456789=&-._~"[..]),
            4 => prop::sample::select(&b"\"#<>%?&=/{}|^`[]\\@!$'()*+,;: \t"[..]),
            1 => any::<u8>(),
        ];
        let target = (
            prop_oneof![
                8 => Just("/abc"),
                2 => Just("/A-b_9"),
                1 => prop::sample::select(&["/api", "/a/b", "/"][..]),
            ],
            prop::option::of(prop::collection::vec(query_byte, 0..12)),
        )
            .prop_map(|(path, query)| match query {
                Some(q) => [path.as_bytes(), b"?", &q].concat(),
                None => path.as_bytes().to_vec(),
            });
        // One line of each name is what a client sends; a second
        // `Connection` or `X-Forwarded-For` line (refused) comes now and then.
        let connection = prop::sample::select(
            &[
                "Connection: close",
                "Connection: Close",
                "connection: keep-alive",
                "Connection: keep-alive, close",
                "Connection: foo,  close ,bar",
                "Connection: closed",
                "Connection: ",
            ][..],
        );
        let forwarded = prop::sample::select(
            &[
                "X-Forwarded-For: 203.0.113.9",
                "x-forwarded-for: 10.0.0.1, 203.0.113.9",
                "X-Forwarded-For: ",
            ][..],
        );
        let other = prop::sample::select(
            &[
                "User-Agent: curl/8",
                "user-agent: k6/1 (+https://k6.io/)",
                "Accept: */*",
                "X-E:\t v \t",
            ][..],
        );
        // Lines that make the fast path refuse a head (a `Host` line here is
        // a second one), or that Pingora answers with a 400.
        let refused = prop::sample::select(
            &[
                "Host: ulo.ad",
                "Host: ulo.ad:8080",
                "host: a@b",
                "Host: ",
                "Connection: upgrade",
                "Content-Length: 0",
                "Transfer-Encoding: chunked",
                "Expect: 100-continue",
                "Upgrade: h2c",
            ][..],
        );
        let line = prop_oneof![6 => other, 2 => connection, 2 => forwarded, 1 => refused];
        (
            prop::sample::select(&["GET ", "HEAD "][..]),
            target,
            prop::collection::vec(line, 0..6),
            // A `Host` line most of the time (without one the fast path
            // refuses), among the others: where is an index into them.
            prop::option::weighted(
                0.9,
                prop::sample::select(&["Host: ulo.ad", "host: ulo.ad:8080"][..]),
            ),
            any::<prop::sample::Index>(),
        )
            .prop_map(|(method, target, mut lines, host, at)| {
                if let Some(host) = host {
                    lines.insert(at.index(lines.len() + 1), host);
                }
                let mut head = [method.as_bytes(), &target, b" HTTP/1.1\r\n"].concat();
                for l in lines {
                    head.extend_from_slice(l.as_bytes());
                    head.extend_from_slice(b"\r\n");
                }
                head.extend_from_slice(b"\r\n");
                head
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Every head the fast path takes, Pingora takes too and reads the
        /// same way (and so does httparse).
        #[test]
        fn takes_only_what_pingora_reads_the_same(head in head()) {
            if let Some(difference) = differs_from_pingora(&head) {
                panic!("{difference}");
            }
        }
    }

    /// The lines written out are the ones built from the status's number
    /// and canonical reason (as for any other status).
    #[test]
    fn status_lines() {
        for status in [301, 302, 307, 308, 404, 429] {
            let mut fast = Vec::new();
            status_line(&mut fast, status);
            let reason = http::StatusCode::from_u16(status)
                .unwrap()
                .canonical_reason()
                .unwrap();
            assert_eq!(
                String::from_utf8(fast).unwrap(),
                format!("HTTP/1.1 {status} {reason}\r\n")
            );
        }
        let mut other = Vec::new();
        status_line(&mut other, 503);
        assert_eq!(other, b"HTTP/1.1 503 Service Unavailable\r\n");
    }

    #[test]
    fn http_dates() {
        for (secs, text) in [
            (0, "Thu, 01 Jan 1970 00:00:00 GMT"),
            (784_111_777, "Sun, 06 Nov 1994 08:49:37 GMT"),
            (951_782_400, "Tue, 29 Feb 2000 00:00:00 GMT"),
            (951_868_799, "Tue, 29 Feb 2000 23:59:59 GMT"),
            (1_709_164_800, "Thu, 29 Feb 2024 00:00:00 GMT"),
            (1_798_761_599, "Thu, 31 Dec 2026 23:59:59 GMT"),
            (4_107_542_400, "Mon, 01 Mar 2100 00:00:00 GMT"),
            (253_402_300_799, "Fri, 31 Dec 9999 23:59:59 GMT"),
        ] {
            assert_eq!(
                std::str::from_utf8(&http_date(secs)).unwrap(),
                text,
                "{secs}"
            );
        }
    }

    /// The same text as Pingora's own `Date` (what the Pingora path sends),
    /// at every hour of four years and now.
    #[test]
    fn http_date_matches_pingoras() {
        for _ in 0..10 {
            let before = now_ms() / 1000;
            let pingora = pingora::protocols::http::date::get_cached_date();
            if now_ms() / 1000 == before {
                assert_eq!(&cached_date(before)[..], pingora.as_bytes());
                break;
            }
        }
        // Every day from 1970 to 2200 against a day-by-day calendar walk.
        let leap =
            |y: u64| (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400);
        let months = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let weekdays = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
        let (mut year, mut month, mut day) = (1970u64, 0usize, 1u64);
        for days in 0..(230 * 365) {
            let secs = days * 86_400 + (days * 7919) % 86_400;
            let (h, m, s) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
            let want = format!(
                "{}, {day:02} {} {year} {h:02}:{m:02}:{s:02} GMT",
                weekdays[(days % 7) as usize],
                months[month]
            );
            assert_eq!(std::str::from_utf8(&http_date(secs)).unwrap(), want);
            let length = [
                31,
                28 + u64::from(leap(year)),
                31,
                30,
                31,
                30,
                31,
                31,
                30,
                31,
                30,
                31,
            ];
            day += 1;
            if day > length[month] {
                (day, month) = (1, month + 1);
                if month == 12 {
                    (month, year) = (0, year + 1);
                }
            }
        }
    }
}
