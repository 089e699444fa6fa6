//! Deletes finished jobs once their retention has passed (completed after 24 h, cancelled
//! and dead after 30 days by default; a job holding an idempotency key is kept at least as
//! long as the key's window). Each pass also deletes expired shared records (worker
//! registrations and other records written with a TTL) and idle rate buckets, and folds the
//! store's count bookkeeping ([`Store::fold_counts`]).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use conveyor_worker::store::RetentionPolicy;
use conveyor_worker::{Result, Store};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Pruner settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// How often to prune (default 1 min).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Rows per delete statement (default 1,000), so a pass never holds locks for long; a pass
    /// repeats full batches up to 10 times.
    pub batch: u32,
    /// How long finished jobs are kept.
    pub retention: RetentionPolicy,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            batch: 1000,
            retention: RetentionPolicy::default(),
        }
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct Pruner {
    store: Arc<dyn Store>,
    config: Config,
}

impl Pruner {
    /// A pruner over `store`.
    pub fn new(store: Arc<dyn Store>, config: Config) -> Self {
        Self { store, config }
    }

    /// One pass at the store's current time; returns how many jobs were deleted.
    pub async fn run_once(&self) -> Result<u64> {
        self.run_once_at(self.store.now().await?).await
    }

    /// One pass as if the store's clock read `now`.
    pub async fn run_once_at(&self, now: chrono::DateTime<Utc>) -> Result<u64> {
        let mut total = 0;
        for _ in 0..10 {
            let n = self
                .store
                .prune(now, &self.config.retention, self.config.batch)
                .await?;
            total += n;
            if n < u64::from(self.config.batch) {
                break;
            }
        }
        self.store.fold_counts().await?;
        for _ in 0..10 {
            if self.store.meta_prune(now, self.config.batch).await? < u64::from(self.config.batch) {
                break;
            }
        }
        Ok(total)
    }

    /// Runs passes every `interval` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let interval = self.config.interval;
        crate::tick("pruner", interval, shutdown, || self.run_once()).await
    }
}
