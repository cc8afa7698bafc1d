//! API key authentication: `Authorization: Bearer <key>`, hashed with SHA-256
//! and compared in constant time against `admin.api_key_hashes`.
//!
//! The check runs as a middleware before routing reaches a handler, so a
//! caller without a valid key learns nothing: a missing link and an existing
//! one get the same 401.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderMap, header, request::Parts};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::state::AdminState;
use crate::config::hash_api_key;

/// The authenticated caller of a request, put into the request's extensions
/// by [`require_key`]. Copying it copies a `u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// First 8 bytes (little-endian) of the caller's key hash; stored as a
    /// created link's `owner_key_id`.
    pub key_id: u64,
}

impl Caller {
    /// The caller holding the key whose SHA-256 is `hash`.
    pub fn from_hash(hash: &[u8; 32]) -> Self {
        let mut id = [0u8; 8];
        id.copy_from_slice(&hash[..8]);
        Self {
            key_id: u64::from_le_bytes(id),
        }
    }
}

/// Finds the caller the request's bearer key belongs to, if any. Every
/// accepted hash is compared, in constant time, whatever matched before.
pub fn authenticate(headers: &HeaderMap, accepted: &[[u8; 32]]) -> Option<Caller> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let key = key.trim();
    if key.is_empty() {
        return None;
    }
    let hash = hash_api_key(key);
    let mut found = false;
    for candidate in accepted {
        found |= constant_time_eq(&hash, candidate);
    }
    found.then(|| Caller::from_hash(&hash))
}

/// Compares two digests without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Middleware: refuses the request with 401 unless it carries an accepted
/// key; otherwise records the [`Caller`] and passes it on.
pub async fn require_key(
    State(state): State<AdminState>,
    mut req: Request,
    next: Next,
) -> Response {
    match authenticate(req.headers(), state.key_hashes()) {
        Some(caller) => {
            if let Some(limit) = state.write_limit()
                && let Some(d) =
                    limit.check(req.method(), caller.key_id, crate::ratelimit::now_us())
            {
                state.metrics().limit_decision(d.allowed);
                if !d.allowed {
                    return super::limits::too_many_requests(&d);
                }
            }
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        None => ApiError::unauthorized().into_response(),
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        // Absent only if a route was added outside the auth layer: refuse.
        parts
            .extensions
            .get::<Caller>()
            .copied()
            .ok_or_else(ApiError::unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_keys() {
        let accepted = [hash_api_key("other-key"), hash_api_key("good-key")];
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            authenticate(&h, &accepted)
        };
        let caller = with("Bearer good-key").unwrap();
        assert_eq!(caller, Caller::from_hash(&hash_api_key("good-key")));
        assert_eq!(with("bearer good-key"), Some(caller));
        assert_eq!(with("Bearer bad-key"), None);
        assert_eq!(with("Basic good-key"), None);
        assert_eq!(with("Bearer "), None);
        assert_eq!(with("good-key"), None);
        assert_eq!(authenticate(&HeaderMap::new(), &accepted), None);
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer good-key".parse().unwrap());
        assert_eq!(authenticate(&h, &[]), None);
    }
}
