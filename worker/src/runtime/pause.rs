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
