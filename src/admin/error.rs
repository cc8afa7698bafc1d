//! The admin API's one error type: every refusal a client can get, with a
//! stable machine-readable code, an HTTP status and the field at fault.
//!
//! The body is always
//! `{"error":{"code":"<snake_case>","message":"...","field":"<name>"|null}}`;
//! the full list of codes is in `docs/api.md`. Details that only matter to an
//! operator (an I/O error, a path) go to the log, not to the client.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::store::StoreError;
use crate::store::record::RecordError;

/// Whether an I/O error means "no space": the disk or the quota is full, or
/// the file would grow past `RLIMIT_FSIZE` or the file system's limit.
pub fn is_out_of_space(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG)
    ) || matches!(
        e.kind(),
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge
    )
}

/// Every error code the API can answer with. The string form (`as_str`) is
/// part of the API contract: never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The body is not JSON (syntax error, empty, truncated).
    InvalidJson,
    /// The body is not declared as `application/json`.
    InvalidContentType,
    /// The body has a field the endpoint does not know.
    UnknownField,
    /// A required field is absent.
    MissingField,
    /// A field has the wrong JSON type or an out-of-range number.
    InvalidType,
    /// The body is larger than `admin.max_body_bytes`.
    BodyTooLarge,
    /// `url` is not an absolute http(s) URL without whitespace or controls.
    InvalidUrl,
    /// `code` is not 1 to 64 bytes of `[A-Za-z0-9_-]`.
    InvalidCode,
    /// `code` collides with one of the edge's own routes.
    ReservedCode,
    /// `status` is not 301, 302, 307 or 308.
    InvalidStatus,
    /// `expires_at` is not an RFC 3339 time after 1970.
    InvalidExpiresAt,
    /// `max_clicks` is 0.
    InvalidMaxClicks,
    /// `cursor` is not a cursor this API handed out.
    InvalidCursor,
    /// `limit` is not 1 to 1000.
    InvalidLimit,
    /// A query parameter is unknown or malformed.
    InvalidQuery,
    /// A bulk request holds more links than `admin.max_bulk`.
    TooManyLinks,
    /// A link with this code already exists (or is being created).
    DuplicateCode,
    /// Another change to the same link is in flight; retry.
    Conflict,
    /// No such link, or no such route.
    NotFound,
    /// The route exists but not with this method.
    MethodNotAllowed,
    /// No API key, or not an accepted one.
    Unauthorized,
    /// The API cannot serve the request now (e.g. no free generated code).
    Unavailable,
    /// The data dir refused the write; nothing was acknowledged.
    StorageError,
    /// The data dir is out of space (ENOSPC, EDQUOT, EFBIG); nothing was
    /// acknowledged; writes work again once space is freed.
    InsufficientStorage,
    /// Too many writes with this API key for now (`Retry-After` says when).
    RateLimited,
    /// A bug: something that should not happen did.
    Internal,
}

