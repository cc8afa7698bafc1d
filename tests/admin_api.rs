//! The admin API against real data dirs in temp directories: every route,
//! every refusal (with its JSON error body, and proof the store did not
//! change), concurrency, restart, the writer lock, compaction, and one run
//! of `serve` on a real loopback listener spoken to in raw HTTP/1.1.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;
use uload::admin::{AdminError, AdminState, app, serve};
use uload::config::{Config, hash_api_key};
use uload::store::{DataDir, StoreError};

const KEY: &str = "test-key-0123456789abcdef";
const OTHER_KEY: &str = "another-key-0123456789";
const MAX_BODY: usize = 4096;

fn config(dir: &Path, extra_admin: &str) -> Config {
    let yaml = format!(
        "data_dir: {}\npublic_base_url: https://ulo.ad/\nadmin:\n  api_key: {KEY}\n  max_body_bytes: {MAX_BODY}\n  max_bulk: 10\n{extra_admin}",
        dir.display()
    );
    Config::from_yaml_str(&yaml, "test", &[]).unwrap()
}

/// A data dir with an admin on it.
struct Admin {
    dir: TempDir,
    config: Config,
    state: AdminState,
    app: Router,
}

impl Admin {
    fn new() -> Self {
        Self::with("")
    }

    fn with(extra_admin: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), extra_admin);
        let state = AdminState::open(&config).unwrap();
        let app = app(state.clone());
        Self {
            dir,
            config,
            state,
            app,
        }
    }

    /// Drops the state and opens the data dir again, as after a restart.
    fn restart(self) -> Self {
        let Self {
            dir,
            config,
            state,
            app: router,
        } = self;
        drop(router);
        drop(state);
        let state = AdminState::open(&config).unwrap();
        let app = app(state.clone());
        Self {
            dir,
            config,
            state,
            app,
        }
    }

    /// (seq, links) of the admin's view.
    fn counts(&self) -> (u64, u64) {
        let v = self.state.view();
        (v.seq(), v.len())
    }

    async fn call(&self, method: &str, path: &str, body: Option<&str>) -> Reply {
        self.send(method, path, Some(KEY), Some("application/json"), body)
            .await
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        content_type: Option<&str>,
        body: Option<&str>,
    ) -> Reply {
        let mut req = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(path);
        if let Some(k) = key {
            req = req.header(header::AUTHORIZATION, format!("Bearer {k}"));
        }
        if let (Some(ct), Some(_)) = (content_type, body) {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let req = req.body(Body::from(body.unwrap_or("").to_owned())).unwrap();
        let res = self.app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("{method} {path}: body is not JSON ({e}): {bytes:?}"))
        };
        Reply {
            status,
            json,
            headers,
        }
    }

    async fn create(&self, body: Value) -> Value {
        let r = self
            .call("POST", "/api/links", Some(&body.to_string()))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{body}: {}", r.json);
        r.json
    }
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    json: Value,
    headers: HeaderMap,
}

impl Reply {
    /// Asserts the stable error shape and returns (code, field).
    fn error(&self) -> (String, Option<String>) {
        common::api_error(&self.json)
    }
}

