//! Endpoint CRUD and secret rotation. Endpoints are records in `webhook_endpoints`; every
//! change is a versioned write, so two admins editing at once do not lose each other's edits.
//!
//! Signing secrets are stored sealed with the service's [`Keyring`] (see
//! `conveyor_worker::keyring`), bound to their endpoint's record: the store never holds one in
//! clear. Records written before secrets were sealed hold them in clear (`secret` instead of
//! `sealed`); they read as before, and [`Webhooks::seal_secrets`] (run at start) seals them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use conveyor_worker::keyring::{KeyError, Keyring, Sealed};
use conveyor_worker::store::meta::{Expect, Put, Record, list_all};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::model::{ENDPOINTS, Endpoint, Secret};
use super::{Result, WebhookError, Webhooks, new_id, signature};

/// What creating an endpoint takes. Absent fields take the defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct NewEndpoint {
    /// Where to POST (http or https).
    #[schema(required = true, value_type = super::model::WebhookUrl)]
    pub url: String,
    /// Free text.
    #[schema(max_length = 1024)]
    pub description: String,
    /// Event types; empty: all.
    #[schema(max_items = 256)]
    pub event_types: Vec<String>,
    /// Extra headers.
    #[schema(value_type = HeadersSchema)]
    pub headers: BTreeMap<String, String>,
    /// Deliveries per second across all workers.
    #[schema(exclusive_minimum = 0.0)]
    pub rate_limit: Option<f64>,
    /// Request timeout in milliseconds.
    #[schema(minimum = 1)]
    pub timeout_ms: Option<u64>,
    /// Waits before each attempt, in milliseconds (1 to 50 of them).
    #[schema(min_items = 1, max_items = 50)]
    pub retry_schedule_ms: Option<Vec<u64>>,
    /// Follow redirects.
    pub follow_redirects: Option<bool>,
    /// A secret to use instead of a generated one (see `signature::SECRET_PATTERN`).
    #[schema(value_type = Option<super::signature::SecretSchema>)]
    pub secret: Option<String>,
    /// Start disabled.
    pub disabled: bool,
}

/// A partial update: only the fields given change. `Some(None)` clears an optional field.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointPatch {
    /// New URL.
    #[schema(value_type = Option<super::model::WebhookUrl>)]
    pub url: Option<String>,
    /// New description.
    #[schema(max_length = 1024)]
    pub description: Option<String>,
    /// New event types.
    #[schema(max_items = 256)]
    pub event_types: Option<Vec<String>>,
    /// New headers (replacing all).
    #[schema(value_type = Option<HeadersSchema>)]
    pub headers: Option<BTreeMap<String, String>>,
    /// New rate limit.
    #[schema(exclusive_minimum = 0.0)]
    pub rate_limit: Option<Option<f64>>,
    /// New timeout.
    #[schema(minimum = 1)]
    pub timeout_ms: Option<Option<u64>>,
    /// New schedule.
    #[schema(min_items = 1, max_items = 50)]
    pub retry_schedule_ms: Option<Option<Vec<u64>>>,
    /// New redirect setting.
    pub follow_redirects: Option<Option<bool>>,
}

/// What a custom header's name must be: an HTTP token, and none of [`RESERVED_HEADERS`]
/// (in any case). [`check`] enforces it; the OpenAPI document states it ([`HeadersSchema`]).
pub const HEADER_NAME_PATTERN: &str = concat!(
    r"^(?!",
    r"[Ww][Ee][Bb][Hh][Oo][Oo][Kk]-(?:[Ii][Dd]|[Tt][Ii][Mm][Ee][Ss][Tt][Aa][Mm][Pp]|[Ss][Ii][Gg][Nn][Aa][Tt][Uu][Rr][Ee])$",
    r"|[Cc][Oo][Nn][Tt][Ee][Nn][Tt]-[Tt][Yy][Pp][Ee]$|[Hh][Oo][Ss][Tt]$",
    r")[!#$%&'*+.^_`|~0-9A-Za-z-]+$",
);

