//! Hostile input to the admin API (issue 5, fault 9): oversized and deeply
//! nested bodies, wrong types and unknown or repeated fields, control and
//! invisible characters in URLs, dangerous schemes in every letter case,
//! codes that collide with the edge's routes or only look like them, IDN and
//! homograph hosts, bodies that are not UTF-8, wrong content types, bulk
//! requests mixing good and bad items, and hostile PATCH/DELETE paths.
//!
//! Every refusal must come with its 4xx and the stable error body
//! `{"error":{"code","message","field"}}`, and must leave the store exactly
//! as it was: the full listing, the log's durable sequence and the size of
//! every log file are compared before and after. `tests/admin_api.rs`
//! covers the basic refusals; this file covers what it does not.
//!
//! Most requests go through `uload::admin::app` in process (tower's
//! `oneshot`); `hostile_bytes_on_a_real_listener` speaks raw HTTP/1.1 to
//! `serve` on a loopback port. The two 409 tests hold a PATCH or DELETE in
//! flight deterministically (see `hold_writes`).

mod common;

use std::path::Path;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;
use uload::admin::{AdminState, app, serve};
use uload::config::Config;

const KEY: &str = "test-key-0123456789abcdef";
/// The default `admin.max_body_bytes` (1 MiB): large enough for 100,000
/// nested arrays or objects.
const MAX_BODY: usize = 1 << 20;
const MAX_BULK: usize = 50;

fn config(dir: &Path) -> Config {
    let yaml = format!(
        "data_dir: {}\npublic_base_url: https://ulo.ad/\nadmin:\n  api_key: {KEY}\n  max_body_bytes: {MAX_BODY}\n  max_bulk: {MAX_BULK}\n",
        dir.display()
    );
    Config::from_yaml_str(&yaml, "test", &[]).unwrap()
}

struct Admin {
    dir: TempDir,
    state: AdminState,
    app: Router,
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    json: Value,
}

impl Reply {
    /// Asserts the stable error shape and returns (code, field).
    fn error(&self) -> (String, Option<String>) {
        common::api_error(&self.json)
    }
}

/// Everything a refused request must leave alone.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    durable_seq: u64,
    view_seq: u64,
    /// Every link, as the API lists it, in code order.
    links: Vec<Value>,
    /// (file name, length) of every file under `log/`.
    log_files: Vec<(String, u64)>,
}

fn bytes_of(v: &Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

impl Admin {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = AdminState::open(&config(dir.path())).unwrap();
        let app = app(state.clone());
        Self { dir, state, app }
    }

    /// Sends a request with the key and `Content-Type: application/json`
    /// unless `headers` names its own.
    async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Reply {
        let mut req = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {KEY}"));
        let own_type = headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-type"));
        if !own_type && !body.is_empty() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let res = self
            .app
            .clone()
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("{method} {path}: body is not JSON ({e}): {bytes:?}"))
        };
        Reply { status, json }
    }

    async fn json(&self, method: &str, path: &str, body: Value) -> Reply {
        self.send(method, path, &[], bytes_of(&body)).await
    }

    async fn create(&self, body: Value) -> Value {
        let r = self.json("POST", "/api/links", body.clone()).await;
        assert_eq!(r.status, StatusCode::CREATED, "{body}: {}", r.json);
        r.json
    }

    async fn fingerprint(&self) -> Fingerprint {
        let mut links = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..1000 {
            let path = match &cursor {
                Some(c) => format!("/api/links?limit=1000&cursor={c}"),
                None => "/api/links?limit=1000".to_owned(),
            };
            let page = self.send("GET", &path, &[], Vec::new()).await;
            assert_eq!(page.status, StatusCode::OK, "{}", page.json);
            links.extend(page.json["links"].as_array().unwrap().iter().cloned());
            match page.json["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        let mut log_files: Vec<(String, u64)> = std::fs::read_dir(self.dir.path().join("log"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().unwrap().len(),
                )
            })
            .collect();
        log_files.sort();
        Fingerprint {
            durable_seq: self.state.store().log().durable_seq(),
            view_seq: self.state.view().seq(),
            links,
            log_files,
        }
    }

    /// Sends the request and asserts its refusal: status, error code, field,
    /// and an unchanged store.
    #[allow(clippy::too_many_arguments)]
    async fn refused(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
        status: u16,
        code: &str,
        field: Option<&str>,
    ) {
        let before = self.fingerprint().await;
        let shown = String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned();
        let r = self.send(method, path, headers, body).await;
        let what = format!("{method} {path} {headers:?} {shown:?}");
        assert_eq!(r.status.as_u16(), status, "{what}: {}", r.json);
        assert_eq!(
            r.error(),
            (code.to_owned(), field.map(str::to_owned)),
            "{what}"
        );
        assert_eq!(self.fingerprint().await, before, "{what} changed the store");
    }

    async fn refused_json(
        &self,
        method: &str,
        path: &str,
        body: Value,
        status: u16,
        code: &str,
        field: Option<&str>,
    ) {
        self.refused(method, path, &[], bytes_of(&body), status, code, field)
            .await;
    }
}

fn nested_arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn oversized_bodies_are_413_on_every_body_route() {
    let admin = Admin::new();
    admin
        .create(json!({"url": "https://example.com/", "code": "exists"}))
        .await;
    let padding = "x".repeat(MAX_BODY);
    let bulk = json!({"links": [{"url": format!("https://example.com/{padding}")}]});
    admin
        .refused(
            "POST",
            "/api/links/bulk",
            &[],
            bytes_of(&bulk),
            413,
            "body_too_large",
            None,
        )
        .await;
    let patch = json!({"url": format!("https://example.com/{padding}")});
    admin
        .refused(
            "PATCH",
            "/api/links/exists",
            &[],
            bytes_of(&patch),
            413,
            "body_too_large",
            None,
        )
        .await;
    // One byte over: refused before it is parsed (the body is not even JSON).
    admin
        .refused(
            "POST",
            "/api/links",
            &[],
            vec![b' '; MAX_BODY + 1],
            413,
            "body_too_large",
            None,
        )
        .await;
    // Exactly at the limit: read and judged on its contents.
    let mut at_limit = bytes_of(&json!({"url": "javascript:alert(1)"}));
    at_limit.resize(MAX_BODY, b' ');
    admin
        .refused(
            "POST",
            "/api/links",
            &[],
            at_limit,
            400,
            "invalid_url",
            Some("url"),
        )
        .await;
}

