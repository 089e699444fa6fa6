//! What every handler shares.

use std::sync::Arc;

use conveyor_jobs::webhook::{WebhookConfig, Webhooks};
use conveyor_worker::Store;
use conveyor_worker::clock::StoreClock;
use conveyor_worker::store::feed::ChangeFeed;
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
    /// The per-kind checks of args every enqueue and schedule passes (e.g. `http.request`'s
    /// target rule); empty until [`AppState::with_validators`].
    pub validators: Arc<conveyor_worker::validate::ArgsValidators>,
    /// Cancelled when the process starts shutting down: `/readyz` answers `503` from then
    /// on, while the listener stays up until the workers have finished their jobs.
    pub draining: CancellationToken,
    /// The remote-worker operations (`/v1/workers/claim` …), with what this server remembers
    /// of the remote workers between requests.
    pub remote: Arc<conveyor_admin::remote::RemoteWorkers>,
    /// Job state changes for `/v1/jobs/events`, with their replay buffer.
    pub job_events: Arc<ChangeFeed>,
    /// The platform history's settings (`[stats]`): how long each resolution is kept, which
    /// decides the resolution `/v1/stats/jobs` reads.
    pub stats: Arc<conveyor_analytics::StatsConfig>,
    /// The backup settings (`[backup]`) behind `/v1/backups`; without them (until
    /// [`AppState::with_backups`]) those routes answer `409`.
    pub backups: Option<Arc<conveyor_backup::Backups>>,
}

impl AppState {
    /// State over `store` with `config`.
    /// Webhooks use their default settings and no secrets key (so creating an endpoint fails)
    /// until [`AppState::with_webhooks`].
    pub fn new(store: Arc<dyn Store>, config: ApiConfig) -> Self {
        let webhooks = Webhooks::new(store.clone(), WebhookConfig::default())
            .expect("the default webhook settings are valid and the HTTP client builds");
        Self {
            remote: Arc::new(conveyor_admin::remote::RemoteWorkers::new(store.clone())),
            job_events: Arc::new(ChangeFeed::new(store.clone())),
            store,
            config: Arc::new(config),
            webhooks: Arc::new(webhooks),
            clock: Arc::default(),
            validators: Arc::default(),
            draining: CancellationToken::new(),
            stats: Arc::default(),
            backups: None,
        }
    }

    /// The operator operations over this state's store, webhook service and limits.
    pub fn admin(&self) -> conveyor_admin::Admin {
        conveyor_admin::Admin::new(self.webhooks.clone(), self.config.limits())
            .with_validators(self.validators.clone())
    }

    /// With the per-kind checks of args (see [`AppState::validators`]).
    pub fn with_validators(
        mut self,
        validators: Arc<conveyor_worker::validate::ArgsValidators>,
    ) -> Self {
        self.validators = validators;
        self
    }

    /// With the largest result a remote worker may report (`worker.max_result_bytes`, the
    /// limit native handlers have).
    pub fn with_max_result_bytes(mut self, limit: usize) -> Self {
        self.remote = Arc::new(
            conveyor_admin::remote::RemoteWorkers::new(self.store.clone())
                .with_max_result_bytes(limit),
        );
        self
    }

    /// With the platform history's settings (`[stats]`).
    pub fn with_stats(mut self, stats: conveyor_analytics::StatsConfig) -> Self {
        self.stats = Arc::new(stats);
        self
    }

    /// With the backup settings (see [`AppState::backups`]).
    pub fn with_backups(mut self, backups: Arc<conveyor_backup::Backups>) -> Self {
        self.backups = Some(backups);
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