/// What a custom header's value must be: visible ASCII, spaces and tabs (no line breaks), as
/// HTTP sends it. [`check`] enforces it through the HTTP client's own rule.
pub const HEADER_VALUE_PATTERN: &str = r"^[\t\x20-\x7e]*$";

/// Custom headers in the OpenAPI document: names matching [`HEADER_NAME_PATTERN`], string values.
pub struct HeadersSchema;

impl utoipa::PartialSchema for HeadersSchema {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::{ObjectBuilder, Type, schema::AdditionalProperties};
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .max_properties(Some(limits::HEADERS))
            .property_names(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .max_length(Some(limits::HEADER_NAME))
                    .pattern(Some(HEADER_NAME_PATTERN)),
            ))
            .additional_properties(Some(AdditionalProperties::RefOr(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .max_length(Some(limits::HEADER_VALUE))
                    .pattern(Some(HEADER_VALUE_PATTERN))
                    .into(),
            )))
            .description(Some(
                "At most 32 headers, 16 KiB of names and values together (a limit the server checks)",
            ))
            .into()
    }
}

impl utoipa::ToSchema for HeadersSchema {}

const RESERVED_HEADERS: [&str; 5] = [
    signature::HEADER_ID,
    signature::HEADER_TIMESTAMP,
    signature::HEADER_SIGNATURE,
    "content-type",
    "host",
];

/// Bounds on what an endpoint keeps: each delivery sends its headers and the attempt log keeps
/// them, so nothing an admin sets may grow without limit.
pub mod limits {
    /// Longest endpoint URL, in bytes (checked with the URL's form, `model::check_url`).
    pub const URL: usize = 2_048;
    /// Longest description, in bytes.
    pub const DESCRIPTION: usize = 1_024;
    /// Most event types in an endpoint's filter.
    pub const EVENT_TYPES: usize = 256;
    /// Most custom headers.
    pub const HEADERS: usize = 32;
    /// Longest custom header name, in bytes.
    pub const HEADER_NAME: usize = 256;
    /// Longest custom header value, in bytes.
    pub const HEADER_VALUE: usize = 4_096;
    /// Most bytes of custom header names and values together.
    pub const HEADERS_TOTAL: usize = 16_384;
}

fn too_long(field: &'static str, what: &str, len: usize, max: usize) -> WebhookError {
    WebhookError::invalid(
        field,
        format!("{what} is {len} bytes long; at most {max} are accepted"),
    )
}

fn check_sizes(ep: &Endpoint) -> Result<()> {
    if ep.description.len() > limits::DESCRIPTION {
        return Err(too_long(
            "description",
            "the description",
            ep.description.len(),
            limits::DESCRIPTION,
        ));
    }
    if ep.event_types.len() > limits::EVENT_TYPES {
        return Err(WebhookError::invalid(
            "event_types",
            format!(
                "{} event types given; at most {} are accepted (a filter of none receives every type)",
                ep.event_types.len(),
                limits::EVENT_TYPES
            ),
        ));
    }
    if ep.headers.len() > limits::HEADERS {
        return Err(WebhookError::invalid(
            "headers",
            format!(
                "{} headers given; at most {} are accepted",
                ep.headers.len(),
                limits::HEADERS
            ),
        ));
    }
    let mut total = 0;
    for (name, value) in &ep.headers {
        if name.len() > limits::HEADER_NAME {
            return Err(too_long(
                "headers",
                "a header name",
                name.len(),
                limits::HEADER_NAME,
            ));
        }
        if value.len() > limits::HEADER_VALUE {
            return Err(too_long(
                "headers",
                &format!("the value of `{name}`"),
                value.len(),
                limits::HEADER_VALUE,
            ));
        }
        // As HEADER_VALUE_PATTERN states: visible ASCII, spaces and tabs.
        if !value
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
        {
            return Err(WebhookError::invalid(
                "headers",
                format!(
                    "the value of `{name}` is not a valid header value (visible ASCII, spaces and tabs; no line breaks)"
                ),
            ));
        }
        total += name.len() + value.len();
    }
    if total > limits::HEADERS_TOTAL {
        return Err(too_long(
            "headers",
            "the headers together",
            total,
            limits::HEADERS_TOTAL,
        ));
    }
    Ok(())
}

