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
