//! The link record: what a short link is, how it is validated and how it is
//! laid out in bytes.
//!
//! The same byte layout ("link encoding v1", see `docs/storage.md`) is used in
//! a log frame's payload and in a snapshot's records region, so a record moves
//! from the log into a snapshot without being re-encoded by hand twice.
//!
//! ```
//! use uload::store::record::{Link, RedirectStatus};
//! let link = Link::new("abc", "https://example.com/").unwrap();
//! let mut buf = Vec::new();
//! link.encode_into(&mut buf);
//! let back = uload::store::record::LinkRef::decode(&buf).unwrap();
//! assert_eq!(back.0.to_link().unwrap(), link);
//! assert_eq!(link.status, RedirectStatus::Found);
//! ```

use std::fmt;

/// Longest short code, in bytes.
pub const MAX_CODE_LEN: usize = 64;
/// Longest target URL accepted, in bytes (2 KiB; the format itself allows 65535).
pub const MAX_TARGET_LEN: usize = 2048;
/// Version byte written at the start of every encoded link.
pub const LINK_ENCODING_VERSION: u8 = 1;
/// Size of the fixed part of an encoded link, before the code and target bytes.
pub const LINK_FIXED_LEN: usize = 40;

/// Flag bit: the link exists but must not redirect.
pub const FLAG_DISABLED: u8 = 0b0000_0001;
/// Flag bit: merge the request's query string into the target's.
pub const FLAG_FORWARD_QUERY: u8 = 0b0000_0010;
const KNOWN_FLAGS: u8 = FLAG_DISABLED | FLAG_FORWARD_QUERY;

/// The flag byte for a link with these settings.
pub fn flags_of(disabled: bool, forward_query: bool) -> u8 {
    (if disabled { FLAG_DISABLED } else { 0 })
        | (if forward_query { FLAG_FORWARD_QUERY } else { 0 })
}

/// Why a link, a code or an encoded record was refused. Each variant names the
/// field at fault so that callers (the CLI, the API) can report it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("code: must be 1 to {MAX_CODE_LEN} bytes, got {0}")]
    CodeLength(usize),
    #[error("code: byte {0:#04x} at position {1} is not one of [A-Za-z0-9_-]")]
    CodeCharset(u8, usize),
    #[error("url: must be 1 to {MAX_TARGET_LEN} bytes, got {0}")]
    TargetLength(usize),
    #[error("url: contains whitespace or a control character at byte {0}")]
    TargetControl(usize),
    #[error("url: must be an absolute http:// or https:// URL")]
    TargetScheme,
    #[error("url: has no host")]
    TargetHost,
    #[error("url: is not valid UTF-8")]
    TargetUtf8,
    #[error("status: must be 301, 302, 307 or 308, got {0}")]
    Status(u16),
    #[error("flags: unknown bits {0:#04x}")]
    Flags(u8),
    #[error("record: unsupported link encoding version {0}")]
    Version(u8),
    #[error("record: truncated, need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("record: reserved byte is {0:#04x}, must be 0")]
    Reserved(u8),
}

/// The HTTP status a link redirects with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum RedirectStatus {
    /// 301: permanent, clients and caches may remember it.
    MovedPermanently,
    /// 302: temporary; the default, so that a link can be changed later.
    #[default]
    Found,
    /// 307: temporary, method preserved.
    TemporaryRedirect,
    /// 308: permanent, method preserved.
    PermanentRedirect,
}

impl RedirectStatus {
    /// The numeric HTTP status.
    pub fn code(self) -> u16 {
        match self {
            Self::MovedPermanently => 301,
            Self::Found => 302,
            Self::TemporaryRedirect => 307,
            Self::PermanentRedirect => 308,
        }
    }

    /// Parses a numeric HTTP status; only the four redirect statuses are accepted.
    pub fn from_code(code: u16) -> Result<Self, RecordError> {
        match code {
            301 => Ok(Self::MovedPermanently),
            302 => Ok(Self::Found),
            307 => Ok(Self::TemporaryRedirect),
            308 => Ok(Self::PermanentRedirect),
            other => Err(RecordError::Status(other)),
        }
    }
}

impl fmt::Display for RedirectStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code())
    }
}

