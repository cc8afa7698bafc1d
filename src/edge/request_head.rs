//! The fast path's request-head parser: a strict subset of HTTP/1.1, the
//! shape of a plain redirect request and nothing else.
//!
//! Every head it accepts is one that httparse (which Pingora parses with)
//! also accepts, with the same method, target and header lines
//! (`tests::accepts_only_what_httparse_reads_the_same`); anything it does not
//! accept is left to Pingora, which answers it as it would any request. So
//! it decides only which requests the fast path may answer, never what a
//! request means. It is stricter than httparse where being lenient would
//! cost a redirect's time for requests no client sends:
//! - request line exactly `GET` or `HEAD`, one space, an origin-form target
//!   of at most [`MAX_TARGET`] bytes that Pingora's URI parser (the `http`
//!   crate's) takes as they are: visible ASCII but `"`, `#`, `<` and `>`
//!   (Pingora answers 400 to the first three and drops a `#` fragment), one
//!   space, `HTTP/1.1`, CRLF;
//! - header lines `name: value` CRLF, the name a token (RFC 9110 `tchar`),
//!   optional spaces and tabs around the value, the value of tabs, spaces and
//!   visible ASCII (no obs-text, no obs-fold, no bare LF or CR);
//! - at most [`MAX_HEADERS`] lines, then CRLF, which must end the buffer (no
//!   body, no pipelined request after it).
//!
//! It replaced httparse on this path because httparse's general parser (UTF-8
//! checks, runtime SIMD dispatch, a 32-slot header array to fill) cost about
//! 700 instructions of a redirect's 2,500 (`docs/benchmarks.md`).

/// Most header lines looked at; a request with more goes to Pingora.
pub const MAX_HEADERS: usize = 32;

/// The longest request target taken (Pingora's URI parser takes up to
/// 65,534 bytes; a short link's request is far shorter).
pub const MAX_TARGET: usize = 8 * 1024;

/// Whether `value` is a valid `Host` field value (RFC 9110, 7.2: `uri-host
/// [ ":" port ]`, RFC 3986's grammar): a registered name of unreserved
/// characters, sub-delims and percent-escapes (empty included), an IPv4
/// address (a name by this grammar), or an IP literal in brackets; then,
/// optionally, `:` and digits. RFC 9112, 3.2: a request whose `Host` is not
/// valid gets a 400. Nothing is decoded and no name is looked up.
pub fn valid_host(value: &[u8]) -> bool {
    if value.first() == Some(&b'[') {
        return valid_ip_literal_host(value);
    }
    // One table look-up a byte: a `Host` is looked at on every redirect.
    let mut i = 0;
    while let Some(&b) = value.get(i) {
        match HOST_BYTE[b as usize] {
            NAME => i += 1,
            PERCENT if escape_at(value, i) => i += 3,
            COLON => return value[i + 1..].iter().all(u8::is_ascii_digit),
            _ => return false,
        }
    }
    true
}

const OTHER: u8 = 0;
const NAME: u8 = 1;
const PERCENT: u8 = 2;
const COLON: u8 = 3;

/// What each byte is in a `Host` outside brackets: a byte of a registered
/// name (unreserved or sub-delims), `%`, `:`, or anything else.
const HOST_BYTE: [u8; 256] = {
    let mut t = [OTHER; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() {
            t[b] = NAME;
        }
        b += 1;
    }
    let extra = b"-._~!$&'()*+,;=";
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = NAME;
        i += 1;
    }
    t[b'%' as usize] = PERCENT;
    t[b':' as usize] = COLON;
    t
};

/// Whether `s[i]` (a `%`) starts a percent-escape: two hex digits follow.
fn escape_at(s: &[u8], i: usize) -> bool {
    let hex = |j: usize| s.get(j).is_some_and(u8::is_ascii_hexdigit);
    hex(i + 1) && hex(i + 2)
}

/// `[` IPv6address / IPvFuture (with an RFC 6874 zone) `]` [ `:` port ].
fn valid_ip_literal_host(value: &[u8]) -> bool {
    let Some(end) = value.iter().position(|&b| b == b']') else {
        return false;
    };
    let literal = &value[1..end];
    let mut i = 0;
    while let Some(&b) = literal.get(i) {
        match HOST_BYTE[b as usize] {
            NAME | COLON => i += 1,
            PERCENT if escape_at(literal, i) => i += 3,
            _ => return false,
        }
    }
    !literal.is_empty()
        && match &value[end + 1..] {
            [] => true,
            [b':', port @ ..] => port.iter().all(u8::is_ascii_digit),
            _ => false,
        }
}

/// A request line the fast path can answer, and its header lines still to
/// be read.
pub struct RequestHead<'a> {
    /// `HEAD` (true) or `GET` (false).
    pub head_only: bool,
    /// The request target, starting with `/`.
    pub target: &'a [u8],
    /// The header lines, read one by one.
    pub headers: HeaderLines<'a>,
}

