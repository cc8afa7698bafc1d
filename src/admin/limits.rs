//! The per-API-key write limit (`rate_limit.api_key_writes_per_second`):
//! POST, PATCH, PUT and DELETE requests of one key share a GCRA bucket kept
//! in `<rate_limit.state_dir>/admin-ratelimit.bin`, so a restart of the admin
//! does not hand a runaway client a fresh burst ([`crate::ratelimit`]).

use axum::http::{HeaderValue, Method};
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, ErrorCode};
use crate::config::RateLimitConfig;
use crate::ratelimit::{Decision, Limit, LimiterTable};
use crate::state_file::StateError;

const KIND_API_KEY_WRITES: u8 = 3;

/// The admin's write limit. Shared through the admin's state; no lock.
#[derive(Debug)]
pub struct WriteLimit {
    table: LimiterTable,
    limit: Limit,
}

impl WriteLimit {
    /// `None` when no write limit is configured. `max_bulk` is the most
    /// links one bulk request creates: all but one of them may be charged
    /// beyond an empty bucket ([`Self::charge`]).
    pub fn open(config: &RateLimitConfig, max_bulk: usize) -> Result<Option<Self>, StateError> {
        let Some(limit) = config.api_key_writes else {
            return Ok(None);
        };
        let limit = limit.with_max_debt((max_bulk as u64).saturating_sub(1));
        let table =
            LimiterTable::open(&config.state_dir.join("admin-ratelimit.bin"), config.slots)?;
        Ok(Some(Self { table, limit }))
    }

    /// Charges a request of key `key_id` if it writes; `Some` when refused.
    pub fn check(&self, method: &Method, key_id: u64, now_us: u64) -> Option<Decision> {
        let writes = matches!(
            *method,
            Method::POST | Method::PATCH | Method::PUT | Method::DELETE
        );
        if !writes {
            return None;
        }
        let d = self.table.check(
            KIND_API_KEY_WRITES,
            &key_id.to_le_bytes(),
            self.limit,
            now_us,
        );
        Some(d)
    }

    /// Charges `writes` more writes to `key_id` (a bulk request's links
    /// beyond the first; the request was checked as one), before they are
    /// written; `Err` when they do not fit, charging nothing.
    pub fn try_charge(&self, key_id: u64, writes: u64, now_us: u64) -> Result<(), Decision> {
        self.table.try_charge(
            KIND_API_KEY_WRITES,
            &key_id.to_le_bytes(),
            self.limit,
            now_us,
            writes,
        )
    }

    /// Gives back what [`Self::try_charge`] charged for writes that failed.
    pub fn refund(&self, key_id: u64, writes: u64, now_us: u64) {
        self.table.refund(
            KIND_API_KEY_WRITES,
            &key_id.to_le_bytes(),
            self.limit,
            now_us,
            writes,
        );
    }
}

/// The 429 for a refused write: the stable JSON error, `Retry-After` and
/// the `RateLimit-*` fields.
pub fn too_many_requests(d: &Decision) -> Response {
    let mut resp = ApiError::new(
        ErrorCode::RateLimited,
        "too many writes with this API key; retry later",
    )
    .into_response();
    let h = resp.headers_mut();
    for (name, value) in [
        ("retry-after", d.retry_after_secs),
        ("ratelimit-limit", d.limit),
        ("ratelimit-remaining", d.remaining),
        ("ratelimit-reset", d.reset_secs),
    ] {
        h.insert(name, HeaderValue::from(value));
    }
    h.insert("cache-control", HeaderValue::from_static("no-store"));
    resp
}