fn check(ep: &Endpoint) -> Result<()> {
    check_sizes(ep)?;
    super::model::check_url("url", &ep.url)?;
    let url = reqwest::Url::parse(&ep.url)
        .map_err(|e| WebhookError::invalid("url", format!("`{}` is not a URL: {e}", ep.url)))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(WebhookError::invalid(
            "url",
            format!(
                "`{}` must be an http:// or https:// URL with a host",
                ep.url
            ),
        ));
    }
    for name in ep.headers.keys() {
        if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(WebhookError::invalid(
                "headers",
                format!("`{name}` is set by Conveyor and cannot be overridden"),
            ));
        }
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(WebhookError::invalid(
                "headers",
                format!("`{name}` is not a valid header name"),
            ));
        }
    }
    if let Some(r) = ep.rate_limit
        && !(r.is_finite() && r > 0.0)
    {
        return Err(WebhookError::invalid(
            "rate_limit",
            format!("must be a positive number of deliveries per second, got {r}"),
        ));
    }
    if ep.timeout_ms == Some(0) {
        return Err(WebhookError::invalid("timeout_ms", "must be more than 0"));
    }
    if let Some(s) = &ep.retry_schedule_ms
        && (s.is_empty() || s.len() > 50)
    {
        return Err(WebhookError::invalid(
            "retry_schedule_ms",
            "must list 1 to 50 waits (the first is usually 0)",
        ));
    }
    for s in &ep.secrets {
        signature::secret_key(&s.secret)
            .map_err(|e| WebhookError::invalid("secret", e.to_string()))?;
    }
    Ok(())
}

impl Webhooks {
    /// Creates an endpoint with a fresh secret (or the one given); returns it with its
    /// secret in clear — the only time the secret is returned unasked.
    pub async fn create_endpoint(&self, new: NewEndpoint) -> Result<Endpoint> {
        let now = Utc::now();
        let ep = Endpoint {
            id: new_id("ep_"),
            url: new.url,
            description: new.description,
            enabled: !new.disabled,
            event_types: new.event_types,
            headers: new.headers,
            secrets: vec![Secret {
                secret: new.secret.unwrap_or_else(signature::generate_secret),
                expires_at: None,
            }],
            rate_limit: new.rate_limit,
            timeout_ms: new.timeout_ms,
            retry_schedule_ms: new.retry_schedule_ms,
            follow_redirects: new.follow_redirects,
            created_at: now,
            updated_at: now,
            disabled_reason: None,
        };
        check(&ep)?;
        let value = self.stored(&ep)?;
        self.store
            .meta_put(Put::new(ENDPOINTS, &ep.id, &value).expect(Expect::Absent))
            .await?;
        Ok(ep)
    }

    /// One endpoint, secrets included (callers showing it should use [`Endpoint::redacted`]).
    pub async fn endpoint(&self, id: &str) -> Result<Endpoint> {
        Ok(self.endpoint_record(id).await?.1)
    }

    async fn endpoint_record(&self, id: &str) -> Result<(Record, Endpoint)> {
        let record = self
            .store
            .meta_get(ENDPOINTS, id)
            .await?
            .ok_or_else(|| WebhookError::not_found("endpoint", id))?;
        let ep = self.opened(&record)?;
        Ok((record, ep))
    }

    /// Every endpoint, oldest first.
    pub async fn endpoints(&self) -> Result<Vec<Endpoint>> {
        list_all(self.store.as_ref(), ENDPOINTS)
            .await?
            .iter()
            .map(|r| self.opened(r))
            .collect()
    }

