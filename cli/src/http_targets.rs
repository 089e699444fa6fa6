//! `http.request` in the binary: the service built from `[http_requests]` and
//! `[http_targets.*]`, for `serve` (which runs the kind and checks its enqueues) and for the
//! admin commands (which check enqueues with the same rule; `crate::emails::validators`
//! gathers every kind's check).

use std::sync::Arc;

use conveyor_jobs::http_target::HttpTargets;
use conveyor_worker::Store;
use conveyor_worker::keyring::Keyring;

use crate::config::{Config, ConfigError};

/// The `http.request` service over `store`; sealed signing secrets open with `keys`. A wrong
/// setting or a secret that does not open is a [`ConfigError`] (exit 2).
pub fn service(
    config: &Config,
    store: Arc<dyn Store>,
    keys: &Keyring,
) -> anyhow::Result<Arc<HttpTargets>> {
    match HttpTargets::new(store, config.http(), keys) {
        Ok(t) => Ok(Arc::new(t)),
        Err(e) if e.is_config() => Err(ConfigError(e.to_string()).into()),
        Err(e) => Err(e.into()),
    }
}
