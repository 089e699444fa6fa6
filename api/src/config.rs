//! `[api]`: limits, rate limits, where `/metrics` is served, CORS. Every default is here and
//! in `config/conveyor.example.toml`.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// API settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Largest request body in bytes (default 4 MiB, so a batch of small jobs fits).
    pub body_limit: usize,
    /// Largest `args` of one job, as serialized JSON bytes (default 256 KiB).
    pub args_limit: usize,
    /// Most jobs in one batch enqueue (default 1,000).
    pub batch_limit: usize,
    /// Most jobs one bulk cancel touches per call (default 10,000; the answer says if more remain).
    pub bulk_cancel_limit: u32,
    /// Per-key rate limit.
    pub rate_limit: RateLimitConfig,
    /// Who may read `/metrics`.
    pub metrics: MetricsConfig,
    /// Origins allowed by CORS; empty (the default) turns CORS off.
    pub cors_origins: Vec<String>,
    /// The admin dashboard under `/dashboard`.
    pub dashboard: DashboardConfig,
}

/// `[api.dashboard]`: the browser dashboard served under `/dashboard` on the API listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DashboardConfig {
    /// Serve it (default true).
    pub enabled: bool,
    /// How long a sign-in lasts (default 8 hours).
    #[serde(with = "humantime_serde")]
    pub session_ttl: std::time::Duration,
    /// Mark the session cookie `Secure` (send it over HTTPS only). Turn on when a TLS proxy
    /// fronts the listener (default false: the listener itself speaks plain HTTP).
    pub secure_cookie: bool,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            session_ttl: std::time::Duration::from_secs(8 * 3600),
            secure_cookie: false,
        }
    }
}

impl ApiConfig {
    /// The limits the admin layer applies to every caller.
    pub fn limits(&self) -> conveyor_admin::Limits {
        conveyor_admin::Limits {
            args_limit: self.args_limit,
            batch_limit: self.batch_limit,
            bulk_cancel_limit: self.bulk_cancel_limit,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            body_limit: 4 * 1024 * 1024,
            args_limit: 256 * 1024,
            batch_limit: 1000,
            bulk_cancel_limit: 10_000,
            rate_limit: RateLimitConfig::default(),
            metrics: MetricsConfig::default(),
            cors_origins: Vec::new(),
            dashboard: DashboardConfig::default(),
        }
    }
}

/// `[api.rate_limit]`: a token bucket per API key, kept in the store so every API replica
/// shares it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Off switch (default on).
    pub enabled: bool,
    /// Requests per second refilled (default 100).
    pub per_second: f64,
    /// Bucket size: requests allowed at once after a quiet spell (default 200).
    pub burst: f64,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            per_second: 100.0,
            burst: 200.0,
        }
    }
}

/// `[api.metrics]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `/metrics` on the API listener needs a key with the `read` scope (default true).
    pub require_key: bool,
    /// Also serve `/metrics` (without a key) on this address, e.g. `127.0.0.1:9090` for a
    /// scraper on a private network. Default: none.
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            require_key: true,
            listen: None,
        }
    }
}

impl ApiConfig {
    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.body_limit < 1024 {
            return Err("`api.body_limit` must be at least 1024 bytes".into());
        }
        if self.args_limit == 0 || self.args_limit > self.body_limit {
            return Err("`api.args_limit` must be between 1 and `api.body_limit`".into());
        }
        if self.batch_limit == 0 || self.batch_limit > 10_000 {
            return Err("`api.batch_limit` must be between 1 and 10000".into());
        }
        if self.bulk_cancel_limit == 0 {
            return Err("`api.bulk_cancel_limit` must be at least 1".into());
        }
        let r = &self.rate_limit;
        if r.enabled && !(r.per_second.is_finite() && r.per_second > 0.0 && r.burst >= 1.0) {
            return Err(
                "`api.rate_limit`: per_second must be positive and burst at least 1".into(),
            );
        }
        let ttl = self.dashboard.session_ttl;
        if ttl < std::time::Duration::from_secs(60)
            || ttl > std::time::Duration::from_secs(30 * 86400)
        {
            return Err("`api.dashboard.session_ttl` must be between 1m and 30d".into());
        }
        for origin in &self.cors_origins {
            if origin != "*" && axum::http::HeaderValue::from_str(origin).is_err() {
                return Err(format!(
                    "`api.cors_origins`: `{origin}` is not a valid origin"
                ));
            }
        }
        Ok(())
    }
}
