//! Environment variables over the config file: every key can be set by
//! one, `ULOAD_` and the key's path in capitals with `_` for the dot
//! (`edge.admin_retries` is `ULOAD_EDGE_ADMIN_RETRIES`); five keys also keep
//! the shorter name they had first. A value is read as its key's type here;
//! [`super::Config::from_yaml_str`] then checks it as it checks the file's,
//! naming the variable in any error. The list is in `docs/configuration.md`.

use std::path::PathBuf;

use super::RawConfig;

/// A value an environment variable can set: the text of the variable,
/// read as the key's type. A list is comma-separated.
trait FromEnv: Sized {
    fn from_env(var: &str, value: &str) -> Result<Self, String>;
}

impl FromEnv for String {
    fn from_env(_: &str, value: &str) -> Result<Self, String> {
        Ok(value.to_owned())
    }
}

impl FromEnv for PathBuf {
    fn from_env(_: &str, value: &str) -> Result<Self, String> {
        Ok(value.into())
    }
}

/// Empty: the key unset.
impl FromEnv for Option<PathBuf> {
    fn from_env(_: &str, value: &str) -> Result<Self, String> {
        Ok((!value.is_empty()).then(|| value.into()))
    }
}

/// `true`/`1` or `false`/`0`.
impl FromEnv for bool {
    fn from_env(var: &str, value: &str) -> Result<Self, String> {
        match value.trim() {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            other => Err(format!("{var}={other:?} is not true or false")),
        }
    }
}

/// Comma-separated; blanks around and between the commas are dropped.
impl FromEnv for Vec<String> {
    fn from_env(_: &str, value: &str) -> Result<Self, String> {
        Ok(value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect())
    }
}

macro_rules! from_env_number {
    ($($t:ty),*) => {$(
        impl FromEnv for $t {
            fn from_env(var: &str, value: &str) -> Result<Self, String> {
                value.trim().parse().map_err(|_| {
                    format!("{var}={value:?} is not a whole number from 0 to {}", <$t>::MAX)
                })
            }
        }
    )*};
}
from_env_number!(u16, u32, u64, usize);

/// Every key of the file and the environment variables that override it,
/// from one list, so that a key cannot be added without its variable (the
/// test `every_key_has_a_variable_that_sets_it` checks the list against
/// the keys themselves). Each key's variable is `ULOAD_` and the key's path
/// in capitals with `.` as `_`; five keys also keep the shorter name they
/// had first (`ULOAD_API_KEY`, ...).
macro_rules! env_overrides {
    ($($key:literal => $($field:ident).+ : $($var:literal),+ ;)*) => {
        /// Environment variables that override keys, and the key each
        /// overrides; a key may have two (its own and an older, shorter one).
        pub const ENV_OVERRIDES: &[(&str, &str)] = &[$($(($var, $key)),+),*];

        /// Sets the key `var` overrides to `value`; `Ok(None)` when `var`
        /// overrides nothing; `Err((key, problem))` when the value is not
        /// of the key's type.
        pub(super) fn apply_env(
            raw: &mut RawConfig,
            var: &str,
            value: &str,
        ) -> Result<Option<&'static str>, (&'static str, String)> {
            match var {
                $($($var)|+ => {
                    raw.$($field).+ = FromEnv::from_env(var, value).map_err(|p| ($key, p))?;
                    Ok(Some($key))
                })*
                _ => Ok(None),
            }
        }
    };
}

