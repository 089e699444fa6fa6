//! `http.request`: a job that calls the application's own HTTP endpoint, as Cloud Tasks' HTTP
//! targets do, so the application's handler is just an HTTP route.
//!
//! Where to start reading:
//! - [`HttpTargets`]: the service — the configured targets with their opened signing secrets
//!   and guarded HTTP clients; [`HttpTargets::check_args`] is the enqueue-time rule (a job
//!   naming a target reaches only URLs under its `base_url`; raw URLs only when
//!   `http_requests.allow_raw_urls` is on), run by every client path through
//!   [`HttpTargets::validators`].
//! - [`request`]: the job handler — the shared rate limit, signing, the request, the verdict
//!   (2xx done, `Retry-After` honoured, retry and permanent statuses), the attempt log.
//! - [`config`]: `[http_requests]` and `[http_targets.<name>]`; [`resolve`]: URL resolution.
//!
//! It reuses webhook delivery's machinery: the SSRF guard and HTTP client
//! ([`crate::webhook::client`]), Standard Webhooks signing ([`crate::webhook::signature`]),
//! `Retry-After` parsing, the group-committed attempt log and the store's token buckets.

pub mod config;
pub mod request;
pub mod resolve;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use conveyor_worker::keyring::{Keyring, Sealed};
use conveyor_worker::validate::ArgsValidators;
use conveyor_worker::{Error, JobArgs, JobContext, KindOptions, Registry, Store};
use serde::{Deserialize, Serialize};
use url::Url;

pub use config::{HttpConfig, HttpRequestsConfig, HttpTarget, SecretText, StatusRule, StatusSet};
pub use request::HttpAttempt;

use crate::webhook::client::Client;
use crate::webhook::guard::Guard;
use crate::webhook::{attempt_log, signature};

/// The job kind.
pub const KIND: &str = "http.request";

/// Collection of attempt-log entries, keyed `{job id}:{attempt id}`.
pub const ATTEMPTS: &str = "http_attempts";

/// Methods a job may use.
pub const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Most headers one job may give.
pub const MAX_HEADERS: usize = 64;

/// Headers Conveyor sets on every request (a job or a target cannot set them).
pub const HEADER_JOB_ID: &str = "conveyor-job-id";
/// See [`HEADER_JOB_ID`].
pub const HEADER_ATTEMPT: &str = "conveyor-attempt";
/// See [`HEADER_JOB_ID`].
pub const HEADER_KIND: &str = "conveyor-kind";
/// See [`HEADER_JOB_ID`]: the target's name (absent for a raw URL).
pub const HEADER_TARGET: &str = "conveyor-target";

/// Args of `http.request`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestArgs {
    /// A target configured in `[http_targets.<name>]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// With a target: a path below its base URL (`invoices/42/send`) or an absolute URL under
    /// it; absent, the base URL itself. Without a target: an absolute URL (only when
    /// `http_requests.allow_raw_urls` is on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `POST` unless given (one of [`METHODS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Extra request headers (the target's own headers win over these).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The body: a JSON value is sent as JSON, a string as text; absent or `null`, no body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
}

impl JobArgs for RequestArgs {
    const KIND: &'static str = KIND;
}

/// Why the service could not be built from its config.
#[derive(Debug, thiserror::Error)]
pub enum HttpTargetError {
    /// A setting is wrong; the message names the key (and never shows a secret).
    #[error("{0}")]
    Config(String),
    /// A sealed signing secret does not open with the configured keys.
    #[error("`{key}`: {source}")]
    Secret {
        /// The config key.
        key: String,
        /// Why.
        source: conveyor_worker::keyring::KeyError,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

impl HttpTargetError {
    /// The operator must fix the configuration (a CLI exits 2).
    pub fn is_config(&self) -> bool {
        !matches!(self, HttpTargetError::Client(_))
    }
}

/// One target, ready to send.
pub(crate) struct Target {
    pub(crate) name: String,
    pub(crate) base: Url,
    pub(crate) config: HttpTarget,
    pub(crate) keys: Vec<Vec<u8>>,
    pub(crate) client: Client,
}

/// The `http.request` service: the settings, the targets with their opened secrets and
/// guarded clients, the store for the shared rate limits and the attempt log. One per
/// process, shared (`Arc`).
pub struct HttpTargets {
    store: Arc<dyn Store>,
    config: HttpRequestsConfig,
    targets: HashMap<String, Target>,
    raw_guard: Guard,
    raw_client: Client,
    raw_keys: Vec<Vec<u8>>,
    attempt_log: attempt_log::AttemptLog,
}

impl std::fmt::Debug for HttpTargets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&str> = self.targets.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("HttpTargets")
            .field("targets", &names)
            .field("allow_raw_urls", &self.config.allow_raw_urls)
            .finish_non_exhaustive()
    }
}

