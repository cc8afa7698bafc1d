//! The link record: what a short link is, how it is validated and how it is
//! laid out in bytes.
//!
//! The same byte layout (a "link encoding", see `docs/storage.md`) is used in
//! a log frame's payload and in a snapshot's records region, so a record moves
//! from the log into a snapshot without being re-encoded by hand twice.
//!
//! Every encoded link starts with its version byte. Writers produce link
//! encoding v2 (a 12-byte fixed part; the fields that are usually zero are
//! stored only when set); readers decode v1 (a 40-byte fixed part, written by
//! earlier builds) and v2, each as strictly as the other.
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
/// Version byte of link encoding v1 (written by earlier builds; still read).
pub const LINK_ENCODING_V1: u8 = 1;
/// Version byte of link encoding v2 (written by this build).
pub const LINK_ENCODING_V2: u8 = 2;
/// Version byte written at the start of every link this build encodes.
pub const LINK_ENCODING_VERSION: u8 = LINK_ENCODING_V2;
/// Size of v1's fixed part, before the code and target bytes.
pub const LINK_V1_FIXED_LEN: usize = 40;
/// Size of v2's fixed part, before the code, the target and the optional fields.
pub const LINK_V2_FIXED_LEN: usize = 12;
/// The smallest fixed part of any version: fewer bytes never hold a link.
pub const LINK_MIN_FIXED_LEN: usize = LINK_V2_FIXED_LEN;

/// v2 `flags` bit: `expires_at` (8 bytes) is present.
pub const V2_HAS_EXPIRES_AT: u8 = 0b0001_0000;
/// v2 `flags` bit: `max_clicks` (8 bytes) is present.
pub const V2_HAS_MAX_CLICKS: u8 = 0b0010_0000;
/// v2 `flags` bit: `owner_key_id` (8 bytes) is present.
pub const V2_HAS_OWNER_KEY_ID: u8 = 0b0100_0000;
/// v2 `flags` bit: `created_at_high` (2 bytes, bits 48..64 of `created_at`) is present.
pub const V2_HAS_CREATED_AT_HIGH: u8 = 0b1000_0000;
/// v2 `flags` bits that must be 0.
const V2_RESERVED_FLAGS: u8 = 0b0000_1100;

/// Bytes of v2's optional fields for each value of `flags >> 4` (the
/// presence bits): 8 for each of bits 4..=6, 2 for bit 7.
const V2_OPTIONAL_LEN: [u8; 16] = {
    let mut table = [0u8; 16];
    let mut bits = 0;
    while bits < 16 {
        table[bits] = 8 * (bits as u8 & 0b0111).count_ones() as u8 + 2 * (bits as u8 >> 3);
        bits += 1;
    }
    table
};

/// Where a v2 link's code starts: after the fixed part and the optional
/// fields its `flags` byte marks present.
#[inline]
fn v2_code_start(flags: u8) -> usize {
    LINK_V2_FIXED_LEN + V2_OPTIONAL_LEN[(flags >> 4) as usize] as usize
}

/// A link encoding version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkEncoding {
    /// 40-byte fixed part (`LINK_V1_FIXED_LEN`); earlier builds wrote it.
    V1,
    /// 12-byte fixed part plus the optional fields that are set.
    V2,
}

impl LinkEncoding {
    /// The encoding this build writes.
    pub const CURRENT: Self = Self::V2;

    /// Its version byte.
    pub fn version(self) -> u8 {
        match self {
            Self::V1 => LINK_ENCODING_V1,
            Self::V2 => LINK_ENCODING_V2,
        }
    }

    /// The encoding an encoded link declares (its first byte), if known.
    pub fn of(encoded: &[u8]) -> Option<Self> {
        match encoded.first() {
            Some(&LINK_ENCODING_V1) => Some(Self::V1),
            Some(&LINK_ENCODING_V2) => Some(Self::V2),
            _ => None,
        }
    }

    /// Size of its fixed part: where the code starts.
    pub fn fixed_len(self) -> usize {
        match self {
            Self::V1 => LINK_V1_FIXED_LEN,
            Self::V2 => LINK_V2_FIXED_LEN,
        }
    }
}