env_overrides! {
    "data_dir" => data_dir: "ULOAD_DATA_DIR";
    "public_base_url" => public_base_url: "ULOAD_PUBLIC_BASE_URL";
    "edge.listen" => edge.listen: "ULOAD_EDGE_LISTEN";
    "edge.default_status" => edge.default_status: "ULOAD_EDGE_DEFAULT_STATUS";
    "edge.not_found_url" => edge.not_found_url: "ULOAD_EDGE_NOT_FOUND_URL";
    "edge.follow_interval_ms" => edge.follow_interval_ms: "ULOAD_EDGE_FOLLOW_INTERVAL_MS";
    "edge.admin_upstreams" => edge.admin_upstreams: "ULOAD_EDGE_ADMIN_UPSTREAMS", "ULOAD_ADMIN_UPSTREAMS";
    "edge.admin_connect_timeout_ms" => edge.admin_connect_timeout_ms: "ULOAD_EDGE_ADMIN_CONNECT_TIMEOUT_MS";
    "edge.admin_read_timeout_ms" => edge.admin_read_timeout_ms: "ULOAD_EDGE_ADMIN_READ_TIMEOUT_MS";
    "edge.admin_retries" => edge.admin_retries: "ULOAD_EDGE_ADMIN_RETRIES";
    "edge.admin_retry_backoff_ms" => edge.admin_retry_backoff_ms: "ULOAD_EDGE_ADMIN_RETRY_BACKOFF_MS";
    "edge.health_check_interval_ms" => edge.health_check_interval_ms: "ULOAD_EDGE_HEALTH_CHECK_INTERVAL_MS";
    "edge.retry_after_secs" => edge.retry_after_secs: "ULOAD_EDGE_RETRY_AFTER_SECS";
    "edge.fast_path" => edge.fast_path: "ULOAD_EDGE_FAST_PATH";
    "edge.redirect_loop" => edge.redirect_loop: "ULOAD_EDGE_REDIRECT_LOOP";
    "edge.busy_poll_us" => edge.busy_poll_us: "ULOAD_EDGE_BUSY_POLL_US";
    "edge.follower_stall_secs" => edge.follower_stall_secs: "ULOAD_EDGE_FOLLOWER_STALL_SECS";
    "edge.client_header_timeout_ms" => edge.client_header_timeout_ms: "ULOAD_EDGE_CLIENT_HEADER_TIMEOUT_MS";
    "edge.keepalive_timeout_ms" => edge.keepalive_timeout_ms: "ULOAD_EDGE_KEEPALIVE_TIMEOUT_MS";
    "edge.click_slots" => edge.click_slots: "ULOAD_EDGE_CLICK_SLOTS";
    "edge.pingora_conf" => edge.pingora_conf: "ULOAD_EDGE_PINGORA_CONF";
    "admin.listen" => admin.listen: "ULOAD_ADMIN_LISTEN";
    "admin.api_key_hashes" => admin.api_key_hashes: "ULOAD_ADMIN_API_KEY_HASHES";
    "admin.api_key" => admin.api_key: "ULOAD_ADMIN_API_KEY", "ULOAD_API_KEY";
    "admin.max_body_bytes" => admin.max_body_bytes: "ULOAD_ADMIN_MAX_BODY_BYTES";
    "admin.code_length" => admin.code_length: "ULOAD_ADMIN_CODE_LENGTH";
    "admin.max_bulk" => admin.max_bulk: "ULOAD_ADMIN_MAX_BULK";
    "admin.compact_every_records" => admin.compact_every_records: "ULOAD_ADMIN_COMPACT_EVERY_RECORDS";
    "metrics.listen" => metrics.listen: "ULOAD_METRICS_LISTEN";
    "metrics.admin_listen" => metrics.admin_listen: "ULOAD_METRICS_ADMIN_LISTEN", "ULOAD_ADMIN_METRICS_LISTEN";
    "rate_limit.state_dir" => rate_limit.state_dir: "ULOAD_RATE_LIMIT_STATE_DIR", "ULOAD_STATE_DIR";
    "rate_limit.slots" => rate_limit.slots: "ULOAD_RATE_LIMIT_SLOTS";
    "rate_limit.client_requests_per_second" => rate_limit.client_requests_per_second: "ULOAD_RATE_LIMIT_CLIENT_REQUESTS_PER_SECOND";
    "rate_limit.client_burst" => rate_limit.client_burst: "ULOAD_RATE_LIMIT_CLIENT_BURST";
    "rate_limit.client_misses_per_minute" => rate_limit.client_misses_per_minute: "ULOAD_RATE_LIMIT_CLIENT_MISSES_PER_MINUTE";
    "rate_limit.client_miss_burst" => rate_limit.client_miss_burst: "ULOAD_RATE_LIMIT_CLIENT_MISS_BURST";
    "rate_limit.api_key_writes_per_second" => rate_limit.api_key_writes_per_second: "ULOAD_RATE_LIMIT_API_KEY_WRITES_PER_SECOND";
    "rate_limit.api_key_write_burst" => rate_limit.api_key_write_burst: "ULOAD_RATE_LIMIT_API_KEY_WRITE_BURST";
    "rate_limit.trusted_proxies" => rate_limit.trusted_proxies: "ULOAD_RATE_LIMIT_TRUSTED_PROXIES";
    "rate_limit.client_ip_header" => rate_limit.client_ip_header: "ULOAD_RATE_LIMIT_CLIENT_IP_HEADER";
    "tls.listen" => tls.listen: "ULOAD_TLS_LISTEN";
    "tls.cert_path" => tls.cert_path: "ULOAD_TLS_CERT_PATH";
    "tls.key_path" => tls.key_path: "ULOAD_TLS_KEY_PATH";
    "tls.http2" => tls.http2: "ULOAD_TLS_HTTP2";
    "tls.redirect_http" => tls.redirect_http: "ULOAD_TLS_REDIRECT_HTTP";
    "tls.redirect_port" => tls.redirect_port: "ULOAD_TLS_REDIRECT_PORT";
    "tls.hsts_max_age_secs" => tls.hsts_max_age_secs: "ULOAD_TLS_HSTS_MAX_AGE_SECS";
    "tls.hsts_include_subdomains" => tls.hsts_include_subdomains: "ULOAD_TLS_HSTS_INCLUDE_SUBDOMAINS";
    "access_log.path" => access_log.path: "ULOAD_ACCESS_LOG_PATH", "ULOAD_ACCESS_LOG";
    "access_log.buffer_lines" => access_log.buffer_lines: "ULOAD_ACCESS_LOG_BUFFER_LINES";
    "backup.dir" => backup.dir: "ULOAD_BACKUP_DIR";
    "backup.interval_secs" => backup.interval_secs: "ULOAD_BACKUP_INTERVAL_SECS";
    "backup.keep_days" => backup.keep_days: "ULOAD_BACKUP_KEEP_DAYS";
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key of the file has a variable (`ULOAD_` and the key's path in
    /// capitals), and each variable sets its own key and nothing else: the
    /// raw config with one variable set differs from the defaults at that
    /// key only, by the value the variable gave.
    #[test]
    fn every_key_has_a_variable_that_sets_it() {
        use serde_yaml::Value;
        use std::collections::{BTreeMap, BTreeSet};
        fn leaves(v: &Value, path: &str, out: &mut BTreeMap<String, Value>) {
            match v {
                Value::Mapping(m) => {
                    for (k, v) in m {
                        let k = k.as_str().unwrap();
                        let path = if path.is_empty() {
                            k.to_owned()
                        } else {
                            format!("{path}.{k}")
                        };
                        leaves(v, &path, out);
                    }
                }
                _ => {
                    out.insert(path.to_owned(), v.clone());
                }
            }
        }
        let of = |raw: &RawConfig| {
            let mut out = BTreeMap::new();
            leaves(&serde_yaml::to_value(raw).unwrap(), "", &mut out);
            out
        };
        let defaults = of(&RawConfig::default());
        let keys: BTreeSet<&str> = ENV_OVERRIDES.iter().map(|(_, k)| *k).collect();
        assert_eq!(keys, defaults.keys().map(String::as_str).collect());
        for key in keys {
            let var = format!("ULOAD_{}", key.to_uppercase().replace('.', "_"));
            assert!(ENV_OVERRIDES.contains(&(var.as_str(), key)), "{key}");
        }
        let docs = include_str!("../../docs/configuration.md");
        for (var, key) in ENV_OVERRIDES {
            assert!(
                docs.contains(&format!("`{var}`")),
                "{var} is not in docs/configuration.md"
            );
            let (text, expected) = match &defaults[*key] {
                Value::Bool(b) => ((!b).to_string(), Value::Bool(!b)),
                Value::Number(n) => {
                    let n = n.as_u64().unwrap() + 1;
                    (format!(" {n}"), Value::from(n))
                }
                Value::Sequence(_) => (
                    "a, b,,".to_owned(),
                    Value::Sequence(vec!["a".into(), "b".into()]),
                ),
                _ => ("/x y".to_owned(), Value::from("/x y")),
            };
            let mut raw = RawConfig::default();
            assert_eq!(apply_env(&mut raw, var, &text), Ok(Some(*key)), "{var}");
            for (k, v) in of(&raw) {
                let want = if k == *key { &expected } else { &defaults[&k] };
                assert_eq!(&v, want, "{var}={text:?}: {k}");
            }
        }
        let mut raw = RawConfig::default();
        assert_eq!(apply_env(&mut raw, "ULOAD_CONFIG", "x"), Ok(None));
    }
}
