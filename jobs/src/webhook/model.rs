//! The records webhooks keep in the store's meta collections, and their settings.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Collection of endpoints, keyed by [`Endpoint::id`].
pub const ENDPOINTS: &str = "webhook_endpoints";
/// Collection of events, keyed by [`Event::id`].
pub const EVENTS: &str = "webhook_events";
/// Collection of event idempotency keys (value: the event id).
pub const EVENT_KEYS: &str = "webhook_event_keys";
/// Collection of attempt-log entries, keyed `{endpoint|direct}:{event}:{attempt}`.
pub const ATTEMPTS: &str = "webhook_attempts";
/// Collection of circuit-breaker states, keyed by endpoint id.
pub const CIRCUITS: &str = "webhook_circuits";
/// Collection of per-minute health counters, keyed `{endpoint}:{unix minute}`.
pub const HEALTH: &str = "webhook_health";
/// The shared audit log (owned by the API; webhooks write auto-disable records into it).
pub const AUDIT: &str = "audit";

/// The job kind of one delivery.
pub const KIND: &str = "webhook.deliver";

/// The default queue of deliveries (`webhooks.queue`).
pub const QUEUE: &str = "webhooks";

/// The event emitted when an endpoint is disabled automatically.
pub const EVENT_ENDPOINT_DISABLED: &str = "webhook.endpoint.disabled";

/// Event types starting with this are the platform's own (e.g. [`EVENT_ENDPOINT_DISABLED`]):
/// clients cannot send them, so a receiver can trust one.
pub const SYSTEM_EVENT_PREFIX: &str = "webhook.";

/// A receiver of events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Endpoint {
    /// `ep_` and a UUIDv7 in hex.
    pub id: String,
    /// Where deliveries are POSTed.
    pub url: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Disabled endpoints get no new deliveries; queued ones are cancelled when they come up.
    pub enabled: bool,
    /// Event types it receives; empty means all. `invoice.*` matches every `invoice.` type.
    #[serde(default)]
    pub event_types: Vec<String>,
    /// Extra request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Signing secrets, the current one first; a rotated-out secret stays until `expires_at`.
    pub secrets: Vec<Secret>,
    /// Deliveries per second, shared by every worker (`None`: unlimited).
    #[serde(default)]
    pub rate_limit: Option<f64>,
    /// Request timeout in milliseconds (`None`: `webhooks.timeout`).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Wait before each attempt in milliseconds, the first usually 0 (`None`: the default).
    #[serde(default)]
    pub retry_schedule_ms: Option<Vec<u64>>,
    /// Follow redirects (each hop guarded) (`None`: `webhooks.follow_redirects`).
    #[serde(default)]
    pub follow_redirects: Option<bool>,
    /// When created.
    pub created_at: DateTime<Utc>,
    /// When last changed.
    pub updated_at: DateTime<Utc>,
    /// Why it was disabled, when it was.
    #[serde(default)]
    pub disabled_reason: Option<String>,
}

/// The `disabled_reason` of an endpoint an admin disabled (any other reason is automatic).
pub const DISABLED_BY_ADMIN: &str = "disabled by an admin";

impl Endpoint {
    /// Whether it was disabled automatically, for failing (`webhooks.auto_disable_after`).
    pub fn disabled_for_failing(&self) -> bool {
        !self.enabled
            && self
                .disabled_reason
                .as_deref()
                .is_some_and(|r| r != DISABLED_BY_ADMIN)
    }
}

/// What a receiver's URL must look like: `http` or `https`; a host name (labels of letters,
/// digits and `-`, the last starting with a letter), an IPv4 address or a bracketed IPv6
/// address (whose exact grammar the URL parser checks after this); an optional port; a
/// path and query of URL characters and `%XX` escapes; no fragment, user info or spaces.
/// The server checks it ([`check_url`]) and the OpenAPI document states it ([`WebhookUrl`]).
pub const URL_PATTERN: &str = concat!(
    r"^https?://",
    r"((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?",
    r"|(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])",
    r"|\[[0-9A-Fa-f:.]{2,45}\])",
    r"(?::(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?",
    r"(?:/(?:[A-Za-z0-9._~!$&'()*+,;=:@/-]|%[0-9A-Fa-f]{2})*)?",
    r"(?:\?(?:[A-Za-z0-9._~!$&'()*+,;=:@/?-]|%[0-9A-Fa-f]{2})*)?$",
);

/// Refuses a URL that does not match [`URL_PATTERN`], naming `field`.
pub fn check_url(field: &'static str, url: &str) -> Result<(), crate::webhook::WebhookError> {
    static RULE: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(URL_PATTERN).expect("URL_PATTERN is a valid regex")
    });
    let max = super::endpoint::limits::URL;
    if url.len() > max {
        return Err(crate::webhook::WebhookError::invalid(
            field,
            format!(
                "the URL is {} bytes long; at most {max} are accepted",
                url.len()
            ),
        ));
    }
    if RULE.is_match(url) {
        Ok(())
    } else {
        Err(crate::webhook::WebhookError::invalid(
            field,
            format!(
                "`{url}` must be an http:// or https:// URL with a host name or IPv4 address, \
                 e.g. https://example.com/webhooks (no fragment, user info or spaces)"
            ),
        ))
    }
}

