//! Worker registrations: each running worker keeps a record in the store's `workers`
//! collection (keyed by its id) with a TTL, rewritten by its heartbeat, so the API can list
//! the live processes; a process that stops heartbeating disappears when the TTL runs out.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The collection registrations live in, keyed by worker id.
pub const COLLECTION: &str = "workers";

/// One live worker process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerRegistration {
    /// Its id (the lease owner name).
    pub id: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its latest heartbeat.
    pub last_heartbeat: DateTime<Utc>,
    /// The queues it runs.
    pub queues: Vec<QueueLoad>,
    /// The kinds it has handlers for, sorted (on every one of its queues). `None` in a
    /// record written by a version that did not say: any kind may be served.
    #[serde(default)]
    pub kinds: Option<Vec<String>>,
}

impl WorkerRegistration {
    /// Whether this worker runs jobs of `kind` on `queue`.
    pub fn serves(&self, queue: &str, kind: &str) -> bool {
        self.serves_queue(queue)
            && self
                .kinds
                .as_ref()
                .is_none_or(|k| k.iter().any(|k| k == kind))
    }

    /// Whether this worker fetches from `queue`.
    pub fn serves_queue(&self, queue: &str) -> bool {
        self.queues.iter().any(|q| q.name == queue)
    }
}

/// One queue of a worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueLoad {
    /// Queue name.
    pub name: String,
    /// Jobs it may run at once.
    pub concurrency: u32,
    /// Jobs running now.
    pub running: u32,
    /// Jobs finished (any outcome) per second since the previous heartbeat.
    pub finished_per_second: f64,
}

/// The host name, as in the default worker id.
fn host() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Finished-attempt counts per queue at the previous write, for the throughput.
pub(crate) type Previous = std::collections::HashMap<String, (u64, std::time::Instant)>;

/// Writes (or refreshes) this worker's registration with a TTL of one lease.
pub(crate) async fn write(shared: &super::Shared, previous: &mut Previous) {
    use std::sync::atomic::Ordering;

    use crate::store::meta::Put;

    let now = std::time::Instant::now();
    let mut queues: Vec<QueueLoad> = shared
        .queues
        .values()
        .map(|q| {
            let finished = q.finished.load(Ordering::Relaxed);
            let rate = match previous.insert(q.config.name.clone(), (finished, now)) {
                Some((before, at)) => {
                    let secs = now.duration_since(at).as_secs_f64();
                    if secs > 0.0 {
                        (finished.saturating_sub(before)) as f64 / secs
                    } else {
                        0.0
                    }
                }
                None => 0.0,
            };
            QueueLoad {
                name: q.config.name.clone(),
                concurrency: q.config.concurrency,
                running: q.running(),
                finished_per_second: rate,
            }
        })
        .collect();
    queues.sort_by(|a, b| a.name.cmp(&b.name));
    let record = WorkerRegistration {
        id: shared.worker_id.to_string(),
        host: host(),
        pid: std::process::id(),
        started_at: shared.started_at,
        last_heartbeat: shared.clock.now(),
        queues,
        kinds: Some(
            shared
                .registry
                .kinds()
                .into_iter()
                .map(str::to_string)
                .collect(),
        ),
    };
    let value = match serde_json::to_value(&record) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode the worker registration");
            return;
        }
    };
    let put = Put::new(COLLECTION, &shared.worker_id, &value).ttl(shared.config.lease);
    if let Err(e) = shared.store.meta_put(put).await {
        tracing::warn!(error = %e, "writing the worker registration failed; retrying on the next heartbeat");
    }
}

/// Removes this worker's registration (at shutdown).
pub(crate) async fn remove(shared: &super::Shared) {
    if let Err(e) = shared
        .store
        .meta_delete(
            COLLECTION,
            &shared.worker_id,
            crate::store::meta::Expect::Any,
        )
        .await
    {
        tracing::warn!(error = %e, "removing the worker registration failed; it expires on its own");
    }
}