/// The record a sealed signing secret is bound to (`conveyor secrets seal --for <record>`).
pub fn secret_context(config_key: &str) -> String {
    format!("config/{config_key}")
}

/// Opens a configured signing secret (`whsec_…` as is, a sealed `cv1:…` with `keys`) into its
/// HMAC key.
fn open_secret(key: &str, value: &SecretText, keys: &Keyring) -> Result<Vec<u8>, HttpTargetError> {
    let secret = if value.is_sealed() {
        keys.open(&Sealed::from_stored(value.0.as_str()), &secret_context(key))
            .map_err(|source| HttpTargetError::Secret {
                key: key.to_string(),
                source,
            })?
    } else {
        value.0.clone()
    };
    signature::secret_key(&secret).map_err(|e| HttpTargetError::Config(format!("`{key}`: {e}")))
}

impl HttpTargets {
    /// The service over `store` with `config`; sealed signing secrets open with `keys`.
    pub fn new(
        store: Arc<dyn Store>,
        config: HttpConfig,
        keys: &Keyring,
    ) -> Result<Self, HttpTargetError> {
        config.validate().map_err(HttpTargetError::Config)?;
        let HttpConfig { requests, targets } = config;
        let raw_guard =
            Guard::new(requests.allow_cidrs.clone()).naming("http_requests.allow_cidrs");
        let raw_client = Client::new(raw_guard.clone(), requests.connect_timeout)?;
        let raw_keys = match &requests.signing_secret {
            Some(s) => vec![open_secret("http_requests.signing_secret", s, keys)?],
            None => Vec::new(),
        };
        let mut built = HashMap::with_capacity(targets.len());
        for (name, t) in targets {
            let base = resolve::check_base_url(&t.base_url).map_err(HttpTargetError::Config)?;
            let mut allow = requests.allow_cidrs.clone();
            allow.extend(t.allow_cidrs.iter().copied());
            let guard = Guard::new(allow).naming("the target's allow_cidrs");
            let client = Client::new(guard, requests.connect_timeout)?;
            let keys = match &t.signing_secret {
                Some(s) => vec![open_secret(
                    &format!("http_targets.{name}.signing_secret"),
                    s,
                    keys,
                )?],
                None => Vec::new(),
            };
            built.insert(
                name.clone(),
                Target {
                    name,
                    base,
                    config: t,
                    keys,
                    client,
                },
            );
        }
        Ok(Self {
            store,
            config: requests,
            targets: built,
            raw_guard,
            raw_client,
            raw_keys,
            attempt_log: attempt_log::AttemptLog::default(),
        })
    }

    /// `[http_requests]`.
    pub fn config(&self) -> &HttpRequestsConfig {
        &self.config
    }

    /// The configured target names, sorted.
    pub fn target_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.targets.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    fn names_hint(&self) -> String {
        let names = self.target_names();
        if names.is_empty() {
            "none is configured: add one as [http_targets.<name>] with its base_url".into()
        } else {
            format!("configured: {}", names.join(", "))
        }
    }

    /// Where a job's request goes, and through which target. `Err` is bad input whose field
    /// is a path inside the args (`target`, `url`).
    pub(crate) fn destination(
        &self,
        args: &RequestArgs,
    ) -> conveyor_worker::Result<(Option<&Target>, Url)> {
        match &args.target {
            Some(name) => {
                let Some(target) = self.targets.get(name) else {
                    return Err(Error::invalid(
                        "target",
                        format!("no HTTP target `{name}` ({})", self.names_hint()),
                    ));
                };
                let url = resolve::resolve(&target.base, args.url.as_deref()).map_err(|m| {
                    Error::invalid(
                        "url",
                        format!(
                            "{m}: a job naming target `{name}` may only reach URLs under {}; \
                             give a path below it, such as \"invoices/42/send\"",
                            target.base
                        ),
                    )
                })?;
                Ok((Some(target), url))
            }
            None => {
                let Some(text) = &args.url else {
                    return Err(Error::invalid(
                        "target",
                        format!("give the `target` to call ({})", self.names_hint()),
                    ));
                };
                if !self.config.allow_raw_urls {
                    return Err(Error::invalid(
                        "target",
                        format!(
                            "a URL without a target is refused (http_requests.allow_raw_urls is \
                             off): name the target to call ({}) and give `url` as a path below it",
                            self.names_hint()
                        ),
                    ));
                }
                if text.len() > resolve::MAX_URL {
                    return Err(Error::invalid(
                        "url",
                        format!("at most {} bytes are accepted", resolve::MAX_URL),
                    ));
                }
                let url = resolve::parse_absolute(text).map_err(|m| Error::invalid("url", m))?;
                // Literal addresses are refused now; names are checked when they resolve.
                self.raw_guard
                    .check_url(&url)
                    .map_err(|b| Error::invalid("url", b.to_string()))?;
                Ok((None, url))
            }
        }
    }

