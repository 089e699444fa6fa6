//! `[http_requests]` (settings of every `http.request` job) and `[http_targets.<name>]` (the
//! named targets) in the config file. See docs/http-targets.md.

use std::collections::BTreeMap;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// `[http_requests]`: what applies to every `http.request` job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpRequestsConfig {
    /// Accept jobs that give an absolute `url` and no `target`. Off by default: callers can
    /// then reach only the targets the operator configured.
    pub allow_raw_urls: bool,
    /// CIDRs the SSRF guard lets through for every request (raw URLs and targets alike);
    /// a target adds its own `allow_cidrs`.
    pub allow_cidrs: Vec<IpNet>,
    /// Request timeout (a target may set its own).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// TCP/TLS connect timeout.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The longest `Retry-After` honoured; a longer one waits this long.
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
    /// Statuses that are retried (a target may set its own): codes and classes (`"5xx"`).
    pub retry_statuses: StatusSet,
    /// Statuses that are final even though `retry_statuses` lists them (e.g. `501`).
    pub permanent_statuses: StatusSet,
    /// Signs requests to raw URLs: `whsec_…`, or a value sealed with the secrets keys
    /// (`conveyor secrets seal --for http_requests`). Unset: they go unsigned.
    pub signing_secret: Option<SecretText>,
    /// Keep an attempt log (status, latency, the start of the answer) per request.
    pub attempt_log: bool,
    /// How long attempt-log entries are kept.
    #[serde(with = "humantime_serde")]
    pub attempt_log_ttl: Duration,
}

impl Default for HttpRequestsConfig {
    fn default() -> Self {
        Self {
            allow_raw_urls: false,
            allow_cidrs: Vec::new(),
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(3600),
            retry_statuses: StatusSet::default_retry(),
            permanent_statuses: StatusSet::default(),
            signing_secret: None,
            attempt_log: true,
            attempt_log_ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// `[http_targets.<name>]`: one application endpoint jobs may call by name.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTarget {
    /// Every request of the target goes to this URL or below it (`http://` or `https://`,
    /// no query, fragment or user info).
    pub base_url: String,
    /// Headers added to every request (e.g. `Authorization`); they win over a job's headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Signs every request: `whsec_…`, or a value sealed with the secrets keys
    /// (`conveyor secrets seal --for http_targets.<name>`).
    #[serde(default)]
    pub signing_secret: Option<SecretText>,
    /// Request timeout (`None`: `http_requests.timeout`).
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Requests per second, shared by every worker (`None`: unlimited).
    #[serde(default)]
    pub rate_limit: Option<f64>,
    /// Statuses retried (`None`: `http_requests.retry_statuses`).
    #[serde(default)]
    pub retry_statuses: Option<StatusSet>,
    /// Statuses final even if retried by the above (`None`: `http_requests.permanent_statuses`).
    #[serde(default)]
    pub permanent_statuses: Option<StatusSet>,
    /// CIDRs the SSRF guard lets through for this target, besides `http_requests.allow_cidrs`
    /// (an application on a private network: `["10.0.0.0/8"]`).
    #[serde(default)]
    pub allow_cidrs: Vec<IpNet>,
}

impl HttpTarget {
    /// The keys a target has (the environment may set them:
    /// `CONVEYOR_HTTP_TARGETS__<NAME>__<KEY>`, and `…__HEADERS__<HEADER>`).
    pub const FIELDS: [&'static str; 8] = [
        "base_url",
        "headers",
        "signing_secret",
        "timeout",
        "rate_limit",
        "retry_statuses",
        "permanent_statuses",
        "allow_cidrs",
    ];

    /// A target at `base_url` with every other setting at its default.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            headers: BTreeMap::new(),
            signing_secret: None,
            timeout: None,
            rate_limit: None,
            retry_statuses: None,
            permanent_statuses: None,
            allow_cidrs: Vec::new(),
        }
    }
}

/// Never shows the signing secret or a credential-looking header's value.
impl std::fmt::Debug for HttpTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: BTreeMap<&str, &str> = self
            .headers
            .iter()
            .map(|(k, v)| {
                let shown = if crate::webhook::model::is_secret_header(k) {
                    crate::webhook::model::REDACTED
                } else {
                    v.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("HttpTarget")
            .field("base_url", &self.base_url)
            .field("headers", &headers)
            .field("signing_secret", &self.signing_secret)
            .field("timeout", &self.timeout)
            .field("rate_limit", &self.rate_limit)
            .field("retry_statuses", &self.retry_statuses)
            .field("permanent_statuses", &self.permanent_statuses)
            .field("allow_cidrs", &self.allow_cidrs)
            .finish()
    }
}

/// Every setting of `http.request`: `[http_requests]` and `[http_targets.*]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HttpConfig {
    /// `[http_requests]`.
    pub requests: HttpRequestsConfig,
    /// `[http_targets.<name>]`, by name.
    pub targets: BTreeMap<String, HttpTarget>,
}

