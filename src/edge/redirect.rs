//! The redirect decision, free of any network type: which route a path is,
//! which code it names, what the answer to a code is and how the target's
//! query string is merged with the request's. `proxy.rs` turns the decision
//! into a Pingora response; tests and fuzz targets call these directly.

use super::clicks::{Click, ClickTable, click_key};
use crate::store::record::{LinkRef, MAX_CODE_LEN, RedirectStatus, is_code_byte};
use crate::store::view::TableView;

/// What a request path is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// `/{code}`: a short link (the code is validated).
    Redirect(&'a [u8]),
    /// `/api` or `/api/...`: proxied to the admin.
    Api,
    /// `/health`: liveness, answered by the edge.
    Health,
    /// `/health/ready`: readiness, answered by the edge.
    Ready,
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
    if rest == b"health/ready" {
        return Route::Ready;
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
    /// Its click budget (`max_clicks`) is spent.
    Exhausted,
}

/// The answer to a code: the link to redirect to, or why not. `clicks`:
/// the edge's click counts and whether this request spends a click (a GET)
/// or only looks (a HEAD), see [`super::clicks`]; `None` counts nothing and
/// leaves every budget whole (benchmarks, tests).
#[inline]
pub fn resolve<'a>(
    view: &'a TableView,
    code: &[u8],
    now_ms: u64,
    clicks: Option<(&ClickTable, bool)>,
) -> Result<LinkRef<'a>, Miss> {
    let link = view.get(code).ok_or(Miss::Unknown)?;
    if link.is_disabled() {
        return Err(Miss::Disabled);
    }
    if link.is_expired_at(now_ms) {
        return Err(Miss::Expired);
    }
    if let (Some(budget), Some((table, take))) = (link.max_clicks, clicks) {
        let key = click_key(code, link.created_at_ms);
        if table.click(key, budget, take) != Click::Allowed {
            return Err(Miss::Exhausted);
        }
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
    // A separator unless the target's query (after its first `?`) is empty
    // or already ends in one: `?next=/a?` is a query whose last value ends
    // in `?`, and the request's query is not glued onto that value.
    match base.iter().position(|&b| b == b'?') {
        Some(i) => {
            let own = &base[i + 1..];
            if !own.is_empty() && !own.ends_with(b"&") {
                out.push(b'&');
            }
        }
        None => out.push(b'?'),
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
/// that edits and deletes take effect at once; nor is a link with a click
/// budget (`budgeted`), whose every click must reach the edge to be counted.
pub fn cache_control(
    status: RedirectStatus,
    expires_at_ms: Option<u64>,
    budgeted: bool,
    now_ms: u64,
) -> CacheControl {
    if budgeted {
        return CacheControl::NoStore;
    }
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
        assert_eq!(loc("https://x/p?t=0&", Some(b"a=1")), "https://x/p?t=0&a=1");
        // A query whose last value ends in `?` still gets its `&`.
        assert_eq!(
            loc("https://x/login?next=/home?", Some(b"a=1")),
            "https://x/login?next=/home?&a=1"
        );
        assert_eq!(loc("https://x/p??", Some(b"a=1")), "https://x/p??&a=1");
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
            cache_control(MovedPermanently, None, false, 0),
            CacheControl::Public(3600)
        );
        assert_eq!(
            cache_control(PermanentRedirect, Some(60_000), false, 0),
            CacheControl::Public(60)
        );
        assert_eq!(cache_control(Found, None, false, 0), CacheControl::NoStore);
        // A link with a click budget: never cached, whatever its status.
        assert_eq!(
            cache_control(MovedPermanently, None, true, 0),
            CacheControl::NoStore
        );
        assert_eq!(
            cache_control(TemporaryRedirect, None, false, 0),
            CacheControl::NoStore
        );
        assert_eq!(CacheControl::Public(60).value(), "public, max-age=60");
    }

    /// Hostile paths (issue 5, fault 8): none is a redirect, none reaches
    /// the admin unless it starts with `/api` as written.
    #[test]
    fn hostile_paths() {
        for p in [
            &b"/%ff%fe"[..],
            b"/%zz",
            b"/%",
            b"/%00",
            b"/%6bnown",
            b"/kn\0own",
            b"/known%0d%0aSet-Cookie:x=1",
            b"/known\r\nSet-Cookie: x=1",
            b"/../api/links",
            b"/%2e%2e/api",
            b"/%2E%2E/api/links",
            b"/..%2fapi/links",
            b"/a%2fb",
            b"//api/links",
            b"/./api/links",
            b"/known/../api/links",
            b"/%2fapi%2flinks",
            b"/api%2flinks",
            b"/API/links",
            b"/\\api\\links",
            b"/api\\links",
            b"/health/",
            b"/health%2f",
            b"/kn\xc3\xb6wn",
        ] {
            assert!(
                !matches!(route(p), Route::Redirect(_) | Route::Api),
                "{:?}: {:?}",
                p.escape_ascii().to_string(),
                route(p)
            );
        }
        // Under /api as written, the admin decides (and authenticates).
        assert_eq!(route(b"/api/../x"), Route::Api);
        assert_eq!(route(b"/api/%2e%2e/links"), Route::Api);
    }

    /// The bytes a `Location` header value may hold: visible ASCII only.
    fn header_safe(b: u8) -> bool {
        b.is_ascii_graphic()
    }

    /// A target as the store accepts them: `validate_target` passes.
    fn valid_target() -> impl Strategy<Value = String> {
        (
            prop_oneof![Just("http://"), Just("https://")],
            "[a-z0-9.-]{1,20}",
            "[!-~]{0,60}",
        )
            .prop_map(|(scheme, host, rest)| format!("{scheme}{host}/{rest}"))
            .prop_filter("a valid target", |t| {
                crate::store::record::validate_target(t).is_ok()
            })
    }

    use proptest::prelude::*;

    /// Paths for `route_of_any_bytes`. Uniformly random bytes almost never
    /// start with `/` and never form a code (all 6144 cases of three runs
    /// fell through to `NotFound`, where nothing is asserted), so most paths
    /// here are codes or nearly codes: of any length around the 64-byte
    /// limit, `/api` and its look-alikes, the edge's own routes and the
    /// admin's reserved names in mixed case with a suffix, and
    /// percent-encoded or dotted variants; random bytes, alone or inside a
    /// code, keep the hostile variety. Measured: about 38% of paths are
    /// redirects, 18% `/api`, 3% each `/health` and `/health/ready`, 38%
    /// not found.
    fn plausible_path() -> impl Strategy<Value = Vec<u8>> {
        let others: Vec<&str> = crate::admin::RESERVED_CODES
            .iter()
            .copied()
            .chain(["apix", "api_", "healthz", "ready"])
            .collect();
        let named = (
            // The edge's own routes half the time: each is one exact path.
            prop_oneof![
                prop::sample::select(&["api", "health", "health/ready"][..]),
                prop::sample::select(others),
            ],
            // Mostly as written, else in mixed case.
            prop_oneof![3 => Just(0), 1 => any::<u64>()],
            prop_oneof![
                2 => Just(""),
                1 => prop::sample::select(&["/", "/ready", "/links/x", "x", "%2f", ".."][..]),
            ],
        )
            .prop_map(|(name, upper, suffix)| {
                // Bit i of `upper` uppercases byte i: `Api`, `HEALTH`, ...
                let mut p = format!("/{name}{suffix}").into_bytes();
                for (i, b) in p[1..].iter_mut().enumerate() {
                    if upper >> (i % 64) & 1 == 1 {
                        b.make_ascii_uppercase();
                    }
                }
                p
            });
        let spliced = (
            "/[A-Za-z0-9_-]{0,10}",
            prop::collection::vec(any::<u8>(), 1..3),
            "[A-Za-z0-9_-]{0,10}",
        )
            .prop_map(|(a, raw, b)| [a.as_bytes(), &raw, b.as_bytes()].concat());
        prop_oneof![
            4 => "/[A-Za-z0-9_-]{0,70}".prop_map(String::into_bytes),
            2 => "/api(/[a-z]{0,10})?".prop_map(String::into_bytes),
            4 => named,
            2 => "/([A-Za-z0-9_-]|%[0-9A-Fa-f]{2}|[./\\\\]){1,20}".prop_map(String::into_bytes),
            1 => spliced,
            1 => prop::collection::vec(any::<u8>(), 0..96),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

        /// `route`'s whole rule, both ways, on any path: after a leading `/`,
        /// exactly `api` or `api/...` is `Api`, exactly `health` is `Health`
        /// and `health/ready` is `Ready`; otherwise the rest is a `Redirect`
        /// if and only if the store takes it as a code (`validate_code`:
        /// 1 to 64 bytes of `[A-Za-z0-9_-]`), matched case-sensitively (so
        /// `/API`, `/Health` and the admin's other reserved names, `/metrics`
        /// or `/admin`, are redirects here: the admin never lets a link take
        /// one, so they answer 404); anything else is `NotFound`.
        #[test]
        fn route_of_any_bytes(path in plausible_path()) {
            let r = route(&path);
            let rest = path.strip_prefix(b"/");
            let is_api = rest.is_some_and(|c| c == b"api" || c.starts_with(b"api/"));
            let is_code = rest.is_some_and(|c| {
                crate::store::record::validate_code(c).is_ok() && c != b"api" && c != b"health"
            });
            let shown = path.escape_ascii().to_string();
            prop_assert_eq!(matches!(r, Route::Redirect(_)), is_code, "{} -> {:?}", shown, r);
            if let Route::Redirect(code) = r {
                prop_assert_eq!(Some(code), rest);
            }
            prop_assert_eq!(r == Route::Api, is_api, "{} -> {:?}", shown, r);
            prop_assert_eq!(r == Route::Health, path == b"/health", "{}", shown);
            prop_assert_eq!(r == Route::Ready, path == b"/health/ready", "{}", shown);
        }

        /// Paths made of the characters an attacker would use: anything with
        /// a `/` after the first byte, or a `%`, is not a redirect.
        #[test]
        fn slashes_and_percents_never_redirect(
            path in "/[a-zA-Z0-9_%./\\\\-]{0,70}",
        ) {
            let bytes = path.as_bytes();
            let r = route(bytes);
            if bytes[1..].contains(&b'/') || bytes.contains(&b'%') {
                prop_assert!(!matches!(r, Route::Redirect(_)), "{} -> {:?}", path, r);
            }
            if matches!(r, Route::Api) {
                prop_assert!(path == "/api" || path.starts_with("/api/"));
            }
        }

        /// `split_target` takes any bytes and loses none of them.
        #[test]
        fn split_target_of_any_bytes(target in proptest::collection::vec(any::<u8>(), 0..96)) {
            let (path, query) = split_target(&target);
            prop_assert!(!path.contains(&b'?'));
            let mut back = path.to_vec();
            if let Some(q) = query {
                back.push(b'?');
                back.extend_from_slice(q);
            }
            prop_assert_eq!(back, target);
        }

        /// Whatever the request's query, a `Location` built from a stored
        /// target holds visible ASCII only (no CR, LF, control, space or
        /// non-ASCII byte), keeps the target's base and fragment, and adds
        /// no `#`.
        #[test]
        fn location_is_header_safe(
            target in valid_target(),
            query in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
        ) {
            let mut out = Vec::new();
            location_into(&mut out, target.as_bytes(), query.as_deref());
            prop_assert!(out.iter().all(|&b| header_safe(b)), "{:?}", out.escape_ascii().to_string());
            prop_assert!(::http::HeaderValue::from_bytes(&out).is_ok());
            let hash = target.find('#').unwrap_or(target.len());
            prop_assert!(out.starts_with(&target.as_bytes()[..hash]));
            prop_assert!(out.ends_with(&target.as_bytes()[hash..]));
            prop_assert_eq!(
                out.iter().filter(|&&b| b == b'#').count(),
                target.matches('#').count()
            );
            if query.as_deref().is_none_or(<[u8]>::is_empty) {
                prop_assert_eq!(&out[..], target.as_bytes());
            }
            // Deterministic, and a reused buffer gives the same bytes.
            let mut again = b"leftover".to_vec();
            location_into(&mut again, target.as_bytes(), query.as_deref());
            prop_assert_eq!(again, out);
        }

        /// Arbitrary targets and queries never panic, and a query never
        /// brings a byte that could break a header.
        #[test]
        fn location_of_any_bytes(
            target in proptest::collection::vec(any::<u8>(), 0..64),
            query in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut out = Vec::new();
            location_into(&mut out, &target, Some(&query));
            let unsafe_in_target = target.iter().filter(|&&b| !header_safe(b)).count();
            let unsafe_in_out = out.iter().filter(|&&b| !header_safe(b)).count();
            prop_assert_eq!(unsafe_in_out, unsafe_in_target);
        }
    }
}
