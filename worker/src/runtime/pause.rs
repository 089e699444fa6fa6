//! Paused queues: a queue's settings live in the store's `queues` collection (one record per
//! queue, written by the API). A paused queue still accepts jobs; workers fetch none from it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The collection queue settings live in, keyed by queue name.
pub const COLLECTION: &str = "queues";

/// One queue's settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueSettings {
    /// Workers fetch nothing while true.
    #[serde(default)]
    pub paused: bool,
    /// When `paused` last changed.
    #[serde(default)]
    pub changed_at: Option<DateTime<Utc>>,
    /// Who changed it (an API key's name, or `cli:<user>`).
    #[serde(default)]
    pub changed_by: Option<String>,
}

/// How often a worker reads the queues' settings: a pause or resume takes effect within this.
pub const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads every queue's settings once (one listing) and applies them to this worker's queues;
/// a queue that was resumed gets its fetch loop woken at once.
pub(crate) async fn refresh(shared: &super::Shared) {
    use std::sync::atomic::Ordering;

    use crate::store::meta::MetaQuery;

    let query = MetaQuery {
        limit: 1000,
        ..MetaQuery::default()
    };
    let records = match shared.store.meta_list(COLLECTION, &query).await {
        Ok(r) => r,
        Err(e) => {
            // Keep the last known settings: a store hiccup neither pauses nor resumes.
            tracing::warn!(error = %e, "reading queue settings failed; keeping the last known");
            return;
        }
    };
    for (name, queue) in &shared.queues {
        let paused = records
            .iter()
            .find(|r| &r.key == name)
            .and_then(|r| r.decode::<QueueSettings>().ok())
            .is_some_and(|s| s.paused);
        let was = queue.paused.swap(paused, Ordering::Relaxed);
        if was != paused {
            tracing::info!(queue = %name, paused, "queue {}", if paused { "paused" } else { "resumed" });
            if !paused {
                queue.wake.notify_one();
            }
        }
    }
}

/// Calls [`refresh`] every [`WATCH_INTERVAL`] until `stop`.
pub(crate) async fn watch(
    shared: std::sync::Arc<super::Shared>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut ticker = tokio::time::interval(WATCH_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => refresh(&shared).await,
        }
    }
}
