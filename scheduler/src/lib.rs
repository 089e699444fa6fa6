//! Conveyor's scheduler role: the maintenance services that keep a store healthy.
//!
//! Each service has the same shape: a `Config` with documented defaults, a `run_once()` that
//! does one bounded pass and returns what it did (tests call it directly), and `run()` that
//! calls it on a ticker until shutdown. All of them are safe to run on every replica at once:
//! each pass claims its rows with `FOR UPDATE SKIP LOCKED` (Postgres) or inside one write
//! transaction (SQLite), so two replicas never act on the same job twice.
//!
//! - [`promoter`]: due `scheduled`/`retryable` jobs → `available` (fetch claims due jobs
//!   directly, so this keeps listings and queue stats truthful rather than being on the hot path).
//! - [`rescuer`]: running jobs whose lease expired → `retryable`, or `dead` when out of attempts.
//! - [`pruner`]: deletes finished jobs after their retention.
//!
//! [`Maintenance`] runs all three; `conveyor serve` starts it in every process with the
//! `scheduler` role, with the [`cron`] service that enqueues each [`schedule`]'s jobs.

pub mod cron;
pub mod promoter;
pub mod pruner;
pub mod registry;
pub mod rescuer;
pub mod schedule;

use std::sync::Arc;

use conveyor_worker::Store;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use cron::CronScheduler;
pub use promoter::Promoter;
pub use pruner::Pruner;
pub use registry::Schedules;
pub use rescuer::Rescuer;

/// Settings for all maintenance services.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaintenanceConfig {
    /// The promoter.
    pub promoter: promoter::Config,
    /// The rescuer.
    pub rescuer: rescuer::Config,
    /// The pruner.
    pub pruner: pruner::Config,
    /// The cron service (schedules are configured under `[[schedules]]`).
    pub cron: cron::Config,
}

/// All maintenance services over one store.
#[derive(Clone)]
pub struct Maintenance {
    /// Due jobs → available.
    pub promoter: Promoter,
    /// Expired leases → retryable/dead.
    pub rescuer: Rescuer,
    /// Old finished jobs → deleted.
    pub pruner: Pruner,
}

impl Maintenance {
    /// The services over `store`.
    pub fn new(store: Arc<dyn Store>, config: MaintenanceConfig) -> Self {
        Self {
            promoter: Promoter::new(store.clone(), config.promoter),
            rescuer: Rescuer::new(store.clone(), config.rescuer),
            pruner: Pruner::new(store, config.pruner),
        }
    }

    /// Runs every service until `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) {
        tokio::join!(
            self.promoter.run(shutdown.clone()),
            self.rescuer.run(shutdown.clone()),
            self.pruner.run(shutdown),
        );
    }
}

/// Calls `pass` every `interval` until `shutdown`; errors are logged and the loop goes on,
/// because a store that is briefly unreachable must not stop maintenance for good.
async fn tick<F, Fut, T>(
    name: &'static str,
    interval: std::time::Duration,
    shutdown: CancellationToken,
    mut pass: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = conveyor_worker::Result<T>>,
    T: std::fmt::Debug,
{
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match pass().await {
            Ok(report) => tracing::debug!(service = name, ?report, "maintenance pass"),
            Err(e) => {
                tracing::warn!(service = name, error = %e, "maintenance pass failed; retrying next tick")
            }
        }
    }
}
