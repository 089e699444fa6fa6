//! Moves due `scheduled` and `retryable` jobs to `available`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_worker::{Result, Store};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Promoter settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// How often to look for due jobs (default 1 s).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Jobs per statement (default 1,000); a pass repeats full batches up to 10 times.
    pub batch: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            batch: 1000,
        }
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct Promoter {
    store: Arc<dyn Store>,
    config: Config,
}

impl Promoter {
    /// A promoter over `store`.
    pub fn new(store: Arc<dyn Store>, config: Config) -> Self {
        Self { store, config }
    }

    /// One pass: promotes what is due now on the store's clock; returns how many jobs moved.
    pub async fn run_once(&self) -> Result<u64> {
        self.run_once_at(self.store.now().await?).await
    }

    /// One pass as if the store's clock read `now`.
    pub async fn run_once_at(&self, now: DateTime<Utc>) -> Result<u64> {
        let mut total = 0;
        for _ in 0..10 {
            let n = self.store.promote_due(now, self.config.batch).await?;
            total += n;
            if n < u64::from(self.config.batch) {
                break;
            }
        }
        Ok(total)
    }

    /// Runs passes every `interval` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let interval = self.config.interval;
        crate::tick("promoter", interval, shutdown, || self.run_once()).await
    }
}