/// An owned short link. Cloning copies both strings; the hot table shares
/// links through `Arc<Link>` instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The short code, `[A-Za-z0-9_-]{1,64}`, case-sensitive.
    pub code: String,
    /// The absolute http(s) URL the code redirects to.
    pub target: String,
    /// Redirect status.
    pub status: RedirectStatus,
    /// Bit set of `FLAG_*`.
    pub flags: u8,
    /// Creation time, milliseconds since the Unix epoch (UTC).
    pub created_at_ms: u64,
    /// Expiry time, milliseconds since the Unix epoch; `None` never expires.
    pub expires_at_ms: Option<u64>,
    /// Click budget; `None` is unlimited.
    pub max_clicks: Option<u64>,
    /// Id of the API key that owns the link (0: imported or unowned).
    pub owner_key_id: u64,
}

impl Link {
    /// A link with defaults (302, no flags, created now), after validating
    /// the code and the target.
    pub fn new(code: &str, target: &str) -> Result<Self, RecordError> {
        validate_code(code.as_bytes())?;
        validate_target(target)?;
        Ok(Self {
            code: code.to_owned(),
            target: target.to_owned(),
            status: RedirectStatus::default(),
            flags: 0,
            created_at_ms: now_ms(),
            expires_at_ms: None,
            max_clicks: None,
            owner_key_id: 0,
        })
    }

    /// Checks every field; the store calls this before anything is appended.
    pub fn validate(&self) -> Result<(), RecordError> {
        validate_code(self.code.as_bytes())?;
        validate_target(&self.target)?;
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(RecordError::Flags(self.flags & !KNOWN_FLAGS));
        }
        Ok(())
    }

    /// Whether the disabled flag is set.
    pub fn is_disabled(&self) -> bool {
        self.flags & FLAG_DISABLED != 0
    }

    /// Whether the forward-query flag is set.
    pub fn forwards_query(&self) -> bool {
        self.flags & FLAG_FORWARD_QUERY != 0
    }

    /// Length of the encoding `encode_into` appends.
    pub fn encoded_len(&self) -> usize {
        LINK_FIXED_LEN + self.code.len() + self.target.len()
    }

    /// Appends link encoding v1 to `out`. The link must have been validated
    /// (lengths fit their fields); the store never encodes an unvalidated link.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        debug_assert!(self.validate().is_ok());
        self.as_ref().encode_into(out);
    }
}

/// A link borrowed from wherever it lives (a snapshot's mmap or an overlay
/// entry). Building one allocates nothing; the target stays bytes because the
/// edge writes it into a header as bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkRef<'a> {
    pub code: &'a [u8],
    pub target: &'a [u8],
    pub status: RedirectStatus,
    pub flags: u8,
    pub created_at_ms: u64,
    pub expires_at_ms: Option<u64>,
    pub max_clicks: Option<u64>,
    pub owner_key_id: u64,
}

impl<'a> LinkRef<'a> {
    /// Decodes one link encoding from the front of `buf`, returning the link
    /// and the number of bytes it used. Never panics; every length is checked.
    pub fn decode(buf: &'a [u8]) -> Result<(Self, usize), RecordError> {
        if buf.len() < LINK_FIXED_LEN {
            return Err(RecordError::Truncated {
                need: LINK_FIXED_LEN,
                have: buf.len(),
            });
        }
        if buf[0] != LINK_ENCODING_VERSION {
            return Err(RecordError::Version(buf[0]));
        }
        let code_len = buf[1] as usize;
        let target_len = u16::from_le_bytes([buf[2], buf[3]]) as usize;
        let status = RedirectStatus::from_code(u16::from_le_bytes([buf[4], buf[5]]))?;
        let flags = buf[6];
        if flags & !KNOWN_FLAGS != 0 {
            return Err(RecordError::Flags(flags & !KNOWN_FLAGS));
        }
        if buf[7] != 0 {
            return Err(RecordError::Reserved(buf[7]));
        }
        let total = LINK_FIXED_LEN + code_len + target_len;
        if buf.len() < total {
            return Err(RecordError::Truncated {
                need: total,
                have: buf.len(),
            });
        }
        let code = &buf[LINK_FIXED_LEN..LINK_FIXED_LEN + code_len];
        validate_code(code)?;
        let target = &buf[LINK_FIXED_LEN + code_len..total];
        let opt = |v: u64| if v == 0 { None } else { Some(v) };
        Ok((
            Self {
                code,
                target,
                status,
                flags,
                created_at_ms: read_u64(buf, 8),
                expires_at_ms: opt(read_u64(buf, 16)),
                max_clicks: opt(read_u64(buf, 24)),
                owner_key_id: read_u64(buf, 32),
            },
            total,
        ))
    }

