//! What every handler shares.

use std::sync::Arc;

use conveyor_worker::Store;

use crate::config::ApiConfig;

/// The router's state: the store and the settings.
#[derive(Clone)]
pub struct AppState {
    /// Where jobs, keys, audit records and queue settings live.
    pub store: Arc<dyn Store>,
    /// Limits and switches.
    pub config: Arc<ApiConfig>,
}

impl AppState {
    /// State over `store` with `config`.
    pub fn new(store: Arc<dyn Store>, config: ApiConfig) -> Self {
        Self {
            store,
            config: Arc::new(config),
        }
    }
}