    /// Read-modify-write of one endpoint, retried on a concurrent change.
    pub(crate) async fn modify_endpoint(
        &self,
        id: &str,
        change: impl Fn(&mut Endpoint) -> Result<()>,
    ) -> Result<Endpoint> {
        for _ in 0..5 {
            let (record, mut ep) = self.endpoint_record(id).await?;
            change(&mut ep)?;
            ep.updated_at = Utc::now();
            check(&ep)?;
            let value = self.stored(&ep)?;
            match self
                .store
                .meta_put(Put::new(ENDPOINTS, id, &value).expect(Expect::Version(record.version)))
                .await
            {
                Ok(_) => {
                    self.forget_endpoint(id);
                    return Ok(ep);
                }
                Err(conveyor_worker::Error::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(WebhookError::Conflict(format!(
            "endpoint {id} kept changing under this update; try again"
        )))
    }

    /// Changes the fields given.
    pub async fn update_endpoint(&self, id: &str, patch: EndpointPatch) -> Result<Endpoint> {
        self.modify_endpoint(id, |ep| {
            let p = patch.clone();
            if let Some(v) = p.url {
                ep.url = v;
            }
            if let Some(v) = p.description {
                ep.description = v;
            }
            if let Some(v) = p.event_types {
                ep.event_types = v;
            }
            if let Some(v) = p.headers {
                ep.headers = v;
            }
            if let Some(v) = p.rate_limit {
                ep.rate_limit = v;
            }
            if let Some(v) = p.timeout_ms {
                ep.timeout_ms = v;
            }
            if let Some(v) = p.retry_schedule_ms {
                ep.retry_schedule_ms = v;
            }
            if let Some(v) = p.follow_redirects {
                ep.follow_redirects = v;
            }
            Ok(())
        })
        .await
    }

    /// Enables or disables an endpoint. Enabling replays nothing by itself (see
    /// [`Webhooks::replay_failed`]) and resets its circuit.
    pub async fn set_enabled(&self, id: &str, enabled: bool) -> Result<Endpoint> {
        let ep = self
            .modify_endpoint(id, |ep| {
                ep.enabled = enabled;
                ep.disabled_reason =
                    (!enabled).then(|| super::model::DISABLED_BY_ADMIN.to_string());
                Ok(())
            })
            .await?;
        if enabled {
            self.reset_circuit(id).await?;
        }
        Ok(ep)
    }

    /// Deletes an endpoint; its queued deliveries are cancelled when they come up.
    pub async fn delete_endpoint(&self, id: &str) -> Result<()> {
        if !self.store.meta_delete(ENDPOINTS, id, Expect::Any).await? {
            return Err(WebhookError::not_found("endpoint", id));
        }
        self.forget_endpoint(id);
        let _ = self
            .store
            .meta_delete(super::model::CIRCUITS, id, Expect::Any)
            .await;
        Ok(())
    }

    /// Starts signing with a new secret (generated unless given). The old ones keep signing
    /// beside it for at most `overlap` (default `webhooks.secret_overlap`), so receivers can
    /// switch without dropping a request; overlap 0 ends every older secret at once. Returns
    /// the endpoint with its secrets in clear.
    pub async fn rotate_secret(
        &self,
        id: &str,
        secret: Option<String>,
        overlap: Option<Duration>,
    ) -> Result<Endpoint> {
        let fresh = secret.unwrap_or_else(signature::generate_secret);
        let overlap = overlap.unwrap_or(self.config.secret_overlap);
        self.modify_endpoint(id, |ep| {
            let now = Utc::now();
            // Every older secret, not only the current one, ends within `overlap`: a rotation
            // (overlap 0 above all) is how an operator revokes a leaked secret, and an earlier
            // one must not keep signing for the rest of its own overlap.
            let until = conveyor_worker::store::after(now, overlap);
            for s in &mut ep.secrets {
                s.expires_at = Some(s.expires_at.map_or(until, |t| t.min(until)));
            }
            ep.secrets.retain(|s| s.expires_at.is_some_and(|t| t > now));
            ep.secrets.insert(
                0,
                Secret {
                    secret: fresh.clone(),
                    expires_at: None,
                },
            );
            Ok(())
        })
        .await
    }

    /// The endpoint as the handler sees it: cached for `webhooks.endpoint_cache`.
    pub(crate) async fn endpoint_cached(&self, id: &str) -> Result<Option<Arc<Endpoint>>> {
        let ttl = self.config.endpoint_cache;
        if !ttl.is_zero()
            && let Some((at, ep)) = self.endpoints.lock().expect("not poisoned").get(id)
            && at.elapsed() < ttl
        {
            return Ok(ep.clone());
        }
        let ep = match self.store.meta_get(ENDPOINTS, id).await? {
            Some(r) => Some(Arc::new(self.opened(&r)?)),
            None => None,
        };
        if !ttl.is_zero() {
            self.endpoints
                .lock()
                .expect("not poisoned")
                .insert(id.to_string(), (Instant::now(), ep.clone()));
        }
        Ok(ep)
    }

    fn forget_endpoint(&self, id: &str) {
        self.endpoints.lock().expect("not poisoned").remove(id);
        self.closed.lock().expect("not poisoned").remove(id);
    }
}

/// One secret as the store keeps it (no `Debug`: a record from before sealing holds it in
/// clear).
#[derive(Serialize, Deserialize)]
struct StoredSecret {
    /// The secret, sealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed: Option<Sealed>,
    /// The secret in clear: only in records written before secrets were sealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
}

/// What an endpoint's secrets are bound to: its record. A sealed secret copied into another
/// endpoint's record does not open there.
fn secret_context(id: &str) -> String {
    format!("{ENDPOINTS}/{id}")
}

/// The stored secrets of an endpoint record.
fn stored_secrets(record: &Record) -> Result<Vec<StoredSecret>> {
    let secrets = record
        .value
        .get("secrets")
        .cloned()
        .unwrap_or(Value::Array(Vec::new()));
    Ok(serde_json::from_value(secrets)?)
}

/// The stored secrets of `records` by the id of the key they are sealed with ([`PLAINTEXT`]
/// for those in clear).
fn count_by_key(records: &[Record]) -> Result<BTreeMap<String, usize>> {
    let mut out = BTreeMap::new();
    for record in records {
        for s in stored_secrets(record)? {
            let id = match &s.sealed {
                Some(sealed) => sealed.key_id().unwrap_or("malformed").to_string(),
                None => PLAINTEXT.to_string(),
            };
            *out.entry(id).or_default() += 1;
        }
    }
    Ok(out)
}

/// Which pass [`Webhooks::seal_secrets`] makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealPass {
    /// Count only; write nothing and refuse nothing.
    Check,
    /// Seal secrets still in clear (records from before secrets were sealed); run at start.
    Plaintext,
    /// That, and re-seal every secret sealed with an older key under the current one, after
    /// which the older keys can be removed (`conveyor secrets reencrypt`).
    Reencrypt,
}

/// What [`Webhooks::seal_secrets`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SealReport {
    /// Endpoints looked at.
    pub endpoints: usize,
    /// Their secrets (current and rotated-out ones still signing) after the pass, by the id
    /// of the key they are sealed with; `plaintext` counts those still in clear.
    pub by_key: BTreeMap<String, usize>,
    /// Secrets this pass found in clear and sealed.
    pub sealed: usize,
    /// Secrets this pass moved from an older key to the current one.
    pub reencrypted: usize,
}

/// How `by_key` counts secrets still in clear.
pub const PLAINTEXT: &str = "plaintext";

impl Webhooks {
    /// The keys secrets are sealed and opened with.
    pub fn keyring(&self) -> &Keyring {
        &self.keys
    }

