//! Hostile input to the edge (issue 5, fault 8), over raw TCP to the real
//! `uload edge` and `uload admin` processes on loopback:
//!
//! - malformed request lines, oversized and numerous headers, long paths;
//! - invalid UTF-8, bad percent-encoding, `..` and encoded slashes, which
//!   must never reach the admin's `/api` (sent *with* a valid key, so that a
//!   request that got through would visibly list or create links);
//! - request smuggling (CL + TE, two Content-Lengths, a non-chunked final
//!   coding, obs-fold): the smuggled request must never run against `/api`;
//! - slow senders (a byte at a time, nothing at all, idle keep-alive), one
//!   at a time and many at once.
//!
//! Every hostile case must get a 4xx or a closed connection (or, when it is
//! within the limits the edge enforces, its normal answer), never a 5xx or a
//! hang; after every case, and while the slow senders hold their
//! connections, a known link must still redirect. Figures are printed for
//! `docs/`. No timed assertions: waits are bounded polls, generous against
//! the configured limits.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{Cluster, KEY, api, wait_until};

/// The link every check redirects through.
const CODE: &str = "known";
const TARGET: &str = "https://example.com/known?x=1";

/// What the edge did with one hostile exchange.
#[derive(Debug, Default)]
struct Outcome {
    /// Every response read, in order: status and `Location`.
    responses: Vec<(u16, Option<String>)>,
    /// The edge closed the connection (EOF or reset) before our wait ended.
    closed: bool,
    /// The raw bytes read (for messages).
    raw: Vec<u8>,
}

impl Outcome {
    fn statuses(&self) -> Vec<u16> {
        self.responses.iter().map(|r| r.0).collect()
    }

    fn describe(&self) -> String {
        let mut parts: Vec<String> = self.statuses().iter().map(u16::to_string).collect();
        if self.closed {
            parts.push("closed".into());
        } else if parts.is_empty() {
            parts.push("no answer, still open".into());
        }
        parts.join(" + ")
    }

    fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Splits a byte stream into the responses it holds (complete heads; bodies
/// framed by Content-Length or chunked; anything else runs to the end).
fn parse_responses(raw: &[u8]) -> Vec<(u16, Option<String>)> {
    let mut out = Vec::new();
    let mut rest = raw;
    while let Some(end) = find(rest, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let Some(status) = lines
            .next()
            .and_then(|l| l.strip_prefix("HTTP/1."))
            .and_then(|l| l.get(2..5))
            .and_then(|s| s.parse::<u16>().ok())
        else {
            break;
        };
        let (mut length, mut chunked, mut location) = (None, false, None);
        for line in lines {
            if let Some((name, value)) = line.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.parse::<usize>().ok();
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = value.to_ascii_lowercase().contains("chunked");
                } else if name.eq_ignore_ascii_case("location") {
                    location = Some(value.to_owned());
                }
            }
        }
        out.push((status, location));
        let body = &rest[end + 4..];
        rest = if chunked {
            match skip_chunked(body) {
                Some(r) => r,
                None => break,
            }
        } else {
            match body.get(length.unwrap_or(body.len())..) {
                Some(r) => r,
                None => break,
            }
        };
    }
    out
}

fn skip_chunked(mut data: &[u8]) -> Option<&[u8]> {
    for _ in 0..10_000 {
        let line_end = find(data, b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return data.get(find(data, b"\r\n")? + 2..);
        }
        data = data.get(size + 2..)?;
    }
    None
}

