//! The store URL's own parameters: `?prefix=` and `?allow_eviction=`, taken off before the
//! redis crate sees the URL (`tls.rs` takes the TLS ones).

use super::DEFAULT_PREFIX;
use crate::error::{Error, Result};
use crate::store::redact_url;

/// Splits `?prefix=…` off a Redis URL; returns the URL to connect with and the prefix.
pub(super) fn split_prefix(url: &str) -> Result<(String, String)> {
    let bad = |reason: String| Error::BadUrl {
        url: redact_url(url),
        reason,
    };
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut prefix = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("prefix", value)) => prefix = Some(value.to_string()),
            // Read by `allow_eviction`.
            Some(("allow_eviction", _)) => {}
            _ => rest.push(pair),
        }
    }
    let prefix = prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_string());
    let ok = !prefix.is_empty()
        && prefix.len() <= 64
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
    if !ok {
        return Err(bad(format!(
            "prefix `{prefix}` must be 1-64 ASCII letters, digits, '.', '_', '-' or ':'"
        )));
    }
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((url, prefix))
}

/// The URL's `allow_eviction=true|false` (default false): whether to start on a server whose
/// `maxmemory-policy` may evict keys (see [`check_server`], which `RedisStore::connect`
/// runs). [`split_prefix`] leaves it out of the URL the client connects with.
pub(super) fn allow_eviction(url: &str) -> Result<bool> {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let mut allow = false;
    for pair in query.split('&') {
        if let Some(("allow_eviction", value)) = pair.split_once('=') {
            allow = match value {
                "true" | "1" => true,
                "false" | "0" => false,
                other => {
                    return Err(Error::BadUrl {
                        url: redact_url(url),
                        reason: format!("allow_eviction must be true or false, not `{other}`"),
                    });
                }
            };
        }
    }
    Ok(allow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_comes_from_the_url() {
        assert_eq!(
            split_prefix("redis://h:6379/0").unwrap(),
            ("redis://h:6379/0".to_string(), "conveyor".to_string())
        );
        assert_eq!(
            split_prefix("redis://h/1?prefix=app_jobs&protocol=resp3").unwrap(),
            (
                "redis://h/1?protocol=resp3".to_string(),
                "app_jobs".to_string()
            )
        );
        assert!(split_prefix("redis://h/0?prefix=").is_err());
        assert!(split_prefix("redis://h/0?prefix={x}").is_err());
    }

    #[test]
    fn allow_eviction_comes_off_the_url() {
        assert!(!allow_eviction("redis://h/0").unwrap());
        assert!(allow_eviction("redis://h/0?prefix=a&allow_eviction=true").unwrap());
        assert!(!allow_eviction("redis://h/0?allow_eviction=false&protocol=resp3").unwrap());
        assert!(allow_eviction("redis://h/0?allow_eviction=yes").is_err());
        assert_eq!(
            split_prefix("redis://h/0?allow_eviction=true&protocol=resp3").unwrap(),
            (
                "redis://h/0?protocol=resp3".to_string(),
                "conveyor".to_string()
            )
        );
    }
}