impl HttpConfig {
    /// Checks what serde cannot; the message names the key and never shows a secret.
    pub fn validate(&self) -> Result<(), String> {
        let r = &self.requests;
        if r.timeout.is_zero() {
            return Err("`http_requests.timeout` must be more than 0s".into());
        }
        r.retry_statuses.validate("http_requests.retry_statuses")?;
        r.permanent_statuses
            .validate("http_requests.permanent_statuses")?;
        if let Some(secret) = &r.signing_secret {
            secret.validate("http_requests.signing_secret")?;
        }
        for (name, t) in &self.targets {
            let key = format!("http_targets.{name}");
            conveyor_worker::job::check_name(&key, name).map_err(|e| e.to_string())?;
            super::resolve::check_base_url(&t.base_url)
                .map_err(|m| format!("`{key}.base_url`: {m}"))?;
            for (header, value) in &t.headers {
                super::check_header(header, value)
                    .map_err(|m| format!("`{key}.headers.{header}`: {m}"))?;
            }
            if let Some(secret) = &t.signing_secret {
                secret.validate(&format!("{key}.signing_secret"))?;
            }
            if t.timeout.is_some_and(|d| d.is_zero()) {
                return Err(format!("`{key}.timeout` must be more than 0s"));
            }
            if let Some(rate) = t.rate_limit
                && !(rate.is_finite() && rate > 0.0)
            {
                return Err(format!(
                    "`{key}.rate_limit` must be a number of requests per second above 0, e.g. 50"
                ));
            }
            if let Some(s) = &t.retry_statuses {
                s.validate(&format!("{key}.retry_statuses"))?;
            }
            if let Some(s) = &t.permanent_statuses {
                s.validate(&format!("{key}.permanent_statuses"))?;
            }
        }
        Ok(())
    }
}

/// A signing secret as configured: `whsec_…`, or sealed with the secrets keys (`cv1:…`).
/// `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretText(pub String);

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(crate::webhook::model::REDACTED)
    }
}

impl SecretText {
    /// Whether it is sealed (opened with the secrets keys when the service starts).
    pub fn is_sealed(&self) -> bool {
        conveyor_worker::keyring::Sealed::from_stored(self.0.as_str())
            .key_id()
            .is_some()
    }

    /// A plain secret must be `whsec_` and base64 (a sealed one is checked when opened).
    fn validate(&self, key: &str) -> Result<(), String> {
        if self.is_sealed() {
            return Ok(());
        }
        crate::webhook::signature::secret_key(&self.0)
            .map(drop)
            .map_err(|e| format!("`{key}`: {e}, or a value sealed by `conveyor secrets seal`"))
    }
}

/// A set of HTTP statuses: codes (`503`) and classes (`"5xx"`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StatusSet(pub Vec<StatusRule>);

/// One member of a [`StatusSet`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StatusRule {
    /// One status, e.g. `429`.
    Code(u16),
    /// A class written `"5xx"` (or one code as a string, `"429"`).
    Text(String),
}

impl StatusRule {
    fn matches(&self, status: u16) -> bool {
        match self {
            StatusRule::Code(c) => *c == status,
            StatusRule::Text(t) => match t.trim().to_ascii_lowercase().as_bytes() {
                [d @ b'1'..=b'5', b'x', b'x'] => status / 100 == u16::from(d - b'0'),
                _ => t.trim().parse::<u16>().is_ok_and(|c| c == status),
            },
        }
    }

    fn is_valid(&self) -> bool {
        match self {
            StatusRule::Code(c) => (100..=599).contains(c),
            StatusRule::Text(t) => {
                let t = t.trim().to_ascii_lowercase();
                matches!(t.as_bytes(), [b'1'..=b'5', b'x', b'x'])
                    || t.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c))
            }
        }
    }
}

impl StatusSet {
    /// 408, 425, 429 and every 5xx.
    pub fn default_retry() -> Self {
        StatusSet(vec![
            StatusRule::Code(408),
            StatusRule::Code(425),
            StatusRule::Code(429),
            StatusRule::Text("5xx".into()),
        ])
    }

    /// Whether `status` is in the set.
    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|r| r.matches(status))
    }

    fn validate(&self, key: &str) -> Result<(), String> {
        match self.0.iter().find(|r| !r.is_valid()) {
            None => Ok(()),
            Some(bad) => {
                let shown = match bad {
                    StatusRule::Code(c) => c.to_string(),
                    StatusRule::Text(t) => format!("\"{t}\""),
                };
                Err(format!(
                    "`{key}`: {shown} is neither a status (100-599) nor a class such as \"5xx\""
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_sets() {
        let retry = StatusSet::default_retry();
        for s in [408, 425, 429, 500, 503, 599] {
            assert!(retry.contains(s), "{s}");
        }
        for s in [200, 301, 400, 404, 409, 422] {
            assert!(!retry.contains(s), "{s}");
        }
        let parsed: StatusSet = serde_json::from_str(r#"[404, "4XX", "503"]"#).unwrap();
        assert!(parsed.contains(404) && parsed.contains(418) && parsed.contains(503));
        assert!(parsed.validate("k").is_ok());
        let bad: StatusSet = serde_json::from_str(r#"[700]"#).unwrap();
        assert!(bad.validate("k").unwrap_err().contains("`k`"));
        let bad: StatusSet = serde_json::from_str(r#"["6xx"]"#).unwrap();
        assert!(bad.validate("k").is_err());
    }

    #[test]
    fn fields_lists_every_key_and_debug_hides_secrets() {
        let mut t = HttpTarget::new("https://app.example.com/tasks/");
        t.signing_secret = Some(SecretText("whsec_c2VjcmV0LXNob3VsZC1ub3Qtc2hvdw==".into()));
        t.headers
            .insert("Authorization".into(), "Bearer hunter2".into());
        t.headers.insert("X-Tenant".into(), "acme".into());
        t.timeout = Some(Duration::from_secs(1));
        t.rate_limit = Some(1.0);
        t.retry_statuses = Some(StatusSet::default());
        t.permanent_statuses = Some(StatusSet::default());
        let value = serde_json::to_value(&t).unwrap();
        let mut keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        keys.sort_unstable();
        let mut fields = HttpTarget::FIELDS.to_vec();
        fields.sort_unstable();
        assert_eq!(keys, fields);
        let shown = format!("{t:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("c2VjcmV0") && shown.contains("acme"),
            "{shown}"
        );
    }
}