    /// The code as text. Codes are validated ASCII wherever a `LinkRef` is built.
    pub fn code_str(&self) -> &'a str {
        std::str::from_utf8(self.code).unwrap_or("")
    }

    /// Appends link encoding v1 to `out`. Lengths must fit their fields,
    /// as they do for every `LinkRef` decoded or borrowed from a valid `Link`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(LINK_FIXED_LEN + self.code.len() + self.target.len());
        out.push(LINK_ENCODING_VERSION);
        out.push(self.code.len() as u8);
        out.extend_from_slice(&(self.target.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.status.code().to_le_bytes());
        out.push(self.flags);
        out.push(0);
        out.extend_from_slice(&self.created_at_ms.to_le_bytes());
        out.extend_from_slice(&self.expires_at_ms.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&self.max_clicks.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&self.owner_key_id.to_le_bytes());
        out.extend_from_slice(self.code);
        out.extend_from_slice(self.target);
    }

    /// Whether the disabled flag is set.
    pub fn is_disabled(&self) -> bool {
        self.flags & FLAG_DISABLED != 0
    }

    /// Whether the forward-query flag is set.
    pub fn forwards_query(&self) -> bool {
        self.flags & FLAG_FORWARD_QUERY != 0
    }

    /// Whether the link has expired at `now_ms`.
    pub fn is_expired_at(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|t| t <= now_ms)
    }

    /// An owned copy, with the target's UTF-8 checked.
    pub fn to_link(&self) -> Result<Link, RecordError> {
        let target = std::str::from_utf8(self.target).map_err(|_| RecordError::TargetUtf8)?;
        Ok(Link {
            code: self.code_str().to_owned(),
            target: target.to_owned(),
            status: self.status,
            flags: self.flags,
            created_at_ms: self.created_at_ms,
            expires_at_ms: self.expires_at_ms,
            max_clicks: self.max_clicks,
            owner_key_id: self.owner_key_id,
        })
    }
}

impl Link {
    /// A borrowed view of this link.
    pub fn as_ref(&self) -> LinkRef<'_> {
        LinkRef {
            code: self.code.as_bytes(),
            target: self.target.as_bytes(),
            status: self.status,
            flags: self.flags,
            created_at_ms: self.created_at_ms,
            expires_at_ms: self.expires_at_ms,
            max_clicks: self.max_clicks,
            owner_key_id: self.owner_key_id,
        }
    }
}

/// Reads a little-endian u64 at `at`; callers have checked the length.
fn read_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Checks a short code: 1 to 64 bytes of `[A-Za-z0-9_-]`.
pub fn validate_code(code: &[u8]) -> Result<(), RecordError> {
    if code.is_empty() || code.len() > MAX_CODE_LEN {
        return Err(RecordError::CodeLength(code.len()));
    }
    match code.iter().position(|&b| !is_code_byte(b)) {
        Some(pos) => Err(RecordError::CodeCharset(code[pos], pos)),
        None => Ok(()),
    }
}

/// A sort key for codes: their first 8 bytes, big-endian, zero-padded. Codes
/// never contain a zero byte, so comparing keys and then (on a tie) the
/// codes themselves gives bytewise order with far fewer `memcmp` calls.
#[inline]
pub fn code_prefix_key(code: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = code.len().min(8);
    b[..n].copy_from_slice(&code[..n]);
    u64::from_be_bytes(b)
}

/// The order that sorts `items` by code, ties (equal codes) kept in their
/// original order. Sorts 16-byte (key, index) pairs instead of the items, and
/// compares whole codes only when the 8-byte prefixes tie.
pub fn order_by_code<T>(items: &[T], code: impl Fn(&T) -> &[u8]) -> Vec<u32> {
    let mut keys: Vec<(u64, u32)> = items
        .iter()
        .enumerate()
        .map(|(i, item)| (code_prefix_key(code(item)), i as u32))
        .collect();
    keys.sort_unstable_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| code(&items[a.1 as usize]).cmp(code(&items[b.1 as usize])))
            .then(a.1.cmp(&b.1))
    });
    keys.into_iter().map(|(_, i)| i).collect()
}

