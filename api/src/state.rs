//! What every handler shares.

use std::sync::Arc;

use conveyor_jobs::webhook::{WebhookConfig, Webhooks};
use conveyor_worker::Store;
use conveyor_worker::clock::StoreClock;
use tokio_util::sync::CancellationToken;

use crate::config::ApiConfig;

/// The router's state: the store and the settings.
#[derive(Clone)]
pub struct AppState {
    /// Where jobs, keys, audit records and queue settings live.
    pub store: Arc<dyn Store>,
    /// Limits and switches.
    pub config: Arc<ApiConfig>,
    /// The webhook service behind `/v1/webhooks` and `/v1/events`.
    pub webhooks: Arc<Webhooks>,
    /// The store's clock as this server measures it: the rate limits are shared with API
    /// servers on other machines, whose clocks may disagree with this one.
    pub clock: Arc<StoreClock>,
    /// Cancelled when the process starts shutting down: `/readyz` answers `503` from then
    /// on, while the listener stays up until the workers have finished their jobs.
    pub draining: CancellationToken,
    /// The kinds this process has the args types of: enqueues of them with args that do not
    /// fit the type are refused (`conveyor_admin::Admin::with_kinds`).
    pub kinds: Option<Arc<conveyor_worker::Registry>>,
}

impl AppState {
    /// State over `store` with `config`.
    /// Webhooks use their default settings and no secrets key (so creating an endpoint fails)
    /// until [`AppState::with_webhooks`].
    pub fn new(store: Arc<dyn Store>, config: ApiConfig) -> Self {
        let webhooks = Webhooks::new(store.clone(), WebhookConfig::default())
            .expect("the default webhook settings are valid and the HTTP client builds");
        Self {
            store,
            config: Arc::new(config),
            webhooks: Arc::new(webhooks),
            clock: Arc::default(),
            draining: CancellationToken::new(),
            kinds: None,
        }
    }

    /// The operator operations over this state's store, webhook service and limits.
    pub fn admin(&self) -> conveyor_admin::Admin {
        let admin = conveyor_admin::Admin::new(self.webhooks.clone(), self.config.limits());
        match &self.kinds {
            Some(kinds) => admin.with_kinds(kinds.clone()),
            None => admin,
        }
    }

    /// With the kinds this process registers (see [`AppState::kinds`]).
    pub fn with_kinds(mut self, kinds: Arc<conveyor_worker::Registry>) -> Self {
        self.kinds = Some(kinds);
        self
    }

    /// With the process's shutdown signal (see [`AppState::draining`]).
    pub fn with_draining(mut self, draining: CancellationToken) -> Self {
        self.draining = draining;
        self
    }

    /// With the process's webhook service (configured by `[webhooks]`).
    pub fn with_webhooks(mut self, webhooks: Arc<Webhooks>) -> Self {
        self.webhooks = webhooks;
        self
    }
}
