//! Ends attempts whose worker stopped heartbeating (crashed, killed, partitioned).
//!
//! The attempt counts: a job that keeps killing its workers runs out of attempts and ends
//! `dead` instead of looping forever.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use conveyor_worker::store::RescueReport;
use conveyor_worker::{Result, RetryPolicy, Store};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Rescuer settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// How often to look for expired leases (default 5 s).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Jobs per statement (default 500); a pass repeats full batches up to 10 times.
    pub batch: u32,
    /// Backoff before a rescued job runs again.
    pub retry: RetryPolicy,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            batch: 500,
            retry: RetryPolicy::default(),
        }
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct Rescuer {
    store: Arc<dyn Store>,
    config: Config,
}

impl Rescuer {
    /// A rescuer over `store`.
    pub fn new(store: Arc<dyn Store>, config: Config) -> Self {
        Self { store, config }
    }

    /// One pass at the store's current time: a lease has expired when the store's clock
    /// says so, whatever this machine's clock says.
    pub async fn run_once(&self) -> Result<RescueReport> {
        self.run_once_at(self.store.now().await?).await
    }

    /// One pass as if the store's clock read `now` (tests move time forward instead of sleeping).
    pub async fn run_once_at(&self, now: chrono::DateTime<Utc>) -> Result<RescueReport> {
        let mut total = RescueReport::default();
        for _ in 0..10 {
            let r = self
                .store
                .rescue_expired(now, &self.config.retry, self.config.batch)
                .await?;
            total.retried += r.retried;
            total.dead += r.dead;
            total.cancelled += r.cancelled;
            if r.retried + r.dead + r.cancelled < u64::from(self.config.batch) {
                break;
            }
        }
        if total != RescueReport::default() {
            let rescues = &conveyor_worker::metrics::global().rescues;
            rescues.get(&["retried"]).add(total.retried);
            rescues.get(&["dead"]).add(total.dead);
            rescues.get(&["cancelled"]).add(total.cancelled);
            tracing::warn!(?total, "rescued jobs whose worker stopped heartbeating");
        }
        Ok(total)
    }

    /// Runs passes every `interval` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let interval = self.config.interval;
        crate::tick("rescuer", interval, shutdown, || self.run_once()).await
    }
}