/// A receiver's URL in the OpenAPI document: a string matching [`URL_PATTERN`].
pub struct WebhookUrl;

impl utoipa::PartialSchema for WebhookUrl {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::Type::String)
            .max_length(Some(super::endpoint::limits::URL))
            .pattern(Some(URL_PATTERN))
            .examples(["https://example.com/webhooks"])
            .description(Some("An http:// or https:// URL (see URL_PATTERN)"))
            .into()
    }
}

impl ToSchema for WebhookUrl {}

/// One signing secret.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Secret {
    /// `whsec_…`.
    pub secret: String,
    /// When a rotated-out secret stops signing (`None` for the current one).
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

impl Endpoint {
    /// Whether it receives `event_type`.
    pub fn subscribes_to(&self, event_type: &str) -> bool {
        self.event_types.is_empty()
            || self.event_types.iter().any(|t| {
                t == "*"
                    || t == event_type
                    || t.strip_suffix('*')
                        .is_some_and(|prefix| event_type.starts_with(prefix))
            })
    }

    /// The secrets that sign at `now`.
    pub fn live_secrets(&self, now: DateTime<Utc>) -> impl Iterator<Item = &str> {
        self.secrets
            .iter()
            .filter(move |s| s.expires_at.is_none_or(|t| t > now))
            .map(|s| s.secret.as_str())
    }

    /// A copy whose secrets show only their last four characters, for listings and logs.
    pub fn redacted(&self) -> Endpoint {
        let mut out = self.clone();
        for s in &mut out.secrets {
            let tail: String = s
                .secret
                .chars()
                .rev()
                .take(4)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            s.secret = format!("whsec_…{tail}");
        }
        out
    }

    /// [`Endpoint::redacted`], and with `show_headers` false also every custom header value
    /// replaced by [`REDACTED`]: headers often carry the receiver's credentials
    /// (`Authorization`), which only an admin may read back.
    pub fn redacted_for(&self, show_headers: bool) -> Endpoint {
        let mut out = self.redacted();
        if !show_headers {
            for v in out.headers.values_mut() {
                *v = REDACTED.into();
            }
        }
        out
    }
}

/// What a hidden header value reads as.
pub const REDACTED: &str = "***";

/// Whether a request header's value is likely a credential, by its name (`Authorization`,
/// `Cookie`, `X-Api-Key`, `X-Auth-Token`, …). Such values are not kept in the attempt log.
pub fn is_secret_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "auth",
        "cookie",
        "token",
        "secret",
        "key",
        "pass",
        "session",
        "credential",
        "signature",
    ]
    .iter()
    .any(|w| name.contains(w))
}

/// A sent event: what was fanned out, and to whom.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// `evt_` and a UUIDv7 in hex; also the `webhook-id` of its deliveries.
    pub id: String,
    /// E.g. `invoice.paid`.
    pub event_type: String,
    /// The application's data (the body's `data`).
    pub payload: serde_json::Value,
    /// The sender's deduplication key.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// When it was sent.
    pub created_at: DateTime<Utc>,
    /// One delivery per subscribed endpoint.
    pub deliveries: Vec<DeliveryRef>,
}

/// One delivery job of an event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeliveryRef {
    /// The endpoint (`None` for a one-off delivery to a URL).
    pub endpoint_id: Option<String>,
    /// The delivery job.
    pub job_id: String,
}

/// Args of the `webhook.deliver` job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverArgs {
    /// The event (also the `webhook-id` header).
    pub event_id: String,
    /// Its type.
    pub event_type: String,
    /// When the event was sent (the body's `timestamp`).
    pub created_at: DateTime<Utc>,
    /// Its payload.
    pub payload: serde_json::Value,
    /// The endpoint, for endpoint deliveries.
    #[serde(default)]
    pub endpoint_id: Option<String>,
    /// The URL, for one-off deliveries.
    #[serde(default)]
    pub url: Option<String>,
}

/// One line of the attempt log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Attempt {
    /// `att_` and a UUIDv7.
    pub id: String,
    /// The endpoint, or `None` for one-off deliveries.
    pub endpoint_id: Option<String>,
    /// The event.
    pub event_id: String,
    /// The delivery job.
    pub job_id: String,
    /// The job's attempt number.
    pub attempt: i32,
    /// When it was sent.
    pub at: DateTime<Utc>,
    /// Where.
    pub url: String,
    /// What was sent (no secrets: signatures only).
    pub request_headers: BTreeMap<String, String>,
    /// The status, if a response came.
    pub status: Option<u16>,
    /// Milliseconds until the answer (or the failure).
    pub latency_ms: u64,
    /// The first 4 KiB of the answer.
    pub response_body: String,
    /// The transport error, if any.
    pub error: Option<String>,
    /// `delivered`, `retry`, `failed` (final).
    pub result: String,
}