/// Whether `b` may appear in a short code.
#[inline]
pub fn is_code_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Checks a target URL: absolute `http`/`https` with a host, at most
/// `MAX_TARGET_LEN` bytes, no whitespace or control characters anywhere (so
/// nothing can be injected into a `Location` header).
pub fn validate_target(url: &str) -> Result<(), RecordError> {
    let bytes = url.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_TARGET_LEN {
        return Err(RecordError::TargetLength(bytes.len()));
    }
    let bad_ascii = |b: &u8| *b <= b' ' || *b == 0x7f;
    let bad_at = if url.is_ascii() {
        bytes.iter().position(bad_ascii)
    } else {
        url.char_indices()
            .find(|(_, c)| c.is_whitespace() || c.is_control())
            .map(|(i, _)| i)
    };
    if let Some(pos) = bad_at {
        return Err(RecordError::TargetControl(pos));
    }
    let rest = strip_prefix_ignore_case(url, "https://")
        .or_else(|| strip_prefix_ignore_case(url, "http://"))
        .ok_or(RecordError::TargetScheme)?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("");
    let host = if host_port.starts_with('[') {
        host_port
            .split(']')
            .next()
            .unwrap_or("")
            .trim_start_matches('[')
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    if host.is_empty() {
        return Err(RecordError::TargetHost);
    }
    Ok(())
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Link {
        Link {
            code: "Ab_-9".into(),
            target: "https://example.com/a?b=c".into(),
            status: RedirectStatus::PermanentRedirect,
            flags: FLAG_FORWARD_QUERY,
            created_at_ms: 1_700_000_000_123,
            expires_at_ms: Some(1_800_000_000_000),
            max_clicks: Some(42),
            owner_key_id: 7,
        }
    }

    #[test]
    fn round_trip_every_field() {
        let link = sample();
        let mut buf = Vec::new();
        link.encode_into(&mut buf);
        assert_eq!(buf.len(), link.encoded_len());
        let (back, used) = LinkRef::decode(&buf).unwrap();
        assert_eq!(used, buf.len());
        assert_eq!(back.to_link().unwrap(), link);
    }

    #[test]
    fn byte_layout_is_as_specified() {
        let link = sample();
        let mut buf = Vec::new();
        link.encode_into(&mut buf);
        assert_eq!(buf[0], 1, "version");
        assert_eq!(buf[1], 5, "code_len");
        assert_eq!(&buf[2..4], &(25u16).to_le_bytes(), "target_len");
        assert_eq!(&buf[4..6], &308u16.to_le_bytes(), "status");
        assert_eq!(buf[6], FLAG_FORWARD_QUERY, "flags");
        assert_eq!(buf[7], 0, "reserved");
        assert_eq!(
            &buf[8..16],
            &1_700_000_000_123u64.to_le_bytes(),
            "created_at"
        );
        assert_eq!(
            &buf[16..24],
            &1_800_000_000_000u64.to_le_bytes(),
            "expires_at"
        );
        assert_eq!(&buf[24..32], &42u64.to_le_bytes(), "max_clicks");
        assert_eq!(&buf[32..40], &7u64.to_le_bytes(), "owner");
        assert_eq!(&buf[40..45], b"Ab_-9");
        assert_eq!(&buf[45..], b"https://example.com/a?b=c");
    }

    #[test]
    fn optional_fields_encode_as_zero() {
        let mut link = sample();
        link.expires_at_ms = None;
        link.max_clicks = None;
        let mut buf = Vec::new();
        link.encode_into(&mut buf);
        assert_eq!(&buf[16..32], &[0u8; 16]);
        assert_eq!(LinkRef::decode(&buf).unwrap().0.to_link().unwrap(), link);
    }

    #[test]
    fn decode_refuses_each_bad_field() {
        let mut good = Vec::new();
        sample().encode_into(&mut good);
        let cases: [(usize, u8, RecordError); 5] = [
            (0, 2, RecordError::Version(2)),
            (4, 0, RecordError::Status(256)),
            (6, 0x80, RecordError::Flags(0x80)),
            (7, 1, RecordError::Reserved(1)),
            (40, b'/', RecordError::CodeCharset(b'/', 0)),
        ];
        for (at, byte, want) in cases {
            let mut bad = good.clone();
            bad[at] = byte;
            assert_eq!(LinkRef::decode(&bad).unwrap_err(), want, "byte {at}");
        }
        let mut zero_code = good.clone();
        zero_code[1] = 0;
        assert_eq!(
            LinkRef::decode(&zero_code).unwrap_err(),
            RecordError::CodeLength(0)
        );
        for cut in 0..good.len() {
            assert!(matches!(
                LinkRef::decode(&good[..cut]).unwrap_err(),
                RecordError::Truncated { .. }
            ));
        }
    }

    #[test]
    fn codes() {
        assert!(validate_code(b"a").is_ok());
        assert!(validate_code(&[b'z'; 64]).is_ok());
        assert_eq!(validate_code(b""), Err(RecordError::CodeLength(0)));
        assert_eq!(validate_code(&[b'z'; 65]), Err(RecordError::CodeLength(65)));
        assert_eq!(
            validate_code(b"a.b"),
            Err(RecordError::CodeCharset(b'.', 1))
        );
        assert!(validate_code("é".as_bytes()).is_err());
    }

    #[test]
    fn targets() {
        for ok in [
            "http://a",
            "HTTPS://Example.com:8080/x?y#z",
            "https://user@host/",
            "https://[::1]:80/",
            "https://例え.jp/パス",
        ] {
            assert_eq!(validate_target(ok), Ok(()), "{ok}");
        }
        let bad = [
            ("", RecordError::TargetLength(0)),
            ("javascript:alert(1)", RecordError::TargetScheme),
            ("data:text/html,x", RecordError::TargetScheme),
            ("ftp://x/", RecordError::TargetScheme),
            ("//example.com", RecordError::TargetScheme),
            ("https://", RecordError::TargetHost),
            ("https:///path", RecordError::TargetHost),
            ("https://:80/", RecordError::TargetHost),
            (
                "https://a/\r\nSet-Cookie: x",
                RecordError::TargetControl(10),
            ),
            ("https://a/ b", RecordError::TargetControl(10)),
            ("https://a/\u{85}", RecordError::TargetControl(10)),
        ];
        for (url, want) in bad {
            assert_eq!(validate_target(url), Err(want), "{url:?}");
        }
        let long = format!("https://a/{}", "x".repeat(MAX_TARGET_LEN));
        assert_eq!(
            validate_target(&long),
            Err(RecordError::TargetLength(long.len()))
        );
    }

    #[test]
    fn prefix_key_orders_like_the_bytes() {
        let mut codes = [
            "b",
            "a",
            "ab",
            "a-",
            "abcdefgh",
            "abcdefghi",
            "abcdefgg",
            "Z",
            "_",
            "0",
        ];
        let mut by_key = codes;
        codes.sort();
        by_key.sort_by(|a, b| {
            code_prefix_key(a.as_bytes())
                .cmp(&code_prefix_key(b.as_bytes()))
                .then_with(|| a.cmp(b))
        });
        assert_eq!(codes, by_key);
    }

    #[test]
    fn order_by_code_is_stable() {
        let items = ["b", "a", "abcdefghij", "abcdefghi", "a", "b"];
        let order = order_by_code(&items, |s| s.as_bytes());
        assert_eq!(order, [1, 4, 3, 2, 0, 5]);
    }

    #[test]
    fn statuses() {
        for s in [301, 302, 307, 308] {
            assert_eq!(RedirectStatus::from_code(s).unwrap().code(), s);
        }
        for s in [0, 200, 300, 303, 304, 404] {
            assert_eq!(RedirectStatus::from_code(s), Err(RecordError::Status(s)));
        }
    }

    #[test]
    fn expiry() {
        let link = sample();
        assert!(!link.as_ref().is_expired_at(1_799_999_999_999));
        assert!(link.as_ref().is_expired_at(1_800_000_000_000));
    }
}
