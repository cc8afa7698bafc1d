//! The JSON shapes of links: what a client sends to create one
//! ([`CreateLink`]) or change one ([`UpdateLink`]), and what it gets back
//! ([`LinkBody`]). Validation turns them into store records or refuses them
//! with an [`ApiError`] naming the field.

use serde::{Deserialize, Deserializer, Serialize};

use super::codes::check_custom_code;
use super::error::{ApiError, ErrorCode};
use super::url::normalize_target;
use crate::interchange::{format_time, parse_time};
use crate::store::record::{
    FLAG_DISABLED, FLAG_FORWARD_QUERY, Link, LinkRef, RedirectStatus, flags_of,
};

/// Body of `POST /api/links` (and of each item of a bulk request).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateLink {
    /// Target: absolute http(s) URL.
    pub url: String,
    /// Custom code; absent or null: a generated one.
    #[serde(default)]
    pub code: Option<String>,
    /// 301, 302 (default), 307 or 308.
    #[serde(default)]
    pub status: Option<u16>,
    /// RFC 3339 time after which the link no longer redirects.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// Click budget (at least 1); absent: unlimited.
    #[serde(default)]
    pub max_clicks: Option<u64>,
    /// Merge the request's query string into the target's.
    #[serde(default)]
    pub forward_query: bool,
    /// Keep the link but do not redirect.
    #[serde(default)]
    pub disabled: bool,
}

/// A validated create request: the custom code, if any, and the link (its
/// code is filled in once one is reserved).
#[derive(Debug, Clone)]
pub struct NewLink {
    pub code: Option<String>,
    pub link: Link,
}

impl CreateLink {
    /// Validates every field; `owner_key_id`, `now_ms` and the configured
    /// `default_status` fill the rest.
    pub fn validate(
        self,
        owner_key_id: u64,
        now_ms: u64,
        default_status: RedirectStatus,
    ) -> Result<NewLink, ApiError> {
        if let Some(code) = &self.code {
            check_custom_code(code)?;
        }
        let target = normalize_target(&self.url)?;
        let status = match self.status {
            Some(s) => parse_status(s)?,
            None => default_status,
        };
        let expires_at_ms = self.expires_at.as_deref().map(parse_expiry).transpose()?;
        check_max_clicks(self.max_clicks)?;
        let flags = flags_of(self.disabled, self.forward_query);
        Ok(NewLink {
            code: self.code,
            link: Link {
                code: String::new(),
                target,
                status,
                flags,
                created_at_ms: now_ms,
                expires_at_ms,
                max_clicks: self.max_clicks,
                owner_key_id,
            },
        })
    }
}

/// Body of `PATCH /api/links/{code}`: every field optional; `expires_at`
/// and `max_clicks` may be `null` to clear them. Other fields may not be null.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateLink {
    #[serde(default, deserialize_with = "present")]
    pub url: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub status: Option<u16>,
    #[serde(default, deserialize_with = "nullable")]
    pub expires_at: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub max_clicks: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    pub forward_query: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    pub disabled: Option<bool>,
}

/// A field that, when given, must have a value (`null` is a type error).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A field that, when given, may be `null` (`Some(None)`: clear it).
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// A validated update, ready to apply to a link.
#[derive(Debug, Clone, Default)]
pub struct LinkChanges {
    target: Option<String>,
    status: Option<RedirectStatus>,
    expires_at_ms: Option<Option<u64>>,
    max_clicks: Option<Option<u64>>,
    forward_query: Option<bool>,
    disabled: Option<bool>,
}

impl UpdateLink {
    /// Validates every given field.
    pub fn validate(self) -> Result<LinkChanges, ApiError> {
        let target = self.url.as_deref().map(normalize_target).transpose()?;
        let status = self.status.map(parse_status).transpose()?;
        let expires_at_ms = match &self.expires_at {
            Some(Some(t)) => Some(Some(parse_expiry(t)?)),
            Some(None) => Some(None),
            None => None,
        };
        if let Some(max) = self.max_clicks {
            check_max_clicks(max)?;
        }
        Ok(LinkChanges {
            target,
            status,
            expires_at_ms,
            max_clicks: self.max_clicks,
            forward_query: self.forward_query,
            disabled: self.disabled,
        })
    }
}

