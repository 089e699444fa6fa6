//! `http.request` in the binary: the service built from `[http_requests]` and
//! `[http_targets.*]`, for `serve` (which runs the kind and checks its enqueues) and for the
//! admin commands (which check enqueues with the same rule).

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

/// The enqueue-time checks of every kind the binary knows (see
/// `conveyor_worker::validate`): `http.request`'s rules, and that the args of every kind
/// `kinds` has a handler for fit its args type.
pub fn validators(
    targets: &Arc<HttpTargets>,
    kinds: &conveyor_worker::Registry,
) -> Arc<conveyor_worker::validate::ArgsValidators> {
    let mut validators = targets.validators();
    validators.check_types_of(kinds);
    Arc::new(validators)
}
