//! Where a job's request goes: its `url` resolved against its target's `base_url`, and the
//! rule that keeps it there.
//!
//! - No `url`: the base URL itself.
//! - A relative `url` (`send-invoice`, `/invoices/42?full=1`): appended to the base URL as a
//!   path below it (a leading `/` does not climb to the host's root), then normalized.
//! - An absolute `url`: taken as is.
//!
//! Either way the result must be *under* the base URL: the same scheme, host and port, no
//! user info, and a path equal to the base path or below it (`/tasks/` admits `/tasks/x`,
//! not `/tasks-admin`; `..` and its percent-encoded forms are normalized away first, so they
//! cannot climb out).

use url::Url;

/// Longest URL accepted.
pub const MAX_URL: usize = 2048;

/// Checks a configured `base_url`; the message says what is wrong.
pub fn check_base_url(base: &str) -> Result<Url, String> {
    let url = Url::parse(base).map_err(|e| {
        format!("`{base}` is not an absolute URL ({e}); write e.g. https://app.example.com/tasks/")
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "`{base}` must be an http:// or https:// URL with a host"
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "must not carry user info; put credentials in the target's headers (Authorization)"
                .into(),
        );
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("`{base}` must not have a query or fragment"));
    }
    Ok(url)
}

/// Parses an absolute http(s) URL a job gives; `Err` says why not (the field is `url`).
pub fn parse_absolute(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("`{text}` is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "`{text}` must be an http:// or https:// URL with a host"
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("`{text}` must not carry user info"));
    }
    if url.fragment().is_some() {
        return Err(format!("`{text}` must not have a fragment"));
    }
    Ok(url)
}

/// Whether `text` is written as an absolute URL (a scheme followed by `://`).
pub fn is_absolute(text: &str) -> bool {
    match text.split_once("://") {
        Some((scheme, _)) => {
            !scheme.is_empty()
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        }
        None => false,
    }
}

/// `url` (absolute, relative or absent) against `base`; `Err` says why it is refused.
pub fn resolve(base: &Url, url: Option<&str>) -> Result<Url, String> {
    let Some(text) = url else {
        return Ok(base.clone());
    };
    if text.len() > MAX_URL {
        return Err(format!(
            "the URL is {} bytes long; at most {MAX_URL} are accepted",
            text.len()
        ));
    }
    if text.chars().any(|c| c.is_control() || c == ' ') {
        return Err("the URL must not contain spaces or control characters".into());
    }
    let candidate = if is_absolute(text) {
        parse_absolute(text)?
    } else {
        if text.starts_with("//") || text.starts_with('\\') || text.contains('#') {
            return Err(format!(
                "`{text}` is neither an absolute URL nor a path: give a path such as \
                 `send-invoice` (no `//` prefix or fragment)"
            ));
        }
        let mut joined = base.as_str().to_string();
        if !joined.ends_with('/') {
            joined.push('/');
        }
        joined.push_str(text.trim_start_matches('/'));
        Url::parse(&joined).map_err(|e| format!("`{text}` does not make a URL: {e}"))?
    };
    if is_under(base, &candidate) {
        Ok(candidate)
    } else {
        Err(format!(
            "`{text}` resolves to {candidate}, which is outside the target's base URL {base}"
        ))
    }
}

/// Whether `url` is `base` or below it (see the module docs).
pub fn is_under(base: &Url, url: &Url) -> bool {
    if url.scheme() != base.scheme()
        || url.host_str() != base.host_str()
        || url.port_or_known_default() != base.port_or_known_default()
        || !url.username().is_empty()
        || url.password().is_some()
        || url.fragment().is_some()
    {
        return false;
    }
    let (bp, p) = (base.path(), url.path());
    if bp.ends_with('/') {
        p.starts_with(bp)
    } else {
        p == bp || p.strip_prefix(bp).is_some_and(|rest| rest.starts_with('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(s: &str) -> Url {
        check_base_url(s).unwrap()
    }

    #[test]
    fn relative_paths_stay_below_the_base() {
        let b = base("https://app.example.com/tasks/");
        for (given, want) in [
            (None, "https://app.example.com/tasks/"),
            (Some("send"), "https://app.example.com/tasks/send"),
            (Some("/send"), "https://app.example.com/tasks/send"),
            (Some("a/b?x=1"), "https://app.example.com/tasks/a/b?x=1"),
            (Some("a/../b"), "https://app.example.com/tasks/b"),
            (
                Some("https://app.example.com/tasks/x"),
                "https://app.example.com/tasks/x",
            ),
            (
                Some("https://APP.example.com:443/tasks/x"),
                "https://app.example.com/tasks/x",
            ),
        ] {
            assert_eq!(resolve(&b, given).unwrap().as_str(), want, "{given:?}");
        }
        let no_slash = base("https://app.example.com/tasks");
        assert_eq!(
            resolve(&no_slash, Some("send")).unwrap().as_str(),
            "https://app.example.com/tasks/send"
        );
        assert!(resolve(&no_slash, Some("https://app.example.com/tasks")).is_ok());
    }

    #[test]
    fn everything_outside_is_refused() {
        let b = base("https://app.example.com/tasks/");
        for given in [
            "../admin",
            "..%2fadmin",
            "%2e%2e/admin",
            "a/../../admin",
            "//evil.example/tasks/",
            "https://evil.example/tasks/x",
            "http://app.example.com/tasks/x",
            "https://app.example.com:8443/tasks/x",
            "https://app.example.com/tasks",
            "https://app.example.com/tasks-admin/x",
            "https://user@app.example.com/tasks/x",
            "https://app.example.com.evil.example/tasks/x",
            "ftp://app.example.com/tasks/x",
            "send#frag",
            "a b",
        ] {
            let got = resolve(&b, Some(given));
            // `..%2f` stays inside (the encoded slash is part of a segment name).
            if given == "..%2fadmin" {
                assert!(
                    got.as_ref().unwrap().path().starts_with("/tasks/"),
                    "{got:?}"
                );
                continue;
            }
            assert!(got.is_err(), "{given} resolved to {got:?}");
        }
        let no_slash = base("https://app.example.com/tasks");
        assert!(resolve(&no_slash, Some("https://app.example.com/tasksx")).is_err());
    }

    #[test]
    fn base_urls_are_checked() {
        assert!(check_base_url("https://a.example/x/").is_ok());
        for bad in [
            "a.example/x",
            "ftp://a.example/",
            "https://u:p@a.example/",
            "https://a.example/?q=1",
            "https://a.example/#f",
        ] {
            assert!(check_base_url(bad).is_err(), "{bad}");
        }
    }
}