/// Reads the request line of `head`, a whole request head as read from the
/// socket; `None` when it is not one the fast path answers.
pub fn request_line(head: &[u8]) -> Option<RequestHead<'_>> {
    let (head_only, rest) = if let Some(rest) = head.strip_prefix(b"GET ") {
        (false, rest)
    } else {
        (true, head.strip_prefix(b"HEAD ")?)
    };
    let len = span(rest, TARGET);
    let (target, rest) = rest.split_at(len);
    if target.first() != Some(&b'/') || target.len() > MAX_TARGET {
        return None;
    }
    let rest = rest.strip_prefix(b" HTTP/1.1\r\n")?;
    Some(RequestHead {
        head_only,
        target,
        headers: HeaderLines {
            rest: Some(rest),
            left: MAX_HEADERS,
        },
    })
}

/// The header lines of a head, in order, as `Some((name, value))` (the value
/// without surrounding spaces and tabs). A line the parser does not take
/// yields one `None`, then the iteration ends; a caller stops at it. The
/// iteration ends without a `None` only when the empty line that ends the
/// head is the last thing in the buffer.
pub struct HeaderLines<'a> {
    /// What is left to read; `None` once done (or refused).
    rest: Option<&'a [u8]>,
    left: usize,
}

impl<'a> Iterator for HeaderLines<'a> {
    type Item = Option<(&'a [u8], &'a [u8])>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.rest.take()?;
        if rest == b"\r\n" {
            return None;
        }
        if self.left == 0 {
            return Some(None);
        }
        let name_len = span(rest, TCHAR);
        if name_len == 0 || rest.get(name_len) != Some(&b':') {
            return Some(None);
        }
        let name = &rest[..name_len];
        let after = &rest[name_len + 1..];
        let start = after
            .iter()
            .position(|&b| b != b' ' && b != b'\t')
            .unwrap_or(after.len());
        let after = &after[start..];
        let len = span(after, VALUE);
        let Some(next) = after[len..].strip_prefix(b"\r\n") else {
            return Some(None);
        };
        // Only spaces and tabs are ASCII whitespace among value bytes.
        let value = after[..len].trim_ascii_end();
        self.rest = Some(next);
        self.left -= 1;
        Some(Some((name, value)))
    }
}

/// Byte classes, one bit each, looked up in [`CLASS`].
const TCHAR: u8 = 1;
const TARGET: u8 = 2;
const VALUE: u8 = 4;

/// The class bits of each byte: RFC 9110 `tchar` (what a header name is made
/// of), a request target byte here (visible ASCII but `"`, `#`, `<`, `>`:
/// what the `http` crate takes in a query, so in a code's path too), a
/// header value byte here (tab, space, visible ASCII).
static CLASS: [u8; 256] = {
    let mut class = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        let mut bits = 0;
        if c.is_ascii_alphanumeric() {
            bits |= TCHAR;
        }
        let mut i = 0;
        let specials = b"!#$%&'*+-.^_`|~";
        while i < specials.len() {
            if specials[i] == c {
                bits |= TCHAR;
            }
            i += 1;
        }
        if c >= b'!' && c <= b'~' {
            bits |= VALUE;
            if c != b'"' && c != b'#' && c != b'<' && c != b'>' {
                bits |= TARGET;
            }
        }
        if c == b' ' || c == b'\t' {
            bits |= VALUE;
        }
        class[b] = bits;
        b += 1;
    }
    class
};

/// How many bytes at the start of `bytes` are of class `bits`.
#[inline(always)]
fn span(bytes: &[u8], bits: u8) -> usize {
    bytes
        .iter()
        .position(|&b| CLASS[b as usize] & bits == 0)
        .unwrap_or(bytes.len())
}