    /// The enqueue-time rule of `http.request`: args of the right shape, a known method,
    /// valid headers, and a destination the job may reach (see [`HttpTargets::destination`]).
    /// A refusal names its field inside the args.
    pub fn check_args(&self, args: &serde_json::Value) -> conveyor_worker::Result<()> {
        let args = RequestArgs::deserialize(args).map_err(|e| {
            Error::invalid(
                "",
                format!(
                    "{e}; `{KIND}` takes {{\"target\", \"url\", \"method\", \"headers\", \"body\"}}"
                ),
            )
        })?;
        check_method(args.method.as_deref())?;
        if args.headers.len() > MAX_HEADERS {
            return Err(Error::invalid(
                "headers",
                format!("at most {MAX_HEADERS} headers"),
            ));
        }
        for (name, value) in &args.headers {
            check_header(name, value).map_err(|m| Error::invalid(format!("headers.{name}"), m))?;
        }
        self.destination(&args)?;
        Ok(())
    }

    /// The enqueue-time checks of the kinds this service runs (`http.request`), for
    /// `conveyor_admin::Admin::with_validators`.
    pub fn validators(self: &Arc<Self>) -> ArgsValidators {
        let mut v = ArgsValidators::new();
        self.add_validators(&mut v);
        v
    }

    /// Adds `http.request`'s check to `validators`.
    pub fn add_validators(self: &Arc<Self>, validators: &mut ArgsValidators) {
        let me = self.clone();
        validators.register(KIND, move |args| me.check_args(args));
    }

    /// The longest a request may take, for the job's own timeout.
    fn longest_timeout(&self) -> Duration {
        self.targets
            .values()
            .filter_map(|t| t.config.timeout)
            .fold(self.config.timeout, Duration::max)
    }
}

/// The method, `POST` if absent; `Err` names `method`.
pub(crate) fn check_method(method: Option<&str>) -> conveyor_worker::Result<reqwest::Method> {
    let m = method.unwrap_or("POST");
    if !METHODS.contains(&m) {
        return Err(Error::invalid(
            "method",
            format!("`{m}` is not one of {}", METHODS.join(", ")),
        ));
    }
    reqwest::Method::from_bytes(m.as_bytes()).map_err(|e| Error::invalid("method", e.to_string()))
}

/// Headers neither a job nor a target may set: the transport's own, and Conveyor's.
fn reserved_header(lower: &str) -> bool {
    matches!(
        lower,
        "host"
            | "content-length"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "upgrade"
            | "expect"
    ) || lower.starts_with("proxy-")
        || lower.starts_with("webhook-")
        || lower.starts_with("conveyor-")
}

/// Checks one header a job or a target gives; the message never shows the value.
pub(crate) fn check_header(name: &str, value: &str) -> Result<(), String> {
    if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
        return Err(format!(
            "`{name}` is not a valid header name (letters, digits and !#$%&'*+-.^_`|~)"
        ));
    }
    if reserved_header(&name.to_ascii_lowercase()) {
        return Err(format!(
            "`{name}` is set by Conveyor or the HTTP client; leave it out"
        ));
    }
    if value.len() > 8192
        || value
            .bytes()
            .any(|b| !(b == b'\t' || (0x20..0x7f).contains(&b)))
    {
        return Err(
            "the value must be at most 8192 visible ASCII characters, spaces or tabs".into(),
        );
    }
    Ok(())
}

/// Registers `http.request`, run by `targets`.
pub fn register(registry: &mut Registry, targets: Arc<HttpTargets>) {
    let options = KindOptions {
        // The request has its own timeout; the job's is a backstop for a stuck store call.
        timeout: Some(
            targets.longest_timeout() + targets.config.connect_timeout + Duration::from_secs(30),
        ),
        ..KindOptions::default()
    };
    registry.register_with(KIND, options, move |args: RequestArgs, ctx: JobContext| {
        let targets = targets.clone();
        async move { targets.run(args, ctx).await }
    });
}