#[tokio::test]
async fn deep_nesting_is_invalid_json_never_a_stack_overflow() {
    let admin = Admin::new();
    admin
        .create(json!({"url": "https://example.com/", "code": "exists"}))
        .await;
    let arrays = nested_arrays(100_000);
    let objects = format!("{}1{}", r#"{"a":"#.repeat(100_000), "}".repeat(100_000));
    assert!(objects.len() <= MAX_BODY && arrays.len() <= MAX_BODY);
    let in_field = format!(r#"{{"url":"https://example.com/","code":{arrays}}}"#);
    let in_bulk = format!(r#"{{"links":[{{"url":"https://example.com/"}},{arrays}]}}"#);
    // The outer object and 127 arrays: 128 levels, one too many.
    let just_over = format!(
        r#"{{"url":"https://example.com/","code":{}}}"#,
        nested_arrays(127)
    );
    for (method, path, body) in [
        ("POST", "/api/links", &arrays),
        ("POST", "/api/links", &objects),
        ("POST", "/api/links", &in_field),
        ("POST", "/api/links", &just_over),
        ("POST", "/api/links/bulk", &arrays),
        ("POST", "/api/links/bulk", &in_bulk),
        ("PATCH", "/api/links/exists", &objects),
        ("PATCH", "/api/links/exists", &in_field),
    ] {
        admin
            .refused(
                method,
                path,
                &[],
                body.clone().into_bytes(),
                400,
                "invalid_json",
                None,
            )
            .await;
    }
    // Nesting within the limit (the outer object and 126 arrays: 127
    // levels, the most) is parsed, then refused for its type.
    let shallow = format!(
        r#"{{"url":"https://example.com/","code":{}}}"#,
        nested_arrays(126)
    );
    admin
        .refused(
            "POST",
            "/api/links",
            &[],
            shallow.into_bytes(),
            400,
            "invalid_type",
            Some("code"),
        )
        .await;
}

#[tokio::test]
async fn wrong_types_for_every_field() {
    let admin = Admin::new();
    admin
        .create(json!({"url": "https://example.com/", "code": "exists"}))
        .await;
    let url = "https://example.com/";
    let create_cases = [
        (json!({"url": true}), "url"),
        (json!({"url": null}), "url"),
        (json!({"url": ["https://example.com/"]}), "url"),
        (json!({"url": {"href": url}}), "url"),
        (json!({"url": url, "code": 42}), "code"),
        (json!({"url": url, "code": true}), "code"),
        (json!({"url": url, "code": ["abc"]}), "code"),
        (json!({"url": url, "code": {"a": 1}}), "code"),
        (json!({"url": url, "status": "301"}), "status"),
        (json!({"url": url, "status": 301.5}), "status"),
        (json!({"url": url, "status": -301}), "status"),
        (json!({"url": url, "status": 70000}), "status"),
        (json!({"url": url, "status": true}), "status"),
        (
            json!({"url": url, "expires_at": 1_900_000_000}),
            "expires_at",
        ),
        (json!({"url": url, "expires_at": true}), "expires_at"),
        (json!({"url": url, "expires_at": {"t": 1}}), "expires_at"),
        (json!({"url": url, "max_clicks": "5"}), "max_clicks"),
        (json!({"url": url, "max_clicks": 1.5}), "max_clicks"),
        (json!({"url": url, "max_clicks": 1e3}), "max_clicks"),
        (json!({"url": url, "max_clicks": [5]}), "max_clicks"),
        (json!({"url": url, "forward_query": 1}), "forward_query"),
        (
            json!({"url": url, "forward_query": "true"}),
            "forward_query",
        ),
        (json!({"url": url, "forward_query": null}), "forward_query"),
        (json!({"url": url, "disabled": 0}), "disabled"),
        (json!({"url": url, "disabled": null}), "disabled"),
    ];
    for (body, field) in create_cases {
        admin
            .refused_json("POST", "/api/links", body, 400, "invalid_type", Some(field))
            .await;
    }
    // A number beyond u64: refused as out of range for the field.
    admin
        .refused(
            "POST",
            "/api/links",
            &[],
            br#"{"url":"https://example.com/","max_clicks":18446744073709551616}"#.to_vec(),
            400,
            "invalid_type",
            Some("max_clicks"),
        )
        .await;
    let patch_cases = [
        (json!({"url": 5}), "url"),
        (json!({"url": ["https://example.com/"]}), "url"),
        (json!({"status": "308"}), "status"),
        (json!({"status": null}), "status"),
        (json!({"status": 308.0}), "status"),
        (json!({"expires_at": 5}), "expires_at"),
        (json!({"expires_at": false}), "expires_at"),
        (json!({"max_clicks": "x"}), "max_clicks"),
        (json!({"max_clicks": -1}), "max_clicks"),
        (json!({"max_clicks": 2.5}), "max_clicks"),
        (json!({"forward_query": null}), "forward_query"),
        (json!({"forward_query": "yes"}), "forward_query"),
        (json!({"disabled": null}), "disabled"),
        (json!({"disabled": 1}), "disabled"),
    ];
    for (body, field) in patch_cases {
        admin
            .refused_json(
                "PATCH",
                "/api/links/exists",
                body,
                400,
                "invalid_type",
                Some(field),
            )
            .await;
    }
    // Bodies that are not objects.
    for body in ["\"https://example.com/\"", "42", "null", "true"] {
        for (method, path) in [
            ("POST", "/api/links"),
            ("PATCH", "/api/links/exists"),
            ("POST", "/api/links/bulk"),
        ] {
            admin
                .refused(
                    method,
                    path,
                    &[],
                    body.as_bytes().to_vec(),
                    400,
                    "invalid_type",
                    None,
                )
                .await;
        }
    }
}

#[tokio::test]
async fn unknown_and_repeated_fields() {
    let admin = Admin::new();
    admin
        .create(json!({"url": "https://example.com/", "code": "exists"}))
        .await;
    let url = "https://example.com/";
    for name in [
        "URL",
        "Url",
        "url ",
        "__proto__",
        "constructor",
        "owner_key_id",
        "created_at",
        "short_url",
        "id",
    ] {
        let mut body = json!({"url": url});
        body[name] = json!(1);
        admin
            .refused_json("POST", "/api/links", body, 400, "unknown_field", Some(name))
            .await;
    }
    for name in ["created_at", "owner_key_id", "short_url", "URL", "Status"] {
        let mut body = json!({"status": 301});
        body[name] = json!(1);
        admin
            .refused_json(
                "PATCH",
                "/api/links/exists",
                body,
                400,
                "unknown_field",
                Some(name),
            )
            .await;
    }
    // The same key twice: parsers disagree on which one wins (a proxy could
    // vet the first while we stored the last), so the body is refused.
    let repeated: [(&str, &str, &[u8], &str); 5] = [
        (
            "POST",
            "/api/links",
            br#"{"url":"https://example.com/","url":"javascript:alert(1)"}"#,
            "url",
        ),
        (
            "POST",
            "/api/links",
            br#"{"url":"javascript:alert(1)","url":"https://example.com/"}"#,
            "url",
        ),
        (
            "POST",
            "/api/links",
            br#"{"url":"https://example.com/","code":"a","code":"api"}"#,
            "code",
        ),
        (
            "PATCH",
            "/api/links/exists",
            br#"{"disabled":false,"disabled":true}"#,
            "disabled",
        ),
        (
            "POST",
            "/api/links/bulk",
            br#"{"links":[{"url":"https://example.com/","url":"https://evil.example/"}]}"#,
            "links[0].url",
        ),
    ];
    for (method, path, body, field) in repeated {
        admin
            .refused(
                method,
                path,
                &[],
                body.to_vec(),
                400,
                "invalid_json",
                Some(field),
            )
            .await;
    }
}

#[tokio::test]
async fn control_invisible_and_space_characters_in_urls() {
    let admin = Admin::new();
    admin
        .create(json!({"url": "https://example.com/", "code": "exists"}))
        .await;
    let mut bad: Vec<String> = Vec::new();
    // Every C0 control (NUL, CR and LF are in admin_api.rs), DEL and C1,
    // in the path and in the host.
    for c in (1u32..0x20)
        .chain([0x7f])
        .chain(0x80..0xa0)
        .filter(|&c| c != 0x0a && c != 0x0d)
    {
        let c = char::from_u32(c).unwrap();
        bad.push(format!("https://example.com/a{c}b"));
        bad.push(format!("https://exam{c}ple.com/"));
    }
    for s in [
        " https://example.com/",
        "https://example.com/ ",
        "https://exa mple.com/",
        "https://example.com/a b",
        "https://example.com/?q=a b",
        "https://example.com/#a b",
        "https://example.com/\u{00A0}",
        "https://example.com/\u{2028}x",
        "https://example.com/\u{3000}",
        "https://example.com/\u{202E}gnp.exe",
        "https://example.com/\u{200B}",
        "https://exa\u{200D}mple.com/",
        "https://example.com/\u{2066}x\u{2069}",
        "https://example.com/\u{FEFF}",
        "https://example.com/\u{00AD}",
        "\u{FEFF}https://example.com/",
    ] {
        bad.push(s.to_owned());
    }
    for url in &bad {
        admin
            .refused_json(
                "POST",
                "/api/links",
                json!({"url": url}),
                400,
                "invalid_url",
                Some("url"),
            )
            .await;
    }
    for url in bad.iter().step_by(7) {
        admin
            .refused_json(
                "PATCH",
                "/api/links/exists",
                json!({"url": url}),
                400,
                "invalid_url",
                Some("url"),
            )
            .await;
    }
    // Escaped controls are data, not controls: stored as sent (they reach
    // the target's server encoded; nothing is injected into Location).
    let made = admin
        .create(json!({"url": "https://example.com/%0d%0aSet-Cookie:%20x=1", "code": "enc"}))
        .await;
    assert_eq!(made["url"], "https://example.com/%0d%0aSet-Cookie:%20x=1");
}

#[tokio::test]
async fn dangerous_schemes_in_any_letter_case() {
    let admin = Admin::new();
    admin
        .create(json!({"url": "https://example.com/", "code": "exists"}))
        .await;
    let schemes = [
        "JAVASCRIPT:alert(1)",
        "JavaScript:alert(document.cookie)",
        "jAvAsCrIpT://example.com/%0Aalert(1)",
        "javascript:https://example.com/",
        "java\tscript:alert(1)",
        "DATA:text/html,<script>alert(1)</script>",
        "Data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
        "file:///etc/passwd",
        "FILE:///etc/passwd",
        "File://localhost/etc/passwd",
        "vbscript:msgbox(1)",
        "VBScript:MsgBox(1)",
        "VBSCRIPT:msgbox(1)",
        "http:javascript:alert(1)",
        "https:example.com",
        "https:/example.com",
        "//example.com/",
        "ftp://example.com/",
        "mailto:a@example.com",
        "blob:https://example.com/uuid",
        "about:blank",
        "intent://example.com#Intent;scheme=https;end",
        "https//example.com/",
    ];
    for url in schemes {
        admin
            .refused_json(
                "POST",
                "/api/links",
                json!({"url": url}),
                400,
                "invalid_url",
                Some("url"),
            )
            .await;
        admin
            .refused_json(
                "PATCH",
                "/api/links/exists",
                json!({"url": url}),
                400,
                "invalid_url",
                Some("url"),
            )
            .await;
    }
    // Upper-case http(s) is still http(s).
    admin
        .create(json!({"url": "HTTPS://EXAMPLE.COM/UP", "code": "upper"}))
        .await;
}

#[tokio::test]
async fn codes_that_collide_with_edge_routes() {
    let admin = Admin::new();
    // admin_api.rs has "api", "HEALTH" and "robots.txt"; every other
    // reserved code, in other letter cases (the edge matches its routes
    // case-sensitively, the admin refuses them in any case).
    for code in [
        "Api",
        "aPI",
        "API",
        "health",
        "Health",
        "metrics",
        "METRICS",
        "Metrics",
        "favicon.ico",
        "FAVICON.ICO",
        "Favicon.Ico",
        "ROBOTS.TXT",
        ".well-known",
        ".WELL-KNOWN",
        ".Well-Known",
        "admin",
        "ADMIN",
        "static",
        "Static",
        "assets",
        "ASSETS",
    ] {
        admin
            .refused_json(
                "POST",
                "/api/links",
                json!({"url": "https://example.com/", "code": code}),
                400,
                "reserved_code",
                Some("code"),
            )
            .await;
    }
    // Paths, not codes.
    for code in [
        ".",
        "..",
        "api/links",
        "/health",
        "health/",
        "favicon.ico/x",
        "%2e%2e",
        "a?b",
        "a#b",
    ] {
        admin
            .refused_json(
                "POST",
                "/api/links",
                json!({"url": "https://example.com/", "code": code}),
                400,
                "invalid_code",
                Some("code"),
            )
            .await;
    }
    // Near misses are ordinary codes.
    for code in ["apis", "api_", "health-check", "metrics2", "Admin_"] {
        admin
            .create(json!({"url": "https://example.com/", "code": code}))
            .await;
    }
}

#[tokio::test]
async fn unicode_look_alike_codes_are_invalid() {
    let admin = Admin::new();
    admin
        .create(json!({"url": "https://example.com/", "code": "api-x"}))
        .await;
    for code in [
        "\u{0430}pi",               // Cyrillic а + "pi": looks like "api"
        "he\u{0430}lth",            // Cyrillic а inside "health"
        "\u{FF41}\u{FF50}\u{FF49}", // fullwidth "ａｐｉ"
        "\u{FF21}\u{FF30}\u{FF29}", // fullwidth "ＡＰＩ"
        "api\u{200D}",              // zero-width joiner
        "a\u{200B}pi",              // zero-width space
        "\u{202E}ipa",              // right-to-left override
        "api\u{FEFF}",              // BOM
        "\u{1D00}\u{1D18}\u{026A}", // small capitals
        "ap\u{0131}",               // dotless i
        "api\u{0301}",              // combining acute accent
        "\u{0661}\u{0662}\u{0663}", // Arabic-Indic digits
        "api-x\u{00A0}",            // no-break space after an existing code
        "api\u{2010}x",             // Unicode hyphen
    ] {
        admin
            .refused_json(
                "POST",
                "/api/links",
                json!({"url": "https://example.com/", "code": code}),
                400,
                "invalid_code",
                Some("code"),
            )
            .await;
    }
    // In a path they name no link.
    for path in [
        "/api/links/%D0%B0pi-x",
        "/api/links/api-x%E2%80%8D",
        "/api/links/%E2%80%AEx-ipa",
        "/api/links/%EF%BD%81pi-x",
    ] {
        for method in ["GET", "DELETE"] {
            admin
                .refused(method, path, &[], Vec::new(), 404, "not_found", None)
                .await;
        }
        admin
            .refused_json(
                "PATCH",
                path,
                json!({"disabled": true}),
                404,
                "not_found",
                None,
            )
            .await;
    }
}

#[tokio::test]
async fn idn_and_homograph_hosts() {
    let admin = Admin::new();
    admin
        .create(json!({"url": "https://example.com/", "code": "exists"}))
        .await;
    // Raw Unicode hosts are refused: the punycode form must be sent.
    for url in [
        "https://\u{0430}pple.com/",                // Cyrillic а: аpple.com
        "https://www.\u{0440}\u{0430}ypal.com/",    // Cyrillic р and а
        "https://b\u{00FC}cher.de/",                // a genuine IDN, still refused raw
        "https://\u{FF45}xample.com/",              // fullwidth e
        "https://example\u{3002}com/",              // ideographic full stop as a dot
        "https://example.com\u{FF0F}evil.example/", // fullwidth solidus
        "https://xn--80ak6aa92e.\u{0441}om/",       // punycode label + Cyrillic с
    ] {
        admin
            .refused_json(
                "POST",
                "/api/links",
                json!({"url": url}),
                400,
                "invalid_url",
                Some("url"),
            )
            .await;
        admin
            .refused_json(
                "PATCH",
                "/api/links/exists",
                json!({"url": url}),
                400,
                "invalid_url",
                Some("url"),
            )
            .await;
    }
    // Hosts that hide where a link goes.
    for url in [
        "https://bank.example@evil.example/",
        "https://user:pass@example.com/",
        "https://evil.example\\@bank.example/",
        "https://evil.example\\.bank.example/",
        "https://%65xample.com/",
        "https://example..com/",
        "https://example.com:0/",
        "https://example.com:99999/",
        "https://example.com:/",
        "https://[::1/",
        "https://[fe80::1%25eth0]/",
    ] {
        admin
            .refused_json(
                "POST",
                "/api/links",
                json!({"url": url}),
                400,
                "invalid_url",
                Some("url"),
            )
            .await;
    }
    // Punycode is accepted and shown as sent: the homograph of apple.com is
    // visibly not apple.com.
    let made = admin
        .create(json!({"url": "https://xn--pple-43d.com/login", "code": "puny"}))
        .await;
    assert_eq!(made["url"], "https://xn--pple-43d.com/login");
    // Unicode in the path, query and fragment is percent-encoded (UTF-8),
    // as a browser would request it; Location stays ASCII.
    let made = admin
        .create(
            json!({"url": "https://example.com/caf\u{00E9}?q=\u{00FC}#\u{2603}", "code": "cafe"}),
        )
        .await;
    assert_eq!(
        made["url"],
        "https://example.com/caf%C3%A9?q=%C3%BC#%E2%98%83"
    );
    let got = admin.send("GET", "/api/links/cafe", &[], Vec::new()).await;
    assert_eq!(got.json, made);
    let patched = admin
        .json(
            "PATCH",
            "/api/links/puny",
            json!({"url": "https://example.com/\u{00E9}t\u{00E9}"}),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.json);
    assert_eq!(patched.json["url"], "https://example.com/%C3%A9t%C3%A9");
    // The 2048-byte limit is on the encoded URL.
    let long = format!("https://example.com/{}", "\u{00E9}".repeat(400));
    assert!(long.len() < 2048);
    admin
        .refused_json(
            "POST",
            "/api/links",
            json!({"url": long}),
            400,
            "invalid_url",
            Some("url"),
        )
        .await;
}

#[tokio::test]
async fn bodies_that_are_not_utf8() {
    let admin = Admin::new();
    admin
        .create(json!({"url": "https://example.com/", "code": "exists"}))
        .await;
    let bodies: [&[u8]; 8] = [
        b"{\"url\":\"https://example.com/\xff\"}",
        b"{\"url\":\"https://example.com/\xe9t\xe9\"}", // Latin-1
        b"{\"url\":\"https://example.com/\xc0\xaf\"}",  // overlong '/'
        b"{\"url\":\"https://example.com/\xed\xa0\x80\"}", // encoded surrogate
        b"{\"url\":\"https://example.com/\\ud800\"}",   // lone surrogate escape
        b"\xef\xbb\xbf{\"url\":\"https://example.com/\"}", // UTF-8 BOM
        b"\xff\xfe{\x00\"\x00u\x00r\x00l\x00\"\x00",    // UTF-16LE
        b"{\"url\xff\":\"https://example.com/\"}",
    ];
    for body in bodies {
        for (method, path) in [
            ("POST", "/api/links"),
            ("PATCH", "/api/links/exists"),
            ("POST", "/api/links/bulk"),
        ] {
            admin
                .refused(method, path, &[], body.to_vec(), 400, "invalid_json", None)
                .await;
        }
    }
}

#[tokio::test]
async fn wrong_content_types() {
    let admin = Admin::new();
    admin
        .create(json!({"url": "https://example.com/", "code": "exists"}))
        .await;
    let good = bytes_of(&json!({"url": "https://example.com/x"}));
    for ct in [
        "application/json; charset=utf-16",
        "application/json; charset=iso-8859-1",
        "application/json;charset=\"latin1\"",
        "application/jsonp",
        "application/json-seq",
        "application/+json",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/json",
        "json",
        "application/",
        "",
    ] {
        for (method, path) in [
            ("POST", "/api/links"),
            ("PATCH", "/api/links/exists"),
            ("POST", "/api/links/bulk"),
        ] {
            admin
                .refused(
                    method,
                    path,
                    &[("content-type", ct)],
                    good.clone(),
                    400,
                    "invalid_content_type",
                    None,
                )
                .await;
        }
    }
    // Two Content-Types (a proxy may read the other one).
    admin
        .refused(
            "POST",
            "/api/links",
            &[
                ("content-type", "application/json"),
                ("content-type", "text/plain"),
            ],
            good.clone(),
            400,
            "invalid_content_type",
            None,
        )
        .await;
    // A compressed body is not decompressed.
    for encoding in ["gzip", "deflate", "br", "identity, gzip"] {
        admin
            .refused(
                "POST",
                "/api/links",
                &[("content-encoding", encoding)],
                good.clone(),
                400,
                "invalid_content_type",
                None,
            )
            .await;
    }
    // Form data sent as JSON is just not JSON.
    admin
        .refused(
            "POST",
            "/api/links",
            &[],
            b"url=https%3A%2F%2Fexample.com%2F".to_vec(),
            400,
            "invalid_json",
            None,
        )
        .await;
    // Accepted spellings get past the content-type check (and are then
    // judged on their body: here a refused URL, so nothing is written).
    let bad_url = bytes_of(&json!({"url": "javascript:alert(1)"}));
    for ct in [
        "APPLICATION/JSON",
        "application/json; charset=UTF-8",
        "application/json;charset=\"utf-8\"",
        "application/merge-patch+json",
        "application/vnd.uload+json; charset=utf8",
    ] {
        admin
            .refused(
                "POST",
                "/api/links",
                &[("content-type", ct), ("content-encoding", "identity")],
                bad_url.clone(),
                400,
                "invalid_url",
                Some("url"),
            )
            .await;
    }
}

#[tokio::test]
async fn bulk_mixes_good_and_bad_items_and_writes_only_the_good() {
    let admin = Admin::new();
    admin
        .create(json!({"url": "https://example.com/", "code": "exists"}))
        .await;
    let items = json!([
        {"url": "https://good.example/1", "code": "good1"},
        1,
        "https://example.com/",
        null,
        [],
        true,
        {"url": "https://example.com/", "bogus": 1},
        {"url": "https://example.com/", "status": "301"},
        {"url": "JavaScript:alert(1)"},
        {"url": "https://example.com/", "code": "Metrics"},
        {"url": "https://example.com/", "code": "\u{0430}pi"},
        {"url": "https://\u{0430}pple.com/"},
        {"url": "https://example.com/\u{202E}x"},
        {"url": "https://good.example/2", "code": "good2"},
        {"url": "https://other.example/", "code": "good1"},
        {"url": "https://example.com/", "code": "exists"},
        {"code": "nourl"},
        {"url": "https://good.example/3"},
    ]);
    // (status, (error code, field) for a refusal)
    type Expected = (u16, Option<(&'static str, Option<&'static str>)>);
    let expected: Vec<Expected> = vec![
        (201, None),
        (400, Some(("invalid_type", None))),
        (400, Some(("invalid_type", None))),
        (400, Some(("invalid_type", None))),
        (400, Some(("invalid_type", None))),
        (400, Some(("invalid_type", None))),
        (400, Some(("unknown_field", Some("bogus")))),
        (400, Some(("invalid_type", Some("status")))),
        (400, Some(("invalid_url", Some("url")))),
        (400, Some(("reserved_code", Some("code")))),
        (400, Some(("invalid_code", Some("code")))),
        (400, Some(("invalid_url", Some("url")))),
        (400, Some(("invalid_url", Some("url")))),
        (201, None),
        (409, Some(("duplicate_code", Some("code")))),
        (409, Some(("duplicate_code", Some("code")))),
        (400, Some(("missing_field", Some("url")))),
        (201, None),
    ];
    let before = admin.fingerprint().await;
    let syncs = admin.state.store().log().sync_count();
    let r = admin
        .json("POST", "/api/links/bulk", json!({"links": items}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    let results = r.json["results"].as_array().unwrap();
    assert_eq!(results.len(), expected.len());
    let mut created = Vec::new();
    for (i, (result, (status, error))) in results.iter().zip(&expected).enumerate() {
        assert_eq!(result["index"], i, "{result}");
        assert_eq!(result["status"], *status, "item {i}: {result}");
        match error {
            None => created.push(result["link"].clone()),
            Some((code, field)) => {
                let e = &result["error"];
                assert_eq!(e["code"], *code, "item {i}: {result}");
                assert_eq!(e["field"].as_str(), *field, "item {i}: {result}");
                assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
            }
        }
    }
    assert_eq!(created.len(), 3);
    // Exactly the good items, with one append (one fsync).
    let after = admin.fingerprint().await;
    assert_eq!(after.durable_seq, before.durable_seq + 3);
    assert_eq!(admin.state.store().log().sync_count(), syncs + 1);
    let mut want: Vec<Value> = before.links.clone();
    want.extend(created);
    want.sort_by(|a, b| a["code"].as_str().cmp(&b["code"].as_str()));
    assert_eq!(after.links, want);

    // All items bad: 200 with every refusal, and nothing written.
    let all_bad = json!({"links": [
        {"url": "vbscript:msgbox(1)"},
        {"url": "https://example.com/", "code": "ASSETS"},
        {"url": "https://example.com/", "code": "good2"},
    ]});
    let before = admin.fingerprint().await;
    let r = admin.json("POST", "/api/links/bulk", all_bad).await;
    assert_eq!(r.status, StatusCode::OK);
    let statuses: Vec<u64> = r.json["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [400, 400, 409]);
    assert_eq!(admin.fingerprint().await, before);

    // Bodies of the wrong shape refuse the whole request.
    for (body, code, field) in [
        (json!({"links": null}), "invalid_type", Some("links")),
        (
            json!({"links": {"url": "https://example.com/"}}),
            "invalid_type",
            Some("links"),
        ),
        (
            json!({"links": "https://example.com/"}),
            "invalid_type",
            Some("links"),
        ),
        (json!({}), "missing_field", Some("links")),
        (
            json!({"links": [], "dry_run": true}),
            "unknown_field",
            Some("dry_run"),
        ),
        (
            json!([{"url": "https://example.com/"}]),
            "invalid_type",
            None,
        ),
        (
            json!({"links": vec![json!({"url": "https://example.com/"}); MAX_BULK + 1]}),
            "too_many_links",
            Some("links"),
        ),
    ] {
        admin
            .refused_json("POST", "/api/links/bulk", body, 400, code, field)
            .await;
    }
    // An empty list: nothing to do, nothing written.
    let before = admin.fingerprint().await;
    let r = admin
        .json("POST", "/api/links/bulk", json!({"links": []}))
        .await;
    assert_eq!(
        (r.status, &r.json),
        (StatusCode::OK, &json!({"results": []}))
    );
    assert_eq!(admin.fingerprint().await, before);
}

#[tokio::test]
async fn hostile_patch_and_delete_paths() {
    let admin = Admin::new();
    admin
        .create(json!({"url": "https://example.com/", "code": "exists"}))
        .await;
    let long = format!("/api/links/{}", "a".repeat(65));
    let paths = [
        "/api/links/%FF",    // not UTF-8 once decoded
        "/api/links/%C0%AF", // overlong '/'
        "/api/links/exists%FF",
        "/api/links/%00",
        "/api/links/exists%00",
        "/api/links/%0D%0ASet-Cookie:%20x",
        "/api/links/..",
        "/api/links/%2E%2E",
        "/api/links/.",
        "/api/links/exists%20",
        "/api/links/%20exists",
        "/api/links/EXISTS", // codes are case-sensitive
        "/api/links/exists.",
        "/api/links/exist%73%2F",
        long.as_str(),
    ];
    for path in paths {
        for method in ["GET", "DELETE"] {
            admin
                .refused(method, path, &[], Vec::new(), 404, "not_found", None)
                .await;
        }
        admin
            .refused_json(
                "PATCH",
                path,
                json!({"disabled": true}),
                404,
                "not_found",
                None,
            )
            .await;
        // Only `bulk` takes a POST, whatever the path decodes to.
        admin
            .refused_json(
                "POST",
                path,
                json!({"links": []}),
                405,
                "method_not_allowed",
                None,
            )
            .await;
    }
    // The right link, with hostile bodies.
    for (body, code, field) in [
        (
            json!({"url": "https://user:pw@example.com/"}),
            "invalid_url",
            Some("url"),
        ),
        (
            json!({"url": "https://ex\u{0430}mple.com/"}),
            "invalid_url",
            Some("url"),
        ),
        (
            json!({"url": "https://example.com/\u{202E}"}),
            "invalid_url",
            Some("url"),
        ),
        (json!({"url": ""}), "invalid_url", Some("url")),
        (json!({"status": 0}), "invalid_status", Some("status")),
        (
            json!({"expires_at": "1969-12-31T23:59:59Z"}),
            "invalid_expires_at",
            Some("expires_at"),
        ),
        (
            json!({"expires_at": "x".repeat(10_000)}),
            "invalid_expires_at",
            Some("expires_at"),
        ),
        (
            json!({"expires_at": "2026-02-30T00:00:00Z"}),
            "invalid_expires_at",
            Some("expires_at"),
        ),
        (json!([]), "invalid_type", None),
    ] {
        admin
            .refused_json("PATCH", "/api/links/exists", body, 400, code, field)
            .await;
    }
    // A huge invalid value is not echoed back whole.
    let r = admin
        .json(
            "PATCH",
            "/api/links/exists",
            json!({"expires_at": "y".repeat(10_000)}),
        )
        .await;
    assert!(r.json.to_string().len() < 1000, "{}", r.json);
    // PATCH with no body at all: not JSON.
    admin
        .refused(
            "PATCH",
            "/api/links/exists",
            &[("content-type", "application/json")],
            Vec::new(),
            400,
            "invalid_json",
            None,
        )
        .await;
    // A DELETE's body is ignored, whatever it holds.
    let r = admin
        .send("DELETE", "/api/links/exists", &[], b"\xff{{{".to_vec())
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

/// A raw HTTP/1.1 exchange: writes `request` (ignoring a reset once the
/// server has answered early), reads until EOF or reset, and parses the
/// status and body (de-chunked).
async fn raw_http(addr: std::net::SocketAddr, request: Vec<u8>) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.split();
    let write = async {
        for chunk in request.chunks(16 * 1024) {
            if wr.write_all(chunk).await.is_err() {
                break;
            }
        }
    };
    let read = async {
        let mut raw = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
        raw
    };
    let ((), raw) = tokio::join!(write, read);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header block: {text:?}"));
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = rest;
        loop {
            let (size, after) = rest.split_once("\r\n").unwrap();
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            out.push_str(&after[..size]);
            rest = &after[size + 2..];
        }
        out
    } else {
        rest.to_owned()
    };
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    (status, json)
}

fn head(method: &str, path: &str, addr: std::net::SocketAddr, extra: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nConnection: close\r\n{extra}\r\n"
    )
    .into_bytes()
}

#[tokio::test]
async fn hostile_bytes_on_a_real_listener() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let state = AdminState::open(&config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state.clone(), async {
        let _ = stopped.await;
    }));
    let made = br#"{"url":"https://example.com/","code":"exists00"}"#;
    let mut create = head(
        "POST",
        "/api/links",
        addr,
        &format!("Content-Length: {}\r\n", made.len()),
    );
    create.extend_from_slice(made);
    assert_eq!(raw_http(addr, create).await.0, 201);
    let seq = state.view().seq();

    // A chunked body that never ends below the limit: 413 once over it.
    let mut chunked = head("POST", "/api/links", addr, "Transfer-Encoding: chunked\r\n");
    let piece = format!("{{\"url\":\"https://example.com/{}", "z".repeat(4000));
    while chunked.len() < 2 * MAX_BODY {
        chunked.extend_from_slice(format!("{:x}\r\n{piece}\r\n", piece.len()).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (status, body) = raw_http(addr, chunked).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (413, &json!("body_too_large"))
    );

    // A Content-Length over the limit.
    let big = vec![b'['; MAX_BODY + 10];
    let mut req = head(
        "POST",
        "/api/links/bulk",
        addr,
        &format!("Content-Length: {}\r\n", big.len()),
    );
    req.extend_from_slice(&big);
    let (status, body) = raw_http(addr, req).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (413, &json!("body_too_large"))
    );

    // 100,000 nested arrays: an error, not a stack overflow of the server.
    let nested = nested_arrays(100_000);
    let mut req = head(
        "POST",
        "/api/links",
        addr,
        &format!("Content-Length: {}\r\n", nested.len()),
    );
    req.extend_from_slice(nested.as_bytes());
    let (status, body) = raw_http(addr, req).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("invalid_json"))
    );

    // Bytes that are not UTF-8, in the body and in the path.
    let bad = b"{\"url\":\"https://example.com/\xff\xfe\x00\"}";
    let mut req = head(
        "POST",
        "/api/links",
        addr,
        &format!("Content-Length: {}\r\n", bad.len()),
    );
    req.extend_from_slice(bad);
    let (status, body) = raw_http(addr, req).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("invalid_json"))
    );
    for method in ["GET", "DELETE"] {
        let (status, body) = raw_http(addr, head(method, "/api/links/%FF%FE", addr, "")).await;
        assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")));
    }
    let mut req = head(
        "PATCH",
        "/api/links/ex%C0%AFists00",
        addr,
        "Content-Length: 2\r\n",
    );
    req.extend_from_slice(b"{}");
    let (status, body) = raw_http(addr, req).await;
    assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")));

    // The server is still up and nothing was written.
    let (status, health) = raw_http(addr, head("GET", "/api/health", addr, "")).await;
    assert_eq!(status, 200);
    assert_eq!(health["seq"], seq);
    assert_eq!(state.view().seq(), seq);
    assert_eq!(state.store().log().durable_seq(), seq);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// Holds the admin's writes in flight: the admin's writer thread waits
