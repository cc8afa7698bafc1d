//! The handlers of the admin API, one per route. Each validates its input,
//! then goes through [`AdminState`]'s write path (reserve, append, apply) or
//! reads its lock-free view. Routes are listed in [`super::app`] and
//! documented in `docs/api.md`.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::{StatusCode, Uri, request::Parts};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::Caller;
use super::error::{ApiError, ErrorCode};
use super::json::{JsonBody, check_content_type, from_value, parse_json, read_body};
use super::links::{CreateLink, LinkBody, NewLink, UpdateLink};
use super::state::AdminState;
use crate::store::LogOp;
use crate::store::record::{Link, now_ms, validate_code};

/// Links per page when `limit` is not given.
pub const DEFAULT_PAGE: usize = 100;
/// Largest `limit` accepted.
pub const MAX_PAGE: usize = 1000;

fn body(state: &AdminState, link: &Link) -> LinkBody {
    LinkBody::new(&link.as_ref(), &state.settings().public_base_url)
}

/// The `{code}` of a path. A segment that does not decode (percent-escapes
/// of bytes that are not UTF-8) or is a code the store could never hold
/// names no link: 404, like any other missing link.
pub struct CodePath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for CodePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(code) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::not_found())?;
        validate_code(code.as_bytes()).map_err(|_| ApiError::not_found())?;
        Ok(Self(code))
    }
}

/// Reserves a code for `new` (its own, or a generated one) and fills it in.
fn claim(claims: &mut super::state::Claims<'_>, new: NewLink) -> Result<Link, ApiError> {
    let mut link = new.link;
    link.code = match new.code {
        Some(code) => {
            claims.new_code(&code)?;
            code
        }
        None => claims.generated_code()?,
    };
    Ok(link)
}

/// `POST /api/links`
pub async fn create_link(
    State(state): State<AdminState>,
    caller: Caller,
    JsonBody(req): JsonBody<CreateLink>,
) -> Result<(StatusCode, Json<LinkBody>), ApiError> {
    let new = req.validate(caller.key_id, now_ms(), state.settings().default_status)?;
    let (reservation, link) = state.reserve(|claims| claim(claims, new));
    let link = link?;
    state
        .commit(reservation, vec![LogOp::Put(link.clone())])
        .await?;
    tracing::info!(code = %link.code, owner = caller.key_id, "admin: link created");
    Ok((StatusCode::CREATED, Json(body(&state, &link))))
}

/// `GET /api/links/{code}`
pub async fn get_link(
    State(state): State<AdminState>,
    _: Caller,
    CodePath(code): CodePath,
) -> Result<Json<LinkBody>, ApiError> {
    let code = code.as_str();
    let view = state.view();
    let link = view.get(code.as_bytes()).ok_or_else(ApiError::not_found)?;
    Ok(Json(LinkBody::new(
        &link,
        &state.settings().public_base_url,
    )))
}

/// `PATCH /api/links/{code}`
pub async fn update_link(
    State(state): State<AdminState>,
    _: Caller,
    CodePath(code): CodePath,
    JsonBody(req): JsonBody<UpdateLink>,
) -> Result<Json<LinkBody>, ApiError> {
    let code = code.as_str();
    let changes = req.validate()?;
    let (reservation, current) = state.reserve(|claims| claims.existing(code));
    let current = current?;
    let next = changes.apply_to(&current);
    if next != current {
        state
            .commit(reservation, vec![LogOp::Put(next.clone())])
            .await?;
        tracing::info!(code = %next.code, "admin: link updated");
    }
    Ok(Json(body(&state, &next)))
}

/// `DELETE /api/links/{code}`
pub async fn delete_link(
    State(state): State<AdminState>,
    _: Caller,
    CodePath(code): CodePath,
) -> Result<StatusCode, ApiError> {
    let code = code.as_str();
    let (reservation, current) = state.reserve(|claims| claims.existing(code));
    current?;
    state
        .commit(reservation, vec![LogOp::Delete(code.to_owned())])
        .await?;
    tracing::info!(code, "admin: link deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Query of `GET /api/links`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

/// `GET /api/links?limit=&cursor=`: links in code order. The cursor is the
/// last code of the previous page, so links added meanwhile never make a
/// page repeat or skip one. Walks the view from the start: O(n) per page.
pub async fn list_links(
    State(state): State<AdminState>,
    _: Caller,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    let query = axum::extract::Query::<ListQuery>::try_from_uri(&uri)
        .map_err(|e| ApiError::new(ErrorCode::InvalidQuery, e.body_text()))?
        .0;
    let limit = match query.limit.as_deref() {
        None | Some("") => DEFAULT_PAGE,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidLimit,
                    format!("must be a whole number from 1 to {MAX_PAGE}"),
                )
                .on("limit")
            })?,
    };
    let cursor = match query.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => {
            validate_code(c.as_bytes()).map_err(|_| {
                ApiError::new(
                    ErrorCode::InvalidCursor,
                    "not a cursor returned by this API",
                )
                .on("cursor")
            })?;
            Some(c.as_bytes())
        }
    };
    let view = state.view();
    let base = &state.settings().public_base_url;
    let mut links = Vec::with_capacity(limit.min(view.len() as usize));
    let mut more = false;
    for item in view.iter() {
        let link = item.map_err(|e| {
            tracing::error!(error = %e, "admin: a link of the view does not decode");
            ApiError::new(ErrorCode::Internal, "a stored link could not be read")
        })?;
        if cursor.is_some_and(|c| link.code <= c) {
            continue;
        }
        if links.len() == limit {
            more = true;
            break;
        }
        links.push(LinkBody::new(&link, base));
    }
    let next_cursor = if more {
        links.last().map(|l| l.code.clone())
    } else {
        None
    };
    Ok(Json(json!({ "links": links, "next_cursor": next_cursor })))
}