impl ErrorCode {
    /// The stable snake_case name clients match on.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidContentType => "invalid_content_type",
            Self::UnknownField => "unknown_field",
            Self::MissingField => "missing_field",
            Self::InvalidType => "invalid_type",
            Self::BodyTooLarge => "body_too_large",
            Self::InvalidUrl => "invalid_url",
            Self::InvalidCode => "invalid_code",
            Self::ReservedCode => "reserved_code",
            Self::InvalidStatus => "invalid_status",
            Self::InvalidExpiresAt => "invalid_expires_at",
            Self::InvalidMaxClicks => "invalid_max_clicks",
            Self::InvalidCursor => "invalid_cursor",
            Self::InvalidLimit => "invalid_limit",
            Self::InvalidQuery => "invalid_query",
            Self::TooManyLinks => "too_many_links",
            Self::DuplicateCode => "duplicate_code",
            Self::Conflict => "conflict",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Unauthorized => "unauthorized",
            Self::Unavailable => "unavailable",
            Self::StorageError => "storage_error",
            Self::InsufficientStorage => "insufficient_storage",
            Self::RateLimited => "rate_limited",
            Self::Internal => "internal",
        }
    }

    /// The HTTP status this code is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            Self::InvalidJson
            | Self::InvalidContentType
            | Self::UnknownField
            | Self::MissingField
            | Self::InvalidType
            | Self::InvalidUrl
            | Self::InvalidCode
            | Self::ReservedCode
            | Self::InvalidStatus
            | Self::InvalidExpiresAt
            | Self::InvalidMaxClicks
            | Self::InvalidCursor
            | Self::InvalidLimit
            | Self::InvalidQuery
            | Self::TooManyLinks => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::DuplicateCode | Self::Conflict => StatusCode::CONFLICT,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Unavailable | Self::StorageError => StatusCode::SERVICE_UNAVAILABLE,
            Self::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A refused request: what went wrong, for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    /// A sentence for a person; not part of the contract.
    pub message: String,
    /// The request field at fault (`url`, `links[3].status`, ...), if any.
    pub field: Option<String>,
    /// Seconds for `Retry-After` (503 and 507 answers).
    pub retry_after: Option<u64>,
}

/// The `"error"` object of an error body (also used per item in bulk results).
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody<'a> {
    pub code: &'static str,
    pub message: &'a str,
    pub field: Option<&'a str>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    /// The same error, naming `field`.
    pub fn on(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn not_found() -> Self {
        Self::new(ErrorCode::NotFound, "no such link")
    }

    /// The one answer to a missing or wrong key, whatever was asked for.
    pub fn unauthorized() -> Self {
        Self::new(
            ErrorCode::Unauthorized,
            "a valid API key is required: Authorization: Bearer <key>",
        )
    }

    /// A write the store refused: `507 insufficient_storage` when the disk
    /// is full (ENOSPC, EDQUOT, EFBIG: writes work again once space is
    /// freed), else `503 storage_error` (a read-only or failing disk). Both
    /// carry `Retry-After`; the full error (with paths) is logged, the
    /// client gets the operating system's reason only.
    pub fn from_store(e: &StoreError, retry_after: u64) -> Self {
        let os = e.io_error();
        let reason = os.map_or_else(String::new, |io| format!(" ({io})"));
        if os.is_some_and(is_out_of_space) {
            tracing::error!(error = %e, "admin: the data dir is out of space; the write was refused");
            return Self {
                retry_after: Some(retry_after),
                ..Self::new(
                    ErrorCode::InsufficientStorage,
                    format!("the link store is out of disk space{reason}; nothing was saved"),
                )
            };
        }
        tracing::error!(error = %e, "admin: write to the data dir failed");
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                ErrorCode::StorageError,
                format!("the link store could not persist the change{reason}; nothing was saved"),
            )
        }
    }

    /// A validation failure of a link field, mapped to its own code.
    pub fn from_record(e: &RecordError) -> Self {
        let (code, field) = match e {
            RecordError::CodeLength(_) | RecordError::CodeCharset(..) => {
                (ErrorCode::InvalidCode, "code")
            }
            RecordError::TargetLength(_)
            | RecordError::TargetControl(_)
            | RecordError::TargetScheme
            | RecordError::TargetHost
            | RecordError::TargetUtf8 => (ErrorCode::InvalidUrl, "url"),
            RecordError::Status(_) => (ErrorCode::InvalidStatus, "status"),
            _ => (ErrorCode::Internal, "link"),
        };
        // RecordError's text starts with "<field>: "; the field is sent apart.
        let text = e.to_string();
        let message = text
            .strip_prefix(&format!("{field}: "))
            .unwrap_or(&text)
            .to_owned();
        Self::new(code, message).on(field)
    }

    /// The `"error"` object.
    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            code: self.code.as_str(),
            message: &self.message,
            field: self.field.as_deref(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.body() });
        let mut response = (self.code.status(), axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.code == ErrorCode::Unauthorized {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"uload\""),
            );
        }
        response
    }
}