/// (`AdminState::hold_writes`) until the returned guard is dropped. A PATCH
/// or DELETE then reserves its code (on a worker thread) and waits for the
/// writer to append: its code stays claimed until the guard is dropped.
/// Deterministic, no sleeps.
fn hold_writes(admin: &Admin) -> uload::admin::WritesHeld {
    admin.state.hold_writes()
}

fn one_blocking_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// Starts the write `make()` builds and returns its task once it holds
/// `code`: an empty PATCH of `code` (which writes nothing) answers 409
/// `conflict`. The probe itself holds the code for a moment, so the write
/// may lose that race and get 409 itself: it is then sent again. Bounded.
fn start_held(
    rt: &tokio::runtime::Runtime,
    admin: &Admin,
    code: &str,
    make: impl Fn() -> Request<Body>,
) -> tokio::task::JoinHandle<StatusCode> {
    let probe = format!("/api/links/{code}");
    for _ in 0..1000 {
        let app = admin.app.clone();
        let req = make();
        let task = rt.spawn(async move { app.oneshot(req).await.unwrap().status() });
        let held = rt.block_on(async {
            for _ in 0..100_000 {
                if task.is_finished() {
                    return false;
                }
                let r = admin.json("PATCH", &probe, json!({})).await;
                if r.status == StatusCode::CONFLICT {
                    assert_eq!(r.error(), ("conflict".into(), None));
                    return true;
                }
                assert_eq!(r.status, StatusCode::OK, "{}", r.json);
                tokio::task::yield_now().await;
            }
            panic!("the write neither held {code} nor finished");
        });
        if held {
            return task;
        }
        let status = rt.block_on(task).unwrap();
        assert_eq!(status, StatusCode::CONFLICT, "a held write finished");
    }
    panic!("the write never got hold of {code}");
}