#[tokio::test]
async fn create_get_patch_delete_round_trip() {
    let admin = Admin::new();

    // Generated code: 7 base62 characters.
    let made = admin
        .create(json!({"url": "https://example.com/a?x=1"}))
        .await;
    let code = made["code"].as_str().unwrap().to_owned();
    assert_eq!(code.len(), 7);
    assert!(code.bytes().all(|b| b.is_ascii_alphanumeric()), "{code}");
    assert_eq!(made["short_url"], format!("https://ulo.ad/{code}"));
    assert_eq!(made["url"], "https://example.com/a?x=1");
    assert_eq!(made["status"], 302);
    assert_eq!(made["expires_at"], Value::Null);
    assert_eq!(made["max_clicks"], Value::Null);
    assert_eq!(made["forward_query"], false);
    assert_eq!(made["disabled"], false);
    assert!(made["created_at"].as_str().unwrap().ends_with('Z'));

    // Custom code with every field.
    let custom = admin
        .create(json!({
            "url": "https://example.org/",
            "code": "My-Link_1",
            "status": 308,
            "expires_at": "2030-01-02T03:04:05Z",
            "max_clicks": 10,
            "forward_query": true,
            "disabled": true,
        }))
        .await;
    assert_eq!(custom["code"], "My-Link_1");
    assert_eq!(custom["short_url"], "https://ulo.ad/My-Link_1");
    assert_eq!(custom["status"], 308);
    assert_eq!(custom["expires_at"], "2030-01-02T03:04:05.000Z");
    assert_eq!(custom["max_clicks"], 10);
    assert_eq!(custom["forward_query"], true);
    assert_eq!(custom["disabled"], true);

    let got = admin.call("GET", &format!("/api/links/{code}"), None).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json, made);
    let got = admin.call("GET", "/api/links/My-Link_1", None).await;
    assert_eq!(got.json, custom);

    // PATCH: change some fields, clear others, keep the rest.
    let patched = admin
        .call(
            "PATCH",
            "/api/links/My-Link_1",
            Some(r#"{"url":"https://example.net/new","status":301,"expires_at":null,"max_clicks":null,"disabled":false}"#),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.json);
    assert_eq!(patched.json["url"], "https://example.net/new");
    assert_eq!(patched.json["status"], 301);
    assert_eq!(patched.json["expires_at"], Value::Null);
    assert_eq!(patched.json["max_clicks"], Value::Null);
    assert_eq!(patched.json["disabled"], false);
    assert_eq!(patched.json["forward_query"], true);
    assert_eq!(patched.json["created_at"], custom["created_at"]);
    let got = admin.call("GET", "/api/links/My-Link_1", None).await;
    assert_eq!(got.json, patched.json);
    let patched = admin
        .call(
            "PATCH",
            "/api/links/My-Link_1",
            Some(r#"{"max_clicks":3,"expires_at":"2031-05-06T07:08:09.123+02:00"}"#),
        )
        .await;
    assert_eq!(patched.json["max_clicks"], 3);
    assert_eq!(patched.json["expires_at"], "2031-05-06T05:08:09.123Z");
    // An empty PATCH changes nothing and writes nothing.
    let before = admin.counts();
    let same = admin
        .call("PATCH", "/api/links/My-Link_1", Some("{}"))
        .await;
    assert_eq!(same.json, patched.json);
    assert_eq!(admin.counts(), before);

    let deleted = admin.call("DELETE", "/api/links/My-Link_1", None).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_eq!(deleted.json, Value::Null);
    let gone = admin.call("GET", "/api/links/My-Link_1", None).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    assert_eq!(gone.error().0, "not_found");
    let again = admin.call("DELETE", "/api/links/My-Link_1", None).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    let patch_gone = admin
        .call("PATCH", "/api/links/My-Link_1", Some(r#"{"status":302}"#))
        .await;
    assert_eq!(patch_gone.status, StatusCode::NOT_FOUND);
    // The code is free again.
    admin
        .create(json!({"url": "https://example.org/again", "code": "My-Link_1"}))
        .await;

    // The link's owner is the caller's key id.
    let admin = admin.restart();
    let view = DataDir::new(admin.dir.path()).load_view(true).unwrap();
    let link = view.get(code.as_bytes()).unwrap();
    let hash = hash_api_key(KEY);
    assert_eq!(
        link.owner_key_id,
        u64::from_le_bytes(hash[..8].try_into().unwrap())
    );
}

#[tokio::test]
async fn health_needs_no_key() {
    let admin = Admin::new();
    admin.create(json!({"url": "https://example.com/"})).await;
    let r = admin.send("GET", "/api/health", None, None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json,
        json!({"status": "ok", "seq": 1, "links": 1, "writable": true})
    );
}

#[tokio::test]
async fn list_pages_neither_repeat_nor_skip_while_links_are_added() {
    let admin = Admin::new();
    let original: Vec<String> = (0..25).map(|i| format!("k{:02}", i * 2)).collect();
    for code in &original {
        admin
            .create(json!({"url": format!("https://example.com/{code}"), "code": code}))
            .await;
    }
    let empty = admin.call("GET", "/api/links?limit=1000", None).await;
    assert_eq!(empty.json["links"].as_array().unwrap().len(), 25);
    assert_eq!(empty.json["next_cursor"], Value::Null);

    let mut seen: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/links?limit=4&cursor={c}"),
            None => "/api/links?limit=4".to_owned(),
        };
        let page = admin.call("GET", &path, None).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.json);
        let links = page.json["links"].as_array().unwrap();
        assert!(links.len() <= 4);
        for l in links {
            assert_eq!(
                l["short_url"],
                format!("https://ulo.ad/{}", l["code"].as_str().unwrap())
            );
            seen.push(l["code"].as_str().unwrap().to_owned());
        }
        pages += 1;
        // Insert before and after the cursor between pages.
        admin
            .create(json!({"url": "https://example.com/", "code": format!("k{:02}a", pages)}))
            .await;
        admin
            .create(json!({"url": "https://example.com/", "code": format!("a{pages:02}")}))
            .await;
        match &page.json["next_cursor"] {
            Value::Null => break,
            Value::String(c) => {
                assert_eq!(Some(c), seen.last());
                cursor = Some(c.clone());
            }
            other => panic!("next_cursor {other}"),
        }
        assert!(pages < 50, "paging does not end");
    }
    assert!(pages >= 7, "{pages} pages");
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, seen, "pages are in code order, without repeats");
    for code in &original {
        assert!(seen.contains(code), "{code} was skipped");
    }

    // Default limit, and refused parameters.
    let all = admin.call("GET", "/api/links", None).await;
    let total = all.json["links"].as_array().unwrap().len() as u64;
    assert_eq!(total, admin.counts().1.min(100));
    for (query, code) in [
        ("limit=0", "invalid_limit"),
        ("limit=1001", "invalid_limit"),
        ("limit=ten", "invalid_limit"),
        ("cursor=a%2Fb", "invalid_cursor"),
        ("cursor=%0D%0A", "invalid_cursor"),
        ("offset=3", "invalid_query"),
    ] {
        let r = admin
            .call("GET", &format!("/api/links?{query}"), None)
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(r.error().0, code, "{query}");
    }
}