/// For tests and fuzzing: when [`request_line`] takes `head`, how httparse
/// reads it differently (method, target, header lines, or not at all);
/// `None` when it agrees or when `head` is not taken.
#[doc(hidden)]
pub fn differs_from_httparse(head: &[u8]) -> Option<String> {
    let line = request_line(head)?;
    let (head_only, target) = (line.head_only, line.target);
    let mut ours = Vec::new();
    for h in line.headers {
        ours.push(h?);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let shown = || head.escape_ascii().to_string();
    match req.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        other => return Some(format!("httparse: {other:?} for {}", shown())),
    }
    let theirs: Vec<(&[u8], &[u8])> = req
        .headers
        .iter()
        .map(|h| (h.name.as_bytes(), h.value))
        .collect();
    let method = if head_only { "HEAD" } else { "GET" };
    if req.version != Some(1)
        || req.method != Some(method)
        || req.path.map(str::as_bytes) != Some(target)
        || theirs != ours
    {
        return Some(format!(
            "httparse reads {:?} {:?} {:?} {theirs:?}, this {method} {:?} 1 {ours:?}, in {}",
            req.method,
            req.path,
            req.version,
            target.escape_ascii().to_string(),
            shown()
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Method, target and header lines, or `None` when refused.
    type Parsed<'a> = (bool, &'a [u8], Vec<(&'a [u8], &'a [u8])>);

    fn parse(head: &[u8]) -> Option<Parsed<'_>> {
        let line = request_line(head)?;
        let mut headers = Vec::new();
        for h in line.headers {
            headers.push(h?);
        }
        Some((line.head_only, line.target, headers))
    }

    fn check(head: &[u8]) {
        if let Some(difference) = differs_from_httparse(head) {
            panic!("{difference}");
        }
    }

    #[test]
    fn byte_classes() {
        for b in 0..=255u8 {
            let tchar = b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            let visible = (0x21..=0x7e).contains(&b);
            let class = CLASS[b as usize];
            assert_eq!(class & TCHAR != 0, tchar, "{b:#x}");
            // The http crate's query bytes (0x21, 0x24-0x3B, 0x3D, 0x3F-0x7E).
            let query =
                b == 0x21 || (0x24..=0x3b).contains(&b) || b == 0x3d || (0x3f..=0x7e).contains(&b);
            assert_eq!(class & TARGET != 0, query, "{b:#x}");
            if query {
                let target = [b"/a?".as_slice(), &[b]].concat();
                let uri = http::Uri::try_from(target.as_slice()).unwrap();
                assert_eq!(uri.path_and_query().unwrap().as_str().as_bytes(), target);
            }
            assert_eq!(
                class & VALUE != 0,
                visible || b == b' ' || b == b'\t',
                "{b:#x}"
            );
        }
    }

    #[test]
    fn plain_requests_are_read() {
        let head =
            b"GET /abc1234?x=1 HTTP/1.1\r\nHost: ulo.ad\r\nUser-Agent:  curl/8 \t\r\nX-E:\r\n\r\n";
        let (head_only, target, headers) = parse(head).unwrap();
        assert!(!head_only);
        assert_eq!(target, b"/abc1234?x=1");
        assert_eq!(
            headers,
            vec![
                (&b"Host"[..], &b"ulo.ad"[..]),
                (b"User-Agent", b"curl/8"),
                (b"X-E", b""),
            ]
        );
        let (head_only, target, headers) = parse(b"HEAD /a HTTP/1.1\r\n\r\n").unwrap();
        assert!(head_only);
        assert_eq!(target, b"/a");
        assert!(headers.is_empty());
        check(head);
    }

    #[test]
    fn everything_else_is_refused() {
        let with_lines = |n: usize| {
            let mut head = b"GET /a HTTP/1.1\r\n".to_vec();
            for i in 0..n {
                head.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
            }
            head.extend_from_slice(b"\r\n");
            head
        };
        let many = with_lines(MAX_HEADERS + 1);
        let refused: &[&[u8]] = &[
            b"",
            b"GET /a HTTP/1.1\r\n",                       // head not ended
            b"GET /a HTTP/1.1\r\nHost: x\r\n",            // head not ended
            b"GET /a HTTP/1.1\r\n\r\nGET /b",             // something after it
            b"GET /a HTTP/1.1\r\n\r\n\r\n",               // something after it
            b"POST /a HTTP/1.1\r\n\r\n",                  // method
            b"get /a HTTP/1.1\r\n\r\n",                   // method
            b"GET  /a HTTP/1.1\r\n\r\n",                  // two spaces
            b"GET /a  HTTP/1.1\r\n\r\n",                  // two spaces
            b"GET\t/a HTTP/1.1\r\n\r\n",                  // tab
            b"GET a HTTP/1.1\r\n\r\n",                    // not origin-form
            b"GET * HTTP/1.1\r\n\r\n",                    // not origin-form
            b"GET http://x/a HTTP/1.1\r\n\r\n",           // absolute form
            b"GET /a\xff HTTP/1.1\r\n\r\n",               // non-ASCII target
            b"GET /a?b#c HTTP/1.1\r\n\r\n",               // fragment
            b"GET /a?\"b\" HTTP/1.1\r\n\r\n",             // not in a URI
            b"GET /a?<b> HTTP/1.1\r\n\r\n",               // not in a URI
            b"GET /a HTTP/1.0\r\n\r\n",                   // version
            b"GET /a HTTP/1.1\n\n",                       // bare LF
            b"GET /a HTTP/1.1\r\nHost: x\n\r\n",          // bare LF
            b"GET /a HTTP/1.1\r\nHost: x\r\r\n\r\n",      // bare CR
            b"GET /a HTTP/1.1\r\nHost : x\r\n\r\n",       // space before colon
            b"GET /a HTTP/1.1\r\n: x\r\n\r\n",            // empty name
            b"GET /a HTTP/1.1\r\nHo(st: x\r\n\r\n",       // not a token
            b"GET /a HTTP/1.1\r\nHost: x\r\n y\r\n\r\n",  // obs-fold
            b"GET /a HTTP/1.1\r\nHost: \xc3\xa9\r\n\r\n", // obs-text
            b"GET /a HTTP/1.1\r\nHost: a\x00b\r\n\r\n",   // NUL
            b"GET /a HTTP/1.1\r\nHost: a\x7fb\r\n\r\n",   // DEL
        ];
        for head in refused.iter().copied().chain([&many[..]]) {
            assert!(
                parse(head).is_none(),
                "{:?}",
                head.escape_ascii().to_string()
            );
        }
        // As many as allowed are taken.
        let most = with_lines(MAX_HEADERS);
        assert!(parse(&most).is_some());
        check(&most);
        let target = |n: usize| format!("GET /a?{} HTTP/1.1\r\n\r\n", "b".repeat(n - 3));
        assert!(parse(target(MAX_TARGET).as_bytes()).is_some());
        assert!(parse(target(MAX_TARGET + 1).as_bytes()).is_none());
    }

    /// Bytes for a piece of a line: mostly letters, sometimes any byte, often
    /// one of those a parser could read differently.
    fn line_bytes() -> impl Strategy<Value = Vec<u8>> {
        let tricky = prop::sample::select(
            &[
                b' ', b'\t', b'\r', b'\n', b':', b'/', b'?', b'(', 0, 0x0b, 0x0c, 0x7f, 0x80, 0xff,
            ][..],
        );
        prop::collection::vec(
            prop_oneof![8 => b'a'..=b'z', 1 => any::<u8>(), 3 => tricky],
            0..10,
        )
    }

    /// Heads shaped like requests: a request line (usually a good one), header
    /// lines `name:value` CRLF of tricky bytes, the empty line, and sometimes
    /// something after it.
    fn head() -> impl Strategy<Value = Vec<u8>> {
        let request = prop_oneof![
            4 => (prop::sample::select(&["GET ", "HEAD "][..]), line_bytes())
                .prop_map(|(m, t)| [m.as_bytes(), b"/", &t, b" HTTP/1.1\r\n"].concat()),
            1 => line_bytes().prop_map(|l| [&l[..], b"\r\n"].concat()),
        ];
        let header =
            (line_bytes(), line_bytes()).prop_map(|(n, v)| [&n[..], b":", &v, b"\r\n"].concat());
        let end = prop_oneof![
            6 => Just(b"\r\n".to_vec()),
            1 => line_bytes(),
            1 => line_bytes().prop_map(|l| [&b"\r\n"[..], &l].concat()),
        ];
        (request, prop::collection::vec(header, 0..6), end)
            .prop_map(|(r, h, e)| [r, h.concat(), e].concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Whatever the parser takes, httparse reads the same way.
        #[test]
        fn accepts_only_what_httparse_reads_the_same(head in head()) {
            check(&head);
        }

        /// Well-formed heads with arbitrary header text are taken (so the
        /// check above is not passing by refusing everything).
        #[test]
        fn well_formed_heads_are_taken(
            code in "[A-Za-z0-9_-]{1,64}",
            lines in prop::collection::vec(("[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}", "[ -~]{0,40}"), 0..MAX_HEADERS),
        ) {
            let mut head = format!("GET /{code} HTTP/1.1\r\n");
            for (name, value) in &lines {
                head.push_str(&format!("{name}:{value}\r\n"));
            }
            head.push_str("\r\n");
            let parsed = parse(head.as_bytes());
            prop_assert!(parsed.is_some(), "{:?}", head);
            check(head.as_bytes());
        }
    }

    #[test]
    fn host_values() {
        for ok in [
            &b""[..],
            b"ulo.ad",
            b"ulo.ad:8080",
            b"ulo.ad:",
            b"127.0.0.1",
            b"127.0.0.1:80",
            b"[::1]",
            b"[::1]:8443",
            b"[fe80::1%25eth0]",
            b"[v1.x]",
            b"xn--bcher-kva.example",
            b"a_b~c!$&'()*+,;=",
            b"%41bc",
        ] {
            assert!(valid_host(ok), "{:?}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b"a b"[..],
            b"x/y",
            b"user@ulo.ad",
            b"ulo.ad:80:81",
            b"ulo.ad:8o",
            b"[::1",
            b"[]",
            b"[::1]x",
            b"[::1]:8a",
            b"[::1/8]",
            b"%zz",
            b"a%4",
            b"a\\b",
            b"a?b",
            b"a#b",
            b"a\"b",
            b"\xc3\xa9",
            b"a\tb",
        ] {
            assert!(!valid_host(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