fn authed(method: &str, path: &str, body: &str) -> Request<Body> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"));
    if !body.is_empty() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    req.body(Body::from(body.to_owned())).unwrap()
}

#[test]
fn overlapping_patches_and_deletes_of_one_code_get_409() {
    let rt = one_blocking_thread();
    let admin = Admin::new();
    rt.block_on(async {
        admin
            .create(json!({"url": "https://example.com/a", "code": "hot"}))
            .await;
        admin
            .create(json!({"url": "https://example.com/b", "code": "cold"}))
            .await;
    });
    let before = rt.block_on(admin.fingerprint());
    let release = hold_writes(&admin);
    let first = start_held(&rt, &admin, "hot", || {
        authed(
            "PATCH",
            "/api/links/hot",
            r#"{"url":"https://example.com/first"}"#,
        )
    });
    rt.block_on(async {
        // A second PATCH with a real change, and a DELETE: both 409.
        let r = admin
            .json(
                "PATCH",
                "/api/links/hot",
                json!({"url": "https://example.com/second"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CONFLICT);
        assert_eq!(r.error(), ("conflict".into(), None));
        assert!(
            r.json["error"]["message"]
                .as_str()
                .unwrap()
                .contains("retry")
        );
        let r = admin
            .send("DELETE", "/api/links/hot", &[], Vec::new())
            .await;
        assert_eq!(r.status, StatusCode::CONFLICT);
        assert_eq!(r.error(), ("conflict".into(), None));
        // Reads are not held up, and see the link as it was.
        let r = admin.send("GET", "/api/links/hot", &[], Vec::new()).await;
        assert_eq!(r.json["url"], "https://example.com/a");
        // Other codes are not held.
        let r = admin.json("PATCH", "/api/links/cold", json!({})).await;
        assert_eq!(r.status, StatusCode::OK);
        // Nothing was written by any of them.
        assert_eq!(admin.fingerprint().await, before);
    });
    drop(release);
    assert_eq!(rt.block_on(first).unwrap(), StatusCode::OK);
    rt.block_on(async {
        let after = admin.fingerprint().await;
        assert_eq!(after.durable_seq, before.durable_seq + 1);
        let r = admin.send("GET", "/api/links/hot", &[], Vec::new()).await;
        assert_eq!(r.json["url"], "https://example.com/first");
        // Once applied the code is free again.
        let r = admin
            .send("DELETE", "/api/links/hot", &[], Vec::new())
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
    });
}

#[test]
fn overlapping_deletes_of_one_code_get_409() {
    let rt = one_blocking_thread();
    let admin = Admin::new();
    rt.block_on(async {
        admin
            .create(json!({"url": "https://example.com/a", "code": "doomed"}))
            .await;
    });
    let before = rt.block_on(admin.fingerprint());
    let release = hold_writes(&admin);
    let first = start_held(&rt, &admin, "doomed", || {
        authed("DELETE", "/api/links/doomed", "")
    });
    rt.block_on(async {
        for _ in 0..3 {
            let r = admin
                .send("DELETE", "/api/links/doomed", &[], Vec::new())
                .await;
            assert_eq!(r.status, StatusCode::CONFLICT);
            assert_eq!(r.error(), ("conflict".into(), None));
        }
        let r = admin
            .json("PATCH", "/api/links/doomed", json!({"disabled": true}))
            .await;
        assert_eq!(r.status, StatusCode::CONFLICT);
        assert_eq!(r.error(), ("conflict".into(), None));
        // Re-creating it while the delete is in flight: the code is taken.
        let r = admin
            .json(
                "POST",
                "/api/links",
                json!({"url": "https://example.com/new", "code": "doomed"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CONFLICT);
        assert_eq!(r.error(), ("duplicate_code".into(), Some("code".into())));
        assert_eq!(admin.fingerprint().await, before);
    });
    drop(release);
    assert_eq!(rt.block_on(first).unwrap(), StatusCode::NO_CONTENT);
    rt.block_on(async {
        let after = admin.fingerprint().await;
        assert_eq!(after.durable_seq, before.durable_seq + 1);
        assert!(after.links.is_empty());
        let r = admin
            .send("DELETE", "/api/links/doomed", &[], Vec::new())
            .await;
        assert_eq!(r.error(), ("not_found".into(), None));
        admin
            .create(json!({"url": "https://example.com/new", "code": "doomed"}))
            .await;
    });
}
