//! The admin's policy for target URLs, on top of what the store checks
//! (`record::validate_target`: absolute http(s), a host, at most 2048 bytes,
//! no whitespace or control character).
//!
//! What a client sends is checked and normalised so that every stored target
//! is plain ASCII, means the same to every URL parser, and shows its real
//! host:
//!
//! - no invisible or bidirectional formatting character anywhere (U+202E
//!   RIGHT-TO-LEFT OVERRIDE, zero-width spaces and joiners, U+FEFF, ...):
//!   they only serve to make a URL read differently from where it goes;
//! - the host is ASCII: a registered name of letters, digits, `-`, `_` and
//!   dots (labels of 1 to 63 bytes, at most 253 in all), an IPv4 address,
//!   or an IPv6 literal in brackets. An internationalised domain name is
//!   accepted in its punycode (A-label, `xn--...`) form, which is also how
//!   it is shown back; a raw Unicode host is refused, so a homograph
//!   (`аpple.com` with a Cyrillic `а`) never hides behind familiar letters;
//! - no credentials (`user:password@host`): RFC 9110 forbids them in a
//!   `Location`, and `https://bank.example@evil.example/` is a phishing
//!   classic; no `\` in the authority (browsers read it as `/`);
//! - a port, when given, is a number from 1 to 65535;
//! - non-ASCII characters in the path, query or fragment are
//!   percent-encoded (UTF-8), as browsers do: the stored URL is what a
//!   browser would request, and the `Location` header stays ASCII.
//!
//! The 2048-byte limit applies to the normalised URL.

use super::error::{ApiError, ErrorCode};
use crate::store::record::validate_target;

const MAX_HOST_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidUrl, message).on("url")
}

/// Whether `c` is an invisible or direction-changing formatting character:
/// every character of Unicode general category Cf as of Unicode 15.0
/// (which added U+13439 to U+1343F), and the usual fillers and selectors.
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{0600}'..='\u{0605}' | '\u{06DD}' | '\u{070F}' | '\u{0890}'..='\u{0891}' | '\u{08E2}'
        | '\u{110BD}' | '\u{110CD}' | '\u{13430}'..='\u{1343F}' | '\u{1BCA0}'..='\u{1BCA3}'
        | '\u{1D173}'..='\u{1D17A}'
        | '\u{180B}'..='\u{180F}'
        | '\u{200B}'..='\u{200F}'
        | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}'
        | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}'
        | '\u{FFF0}'..='\u{FFFB}'
        | '\u{E0000}'..='\u{E0FFF}'
    )
}

/// Checks `url` against the policy above and returns the form to store.
pub fn normalize_target(url: &str) -> Result<String, ApiError> {
    if let Some((at, c)) = url.char_indices().find(|&(_, c)| is_invisible(c)) {
        return Err(invalid(format!(
            "contains the invisible or bidirectional formatting character U+{:04X} at byte {at}",
            c as u32
        )));
    }
    // Scheme, whitespace, control characters, a host at all.
    validate_target(url).map_err(|e| ApiError::from_record(&e))?;
    let scheme_len = url.find("://").map_or(0, |i| i + 3);
    let (scheme, rest) = url.split_at(scheme_len);
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_len);
    check_authority(authority)?;
    let mut out = String::with_capacity(url.len());
    out.push_str(scheme);
    out.push_str(authority);
    for c in tail.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    validate_target(&out).map_err(|e| ApiError::from_record(&e))?;
    Ok(out)
}

fn check_authority(authority: &str) -> Result<(), ApiError> {
    if authority.contains('@') {
        return Err(invalid(
            "must not contain credentials (user:password@): they cannot be sent in a redirect",
        ));
    }
    if authority.contains('\\') {
        return Err(invalid("the host part must not contain a backslash"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or_else(|| invalid("an IPv6 host must end with ]"))?;
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(invalid("is not a valid IPv6 address in brackets"));
        }
        match after {
            "" => (None, None),
            p => match p.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return Err(invalid("unexpected text after the IPv6 address")),
            },
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(authority), None),
        }
    };
    if let Some(host) = host {
        check_host(host)?;
    }
    if let Some(port) = port {
        let ok = !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
        if !ok {
            return Err(invalid("the port must be a number from 1 to 65535"));
        }
    }
    Ok(())
}