/// Body of `POST /api/links/bulk`; items are checked one by one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkRequest {
    links: Vec<Value>,
}

/// `POST /api/links/{code}`: only `bulk` takes a POST; `bulk` is matched as
/// a code so that a link named `bulk` can still be read, changed or deleted.
pub async fn post_to_code(
    State(state): State<AdminState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    req: Request,
) -> Result<Response, ApiError> {
    // Any other code, even one that does not decode, takes no POST.
    if !matches!(&path, Ok(Path(code)) if code == "bulk") {
        return Err(method_not_allowed_error());
    }
    check_content_type(req.headers())?;
    let bytes = read_body(req, &state).await?;
    let req: BulkRequest = parse_json(&bytes)?;
    bulk(state, caller, req).await
}

/// Creates every valid link of `req` with ONE append (one fsync); each item
/// gets its own status. A storage failure fails the whole request (nothing
/// of it was saved).
async fn bulk(state: AdminState, caller: Caller, req: BulkRequest) -> Result<Response, ApiError> {
    let max = state.settings().max_bulk;
    if req.links.len() > max {
        return Err(ApiError::new(
            ErrorCode::TooManyLinks,
            format!("{} links; at most {max} per request", req.links.len()),
        )
        .on("links"));
    }
    let now = now_ms();
    let default_status = state.settings().default_status;
    let checked: Vec<Result<NewLink, ApiError>> = req
        .links
        .into_iter()
        .map(|item| from_value::<CreateLink>(item)?.validate(caller.key_id, now, default_status))
        .collect();
    let (reservation, claimed) = state.reserve(|claims| {
        checked
            .into_iter()
            .map(|r| r.and_then(|new| claim(claims, new)))
            .collect::<Vec<_>>()
    });
    let ops: Vec<LogOp> = claimed
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|link| LogOp::Put(link.clone()))
        .collect();
    let created = ops.len();
    // Each link it creates is a write for the key's limit. The request was
    // checked (and charged) as one; the rest are charged here, before
    // anything is written, and refused whole when they do not fit: when
    // another bulk request let in at the same time has taken the debt a key
    // may run up. (Charged after the write, concurrent bulks each created
    // their links and only one's were counted.)
    let more = created.saturating_sub(1) as u64;
    if let Some(limit) = state.write_limit()
        && let Err(d) = limit.try_charge(caller.key_id, more, crate::ratelimit::now_us())
    {
        state.metrics().limit_decision(false);
        drop(reservation);
        return Ok(super::limits::too_many_requests(&d));
    }
    if let Err(e) = state.commit(reservation, ops).await {
        if let Some(limit) = state.write_limit() {
            limit.refund(caller.key_id, more, crate::ratelimit::now_us());
        }
        return Err(e);
    }
    let results: Vec<Value> = claimed
        .iter()
        .enumerate()
        .map(|(index, r)| match r {
            Ok(link) => json!({"index": index, "status": 201, "link": body(&state, link)}),
            Err(e) => {
                json!({"index": index, "status": e.code.status().as_u16(), "error": e.body()})
            }
        })
        .collect();
    tracing::info!(
        created,
        refused = results.len() - created,
        owner = caller.key_id,
        "admin: bulk create"
    );
    Ok(Json(json!({ "results": results })).into_response())
}

/// `GET /api/health` (no auth): 200 `ok` while writes work; 200 `degraded`
/// while they fail (disk full, read-only: reads are still served, and the
/// next write retries the disk, so the edge must keep routing to us); 503
/// `read_only` only when the log writer is broken for good (restart).
pub async fn health(State(state): State<AdminState>) -> Response {
    let view = state.view();
    if state.needs_restart() {
        let body = json!({
            "status": "read_only", "seq": view.seq(), "links": view.len(), "writable": false,
        });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    // A real write (and fsync) next to the log, not a flag: a disk that
    // filled up or went read-only shows here before a client's write does.
    let probe = state.probe_write();
    // Degraded, not 503: reads still work, and an edge that stopped routing
    // to this admin would keep clients from the precise 507/503 of a write.
    let body = match (state.write_error(), probe) {
        (None, Ok(())) => {
            json!({ "status": "ok", "seq": view.seq(), "links": view.len(), "writable": true })
        }
        (code, probe) => {
            let probe = probe.err();
            // The last append's failure, or else the probe's (a failing
            // disk shows here before any client's write has failed).
            let code = code.or(probe.as_ref().map(|p| p.code));
            json!({
                "status": "degraded", "seq": view.seq(), "links": view.len(),
                "writable": false,
                "error": code.map(|c| c.as_str()),
                "write_probe": probe.map(|p| p.reason),
            })
        }
    };
    (StatusCode::OK, Json(body)).into_response()
}

/// Any other path: 404 (under `/api`, only after authentication).
pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

fn method_not_allowed_error() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "this route does not take this method",
    )
}

/// A method a route does not take. Every route but `/api/health` needs a
/// key, and the key is asked for first: without one the answer is 401, so
/// that no route's methods are told to a caller without a key.
pub async fn method_not_allowed(
    State(state): State<AdminState>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
) -> ApiError {
    if uri.path() != "/api/health"
        && super::auth::authenticate(&headers, state.key_hashes()).is_none()
    {
        return ApiError::unauthorized();
    }
    method_not_allowed_error()
}