#[tokio::test]
async fn bulk_reports_each_item_and_appends_once() {
    let admin = Admin::new();
    admin
        .create(json!({"url": "https://example.com/", "code": "taken"}))
        .await;
    let before = admin.counts();
    let syncs = admin.state.store().log().sync_count();
    let body = json!({"links": [
        {"url": "https://example.com/1", "code": "bulk-1"},
        {"url": "https://example.com/2"},
        {"url": "https://example.com/3", "code": "taken"},
        {"url": "javascript:alert(1)"},
        {"url": "https://example.com/5", "code": "bulk-1"},
        {"url": "https://example.com/6", "bogus": true},
        {"url": "https://example.com/7", "code": "Admin"},
        {"url": "https://example.com/8", "status": 200},
        "not an object",
        {"url": "https://example.com/10", "code": "bulk"},
    ]});
    let r = admin
        .call("POST", "/api/links/bulk", Some(&body.to_string()))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    let results = r.json["results"].as_array().unwrap();
    assert_eq!(results.len(), 10);
    let expect: [(u16, Option<&str>); 10] = [
        (201, None),
        (201, None),
        (409, Some("duplicate_code")),
        (400, Some("invalid_url")),
        (409, Some("duplicate_code")),
        (400, Some("unknown_field")),
        (400, Some("reserved_code")),
        (400, Some("invalid_status")),
        (400, Some("invalid_type")),
        (201, None),
    ];
    for (i, (item, (status, code))) in results.iter().zip(expect).enumerate() {
        assert_eq!(item["index"], i, "{item}");
        assert_eq!(item["status"], status, "{item}");
        match code {
            None => {
                let link = &item["link"];
                let got = admin
                    .call(
                        "GET",
                        &format!("/api/links/{}", link["code"].as_str().unwrap()),
                        None,
                    )
                    .await;
                assert_eq!(&got.json, link);
            }
            Some(code) => {
                assert_eq!(item["error"]["code"], code, "{item}");
                assert!(item["error"]["message"].is_string());
                assert!(item.get("link").is_none());
            }
        }
    }
    assert_eq!(results[5]["error"]["field"], "bogus");
    // One append of three records, one fsync.
    assert_eq!(admin.counts(), (before.0 + 3, before.1 + 3));
    assert_eq!(admin.state.store().log().sync_count(), syncs + 1);
    // A link named "bulk" is still an ordinary link.
    let named = admin.call("GET", "/api/links/bulk", None).await;
    assert_eq!(named.json["url"], "https://example.com/10");
    let deleted = admin.call("DELETE", "/api/links/bulk", None).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);

    // Too many items: refused whole, nothing written.
    let before = admin.counts();
    let many: Vec<Value> = (0..11)
        .map(|i| json!({"url": format!("https://example.com/{i}")}))
        .collect();
    let r = admin
        .call(
            "POST",
            "/api/links/bulk",
            Some(&json!({"links": many}).to_string()),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error(), ("too_many_links".into(), Some("links".into())));
    assert_eq!(admin.counts(), before);
    // POST to any other code is not a route.
    let r = admin.call("POST", "/api/links/abc", Some("{}")).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.error().0, "method_not_allowed");
}

