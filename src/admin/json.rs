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

/// Refuses a body that is not declared as JSON: exactly one `Content-Type`,
/// `application/json` or `application/<something>+json`, with no `charset`
/// but UTF-8 (JSON is UTF-8, RFC 8259; a body declared in another charset
/// would be misread), and no `Content-Encoding` but `identity` (bodies are
/// not decompressed).
pub fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let refuse = |why: &str| Err(ApiError::new(ErrorCode::InvalidContentType, why));
    let mut all = headers.get_all(header::CONTENT_TYPE).iter();
    let (Some(value), None) = (all.next(), all.next()) else {
        return refuse("the body must be JSON, sent with one Content-Type: application/json");
    };
    let Ok(value) = value.to_str() else {
        return refuse("the body must be JSON, sent with Content-Type: application/json");
    };
    let mut parts = value.split(';');
    let essence = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    let json = essence == "application/json"
        || essence
            .strip_prefix("application/")
            .and_then(|t| t.strip_suffix("+json"))
            .is_some_and(|t| !t.is_empty() && !t.contains(['/', ' ']));
    if !json {
        return refuse("the body must be JSON, sent with Content-Type: application/json");
    }
    for param in parts {
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        let value = value.trim().trim_matches('"');
        if name.trim().eq_ignore_ascii_case("charset")
            && !value.eq_ignore_ascii_case("utf-8")
            && !value.eq_ignore_ascii_case("utf8")
        {
            return refuse("JSON bodies are UTF-8: no other charset is accepted");
        }
    }
    for encoding in headers.get_all(header::CONTENT_ENCODING) {
        let identity = encoding.to_str().is_ok_and(|e| {
            e.split(',')
                .all(|c| c.trim().eq_ignore_ascii_case("identity"))
        });
        if !identity {
            return refuse("Content-Encoding is not supported: send the body uncompressed");
        }
    }
    Ok(())
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
///
/// The body is first read into a `Value` by [`StrictValue`], which refuses
/// an object with the same key twice (I-JSON, RFC 7493: parsers disagree on
/// which one wins, so a proxy could check one value and we store another).
/// Nesting is bounded by `serde_json`'s recursion limit (128): a deeply
/// nested body is `invalid_json`, never a stack overflow.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize::<_, StrictValue>(&mut de)
        .map_err(classify)?
        .0;
    de.end().map_err(|e| classify_plain(&e, None))?;
    from_value(value)
}

/// A JSON value read with duplicate object keys refused.
pub struct StrictValue(pub serde_json::Value);

impl<'de> serde::Deserialize<'de> for StrictValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(serde_json::Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate field `{key}`"
                )));
            }
            let StrictValue(v) = map.next_value()?;
            object.insert(key, v);
        }
        Ok(serde_json::Value::Object(object))
    }
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
            if let Some(rest) = message.strip_prefix("duplicate field `") {
                // An object with a key twice: not JSON this API accepts.
                let name = rest.split('`').next().unwrap_or("");
                let field = match path {
                    Some(p) => format!("{p}.{name}"),
                    None => name.to_owned(),
                };
                ApiError::new(ErrorCode::InvalidJson, message).on(field)
            } else if let Some(rest) = message.strip_prefix("unknown field `") {
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
