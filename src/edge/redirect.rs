//! The redirect decision, free of any network type: which route a path is,
//! which code it names, what the answer to a code is and how the target's
//! query string is merged with the request's. `proxy.rs` turns the decision
//! into a Pingora response; tests and fuzz targets call these directly.

use crate::store::record::{LinkRef, MAX_CODE_LEN, RedirectStatus, is_code_byte};
use crate::store::view::TableView;

/// What a request path is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// `/{code}`: a short link (the code is validated).
    Redirect(&'a [u8]),
    /// `/api` or `/api/...`: proxied to the admin.
    Api,
    /// `/health`: answered by the edge.
    Health,
    /// Anything else (`/`, `/favicon.ico`, `/a/b`, `/%41`, too long, ...).
    NotFound,
}

/// Classifies a request path (without its query). Percent-encoded bytes,
/// dots and slashes never form a code, so `/%41` or `/..` are `NotFound`
/// rather than being decoded into something else.
pub fn route(path: &[u8]) -> Route<'_> {
    let Some(rest) = path.strip_prefix(b"/") else {
        return Route::NotFound;
    };
    if rest == b"api" || rest.starts_with(b"api/") {
        return Route::Api;
    }
    if rest == b"health" {
        return Route::Health;
    }
    if !rest.is_empty() && rest.len() <= MAX_CODE_LEN && rest.iter().all(|&b| is_code_byte(b)) {
        return Route::Redirect(rest);
    }
    Route::NotFound
}

/// Splits a request target (`/path?query`) into path and query (without `?`).
pub fn split_target(target: &[u8]) -> (&[u8], Option<&[u8]>) {
    match target.iter().position(|&b| b == b'?') {
        Some(i) => (&target[..i], Some(&target[i + 1..])),
        None => (target, None),
    }
}

/// Why a code did not redirect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    Unknown,
    Disabled,
    Expired,
}

/// The answer to a code: the link to redirect to, or why not.
pub fn resolve<'a>(view: &'a TableView, code: &[u8], now_ms: u64) -> Result<LinkRef<'a>, Miss> {
    let link = view.get(code).ok_or(Miss::Unknown)?;
    if link.is_disabled() {
        return Err(Miss::Disabled);
    }
    if link.is_expired_at(now_ms) {
        return Err(Miss::Expired);
    }
    Ok(link)
}

/// Writes the `Location` for `target`, merging `query` into it when asked:
/// the request's query goes after the target's own (`?a=1` + `b=2` →
/// `?a=1&b=2`) and before its fragment. Bytes of the query that could break a
/// header (controls, spaces, non-ASCII) are percent-encoded.
pub fn location_into(out: &mut Vec<u8>, target: &[u8], query: Option<&[u8]>) {
    out.clear();
    let query = query.filter(|q| !q.is_empty());
    let Some(query) = query else {
        out.extend_from_slice(target);
        return;
    };
    let (base, fragment) = match target.iter().position(|&b| b == b'#') {
        Some(i) => (&target[..i], &target[i..]),
        None => (target, &b""[..]),
    };
    out.extend_from_slice(base);
    if base.contains(&b'?') {
        if !base.ends_with(b"?") && !base.ends_with(b"&") {
            out.push(b'&');
        }
    } else {
        out.push(b'?');
    }
    for &b in query {
        if b.is_ascii_graphic() && b != b'#' {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[(b >> 4) as usize], HEX[(b & 15) as usize]]);
        }
    }
    out.extend_from_slice(fragment);
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// `Cache-Control` for a redirect. Permanent redirects may be cached for an
/// hour (never past the link's expiry); temporary ones are not cached, so
/// that edits, deletes and click limits take effect at once.
pub fn cache_control(
    status: RedirectStatus,
    expires_at_ms: Option<u64>,
    now_ms: u64,
) -> CacheControl {
    match status {
        RedirectStatus::MovedPermanently | RedirectStatus::PermanentRedirect => {
            let max = match expires_at_ms {
                Some(t) => (t.saturating_sub(now_ms) / 1000).min(3600),
                None => 3600,
            };
            CacheControl::Public(max)
        }
        RedirectStatus::Found | RedirectStatus::TemporaryRedirect => CacheControl::NoStore,
    }
}

/// A `Cache-Control` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheControl {
    Public(u64),
    NoStore,
}

impl CacheControl {
    /// The header value.
    pub fn value(self) -> std::borrow::Cow<'static, str> {
        match self {
            CacheControl::Public(3600) => "public, max-age=3600".into(),
            CacheControl::Public(s) => format!("public, max-age={s}").into(),
            CacheControl::NoStore => "no-store".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route(b"/abc"), Route::Redirect(b"abc"));
        assert_eq!(route(b"/A-b_9"), Route::Redirect(b"A-b_9"));
        assert_eq!(route(b"/api"), Route::Api);
        assert_eq!(route(b"/api/links/x"), Route::Api);
        assert_eq!(route(b"/apix"), Route::Redirect(b"apix"));
        assert_eq!(route(b"/health"), Route::Health);
        for p in [
            &b""[..],
            b"/",
            b"abc",
            b"//abc",
            b"/abc/",
            b"/a/b",
            b"/%41",
            b"/..",
            b"/a%2Fb",
            b"/favicon.ico",
            b"/\xff",
            b"/a b",
        ] {
            assert_eq!(route(p), Route::NotFound, "{p:?}");
        }
        let long = [b'a'; 65];
        let mut path = b"/".to_vec();
        path.extend_from_slice(&long);
        assert_eq!(route(&path), Route::NotFound);
        assert_eq!(route(&path[..65]), Route::Redirect(&long[..64]));
    }

    #[test]
    fn targets_split() {
        assert_eq!(split_target(b"/a?b=1?c"), (&b"/a"[..], Some(&b"b=1?c"[..])));
        assert_eq!(split_target(b"/a"), (&b"/a"[..], None));
        assert_eq!(split_target(b"/a?"), (&b"/a"[..], Some(&b""[..])));
    }

    fn loc(target: &str, query: Option<&[u8]>) -> String {
        let mut out = Vec::new();
        location_into(&mut out, target.as_bytes(), query);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn query_merging() {
        assert_eq!(loc("https://x/p", None), "https://x/p");
        assert_eq!(loc("https://x/p", Some(b"")), "https://x/p");
        assert_eq!(loc("https://x/p", Some(b"a=1")), "https://x/p?a=1");
        assert_eq!(loc("https://x/p?t=0", Some(b"a=1")), "https://x/p?t=0&a=1");
        assert_eq!(loc("https://x/p?", Some(b"a=1")), "https://x/p?a=1");
        assert_eq!(
            loc("https://x/p#frag", Some(b"a=1")),
            "https://x/p?a=1#frag"
        );
        assert_eq!(loc("https://x/p?t#f", Some(b"a")), "https://x/p?t&a#f");
        assert_eq!(
            loc("https://x/", Some(b"a=\r\n x\x7f\xff#")),
            "https://x/?a=%0D%0A%20x%7F%FF%23"
        );
    }

    #[test]
    fn cache_control_per_status() {
        use RedirectStatus::*;
        assert_eq!(
            cache_control(MovedPermanently, None, 0),
            CacheControl::Public(3600)
        );
        assert_eq!(
            cache_control(PermanentRedirect, Some(60_000), 0),
            CacheControl::Public(60)
        );
        assert_eq!(cache_control(Found, None, 0), CacheControl::NoStore);
        assert_eq!(
            cache_control(TemporaryRedirect, None, 0),
            CacheControl::NoStore
        );
        assert_eq!(CacheControl::Public(60).value(), "public, max-age=60");
    }
}