/// The code bytes of an encoded link (either version), located from its
/// fixed part without decoding the rest: the snapshot's lookup compares these
/// with the key before it decodes a record. `None` when the version is
/// unknown or the bytes are too short; the code is not validated here.
#[inline]
pub fn encoded_code(encoded: &[u8]) -> Option<&[u8]> {
    let start = match *encoded.first()? {
        LINK_ENCODING_V2 => v2_code_start(*encoded.get(5)?),
        LINK_ENCODING_V1 => LINK_V1_FIXED_LEN,
        _ => return None,
    };
    let len = *encoded.get(1)? as usize;
    encoded.get(start..start + len)
}

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
    #[error("record: {0} is marked present but is 0 (absent fields are left out)")]
    PresentZero(&'static str),
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
        self.as_ref().encoded_len_as(LinkEncoding::CURRENT)
    }

    /// Appends the current link encoding (v2) to `out`. The link must have
    /// been validated (lengths fit their fields); the store never encodes an
    /// unvalidated link.
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
    /// Decodes one link encoding (v1 or v2, by its version byte) from the
    /// front of `buf`, returning the link and the number of bytes it used.
    /// Never panics; every length is checked.
    #[inline]
    pub fn decode(buf: &'a [u8]) -> Result<(Self, usize), RecordError> {
        match buf.first() {
            Some(&LINK_ENCODING_V2) => Self::decode_v2(buf),
            Some(&LINK_ENCODING_V1) => Self::decode_v1(buf),
            Some(&other) => Err(RecordError::Version(other)),
            None => Err(RecordError::Truncated {
                need: LINK_MIN_FIXED_LEN,
                have: 0,
            }),
        }
    }

    /// Link encoding v1: a 40-byte fixed part, then the code and the target.
    fn decode_v1(buf: &'a [u8]) -> Result<(Self, usize), RecordError> {
        if buf.len() < LINK_V1_FIXED_LEN {
            return Err(RecordError::Truncated {
                need: LINK_V1_FIXED_LEN,
                have: buf.len(),
            });
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
        let total = LINK_V1_FIXED_LEN + code_len + target_len;
        if buf.len() < total {
            return Err(RecordError::Truncated {
                need: total,
                have: buf.len(),
            });
        }
        let code = &buf[LINK_V1_FIXED_LEN..LINK_V1_FIXED_LEN + code_len];
        validate_code(code)?;
        let target = &buf[LINK_V1_FIXED_LEN + code_len..total];
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

    /// Link encoding v2: a 12-byte fixed part, the optional fields its
    /// `flags` mark present (in bit order), the code, the target.
    #[inline]
    fn decode_v2(buf: &'a [u8]) -> Result<(Self, usize), RecordError> {
        if buf.len() < LINK_V2_FIXED_LEN {
            return Err(RecordError::Truncated {
                need: LINK_V2_FIXED_LEN,
                have: buf.len(),
            });
        }
        let code_len = buf[1] as usize;
        let target_len = u16::from_le_bytes([buf[2], buf[3]]) as usize;
        let status = RedirectStatus::from_code(300 + u16::from(buf[4]))?;
        let flags = buf[5];
        if flags & V2_RESERVED_FLAGS != 0 {
            return Err(RecordError::Flags(flags & V2_RESERVED_FLAGS));
        }
        let code_start = v2_code_start(flags);
        let target_start = code_start + code_len;
        let total = target_start + target_len;
        if buf.len() < total {
            return Err(RecordError::Truncated {
                need: total,
                have: buf.len(),
            });
        }
        let mut at = LINK_V2_FIXED_LEN;
        let mut optional = |bit: u8, name: &'static str| -> Result<Option<u64>, RecordError> {
            if flags & bit == 0 {
                return Ok(None);
            }
            let v = read_u64(buf, at);
            at += 8;
            if v == 0 {
                return Err(RecordError::PresentZero(name));
            }
            Ok(Some(v))
        };
        let expires_at_ms = optional(V2_HAS_EXPIRES_AT, "expires_at")?;
        let max_clicks = optional(V2_HAS_MAX_CLICKS, "max_clicks")?;
        let owner_key_id = optional(V2_HAS_OWNER_KEY_ID, "owner_key_id")?.unwrap_or(0);
        let mut created = [0u8; 8];
        created[..6].copy_from_slice(&buf[6..12]);
        if flags & V2_HAS_CREATED_AT_HIGH != 0 {
            let high = [buf[at], buf[at + 1]];
            if high == [0, 0] {
                return Err(RecordError::PresentZero("created_at_high"));
            }
            created[6..].copy_from_slice(&high);
        }
        let code = &buf[code_start..target_start];
        validate_code(code)?;
        let target = &buf[target_start..total];
        Ok((
            Self {
                code,
                target,
                status,
                flags: flags & KNOWN_FLAGS,
                created_at_ms: u64::from_le_bytes(created),
                expires_at_ms,
                max_clicks,
                owner_key_id,
            },
            total,
        ))
    }

    /// The code as text. Codes are validated ASCII wherever a `LinkRef` is built.
    pub fn code_str(&self) -> &'a str {
        std::str::from_utf8(self.code).unwrap_or("")
    }

    /// Length of the current encoding (v2) of this link.
    pub fn encoded_len(&self) -> usize {
        self.encoded_len_as(LinkEncoding::CURRENT)
    }

    /// Length of this link in `encoding`.
    pub fn encoded_len_as(&self, encoding: LinkEncoding) -> usize {
        let base = encoding.fixed_len() + self.code.len() + self.target.len();
        match encoding {
            LinkEncoding::V1 => base,
            LinkEncoding::V2 => base + V2_OPTIONAL_LEN[(self.v2_presence() >> 4) as usize] as usize,
        }
    }

    /// The v2 presence bits of this link's optional fields.
    fn v2_presence(&self) -> u8 {
        let bit = |present: bool, bit: u8| if present { bit } else { 0 };
        bit(self.expires_at_ms.unwrap_or(0) != 0, V2_HAS_EXPIRES_AT)
            | bit(self.max_clicks.unwrap_or(0) != 0, V2_HAS_MAX_CLICKS)
            | bit(self.owner_key_id != 0, V2_HAS_OWNER_KEY_ID)
            | bit(self.created_at_ms >> 48 != 0, V2_HAS_CREATED_AT_HIGH)
    }

    /// Appends the current link encoding (v2) to `out`. Lengths must fit
    /// their fields, as they do for every `LinkRef` decoded or borrowed from a
    /// valid `Link`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        self.encode_as(LinkEncoding::CURRENT, out);
    }

    /// Appends this link in `encoding` to `out`. Only v2 is written by the
    /// store; v1 is here for tests and tools that must produce what earlier
    /// builds wrote (and read). `Some(0)` for an optional field is written
    /// as absent, as both versions read 0 as "none".
    pub fn encode_as(&self, encoding: LinkEncoding, out: &mut Vec<u8>) {
        debug_assert!(self.flags & !KNOWN_FLAGS == 0, "unvalidated flags");
        out.reserve(self.encoded_len_as(encoding));
        match encoding {
            LinkEncoding::V1 => {
                out.push(LINK_ENCODING_V1);
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
            LinkEncoding::V2 => {
                let presence = self.v2_presence();
                out.push(LINK_ENCODING_V2);
                out.push(self.code.len() as u8);
                out.extend_from_slice(&(self.target.len() as u16).to_le_bytes());
                out.push((self.status.code() - 300) as u8);
                out.push((self.flags & KNOWN_FLAGS) | presence);
                out.extend_from_slice(&self.created_at_ms.to_le_bytes()[..6]);
                for (bit, v) in [
                    (V2_HAS_EXPIRES_AT, self.expires_at_ms.unwrap_or(0)),
                    (V2_HAS_MAX_CLICKS, self.max_clicks.unwrap_or(0)),
                    (V2_HAS_OWNER_KEY_ID, self.owner_key_id),
                ] {
                    if presence & bit != 0 {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
                if presence & V2_HAS_CREATED_AT_HIGH != 0 {
                    out.extend_from_slice(&self.created_at_ms.to_le_bytes()[6..]);
                }
                out.extend_from_slice(self.code);
                out.extend_from_slice(self.target);
            }
        }
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

/// Whether `b` may appear in a short code: `[A-Za-z0-9_-]`.
#[inline]
pub fn is_code_byte(b: u8) -> bool {
    CODE_BYTES[b as usize]
}

/// [`is_code_byte`] as a table: one load per byte on the request path
/// (a code is checked there on every redirect, and again when decoded).
static CODE_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || c == b'_' || c == b'-';
        b += 1;
    }
    table
};

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

    /// `sample()` in link encoding v1, as the encoder of the last build
    /// before v2 wrote it (bytes computed by hand from the v1 table).
    const SAMPLE_V1: [u8; 70] = [
        1, 5, 25, 0, 52, 1, 2,
        0, // version, code_len, target_len, status 308, flags, reserved
        123, 104, 229, 207, 139, 1, 0, 0, // created_at 1_700_000_000_123
        0, 80, 92, 24, 163, 1, 0, 0, // expires_at 1_800_000_000_000
        42, 0, 0, 0, 0, 0, 0, 0, // max_clicks
        7, 0, 0, 0, 0, 0, 0, 0, // owner_key_id
        b'A', b'b', b'_', b'-', b'9', b'h', b't', b't', b'p', b's', b':', b'/', b'/', b'e', b'x',
        b'a', b'm', b'p', b'l', b'e', b'.', b'c', b'o', b'm', b'/', b'a', b'?', b'b', b'=', b'c',
    ];

    fn encode(link: &Link, encoding: LinkEncoding) -> Vec<u8> {
        let mut buf = Vec::new();
        link.as_ref().encode_as(encoding, &mut buf);
        assert_eq!(buf.len(), link.as_ref().encoded_len_as(encoding));
        buf
    }

    /// Decodes `buf`, which must be exactly one link, and checks that it
    /// re-encodes to the same bytes in its own version.
    fn decode_exact(buf: &[u8]) -> Link {
        let (back, used) = LinkRef::decode(buf).unwrap();
        assert_eq!(used, buf.len());
        let encoding = LinkEncoding::of(buf).unwrap();
        let mut again = Vec::new();
        back.encode_as(encoding, &mut again);
        assert_eq!(again, buf, "re-encoding in {encoding:?}");
        back.to_link().unwrap()
    }

    #[test]
    fn round_trip_every_field() {
        let link = sample();
        let mut buf = Vec::new();
        link.encode_into(&mut buf);
        assert_eq!(buf[0], LINK_ENCODING_V2, "writers use v2");
        assert_eq!(buf.len(), link.encoded_len());
        assert_eq!(decode_exact(&buf), link);
        assert_eq!(decode_exact(&encode(&link, LinkEncoding::V1)), link);
    }

    #[test]
    fn v1_test_vector_still_decodes() {
        assert_eq!(encode(&sample(), LinkEncoding::V1), SAMPLE_V1);
        assert_eq!(decode_exact(&SAMPLE_V1), sample());
        // Followed by other bytes (a padded snapshot record), it uses 70 of them.
        let mut padded = SAMPLE_V1.to_vec();
        padded.extend_from_slice(&[0, 0]);
        assert_eq!(LinkRef::decode(&padded).unwrap().1, 70);
        assert_eq!(encoded_code(&SAMPLE_V1), Some(&b"Ab_-9"[..]));
    }

    #[test]
    fn v1_byte_layout_is_as_specified() {
        let buf = encode(&sample(), LinkEncoding::V1);
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
    fn v2_byte_layout_is_as_specified() {
        let buf = encode(&sample(), LinkEncoding::V2);
        assert_eq!(buf.len(), 12 + 5 + 25 + 8 + 8 + 8);
        assert_eq!(buf[0], 2, "version");
        assert_eq!(buf[1], 5, "code_len");
        assert_eq!(&buf[2..4], &(25u16).to_le_bytes(), "target_len");
        assert_eq!(buf[4], 8, "status 308 - 300");
        assert_eq!(
            buf[5],
            FLAG_FORWARD_QUERY | V2_HAS_EXPIRES_AT | V2_HAS_MAX_CLICKS | V2_HAS_OWNER_KEY_ID,
            "flags"
        );
        assert_eq!(
            &buf[6..12],
            &1_700_000_000_123u64.to_le_bytes()[..6],
            "created_at, low 48 bits"
        );
        assert_eq!(
            &buf[12..20],
            &1_800_000_000_000u64.to_le_bytes(),
            "expires_at"
        );
        assert_eq!(&buf[20..28], &42u64.to_le_bytes(), "max_clicks");
        assert_eq!(&buf[28..36], &7u64.to_le_bytes(), "owner_key_id");
        assert_eq!(&buf[36..41], b"Ab_-9");
        assert_eq!(&buf[41..66], b"https://example.com/a?b=c");
        assert_eq!(encoded_code(&buf), Some(&b"Ab_-9"[..]));
        // created_at_high comes after the other optional fields.
        let mut high = sample();
        high.created_at_ms = 0x1234_5678_9abc_def0;
        let buf = encode(&high, LinkEncoding::V2);
        assert_eq!(buf[5] & V2_HAS_CREATED_AT_HIGH, V2_HAS_CREATED_AT_HIGH);
        assert_eq!(&buf[6..12], &[0xf0, 0xde, 0xbc, 0x9a, 0x78, 0x56]);
        assert_eq!(&buf[36..38], &[0x34, 0x12], "created_at_high");
        assert_eq!(&buf[38..43], b"Ab_-9");
        // The usual link: none of the optional fields, 12 bytes of fixed part.
        let mut plain = sample();
        (plain.expires_at_ms, plain.max_clicks, plain.owner_key_id) = (None, None, 0);
        plain.flags = FLAG_DISABLED;
        plain.status = RedirectStatus::MovedPermanently;
        let buf = encode(&plain, LinkEncoding::V2);
        assert_eq!(buf.len(), 12 + 5 + 25);
        assert_eq!((buf[4], buf[5]), (1, FLAG_DISABLED));
        assert_eq!(&buf[12..17], b"Ab_-9");
        assert_eq!(decode_exact(&buf), plain);
    }

    #[test]
    fn v2_every_combination_of_optional_fields_round_trips() {
        for mask in 0u8..16 {
            let mut link = sample();
            link.expires_at_ms = (mask & 1 != 0).then_some(u64::MAX);
            link.max_clicks = (mask & 2 != 0).then_some(1);
            link.owner_key_id = if mask & 4 != 0 { u64::MAX } else { 0 };
            link.created_at_ms = if mask & 8 != 0 {
                1 << 48
            } else {
                (1 << 48) - 1
            };
            let buf = encode(&link, LinkEncoding::V2);
            let optional = 8 * (mask & 7).count_ones() as usize + if mask & 8 != 0 { 2 } else { 0 };
            assert_eq!(buf.len(), 12 + 5 + 25 + optional, "mask {mask:#b}");
            assert_eq!(buf[5] >> 4, mask, "presence bits");
            assert_eq!(decode_exact(&buf), link, "mask {mask:#b}");
        }
    }

    #[test]
    fn v2_field_bounds() {
        let round_trip = |link: &Link| {
            assert_eq!(decode_exact(&encode(link, LinkEncoding::V2)), *link);
            assert_eq!(decode_exact(&encode(link, LinkEncoding::V1)), *link);
        };
        // created_at: 0, around the 48-bit boundary, the largest u64.
        for created in [
            0,
            1,
            (1 << 48) - 1,
            1 << 48,
            (1 << 48) + 1,
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut link = sample();
            link.created_at_ms = created;
            round_trip(&link);
            let buf = encode(&link, LinkEncoding::V2);
            assert_eq!(buf[5] & V2_HAS_CREATED_AT_HIGH != 0, created >> 48 != 0);
            if created >> 48 != 0 {
                // After expires_at, max_clicks and owner_key_id (all set in sample()).
                assert_eq!(&buf[36..38], &created.to_le_bytes()[6..]);
            }
        }
        // Optional fields: 1 and u64::MAX are stored; 0 (and Some(0)) is absent.
        for v in [1, u64::MAX] {
            let mut link = sample();
            (link.expires_at_ms, link.max_clicks, link.owner_key_id) = (Some(v), Some(v), v);
            round_trip(&link);
        }
        let mut zero = sample();
        (zero.expires_at_ms, zero.max_clicks) = (Some(0), Some(0));
        let buf = encode(&zero, LinkEncoding::V2);
        assert_eq!(buf[5] & (V2_HAS_EXPIRES_AT | V2_HAS_MAX_CLICKS), 0);
        let back = decode_exact(&buf);
        assert_eq!((back.expires_at_ms, back.max_clicks), (None, None));
        // Codes of 1 and 64 bytes, targets of 0 (the format allows it; the
        // writer's policy does not) and 65535 bytes.
        for code in ["a".to_owned(), "Z".repeat(MAX_CODE_LEN)] {
            let mut link = sample();
            link.code = code;
            round_trip(&link);
        }
        let owned = sample();
        for len in [0, u16::MAX as usize] {
            let target = vec![b'x'; len];
            let link = LinkRef {
                target: &target,
                ..owned.as_ref()
            };
            for encoding in [LinkEncoding::V1, LinkEncoding::V2] {
                let mut buf = Vec::new();
                link.encode_as(encoding, &mut buf);
                assert_eq!(LinkRef::decode(&buf).unwrap(), (link, buf.len()));
            }
        }
        // Every status and flag combination.
        for status in [301, 302, 307, 308] {
            for flags in 0..=KNOWN_FLAGS {
                let mut link = sample();
                link.status = RedirectStatus::from_code(status).unwrap();
                link.flags = flags;
                round_trip(&link);
                assert_eq!(encode(&link, LinkEncoding::V2)[4] as u16 + 300, status);
            }
        }
    }

    #[test]
    fn v2_refuses_each_bad_field() {
        let good = encode(&sample(), LinkEncoding::V2);
        let cases: [(usize, u8, RecordError); 9] = [
            (0, 0, RecordError::Version(0)),
            (0, 3, RecordError::Version(3)),
            (0, 0xff, RecordError::Version(0xff)),
            (4, 0, RecordError::Status(300)),
            (4, 3, RecordError::Status(303)),
            (4, 0xff, RecordError::Status(555)),
            (5, good[5] | 0b0100, RecordError::Flags(0b0100)),
            (5, good[5] | 0b1000, RecordError::Flags(0b1000)),
            (36, b'/', RecordError::CodeCharset(b'/', 0)),
        ];
        for (at, byte, want) in cases {
            let mut bad = good.clone();
            bad[at] = byte;
            assert_eq!(LinkRef::decode(&bad).unwrap_err(), want, "byte {at}");
        }
        for (code_len, want) in [
            (0, RecordError::CodeLength(0)),
            (65, RecordError::CodeLength(65)),
        ] {
            let mut bad = good.clone();
            bad[1] = code_len;
            bad.resize(bad.len() + 65, b'a');
            assert_eq!(LinkRef::decode(&bad).unwrap_err(), want);
        }
        // A field marked present holding 0: refused, so that a link has one encoding.
        let fields = [(12, "expires_at"), (20, "max_clicks"), (28, "owner_key_id")];
        for (at, name) in fields {
            let mut bad = good.clone();
            bad[at..at + 8].fill(0);
            assert_eq!(
                LinkRef::decode(&bad).unwrap_err(),
                RecordError::PresentZero(name)
            );
        }
        let mut high = sample();
        high.created_at_ms = u64::MAX;
        let mut bad = encode(&high, LinkEncoding::V2);
        bad[36..38].fill(0);
        assert_eq!(
            LinkRef::decode(&bad).unwrap_err(),
            RecordError::PresentZero("created_at_high")
        );
        // A presence bit without its bytes, or lengths beyond the buffer: truncated.
        let mut plain = sample();
        (plain.expires_at_ms, plain.max_clicks, plain.owner_key_id) = (None, None, 0);
        let buf = encode(&plain, LinkEncoding::V2);
        for bit in [
            V2_HAS_EXPIRES_AT,
            V2_HAS_MAX_CLICKS,
            V2_HAS_OWNER_KEY_ID,
            V2_HAS_CREATED_AT_HIGH,
        ] {
            let mut bad = buf.clone();
            bad[5] |= bit;
            assert!(matches!(
                LinkRef::decode(&bad).unwrap_err(),
                RecordError::Truncated { .. }
            ));
        }
        for cut in 0..good.len() {
            assert!(
                matches!(
                    LinkRef::decode(&good[..cut]).unwrap_err(),
                    RecordError::Truncated { .. }
                ),
                "cut {cut}"
            );
            assert_eq!(encoded_code(&good[..cut]).is_some(), cut >= 41);
        }
        assert_eq!(encoded_code(&[3, 1, 0, 0]), None);
    }

    #[test]
    fn v1_refuses_each_bad_field() {
        let good = SAMPLE_V1.to_vec();
        let cases: [(usize, u8, RecordError); 5] = [
            (0, 9, RecordError::Version(9)),
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
    fn v2_is_smaller_for_the_usual_link() {
        // A 7-byte code and a 70-byte URL with no optional field: 89 bytes
        // instead of 117 (96 and 120 once padded to 8 in a snapshot).
        let link = Link::new(
            "zs3m12t",
            &format!("https://example.com/{}", "a".repeat(50)),
        )
        .unwrap();
        assert_eq!(link.as_ref().encoded_len_as(LinkEncoding::V1), 117);
        assert_eq!(link.encoded_len(), 89);
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
        // Exactly `[A-Za-z0-9_-]`, every byte value.
        let allowed = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
        for b in 0..=255u8 {
            assert_eq!(is_code_byte(b), allowed.contains(&b), "{b:#x}");
            assert_eq!(validate_code(&[b]).is_ok(), allowed.contains(&b), "{b:#x}");
        }
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