/// Sends `bytes` on a fresh connection and reads what comes back: until the
/// first response when `until_close` is false, else until the edge closes.
/// Either way at most `limit` (a bound against hangs, not an assertion).
fn exchange(addr: SocketAddr, bytes: &[u8], until_close: bool, limit: Duration) -> Outcome {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The edge may answer and close before reading everything (a header
    // over its limit): a failed write is part of the outcome, not an error.
    let _ = stream.write_all(bytes);
    let start = Instant::now();
    let mut out = Outcome::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                out.closed = true;
                break;
            }
            Ok(n) => out.raw.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => {
                // Reset: the edge closed with our bytes unread.
                out.closed = true;
                break;
            }
        }
        if !until_close && !parse_responses(&out.raw).is_empty() {
            break;
        }
        if start.elapsed() > limit {
            break;
        }
    }
    out.responses = parse_responses(&out.raw);
    out
}

/// A GET of the known link; true when it is the right redirect.
fn redirect_ok(edge: SocketAddr) -> bool {
    match common::request(edge, "GET", &format!("/{CODE}"), &[], b"") {
        Ok(r) => r.status == 302 && r.header("location") == Some(TARGET),
        Err(_) => false,
    }
}

/// A code exists in the admin (asked directly, with the key).
fn link_exists(admin: SocketAddr, code: &str) -> bool {
    api(admin, "GET", &format!("/api/links/{code}"), "").status == 200
}

/// What a hostile case must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A 4xx, or the connection closed; never a 2xx, 3xx or 5xx.
    Reject,
    /// Within the limits the edge enforces: the normal redirect of the known
    /// link (302 + Location), never a 5xx.
    Redirect,
}

struct Case {
    group: &'static str,
    name: String,
    bytes: Vec<u8>,
    expect: Expect,
    /// Read until the edge closes (smuggling: a second response would show).
    until_close: bool,
    /// A code whose creation would prove the request (or a smuggled one)
    /// reached the admin's `/api`.
    must_not_create: Option<&'static str>,
    /// Also sent straight to the admin, to compare.
    ask_admin: bool,
}

fn case(group: &'static str, name: &str, bytes: impl Into<Vec<u8>>, expect: Expect) -> Case {
    Case {
        group,
        name: name.to_owned(),
        bytes: bytes.into(),
        expect,
        until_close: false,
        must_not_create: None,
        ask_admin: false,
    }
}