/// A circuit breaker's state for one endpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Circuit {
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Open (sending stopped) until then; after it, one probe is let through.
    pub open_until: Option<DateTime<Utc>>,
    /// A probe is in flight until then.
    pub probe_until: Option<DateTime<Utc>>,
    /// The first failure since the last success.
    pub failing_since: Option<DateTime<Utc>>,
    /// The last success.
    pub last_success_at: Option<DateTime<Utc>>,
}

/// The circuit as shown to users.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    /// Sending.
    Closed,
    /// Stopped until the cool-down ends.
    Open,
    /// Cool-down over: the next delivery is a probe.
    HalfOpen,
}

impl Circuit {
    /// The state at `now`.
    pub fn state(&self, now: DateTime<Utc>) -> CircuitState {
        match self.open_until {
            None => CircuitState::Closed,
            Some(t) if t > now => CircuitState::Open,
            Some(_) => CircuitState::HalfOpen,
        }
    }
}

/// `[webhooks]` in the config file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// The queue deliveries run on.
    pub queue: String,
    /// Concurrent deliveries per process on that queue (added to the worker's queues when
    /// `serve` runs the worker role and the queue is not listed).
    pub concurrency: u32,
    /// CIDRs the SSRF guard lets through (on-premise receivers, tests), e.g. `10.1.0.0/16`.
    pub allow_cidrs: Vec<IpNet>,
    /// Default wait before each attempt (the first is usually `0s`).
    #[serde(with = "humantime_list")]
    pub retry_schedule: Vec<Duration>,
    /// Default request timeout.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// TCP/TLS connect timeout.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Follow redirects by default (each hop still guarded).
    pub follow_redirects: bool,
    /// A 4xx other than 408/409/425/429 is final from this attempt on.
    pub permanent_4xx_after: i32,
    /// The longest `Retry-After` honoured.
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
    /// Consecutive failures that open an endpoint's circuit.
    pub circuit_threshold: u32,
    /// How long an open circuit stops sending before one probe.
    #[serde(with = "humantime_serde")]
    pub circuit_cooldown: Duration,
    /// An endpoint failing without a success for this long is disabled.
    #[serde(with = "humantime_serde")]
    pub auto_disable_after: Duration,
    /// How long a rotated-out secret keeps signing by default.
    #[serde(with = "humantime_serde")]
    pub secret_overlap: Duration,
    /// Keep the attempt log.
    pub attempt_log: bool,
    /// How long attempt-log entries are kept.
    #[serde(with = "humantime_serde")]
    pub attempt_log_ttl: Duration,
    /// How long events and their idempotency keys are kept.
    #[serde(with = "humantime_serde")]
    pub event_ttl: Duration,
    /// How long a worker reuses an endpoint's settings and a closed circuit before reading
    /// them again (0s: every delivery reads them).
    #[serde(with = "humantime_serde")]
    pub endpoint_cache: Duration,
    /// How often a worker writes its health counters to the store.
    #[serde(with = "humantime_serde")]
    pub health_flush: Duration,
    /// Signs one-off deliveries to a URL (`whsec_…`); unset: they go unsigned.
    pub direct_secret: Option<String>,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Self {
            queue: QUEUE.into(),
            concurrency: 64,
            allow_cidrs: Vec::new(),
            retry_schedule: super::retry_policy::default_schedule(),
            timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(5),
            follow_redirects: false,
            permanent_4xx_after: 3,
            max_retry_after: Duration::from_secs(3600),
            circuit_threshold: 10,
            circuit_cooldown: Duration::from_secs(60),
            auto_disable_after: Duration::from_secs(5 * DAY),
            secret_overlap: Duration::from_secs(DAY),
            attempt_log: true,
            attempt_log_ttl: Duration::from_secs(7 * DAY),
            event_ttl: Duration::from_secs(7 * DAY),
            endpoint_cache: Duration::from_secs(1),
            health_flush: Duration::from_secs(5),
            direct_secret: None,
        }
    }
}

impl WebhookConfig {
    /// Checks what serde cannot; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        conveyor_worker::job::check_name("webhooks.queue", &self.queue)
            .map_err(|e| e.to_string())?;
        if self.retry_schedule.is_empty() {
            return Err(
                "`webhooks.retry_schedule` is empty; list at least one wait, e.g. [\"0s\"]".into(),
            );
        }
        if self.concurrency == 0 {
            return Err("`webhooks.concurrency` must be at least 1".into());
        }
        if self.circuit_threshold == 0 {
            return Err("`webhooks.circuit_threshold` must be at least 1".into());
        }
        if let Some(secret) = &self.direct_secret {
            super::signature::secret_key(secret)
                .map_err(|e| format!("`webhooks.direct_secret`: {e}"))?;
        }
        if self.timeout.is_zero() {
            return Err("`webhooks.timeout` must be more than 0s".into());
        }
        Ok(())
    }
}

/// A list of humantime durations (`["0s", "5s", "5m"]`).
mod humantime_list {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        v.iter()
            .map(|d| humantime::format_duration(*d).to_string())
            .collect::<Vec<_>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| humantime::parse_duration(s).map_err(serde::de::Error::custom))
            .collect()
    }
}