impl LinkChanges {
    /// `link` with the changes made; code, creation time and owner are kept.
    pub fn apply_to(&self, link: &Link) -> Link {
        let mut next = link.clone();
        if let Some(t) = &self.target {
            next.target.clone_from(t);
        }
        if let Some(s) = self.status {
            next.status = s;
        }
        if let Some(e) = self.expires_at_ms {
            next.expires_at_ms = e;
        }
        if let Some(m) = self.max_clicks {
            next.max_clicks = m;
        }
        let mut set = |flag: u8, on: Option<bool>| match on {
            Some(true) => next.flags |= flag,
            Some(false) => next.flags &= !flag,
            None => {}
        };
        set(FLAG_FORWARD_QUERY, self.forward_query);
        set(FLAG_DISABLED, self.disabled);
        next
    }
}

fn parse_status(code: u16) -> Result<RedirectStatus, ApiError> {
    RedirectStatus::from_code(code).map_err(|e| ApiError::from_record(&e))
}

fn parse_expiry(text: &str) -> Result<u64, ApiError> {
    parse_time(text).map_err(|m| {
        // The message quotes the input: keep an error about a huge string small.
        let m = if text.len() > 64 {
            "is not an RFC 3339 time after 1970".to_owned()
        } else {
            m
        };
        ApiError::new(ErrorCode::InvalidExpiresAt, m).on("expires_at")
    })
}

fn check_max_clicks(max: Option<u64>) -> Result<(), ApiError> {
    if max == Some(0) {
        return Err(ApiError::new(
            ErrorCode::InvalidMaxClicks,
            "must be at least 1 (omit it or send null for unlimited)",
        )
        .on("max_clicks"));
    }
    Ok(())
}

/// A link as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkBody {
    pub code: String,
    pub url: String,
    /// `public_base_url` + `/` + code.
    pub short_url: String,
    pub status: u16,
    /// RFC 3339, UTC, milliseconds.
    pub created_at: String,
    pub expires_at: Option<String>,
    pub max_clicks: Option<u64>,
    pub forward_query: bool,
    pub disabled: bool,
}

impl LinkBody {
    /// The API form of `link`; `base` is `public_base_url` without a trailing `/`.
    pub fn new(link: &LinkRef<'_>, base: &str) -> Self {
        let code = link.code_str();
        Self {
            code: code.to_owned(),
            url: String::from_utf8_lossy(link.target).into_owned(),
            short_url: format!("{base}/{code}"),
            status: link.status.code(),
            created_at: format_time(link.created_at_ms),
            expires_at: link.expires_at_ms.map(format_time),
            max_clicks: link.max_clicks,
            forward_query: link.forwards_query(),
            disabled: link.is_disabled(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::json::parse_json;

    #[test]
    fn update_distinguishes_absent_null_and_value() {
        let u: UpdateLink = parse_json(br#"{"expires_at":null,"max_clicks":5}"#).unwrap();
        assert_eq!(u.expires_at, Some(None));
        assert_eq!(u.max_clicks, Some(Some(5)));
        assert_eq!(u.url, None);
        let e = parse_json::<UpdateLink>(br#"{"url":null}"#).unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            (ErrorCode::InvalidType, Some("url"))
        );
    }

    #[test]
    fn changes_keep_identity_and_toggle_flags() {
        let mut link = Link::new("abc", "https://a.example/").unwrap();
        link.flags = FLAG_DISABLED;
        link.owner_key_id = 7;
        link.expires_at_ms = Some(5);
        let changes = UpdateLink {
            url: Some("https://b.example/".into()),
            expires_at: Some(None),
            forward_query: Some(true),
            disabled: Some(false),
            ..Default::default()
        }
        .validate()
        .unwrap();
        let next = changes.apply_to(&link);
        assert_eq!(next.target, "https://b.example/");
        assert_eq!(next.flags, FLAG_FORWARD_QUERY);
        assert_eq!(next.expires_at_ms, None);
        assert_eq!((next.code.as_str(), next.owner_key_id), ("abc", 7));
        assert_eq!(next.created_at_ms, link.created_at_ms);
    }
}
