//! Webhook delivery: signed, retried, rate-limited, guarded.
//!
//! Where to start reading:
//! - [`Webhooks`]: the service every caller (CLI, HTTP API, the job handler) goes through.
//!   Its methods are spread over the modules that do the work:
//!   - [`endpoint`]: endpoint CRUD and secret rotation, secrets sealed at rest
//!     ([`Webhooks::seal_secrets`] seals old plain-text ones and re-keys);
//!   - [`event`]: sending an event (fan-out, idempotency) and one-off deliveries to a URL;
//!   - [`delivery`]: the `webhook.deliver` job handler — circuit check, shared rate limit,
//!     signing, the POST, classification, attempt log;
//!   - [`replay`]: one delivery, an endpoint's failures since a time, an event to all its
//!     endpoints;
//!   - [`health`]: per-endpoint success rate and latency, circuit state.
//! - [`signature`]: Standard Webhooks signing and [`signature::verify`] for Rust receivers.
//! - [`guard`]: the SSRF guard, applied to resolved addresses inside the HTTP client.
//! - [`client`]: the HTTP client; [`retry_policy`]: the schedule and status classification;
//!   [`circuit`]: the per-endpoint breaker; [`model`]: the stored records and the config.
//!
//! Everything shared between processes lives in the store's meta collections (`webhook_*`):
//! endpoints, events and their idempotency keys, circuit states, attempt log, health counters;
//! the per-endpoint rate limit is the store's token bucket.

pub(crate) mod attempt_log;
pub mod circuit;
pub mod client;
pub mod delivery;
pub mod endpoint;
pub mod event;
pub mod guard;
pub mod health;
pub mod model;
pub mod replay;
pub mod retry_policy;
pub mod signature;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use conveyor_worker::keyring::Keyring;
use conveyor_worker::{JobContext, KindOptions, Registry, Store};

pub use model::{
    Attempt, Circuit, CircuitState, DeliverArgs, Endpoint, Event, KIND, Secret, WebhookConfig,
};

/// Errors of the webhook service.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] conveyor_worker::Error),
    /// No such endpoint, event or delivery.
    #[error("{what} {id} not found")]
    NotFound {
        /// `endpoint`, `event`, `delivery`.
        what: &'static str,
        /// The id asked for.
        id: String,
    },
    /// Bad input; `field` names it.
    #[error("invalid {field}: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A system event type, which only the platform sends.
    #[error(transparent)]
    Reserved(#[from] crate::Reserved),
    /// Someone else changed the record; read it again and retry.
    #[error("{0}")]
    Conflict(String),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    /// A signing secret cannot be sealed or opened: no key, a missing key, a damaged value.
    #[error(transparent)]
    Secrets(#[from] conveyor_worker::keyring::KeyError),
}

impl WebhookError {
    /// The configured secrets keys are missing, wrong or malformed: the operator fixes the
    /// configuration (a CLI exits 2; over HTTP it is the server's fault, not the caller's).
    pub fn is_key_config(&self) -> bool {
        use conveyor_worker::keyring::KeyError;
        matches!(
            self,
            WebhookError::Secrets(
                KeyError::NoKey { .. } | KeyError::UnknownKey { .. } | KeyError::Malformed { .. }
            )
        )
    }

    fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        WebhookError::Invalid {
            field,
            message: message.into(),
        }
    }

    fn not_found(what: &'static str, id: impl Into<String>) -> Self {
        WebhookError::NotFound {
            what,
            id: id.into(),
        }
    }
}

impl From<serde_json::Error> for WebhookError {
    fn from(e: serde_json::Error) -> Self {
        WebhookError::Store(conveyor_worker::Error::Corrupt(e))
    }
}

/// `Result` with [`WebhookError`].
pub type Result<T, E = WebhookError> = std::result::Result<T, E>;

/// An endpoint as read at an instant (`None`: it did not exist).
type CachedEndpoint = (Instant, Option<Arc<Endpoint>>);

/// The webhook service: the store, the config, the keys that seal signing secrets, the HTTP
/// client and small per-process caches. Cheap to share (`Arc`); one per process.
pub struct Webhooks {
    store: Arc<dyn Store>,
    config: WebhookConfig,
    keys: Keyring,
    client: client::Client,
    endpoints: Mutex<HashMap<String, CachedEndpoint>>,
    closed: Mutex<HashMap<String, Instant>>,
    health: health::Recorder,
    attempt_log: attempt_log::AttemptLog,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("config", &self.config)
            .field("keys", &self.keys.ids())
            .finish_non_exhaustive()
    }
}

impl Webhooks {
    /// The service over `store`, with no key to seal signing secrets until
    /// [`Webhooks::with_keyring`]: until then creating an endpoint or rotating a secret fails
    /// with [`WebhookError::Secrets`].
    pub fn new(store: Arc<dyn Store>, config: WebhookConfig) -> Result<Self> {
        config
            .validate()
            .map_err(|m| WebhookError::invalid("webhooks", m))?;
        let guard = guard::Guard::new(config.allow_cidrs.clone());
        let client = client::Client::new(guard, config.connect_timeout)?;
        Ok(Self {
            store,
            config,
            keys: Keyring::default(),
            client,
            endpoints: Mutex::new(HashMap::new()),
            closed: Mutex::new(HashMap::new()),
            health: health::Recorder::default(),
            attempt_log: attempt_log::AttemptLog::default(),
        })
    }

    /// With `keys` to seal signing secrets (the first) and open them (any).
    pub fn with_keyring(mut self, keys: Keyring) -> Self {
        self.keys = keys;
        self
    }

    /// The settings.
    pub fn config(&self) -> &WebhookConfig {
        &self.config
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}

/// Registers the `webhook.deliver` kind, run by `webhooks`. Inside a Tokio runtime it also
/// starts the task that writes health counters every `webhooks.health_flush`; the task ends
/// once the registry (and so the worker) is gone.
pub fn register(registry: &mut Registry, webhooks: Arc<Webhooks>) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let weak = Arc::downgrade(&webhooks);
        let every = webhooks
            .config
            .health_flush
            .max(std::time::Duration::from_millis(100));
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(hooks) = weak.upgrade() else { break };
                if let Err(e) = hooks.flush_health().await {
                    tracing::warn!(error = %e, "cannot write webhook health counters");
                }
            }
        });
    }
    registry.register_with(
        KIND,
        // The request has its own timeout; the job's is a backstop for a stuck store call.
        KindOptions {
            timeout: Some(webhooks.config.timeout * 4 + std::time::Duration::from_secs(30)),
            ..KindOptions::default()
        },
        move |args: DeliverArgs, ctx: JobContext| {
            let webhooks = webhooks.clone();
            async move { webhooks.deliver(args, ctx).await }
        },
    );
}

/// A new id: `prefix` and a UUIDv7 in hex (time-ordered as a string).
pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::now_v7().simple())
}