/// `GET {path}` with the key, so that anything reaching `/api` would succeed.
fn authed_get(path: &[u8]) -> Vec<u8> {
    let mut req = b"GET ".to_vec();
    req.extend_from_slice(path);
    req.extend_from_slice(
        format!(" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    req
}

/// A JSON body creating `code`.
fn create_body(code: &str) -> String {
    format!(r#"{{"url":"https://example.com/{code}","code":"{code}"}}"#)
}

/// An authenticated `POST {path}` creating `code`.
fn authed_post(path: &str, code: &str) -> String {
    let body = create_body(code);
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn cases() -> Vec<Case> {
    use Expect::*;
    let get_known = |extra_headers: &str| {
        format!("GET /{CODE} HTTP/1.1\r\nHost: x\r\n{extra_headers}Connection: close\r\n\r\n")
    };
    let mut v = vec![
        // Request lines.
        case("request line", "garbage", "GARBAGE\r\n\r\n", Reject),
        case(
            "request line",
            "binary garbage",
            &b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n"[..],
            Reject,
        ),
        case(
            "request line",
            "missing version",
            format!("GET /{CODE}\r\nHost: x\r\n\r\n"),
            Reject,
        ),
        case(
            "request line",
            "HTTP/9.9",
            format!("GET /{CODE} HTTP/9.9\r\nHost: x\r\n\r\n"),
            Reject,
        ),
        case(
            "request line",
            "HTTP/2.0 as text",
            format!("GET /{CODE} HTTP/2.0\r\nHost: x\r\n\r\n"),
            Reject,
        ),
        case(
            "request line",
            "NUL in the path",
            b"GET /kn\0own HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
            Reject,
        ),
        case(
            "request line",
            "NUL in the method",
            b"G\0ET /known HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
            Reject,
        ),
        case(
            "request line",
            "NUL in a header value",
            get_known("X-A: a\0b\r\n"),
            Reject,
        ),
        case(
            "request line",
            "unknown method",
            format!("BREW /{CODE} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            Reject,
        ),
        case(
            "request line",
            "CONNECT",
            "CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n",
            Reject,
        ),
        // RFC 9112, 3.2: an HTTP/1.1 request must name its host; HTTP/1.0
        // need not.
        case(
            "request line",
            "HTTP/1.1 without Host",
            format!("GET /{CODE} HTTP/1.1\r\nConnection: close\r\n\r\n"),
            Reject,
        ),
        case(
            "request line",
            "HTTP/1.0 without Host",
            format!("GET /{CODE} HTTP/1.0\r\n\r\n"),
            Redirect,
        ),
        // RFC 9112, 3.2: more than one Host, or an invalid one, is a 400
        // (on either path: the fast path leaves these to Pingora's).
        case(
            "request line",
            "two Host headers",
            get_known("Host: y\r\n"),
            Reject,
        ),
        case(
            "request line",
            "Host with a space",
            format!("GET /{CODE} HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n"),
            Reject,
        ),
        case(
            "request line",
            "Host with a slash",
            format!("GET /{CODE} HTTP/1.1\r\nHost: x/y\r\nConnection: close\r\n\r\n"),
            Reject,
        ),
        case(
            "request line",
            "Host with userinfo",
            format!("GET /{CODE} HTTP/1.1\r\nHost: a@b\r\nConnection: close\r\n\r\n"),
            Reject,
        ),
        case(
            "request line",
            "Host with a port that is not a number",
            format!("GET /{CODE} HTTP/1.1\r\nHost: x:8o\r\nConnection: close\r\n\r\n"),
            Reject,
        ),
        case(
            "request line",
            "Host as an IPv6 literal and port",
            format!("GET /{CODE} HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n"),
            Redirect,
        ),
        case(
            "request line",
            "header line without a colon",
            get_known("NoColonHere\r\n"),
            Reject,
        ),
        case(
            "request line",
            "space before the colon",
            get_known("Host : y\r\n"),
            Reject,
        ),
        // Sizes. Pingora 0.9 reads at most 1 MiB (1048575 bytes) of request
        // header and at most 256 header lines; within those a request is
        // served, beyond them it is refused with a 400.
        case(
            "size",
            "200 KiB single header (limit 1 MiB)",
            get_known(&format!("X-Big: {}\r\n", "a".repeat(200 * 1024))),
            Redirect,
        ),
        case(
            "size",
            "2 MiB single header (over 1 MiB)",
            get_known(&format!("X-Big: {}\r\n", "a".repeat(2 * 1024 * 1024))),
            Reject,
        ),
        case(
            "size",
            "200 headers (limit 256)",
            get_known(
                &(0..200)
                    .map(|i| format!("X-H{i}: v\r\n"))
                    .collect::<String>(),
            ),
            Redirect,
        ),
        case(
            "size",
            "500 headers (over 256)",
            get_known(
                &(0..500)
                    .map(|i| format!("X-H{i}: v\r\n"))
                    .collect::<String>(),
            ),
            Reject,
        ),
        case(
            "size",
            "100 KiB path",
            format!(
                "GET /{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                "a".repeat(100 * 1024)
            ),
            Reject,
        ),
        case(
            "size",
            "2 MiB path (over 1 MiB)",
            format!(
                "GET /{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                "a".repeat(2 * 1024 * 1024)
            ),
            Reject,
        ),
    ];

    // Codes that are not codes: invalid UTF-8, bad percent-encoding.
    for path in [
        &b"/%ff%fe"[..],
        b"/%zz",
        b"/%",
        b"/%00",
        b"/%6bnown",
        b"/\xff\xfe",
        b"/kn\xc3\xb6wn",
        b"/known%0d%0aSet-Cookie:x=1",
    ] {
        v.push(case(
            "encoding",
            &String::from_utf8_lossy(path),
            authed_get(path),
            Reject,
        ));
    }

    // `..` and encoded slashes, sent with a valid key: if one reached the
    // admin's /api it would list the links (200). Compared with the admin's
    // own answer to the same bytes.
    for path in [
        &b"/../api/links"[..],
        b"/%2e%2e/api/links",
        b"/%2E%2E/api/links",
        b"/a%2fb",
        b"//api/links",
        b"/./api/links",
        b"/known/../api/links",
        b"/%2fapi%2flinks",
        b"/api%2flinks",
        b"/API/links",
        b"/..%2fapi/links",
        b"/\\api\\links",
    ] {
        let mut c = case(
            "traversal",
            &String::from_utf8_lossy(path),
            authed_get(path),
            Reject,
        );
        c.ask_admin = true;
        v.push(c);
    }
    for (path, code) in [
        ("/../api/links", "trav-a"),
        ("//api/links", "trav-b"),
        ("/%2e%2e/api/links", "trav-c"),
        ("/x/../api/links", "trav-d"),
    ] {
        let mut c = case(
            "traversal",
            &format!("POST {path}"),
            authed_post(path, code),
            Reject,
        );
        c.must_not_create = Some(code);
        c.ask_admin = true;
        v.push(c);
    }

    // Smuggling: a second, authenticated POST /api/links hidden in the first
    // request's body under ambiguous framing. It must never run.
    let smuggled =
        |code: &str| authed_post("/api/links", code).replace("Connection: close\r\n", "");
    let mut smuggle = |name: &str, code: &'static str, bytes: String, expect: Expect| {
        let mut c = case("smuggling", name, bytes, expect);
        c.until_close = true;
        c.must_not_create = Some(code);
        v.push(c);
    };
    let inner = smuggled("smug-clte");
    let body = format!("0\r\n\r\n{inner}");
    smuggle(
        "CL.TE to /api (CL covers the smuggled request, chunked ends first)",
        "smug-clte",
        format!(
            "POST /api/links HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{body}",
            body.len()
        ),
        Reject,
    );
    let inner = smuggled("smug-tecl");
    smuggle(
        "TE.CL to /api (chunk holds the smuggled request, CL: 4)",
        "smug-tecl",
        format!(
            "POST /api/links HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{inner}\r\n0\r\n\r\n",
            inner.len()
        ),
        Reject,
    );
    let inner = smuggled("smug-clcl");
    smuggle(
        "two different Content-Lengths",
        "smug-clcl",
        format!(
            "POST /api/links HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{inner}",
            inner.len()
        ),
        Reject,
    );
    let inner = smuggled("smug-teid");
    smuggle(
        "Transfer-Encoding: chunked, identity",
        "smug-teid",
        format!(
            "POST /api/links HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked, identity\r\nContent-Length: {}\r\n\r\n{inner}",
            inner.len()
        ),
        Reject,
    );
    let inner = smuggled("smug-fold");
    smuggle(
        "obs-fold Transfer-Encoding",
        "smug-fold",
        format!(
            "POST /api/links HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nTransfer-Encoding: identity\r\n chunked\r\n\r\n{inner}",
            inner.len()
        ),
        Reject,
    );
    let inner = smuggled("smug-sp");
    smuggle(
        "Transfer-Encoding with a space before the colon",
        "smug-sp",
        format!(
            "POST /api/links HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nTransfer-Encoding : chunked\r\nContent-Length: {}\r\n\r\n0\r\n\r\n{inner}",
            inner.len() + 5
        ),
        Reject,
    );
    let inner = smuggled("smug-h10");
    smuggle(
        "HTTP/1.0 with Transfer-Encoding",
        "smug-h10",
        format!(
            "POST /api/links HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{inner}"
        ),
        Reject,
    );
    let inner = smuggled("smug-get");
    let body = format!("0\r\n\r\n{inner}");
    smuggle(
        "CL.TE on a redirect (answered from memory, body never read)",
        "smug-get",
        format!(
            "GET /{CODE} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{body}",
            body.len()
        ),
        Redirect,
    );
    v
}

#[test]
fn hostile_requests_get_a_4xx_or_a_close_and_redirects_keep_working() {
    let cluster = Cluster::start();
    let (edge, admin) = (cluster.edge_addr, cluster.admin_addr);
    let r = api(
        edge,
        "POST",
        "/api/links",
        &format!(r#"{{"url":"{TARGET}","code":"{CODE}"}}"#),
    );
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    wait_until(Duration::from_secs(10), "the known link served", || {
        redirect_ok(edge)
    });

    // What a request that got through to /api with the key would show: the
    // link list, which the leak check below looks for.
    let baseline = exchange(
        admin,
        &authed_get(b"/api/links"),
        false,
        Duration::from_secs(10),
    );
    assert_eq!(baseline.statuses(), [200], "{}", baseline.body_text());
    assert!(
        baseline
            .body_text()
            .contains(&format!("\"code\":\"{CODE}\"")),
        "{}",
        baseline.body_text()
    );
    println!(
        "hostile: baseline, GET /api/links with the key straight to the admin -> 200 with the list"
    );

    let (mut sent, mut redirects, mut failures) = (0u64, 0u64, Vec::<String>::new());
    let limit = Duration::from_secs(10);
    for c in cases() {
        sent += 1;
        let out = exchange(edge, &c.bytes, c.until_close, limit);
        let statuses = out.statuses();
        let mut fail = |why: String| failures.push(format!("[{}] {}: {why}", c.group, c.name));
        if statuses.iter().any(|&s| s >= 500) {
            fail(format!("5xx: {}", out.describe()));
        }
        match c.expect {
            Expect::Reject => {
                if statuses.iter().any(|&s| !(400..500).contains(&s)) {
                    fail(format!("not a 4xx: {}", out.describe()));
                }
                if statuses.is_empty() && !out.closed {
                    fail("neither answered nor closed".into());
                }
            }
            Expect::Redirect => {
                if out.responses.first() != Some(&(302, Some(TARGET.to_owned()))) {
                    fail(format!("not the redirect: {}", out.describe()));
                }
            }
        }
        if c.until_close {
            // One request on the wire as the edge frames it: one answer at
            // most, and the connection is not kept for a next one.
            if statuses.len() > 1 {
                fail(format!("a second response: {}", out.describe()));
            }
            if !out.closed {
                fail(format!("connection kept open: {}", out.describe()));
            }
        }
        let text = out.body_text();
        if text.contains(&format!("\"code\":\"{CODE}\"")) {
            fail(format!("the link list leaked: {}", out.describe()));
        }
        if let Some(code) = c.must_not_create
            && link_exists(admin, code)
        {
            fail(format!("{code} was created through the edge"));
        }
        // Only now (it might create the code itself): the admin's own answer.
        let mut admin_said = String::new();
        if c.ask_admin {
            admin_said = exchange(admin, &c.bytes, false, limit).describe();
        }
        // The admin upstream connection is not poisoned: an /api request
        // through the edge gets its own answer.
        if c.until_close || c.must_not_create.is_some() {
            let r = api(edge, "GET", &format!("/api/links/{CODE}"), "");
            if r.status != 200 || r.json()["url"] != TARGET {
                fail(format!("next /api answer is wrong: {}", r.status));
            }
        }
        if redirect_ok(edge) {
            redirects += 1;
        } else {
            fail("the known link no longer redirects".into());
        }
        let admin_note = if c.ask_admin {
            format!("   (admin direct: {admin_said})")
        } else if c.until_close {
            // Whose 400 it is: Pingora's own has an empty body, the admin's
            // is its JSON error.
            let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            let body: String = body.chars().take(70).collect();
            format!("   body: {body:?}")
        } else {
            String::new()
        };
        println!(
            "hostile [{}] {:<60} -> {}{admin_note}",
            c.group,
            c.name.chars().take(60).collect::<String>(),
            out.describe()
        );
    }
    println!(
        "hostile requests: {sent} cases sent, {redirects} redirects served after them, {} failures",
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The limits the slow-sender test runs the edge with (short, to keep the
/// test fast; the defaults are 10 s and 60 s).
const HEADER_TIMEOUT_MS: u64 = 2_000;
const KEEPALIVE_TIMEOUT_MS: u64 = 2_000;
/// Pacing of a slow sender: one byte per read timeout.
const DRIP: Duration = Duration::from_millis(100);
/// A slow sender gives up after this many paces (40 s): a bound against a
/// hang, twenty times the configured limits.
const MAX_PACES: usize = 400;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlowKind {
    /// Connects and sends nothing.
    Silent,
    /// Sends a request header one byte per pace, never finishing it.
    Drip,
    /// Sends empty lines (which a parser skips before a request line).
    BlankLines,
    /// One normal request, then an idle kept-alive connection.
    IdleKeepAlive,
}

/// What the edge did to one slow connection.
#[derive(Debug)]
struct SlowOutcome {
    kind: SlowKind,
    responses: Vec<(u16, Option<String>)>,
    closed: bool,
    /// Bytes the sender got out before the edge cut it off.
    sent: usize,
}

/// Runs one slow sender until the edge closes the connection (or the
/// sender's own bound runs out). `open` counts connections being held; once
/// connected, the sender waits at `together` (when given) for the others.
fn slow_sender(
    edge: SocketAddr,
    kind: SlowKind,
    open: &AtomicU64,
    together: Option<&Barrier>,
) -> SlowOutcome {
    let header = format!("GET /{CODE} HTTP/1.1\r\nHost: x\r\nX-Slow: ");
    let mut stream = TcpStream::connect_timeout(&edge, Duration::from_secs(5)).expect("connect");
    stream.set_nodelay(true).unwrap();
    stream.set_read_timeout(Some(DRIP)).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut out = SlowOutcome {
        kind,
        responses: Vec::new(),
        closed: false,
        sent: 0,
    };
    let mut raw = Vec::new();
    if kind == SlowKind::IdleKeepAlive {
        let req = format!("GET /{CODE} HTTP/1.1\r\nHost: x\r\n\r\n");
        stream.write_all(req.as_bytes()).unwrap();
        out.sent = req.len();
    }
    open.fetch_add(1, Ordering::SeqCst);
    if let Some(barrier) = together {
        barrier.wait();
    }
    let mut buf = [0u8; 4096];
    for pace in 0..MAX_PACES {
        match stream.read(&mut buf) {
            Ok(0) => {
                out.closed = true;
                break;
            }
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                continue;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                out.closed = true;
                break;
            }
        }
        let byte = match kind {
            SlowKind::Silent | SlowKind::IdleKeepAlive => continue,
            SlowKind::Drip => *header.as_bytes().get(pace).unwrap_or(&b'a'),
            SlowKind::BlankLines => b"\r\n"[pace % 2],
        };
        if stream.write_all(&[byte]).is_err() {
            // The edge closed; read what it said first.
            out.closed = true;
            let _ = stream.read_to_end(&mut raw);
            break;
        }
        out.sent += 1;
    }
    open.fetch_sub(1, Ordering::SeqCst);
    out.responses = parse_responses(&raw);
    out
}

/// Checks one slow connection's fate: cut off (closed), never a 5xx; a
/// partial header gets a 408 at most; an idle keep-alive connection got its
/// redirect first.
fn check_slow(o: &SlowOutcome) -> Result<(), String> {
    if !o.closed {
        return Err(format!("{o:?}: still open after {MAX_PACES} paces"));
    }
    let statuses: Vec<u16> = o.responses.iter().map(|r| r.0).collect();
    let ok = match o.kind {
        SlowKind::Silent => statuses.is_empty(),
        SlowKind::Drip | SlowKind::BlankLines => statuses.is_empty() || statuses == [408],
        SlowKind::IdleKeepAlive => o.responses == [(302, Some(TARGET.to_owned()))],
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{o:?}: unexpected answer"))
    }
}

#[test]
fn slow_senders_are_cut_off_and_redirects_keep_working() {
    let cluster = Cluster::with_client_timeouts(HEADER_TIMEOUT_MS, KEEPALIVE_TIMEOUT_MS);
    let edge = cluster.edge_addr;
    let r = api(
        edge,
        "POST",
        "/api/links",
        &format!(r#"{{"url":"{TARGET}","code":"{CODE}"}}"#),
    );
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    wait_until(Duration::from_secs(10), "the known link served", || {
        redirect_ok(edge)
    });
    println!(
        "slow senders: edge.client_header_timeout_ms {HEADER_TIMEOUT_MS}, edge.keepalive_timeout_ms {KEEPALIVE_TIMEOUT_MS}, one byte per {DRIP:?}"
    );

    let kinds = [
        SlowKind::Silent,
        SlowKind::Drip,
        SlowKind::BlankLines,
        SlowKind::IdleKeepAlive,
    ];
    let (mut sent, mut redirects, mut failures) = (0u64, 0u64, Vec::<String>::new());

    // One at a time.
    let open = AtomicU64::new(0);
    for kind in kinds {
        sent += 1;
        let o = slow_sender(edge, kind, &open, None);
        if let Err(e) = check_slow(&o) {
            failures.push(e);
        }
        if redirect_ok(edge) {
            redirects += 1;
        } else {
            failures.push(format!("{kind:?}: the known link no longer redirects"));
        }
        let statuses: Vec<u16> = o.responses.iter().map(|r| r.0).collect();
        println!(
            "slow {kind:?}: answered {statuses:?}, closed by the edge: {}, after {} bytes sent",
            o.closed, o.sent
        );
    }

    // Many at once, while redirects are requested: every sender connects,
    // then all start together with the redirect checks.
    const EACH: usize = 50;
    let total = EACH * kinds.len();
    let open = Arc::new(AtomicU64::new(0));
    let together = Arc::new(Barrier::new(total + 1));
    let mut threads = Vec::new();
    for kind in kinds {
        for _ in 0..EACH {
            let (open, together) = (open.clone(), together.clone());
            threads.push(std::thread::spawn(move || {
                slow_sender(edge, kind, &open, Some(&together))
            }));
        }
    }
    sent += total as u64;
    together.wait();
    let (mut during, mut during_failed, mut max_held) = (0u64, 0u64, 0u64);
    for _ in 0..5_000 {
        let held = open.load(Ordering::SeqCst);
        if held == 0 {
            break;
        }
        max_held = max_held.max(held);
        if redirect_ok(edge) {
            during += 1;
        } else {
            during_failed += 1;
        }
    }
    let outcomes: Vec<SlowOutcome> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for o in &outcomes {
        if let Err(e) = check_slow(o) {
            failures.push(e);
        }
    }
    if during == 0 || during_failed > 0 {
        failures.push(format!(
            "redirects while held: {during} served, {during_failed} failed"
        ));
    }
    if redirect_ok(edge) {
        redirects += 1;
    } else {
        failures.push("after the slow senders: the known link no longer redirects".into());
    }
    let closed = outcomes.iter().filter(|o| o.closed).count();
    let got_408 = outcomes
        .iter()
        .filter(|o| o.responses.first().map(|r| r.0) == Some(408))
        .count();
    println!(
        "slow senders at once: {total} connections ({EACH} each of {kinds:?}), up to {max_held} held at a time; {during} redirects served while held, {during_failed} failed; {closed} closed by the edge, {got_408} with a 408"
    );
    println!(
        "slow senders: {sent} connections sent, {} redirects served (plus {during} while held), {} failures",
        redirects,
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:#?}");
}