#[tokio::test]
async fn every_refusal_has_a_json_error_and_changes_nothing() {
    let admin = Admin::new();
    let existing = admin
        .create(json!({"url": "https://example.com/", "code": "exists"}))
        .await;
    let before = admin.counts();
    let big = format!(
        r#"{{"url":"https://example.com/{}"}}"#,
        "x".repeat(MAX_BODY)
    );
    let long_url = format!(r#"{{"url":"https://example.com/{}"}}"#, "y".repeat(2100));
    let key = Some(KEY);
    let json_ct = Some("application/json");
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
        Option<&'a str>,
        u16,
        &'a str,
        Option<&'a str>,
    );
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"url":"not a url"}"#),
            400,
            "invalid_url",
            Some("url"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"url":"example.com/x"}"#),
            400,
            "invalid_url",
            Some("url"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"url":"https://a.example/\r\nSet-Cookie: x=1"}"#),
            400,
            "invalid_url",
            Some("url"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"url":"https://a.example/\u0000"}"#),
            400,
            "invalid_url",
            Some("url"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"url":"javascript:alert(1)"}"#),
            400,
            "invalid_url",
            Some("url"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"url":"data:text/html,<script>alert(1)</script>"}"#),
            400,
            "invalid_url",
            Some("url"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"url":"https://"}"#),
            400,
            "invalid_url",
            Some("url"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(&long_url),
            400,
            "invalid_url",
            Some("url"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"url":"https://a.example/","code":"api"}"#),
            400,
            "reserved_code",
            Some("code"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"url":"https://a.example/","code":"HEALTH"}"#),
            400,
            "reserved_code",
            Some("code"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"url":"https://a.example/","code":"robots.txt"}"#),
            400,
            "reserved_code",
            Some("code"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"url":"https://a.example/","code":"a/b"}"#),
            400,
            "invalid_code",
            Some("code"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"url":"https://a.example/","code":"héllo"}"#),
            400,
            "invalid_code",
            Some("code"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"url":"https://a.example/","code":""}"#),
            400,
            "invalid_code",
            Some("code"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"url":"https://a.example/","code":"exists"}"#),
            409,
            "duplicate_code",
            Some("code"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"url":"https://a.example/","status":200}"#),
            400,
            "invalid_status",
            Some("status"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"url":"https://a.example/","status":303}"#),
            400,
            "invalid_status",
            Some("status"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"url":"https://a.example/","max_clicks":0}"#),
            400,
            "invalid_max_clicks",
            Some("max_clicks"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"url":"https://a.example/","expires_at":"tomorrow"}"#),
            400,
            "invalid_expires_at",
            Some("expires_at"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"url":"https://a.example/","bogus":1}"#),
            400,
            "unknown_field",
            Some("bogus"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"url":5}"#),
            400,
            "invalid_type",
            Some("url"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"url":"https://a.example/","max_clicks":-1}"#),
            400,
            "invalid_type",
            Some("max_clicks"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"url":"https://a.example/","disabled":"yes"}"#),
            400,
            "invalid_type",
            Some("disabled"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"code":"abc"}"#),
            400,
            "missing_field",
            Some("url"),
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"["https://a.example/"]"#),
            400,
            "invalid_type",
            None,
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some("{"),
            400,
            "invalid_json",
            None,
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(""),
            400,
            "invalid_json",
            None,
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(r#"{"url":"https://a.example/"} trailing"#),
            400,
            "invalid_json",
            None,
        ),
        (
            "POST",
            "/api/links",
            key,
            Some("text/plain"),
            Some(r#"{"url":"https://a.example/"}"#),
            400,
            "invalid_content_type",
            None,
        ),
        (
            "POST",
            "/api/links",
            key,
            None,
            Some(r#"{"url":"https://a.example/"}"#),
            400,
            "invalid_content_type",
            None,
        ),
        (
            "POST",
            "/api/links",
            key,
            json_ct,
            Some(&big),
            413,
            "body_too_large",
            None,
        ),
        (
            "POST",
            "/api/links",
            None,
            json_ct,
            Some(r#"{"url":"https://a.example/"}"#),
            401,
            "unauthorized",
            None,
        ),
        (
            "POST",
            "/api/links",
            Some("wrong-key-0123456789"),
            json_ct,
            Some(r#"{"url":"https://a.example/"}"#),
            401,
            "unauthorized",
            None,
        ),
        (
            "PATCH",
            "/api/links/exists",
            key,
            json_ct,
            Some(r#"{"url":"javascript:alert(1)"}"#),
            400,
            "invalid_url",
            Some("url"),
        ),
        (
            "PATCH",
            "/api/links/exists",
            key,
            json_ct,
            Some(r#"{"url":null}"#),
            400,
            "invalid_type",
            Some("url"),
        ),
        (
            "PATCH",
            "/api/links/exists",
            key,
            json_ct,
            Some(r#"{"code":"other"}"#),
            400,
            "unknown_field",
            Some("code"),
        ),
        (
            "PATCH",
            "/api/links/exists",
            key,
            json_ct,
            Some(r#"{"status":404}"#),
            400,
            "invalid_status",
            Some("status"),
        ),
        (
            "PATCH",
            "/api/links/exists",
            key,
            json_ct,
            Some(r#"{"max_clicks":0}"#),
            400,
            "invalid_max_clicks",
            Some("max_clicks"),
        ),
        (
            "PATCH",
            "/api/links/exists",
            None,
            json_ct,
            Some(r#"{"status":301}"#),
            401,
            "unauthorized",
            None,
        ),
        (
            "PATCH",
            "/api/links/missing",
            key,
            json_ct,
            Some(r#"{"status":301}"#),
            404,
            "not_found",
            None,
        ),
        (
            "DELETE",
            "/api/links/exists",
            None,
            None,
            None,
            401,
            "unauthorized",
            None,
        ),
        (
            "DELETE",
            "/api/links/exists",
            Some(OTHER_KEY),
            None,
            None,
            401,
            "unauthorized",
            None,
        ),
        (
            "DELETE",
            "/api/links/missing",
            key,
            None,
            None,
            404,
            "not_found",
            None,
        ),
        (
            "DELETE",
            "/api/links/a%2Fb",
            key,
            None,
            None,
            404,
            "not_found",
            None,
        ),
        ("GET", "/api/nope", key, None, None, 404, "not_found", None),
        (
            "GET",
            "/api/nope",
            None,
            None,
            None,
            401,
            "unauthorized",
            None,
        ),
        ("GET", "/api", key, None, None, 404, "not_found", None),
        (
            "GET",
            "/elsewhere",
            None,
            None,
            None,
            404,
            "not_found",
            None,
        ),
        (
            "PUT",
            "/api/links/exists",
            key,
            json_ct,
            Some("{}"),
            405,
            "method_not_allowed",
            None,
        ),
        (
            "DELETE",
            "/api/links",
            key,
            None,
            None,
            405,
            "method_not_allowed",
            None,
        ),
        // Without a key, the key is asked for first: which methods a route
        // takes is not told.
        (
            "PUT",
            "/api/links/exists",
            None,
            json_ct,
            Some("{}"),
            401,
            "unauthorized",
            None,
        ),
        (
            "DELETE",
            "/api/links",
            Some("wrong-key-0123456789"),
            None,
            None,
            401,
            "unauthorized",
            None,
        ),
        (
            "OPTIONS",
            "/api/links/exists",
            None,
            None,
            None,
            401,
            "unauthorized",
            None,
        ),
        // /api/health needs no key for its GET, nor to be told it has no
        // other method.
        (
            "POST",
            "/api/health",
            None,
            None,
            None,
            405,
            "method_not_allowed",
            None,
        ),
    ];
    for (method, path, key, ct, body, status, code, field) in cases {
        let r = admin.send(method, path, key, ct, body).await;
        let what = format!("{method} {path} {body:?}");
        assert_eq!(r.status.as_u16(), status, "{what}: {}", r.json);
        assert_eq!(
            r.error(),
            (code.to_owned(), field.map(str::to_owned)),
            "{what}"
        );
        if status == 405 {
            // With a key (or on /api/health), a 405 says what the route takes.
            assert!(r.headers.contains_key(header::ALLOW), "{what}");
        }
        if status == 401 {
            assert!(r.headers.contains_key(header::WWW_AUTHENTICATE), "{what}");
            // axum's method router adds `Allow` to what a route's
            // method-not-allowed fallback answers, the 401 included.
            assert!(
                !r.headers.contains_key(header::ALLOW),
                "{what}: a 401 names the route's methods: {:?}",
                r.headers
            );
        }
        assert_eq!(admin.counts(), before, "{what} changed the store");
    }

    // A wrong key learns nothing: an existing and a missing link, a route
    // and no route, a method a route takes and one it does not, all get the
    // same answer, headers and body.
    let mut answers = Vec::new();
    for path in [
        "/api/links/exists",
        "/api/links/missing",
        "/api/links",
        "/api/no-such-route",
    ] {
        for method in ["GET", "PUT"] {
            for key in [None, Some("wrong-key-0123456789")] {
                let r = admin.send(method, path, key, None, None).await;
                assert_eq!(r.status, StatusCode::UNAUTHORIZED);
                let mut headers: Vec<String> = r
                    .headers
                    .iter()
                    .map(|(n, v)| format!("{n}: {v:?}"))
                    .collect();
                headers.sort();
                answers.push((format!("{method} {path}"), headers, r.json));
            }
        }
    }
    for (what, headers, body) in &answers {
        assert_eq!(
            (headers, body),
            (&answers[0].1, &answers[0].2),
            "{what} vs {}",
            answers[0].0
        );
    }

    // The existing link is untouched, on disk too.
    let got = admin.call("GET", "/api/links/exists", None).await;
    assert_eq!(got.json, existing);
    let admin = admin.restart();
    assert_eq!(admin.counts(), before);
    drop(admin.state);
    drop(admin.app);
    let view = DataDir::new(admin.dir.path()).load_view(true).unwrap();
    assert_eq!((view.seq(), view.len()), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_of_one_code_give_one_winner() {
    let admin = Admin::new();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let app = admin.app.clone();
        tasks.push(tokio::spawn(async move {
            let body = json!({"url": format!("https://example.com/{i}"), "code": "contested"});
            let req = Request::post("/api/links")
                .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string()))
                .unwrap();
            app.oneshot(req).await.unwrap().status()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let created = statuses
        .iter()
        .filter(|s| **s == StatusCode::CREATED)
        .count();
    let conflicts = statuses
        .iter()
        .filter(|s| **s == StatusCode::CONFLICT)
        .count();
    assert_eq!((created, conflicts), (1, 15), "{statuses:?}");
    assert_eq!(admin.counts(), (1, 1));
}

/// 64 creates at once share one fsync, and each is readable once
/// acknowledged. Deterministic, no timing: the admin's writer thread is held
/// (`hold_writes`) while the creates are sent, until every one's code is in
/// flight (an empty PATCH of it answers 409 `conflict`, 404 before). On this
/// one-thread runtime a create reserves its code and queues its write in one
/// poll, so in flight means queued. Let go, the writer takes all 64 queued
/// writes as one batch: one append, one fsync (an admin appending each
/// write on its own makes 64).
#[test]
fn concurrent_creates_share_fsyncs_and_are_all_readable() {
    const N: usize = 64;
    let admin = Admin::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let syncs = admin.state.store().log().sync_count();
    let held = admin.state.hold_writes();
    let codes: Vec<String> = (0..N).map(|i| format!("c{i:03}")).collect();
    let tasks: Vec<_> = codes
        .iter()
        .enumerate()
        .map(|(i, code)| {
            let app = admin.app.clone();
            let code = code.clone();
            rt.spawn(async move {
                let body = json!({"url": format!("https://example.com/{i}"), "code": code});
                let req = Request::post("/api/links")
                    .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(body.to_string()))
                    .unwrap();
                let status = app.clone().oneshot(req).await.unwrap().status();
                assert_eq!(status, StatusCode::CREATED);
                // Read-your-writes: acknowledged means visible.
                let req = Request::get(format!("/api/links/{code}"))
                    .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
                    .body(Body::empty())
                    .unwrap();
                assert_eq!(app.oneshot(req).await.unwrap().status(), StatusCode::OK);
            })
        })
        .collect();
    // A bound only so that a create that never queues fails instead of
    // hanging CI; on a working admin every code is in flight at once.
    let hang = Instant::now() + Duration::from_secs(120);
    rt.block_on(async {
        for code in &codes {
            loop {
                // A create answered (or failed) while writes are held would
                // leave its code out of flight for good.
                assert!(
                    !tasks.iter().any(|t| t.is_finished()),
                    "a create finished while the writer was held"
                );
                assert!(Instant::now() < hang, "{code} never in flight");
                let probe = admin
                    .call("PATCH", &format!("/api/links/{code}"), Some("{}"))
                    .await;
                match probe.status {
                    StatusCode::CONFLICT => break,
                    StatusCode::NOT_FOUND => tokio::task::yield_now().await,
                    other => panic!("PATCH {code} while held: {other} {}", probe.json),
                }
            }
        }
    });
    drop(held);
    rt.block_on(async {
        for t in tasks {
            t.await.unwrap();
        }
    });
    assert_eq!(
        admin.state.store().log().sync_count() - syncs,
        1,
        "the {N} creates queued behind the held writer share one fsync"
    );
    assert_eq!(admin.counts(), (64, 64));
    let admin = admin.restart();
    assert_eq!(admin.counts(), (64, 64));
}

#[tokio::test]
async fn restart_keeps_every_acknowledged_link() {
    let admin = Admin::new();
    let mut expected = Vec::new();
    for i in 0..20 {
        expected.push(
            admin
                .create(json!({"url": format!("https://example.com/{i}"), "max_clicks": i + 1}))
                .await,
        );
    }
    let bulk = admin
        .call(
            "POST",
            "/api/links/bulk",
            Some(&json!({"links": [{"url": "https://b.example/1"}, {"url": "https://b.example/2", "code": "b2"}]}).to_string()),
        )
        .await;
    for r in bulk.json["results"].as_array().unwrap() {
        expected.push(r["link"].clone());
    }
    let patched = admin
        .call("PATCH", "/api/links/b2", Some(r#"{"forward_query":true}"#))
        .await;
    *expected.last_mut().unwrap() = patched.json;
    let gone = expected.remove(0);
    admin
        .call(
            "DELETE",
            &format!("/api/links/{}", gone["code"].as_str().unwrap()),
            None,
        )
        .await;
    let counts = admin.counts();

    let admin = admin.restart();
    assert_eq!(admin.counts(), counts);
    for link in &expected {
        let got = admin
            .call(
                "GET",
                &format!("/api/links/{}", link["code"].as_str().unwrap()),
                None,
            )
            .await;
        assert_eq!(&got.json, link);
    }
    let got = admin
        .call(
            "GET",
            &format!("/api/links/{}", gone["code"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_second_admin_on_the_same_dir_is_refused() {
    let admin = Admin::new();
    let err = match AdminState::open(&admin.config) {
        Ok(_) => panic!("a second writer opened the data dir"),
        Err(e) => e,
    };
    assert!(
        matches!(err, AdminError::Store(StoreError::Locked { .. })),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("locked by another writer"),
        "{err}"
    );
    // Once the first is gone, the dir opens again.
    let dir = admin.dir;
    drop(admin.app);
    drop(admin.state);
    AdminState::open(&admin.config).unwrap();
    drop(dir);
}

#[tokio::test]
async fn compaction_runs_in_the_background_and_keeps_every_link() {
    let admin = Admin::with("  compact_every_records: 5\n");
    let mut codes = Vec::new();
    for i in 0..12 {
        let link = admin
            .create(json!({"url": format!("https://example.com/{i}")}))
            .await;
        codes.push(link["code"].as_str().unwrap().to_owned());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while admin.state.is_compacting() || admin.state.view().snapshot_seq() == 0 {
        assert!(Instant::now() < deadline, "no compaction happened");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(admin.state.view().snapshot_seq() >= 5);
    admin
        .call("DELETE", &format!("/api/links/{}", codes.remove(0)), None)
        .await;
    // The delete may have started another background compaction: let it end.
    while admin.state.is_compacting() {
        assert!(Instant::now() < deadline, "compaction does not end");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // An explicit compaction folds the rest in.
    let report = admin.state.compact().await.unwrap();
    assert!(report.is_some());
    let view = admin.state.view();
    assert_eq!(view.snapshot_seq(), view.seq());
    assert_eq!(view.overlay_len(), 0);
    assert_eq!(view.len(), 11);
    for code in &codes {
        let got = admin.call("GET", &format!("/api/links/{code}"), None).await;
        assert_eq!(got.status, StatusCode::OK);
    }
    let admin = admin.restart();
    assert_eq!(admin.counts().1, 11);
    let listed = admin.call("GET", "/api/links", None).await;
    let listed: BTreeSet<&str> = listed.json["links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["code"].as_str().unwrap())
        .collect();
    assert_eq!(listed, codes.iter().map(String::as_str).collect());
}

/// One HTTP/1.1 exchange over a fresh connection (`Connection: close`).
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8(response).unwrap();
    let (head, rest) = text.split_once("\r\n\r\n").expect("a header block");
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let lower = head.to_ascii_lowercase();
    let body = if lower.contains("transfer-encoding: chunked") {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    let json = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&body).unwrap()
    };
    (status, json)
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

#[tokio::test]
async fn serves_http_on_a_real_listener_and_shuts_down_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "");
    let state = AdminState::open(&config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state, async {
        let _ = stopped.await;
    }));

    let (status, health) = http(addr, "GET", "/api/health", None).await;
    assert_eq!(
        (status, health),
        (
            200,
            json!({"status":"ok","seq":0,"links":0,"writable":true})
        )
    );
    let (status, made) = http(
        addr,
        "POST",
        "/api/links",
        Some(r#"{"url":"https://example.com/over-tcp","code":"tcp"}"#),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    assert_eq!(made["short_url"], "https://ulo.ad/tcp");
    let (status, got) = http(addr, "GET", "/api/links/tcp", None).await;
    assert_eq!((status, &got), (200, &made));
    let (status, err) = http(addr, "POST", "/api/links", Some("{oops")).await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["code"], "invalid_json");
    let (status, _) = http(addr, "DELETE", "/api/links/tcp", None).await;
    assert_eq!(status, 204);

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    // The server let go of the store: the dir opens again. The health
    // check's background write probe (a thread holding the state while it
    // writes and fsyncs its file) may still be finishing on a busy machine,
    // so the lock is waited for, within a bound.
    let deadline = Instant::now() + Duration::from_secs(30);
    let state = loop {
        match AdminState::open(&config) {
            Ok(state) => break state,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the data dir stayed locked after the server stopped: {e}"),
        }
    };
    assert_eq!(state.view().len(), 0);
    assert_eq!(state.view().seq(), 2);
}

/// `/api/health` degraded by its write probe alone (no client write has
/// failed yet) names the error code a write would get, next to the probe's
/// reason: the probe is there so that a failing disk shows before a
/// client's write does (`error` was `null` until an append failed).
#[tokio::test]
async fn a_failing_write_probe_names_its_error_code() {
    let dir = tempfile::tempdir().unwrap();
    let state = AdminState::open(&config(dir.path(), "")).unwrap();
    // The probe's file cannot be created: a directory holds its name.
    std::fs::create_dir(dir.path().join("log/.health-probe")).unwrap();
    let app = app(state);
    let mut last = Value::Null;
    // The probe runs in the background: ask until it has answered (bounded).
    for _ in 0..1_000_000u32 {
        let res = app
            .clone()
            .oneshot(Request::get("/api/health").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
        last = serde_json::from_slice(&bytes).unwrap();
        if last["status"] == "degraded" {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(last["status"], "degraded", "{last}");
    assert_eq!(last["writable"], false, "{last}");
    assert!(last["write_probe"].is_string(), "{last}");
    // Not a full disk: a directory in the way is a storage error.
    assert_eq!(last["error"], "storage_error", "{last}");
}

/// `uload api-key`, through the real binary: `uload api-key`'s output, with
/// stdin given.
fn uload_api_key(args: &[&str], stdin: &str) -> std::process::Output {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_uload"))
        .arg("api-key")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// A key `uload api-key` makes works as soon as its hash is in
/// `admin.api_key_hashes`, and the key is nowhere in the config; `--from-stdin`
/// gives the same hash for it; two keys are never alike; a key the config
/// would refuse is refused there too.
#[tokio::test]
async fn a_key_from_uload_api_key_authenticates_by_its_hash() {
    let out = uload_api_key(&[], "");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {stdout:?}"))
            .trim()
            .to_owned()
    };
    let (key, hash) = (field("key:"), field("hash:"));
    assert_eq!(key.len(), 43, "{key}");
    assert!(key.bytes().all(|b| b.is_ascii_alphanumeric()), "{key}");
    assert_eq!(hash, uload::config::format_key_hash(&hash_api_key(&key)));

    let admin = Admin::with(&format!("  api_key_hashes: [\"{hash}\"]\n"));
    let reply = admin
        .send(
            "POST",
            "/api/links",
            Some(&key),
            Some("application/json"),
            Some(r#"{"url":"https://example.com/","code":"bykey"}"#),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
    let wrong = format!("{}x", &key[..42]);
    let reply = admin
        .send("GET", "/api/links/bykey", Some(&wrong), None, None)
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);

    for line_end in ["\n", "\r\n", ""] {
        let out = uload_api_key(&["--from-stdin"], &format!("{key}{line_end}"));
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{hash}\n"));
    }
    let again = uload_api_key(&[], "");
    assert!(!String::from_utf8(again.stdout).unwrap().contains(&key));
    for refused in ["short\n", " leading-space-0123456789\n"] {
        let out = uload_api_key(&["--from-stdin"], refused);
        assert!(!out.status.success(), "{refused:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{out:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.contains("standard input: the key must"), "{stderr}");
    }
}