    /// The endpoint as the store keeps it: every secret sealed with the current key.
    fn stored(&self, ep: &Endpoint) -> Result<Value> {
        let context = secret_context(&ep.id);
        let secrets = ep
            .secrets
            .iter()
            .map(|s| {
                Ok(StoredSecret {
                    sealed: Some(self.keys.seal(&s.secret, &context)?),
                    secret: None,
                    expires_at: s.expires_at,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut value = serde_json::to_value(ep)?;
        if let Some(fields) = value.as_object_mut() {
            fields.insert("secrets".into(), serde_json::to_value(secrets)?);
        }
        Ok(value)
    }

    /// An endpoint record read back, its secrets opened.
    fn opened(&self, record: &Record) -> Result<Endpoint> {
        let context = secret_context(&record.key);
        let secrets = stored_secrets(record)?
            .into_iter()
            .map(|s| {
                let secret = match (s.sealed, s.secret) {
                    (Some(sealed), _) => self.keys.open(&sealed, &context)?,
                    (None, Some(clear)) => clear,
                    (None, None) => {
                        return Err(KeyError::Format {
                            context: context.clone(),
                        }
                        .into());
                    }
                };
                Ok(Secret {
                    secret,
                    expires_at: s.expires_at,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut value = record.value.clone();
        if let Some(fields) = value.as_object_mut() {
            fields.insert("secrets".into(), serde_json::to_value(secrets)?);
        }
        Ok(serde_json::from_value(value)?)
    }

    /// Goes over every endpoint's stored secrets: counts them by key and, as `pass` says,
    /// seals those in clear and re-seals those under older keys. Before writing anything it
    /// refuses (naming the key ids) when a secret is sealed with a key that is not configured,
    /// or when secrets in clear must be sealed and no key is configured.
    pub async fn seal_secrets(&self, pass: SealPass) -> Result<SealReport> {
        let records = list_all(self.store.as_ref(), ENDPOINTS).await?;
        let by_key = count_by_key(&records)?;
        if pass == SealPass::Check {
            return Ok(SealReport {
                endpoints: records.len(),
                by_key,
                ..SealReport::default()
            });
        }
        for record in &records {
            for sealed in stored_secrets(record)?
                .iter()
                .filter_map(|s| s.sealed.as_ref())
            {
                if sealed.key_id().is_none_or(|id| !self.keys.has(id)) {
                    // Opening it says which key is missing, and how to add it.
                    self.keys.open(sealed, &secret_context(&record.key))?;
                }
            }
        }
        if let Some(&clear) = by_key.get(PLAINTEXT)
            && self.keys.is_empty()
        {
            return Err(KeyError::NoKey {
                what: format!(
                    "{clear} webhook signing secret(s) are stored in clear and must be encrypted"
                ),
            }
            .into());
        }
        let (mut sealed, mut reencrypted) = (0, 0);
        for record in &records {
            let (s, r) = self.reseal(&record.key, pass).await?;
            sealed += s;
            reencrypted += r;
        }
        let records = if sealed + reencrypted > 0 {
            list_all(self.store.as_ref(), ENDPOINTS).await?
        } else {
            records
        };
        Ok(SealReport {
            endpoints: records.len(),
            by_key: count_by_key(&records)?,
            sealed,
            reencrypted,
        })
    }

    /// Rewrites one endpoint with its secrets sealed under the current key if `pass` says it
    /// needs it; returns how many were sealed from clear and how many re-sealed.
    async fn reseal(&self, id: &str, pass: SealPass) -> Result<(usize, usize)> {
        for _ in 0..5 {
            let Some(record) = self.store.meta_get(ENDPOINTS, id).await? else {
                return Ok((0, 0));
            };
            let stored = stored_secrets(&record)?;
            let clear = stored.iter().filter(|s| s.sealed.is_none()).count();
            let old = match pass {
                SealPass::Reencrypt => stored
                    .iter()
                    .filter(|s| s.sealed.as_ref().is_some_and(|x| !self.keys.is_current(x)))
                    .count(),
                _ => 0,
            };
            if clear + old == 0 {
                return Ok((0, 0));
            }
            let ep = self.opened(&record)?;
            let value = self.stored(&ep)?;
            match self
                .store
                .meta_put(Put::new(ENDPOINTS, id, &value).expect(Expect::Version(record.version)))
                .await
            {
                Ok(_) => {
                    self.forget_endpoint(id);
                    return Ok((clear, old));
                }
                Err(conveyor_worker::Error::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(WebhookError::Conflict(format!(
            "endpoint {id} kept changing while its secrets were being encrypted; try again"
        )))
    }
}