fn check_host(host: &str) -> Result<(), ApiError> {
    if !host.is_ascii() {
        return Err(invalid(
            "the host must be ASCII: send an internationalised domain name in its punycode form (xn--...)",
        ));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let labels_ok = !name.is_empty()
        && name.len() <= MAX_HOST_LEN
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= MAX_LABEL_LEN
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !labels_ok {
        return Err(invalid(
            "the host must be a domain name (letters, digits, '-', '_', dots), an IPv4 address or an IPv6 address in brackets",
        ));
    }
    // A host whose last label is a number is an IPv4 address to a browser
    // (the WHATWG URL standard), which also reads `0x7f.1`, `2130706433` and
    // `0177.0.0.1` as addresses: only the four-decimal form is taken, so
    // that a stored URL shows the host it goes to.
    let last = name.rsplit('.').next().unwrap_or(name);
    let numeric = last.bytes().all(|b| b.is_ascii_digit())
        || last
            .strip_prefix("0x")
            .or_else(|| last.strip_prefix("0X"))
            .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if numeric && name.parse::<std::net::Ipv4Addr>().is_err() {
        return Err(invalid(
            "a host ending in a number must be an IPv4 address of four decimal numbers from 0 to 255, without leading zeros",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_normalises() {
        for (given, stored) in [
            ("https://example.com/", "https://example.com/"),
            (
                "HTTPS://Example.COM:8443/a?b=c#d",
                "HTTPS://Example.COM:8443/a?b=c#d",
            ),
            ("http://xn--80ak6aa92e.com/", "http://xn--80ak6aa92e.com/"),
            ("http://127.0.0.1:8080/x", "http://127.0.0.1:8080/x"),
            ("http://[::1]:8080/x", "http://[::1]:8080/x"),
            ("http://[::ffff:1.2.3.4]/", "http://[::ffff:1.2.3.4]/"),
            ("http://1.2.3.4./", "http://1.2.3.4./"),
            ("http://0.0.0.0/", "http://0.0.0.0/"),
            ("https://123.example.com/", "https://123.example.com/"),
            ("https://0x7f.example/", "https://0x7f.example/"),
            ("https://example.1a/", "https://example.1a/"),
            ("https://example.com./", "https://example.com./"),
            (
                "https://example.com/café?q=é#ü",
                "https://example.com/caf%C3%A9?q=%C3%A9#%C3%BC",
            ),
            ("https://example.com/a%20b", "https://example.com/a%20b"),
            ("https://example.com/@alice", "https://example.com/@alice"),
        ] {
            assert_eq!(normalize_target(given).unwrap(), stored, "{given}");
        }
    }

    #[test]
    fn refuses_hostile_urls() {
        for bad in [
            "https://аpple.com/",
            "https://ｅxample.com/",
            "https://example.com/\u{202E}gpj.exe",
            "https://exa\u{200D}mple.com/",
            "https://example.com/\u{FEFF}",
            "https://user:pass@example.com/",
            "https://bank.example@evil.example/",
            "https://evil.example\\@bank.example/",
            "https://exa%6Dple.com/",
            "https://a..b/",
            "https://example.com:0/",
            "https://example.com:65536/",
            "https://example.com:/",
            "https://example.com:80x/",
            "https://[::1/",
            "https://[fe80::1%25eth0]/",
            "https://[::1]x/",
            // Numbers a browser reads as IPv4 addresses in other forms, or
            // that no URL parser takes.
            "http://0x7f.1/",
            "http://0x7F000001/",
            "http://2130706433/",
            "http://0177.0.0.1/",
            "http://127.1/",
            "http://1.2.3.4.5/",
            "http://256.1.1.1/",
            "https://example.123/",
            "https://example.0x1f/",
            "http://[1.2.3.4]/",
            "http://[:::]/",
            "http://[1::2::3]/",
        ] {
            let e = normalize_target(bad).unwrap_err();
            assert_eq!(
                (e.code, e.field.as_deref()),
                (ErrorCode::InvalidUrl, Some("url")),
                "{bad}"
            );
        }
        let long = format!("https://example.com/{}", "é".repeat(500));
        assert!(long.len() < 2048);
        assert_eq!(
            normalize_target(&long).unwrap_err().code,
            ErrorCode::InvalidUrl,
            "the limit applies to the encoded URL"
        );
    }

    /// Every character of general category Cf, as Python 3.11's
    /// `unicodedata` (Unicode 14.0) lists them
    /// (`[c for c in range(0x110000) if unicodedata.category(chr(c)) == "Cf"]`),
    /// is refused anywhere in a URL. U+0600, U+06DD, U+070F, U+08E2 and the
    /// Kaithi, hieroglyph, shorthand and musical ones used to pass.
    #[test]
    fn refuses_every_format_character() {
        let cf: &[(u32, u32)] = &[
            (0x00AD, 0x00AD),
            (0x0600, 0x0605),
            (0x061C, 0x061C),
            (0x06DD, 0x06DD),
            (0x070F, 0x070F),
            (0x0890, 0x0891),
            (0x08E2, 0x08E2),
            (0x180E, 0x180E),
            (0x200B, 0x200F),
            (0x202A, 0x202E),
            (0x2060, 0x2064),
            (0x2066, 0x206F),
            (0xFEFF, 0xFEFF),
            (0xFFF9, 0xFFFB),
            (0x110BD, 0x110BD),
            (0x110CD, 0x110CD),
            (0x13430, 0x13438),
            (0x1BCA0, 0x1BCA3),
            (0x1D173, 0x1D17A),
            (0xE0001, 0xE0001),
            (0xE0020, 0xE007F),
        ];
        for &(first, last) in cf {
            for c in (first..=last).filter_map(char::from_u32) {
                for url in [
                    format!("https://example.com/a{c}b"),
                    format!("https://example.com/?q={c}"),
                    format!("https://example.com/#{c}"),
                ] {
                    assert!(
                        normalize_target(&url).is_err(),
                        "U+{:04X} accepted in {url:?}",
                        c as u32
                    );
                }
            }
        }
    }
}
