//! JSON request bodies: the [`JsonBody`] extractor, which turns every way a
//! body can be wrong (too large, not JSON, unknown field, wrong type) into an
//! [`ApiError`] naming the field, instead of axum's plain-text rejections.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;

use super::error::{ApiError, ErrorCode};

/// A JSON body deserialized into `T` (which should `deny_unknown_fields`).
/// The size limit is axum's `DefaultBodyLimit`, set from
/// `admin.max_body_bytes` by [`super::app`].
#[derive(Debug, Clone)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        check_content_type(req.headers())?;
        let bytes = read_body(req, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Refuses a body that is not declared as JSON (`application/json` or
/// `application/<something>+json`).
pub fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let declared = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    match declared.as_deref() {
        Some("application/json") => Ok(()),
        Some(t) if t.starts_with("application/") && t.ends_with("+json") => Ok(()),
        _ => Err(ApiError::new(
            ErrorCode::InvalidContentType,
            "the body must be JSON, sent with Content-Type: application/json",
        )),
    }
}

/// Reads the whole body within the configured limit.
pub async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorCode::BodyTooLarge,
                "the body is larger than this API accepts (admin.max_body_bytes)",
            )
        } else {
            ApiError::new(
                ErrorCode::InvalidJson,
                format!("the body could not be read: {}", rejection.body_text()),
            )
        }
    })
}

/// Deserializes `bytes` (one JSON object) into `T`, classifying serde's error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| classify_plain(&e, None))?;
    from_value(value)
}

/// Deserializes one JSON value (a body, a bulk item) into `T`. Only objects
/// are accepted: serde would otherwise also take a struct as an array.
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    if !value.is_object() {
        return Err(ApiError::new(
            ErrorCode::InvalidType,
            "expected a JSON object",
        ));
    }
    serde_path_to_error::deserialize(value).map_err(classify)
}

fn classify(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let path = (path != "." && path != "?").then_some(path);
    classify_plain(e.inner(), path)
}

fn classify_plain(e: &serde_json::Error, path: Option<String>) -> ApiError {
    use serde_json::error::Category;
    // serde_json appends " at line L column C" to data errors; keep the
    // sentence readable and let `field` locate the problem.
    let text = e.to_string();
    let message = match text.rfind(" at line ") {
        Some(at) if e.line() > 0 => text[..at].to_owned(),
        _ => text.clone(),
    };
    match e.classify() {
        Category::Io | Category::Syntax | Category::Eof => ApiError::new(
            ErrorCode::InvalidJson,
            format!("the body is not valid JSON: {text}"),
        ),
        Category::Data => {
            if let Some(rest) = message.strip_prefix("unknown field `") {
                // serde_path_to_error's path already ends with the field.
                let field = path.unwrap_or_else(|| rest.split('`').next().unwrap_or("").to_owned());
                ApiError::new(ErrorCode::UnknownField, message).on(field)
            } else if let Some(rest) = message.strip_prefix("missing field `") {
                let name = rest.split('`').next().unwrap_or("");
                let field = match path {
                    Some(p) => format!("{p}.{name}"),
                    None => name.to_owned(),
                };
                ApiError::new(ErrorCode::MissingField, message).on(field)
            } else {
                let err = ApiError::new(ErrorCode::InvalidType, message);
                match path {
                    Some(p) => err.on(p),
                    None => err,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        url: String,
        #[serde(default)]
        status: Option<u16>,
    }

    #[test]
    fn classifies_serde_errors() {
        let e = parse_json::<Body>(b"{\"url\":\"x\",\"bogus\":1}").unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            (ErrorCode::UnknownField, Some("bogus"))
        );
        let e = parse_json::<Body>(b"{\"url\":\"x\",\"status\":\"301\"}").unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            (ErrorCode::InvalidType, Some("status"))
        );
        let e = parse_json::<Body>(b"{\"status\":301}").unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            (ErrorCode::MissingField, Some("url"))
        );
        for bad in [&b""[..], b"{", b"{\"url\":\"x\"} x", b"nope"] {
            let e = parse_json::<Body>(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidJson, "{bad:?}");
        }
        let e = parse_json::<Body>(b"[1]").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidType);
        assert!(parse_json::<Body>(b" {\"url\":\"x\"} \n").is_ok());
    }
}
