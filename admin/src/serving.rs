//! Which queues and kinds the live workers serve, from their registrations
//! (`conveyor_worker::runtime::registration`): a job nobody serves waits until someone starts
//! a worker for it, which an enqueue warns about and the queue overview shows.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conveyor_worker::Store;
use conveyor_worker::runtime::registration::{self, WorkerRegistration};
use conveyor_worker::store::meta::list_all;

use crate::Result;

/// The live workers, as their registrations say (a stopped worker's record expires within
/// one lease).
#[derive(Clone, Debug, Default)]
pub struct Serving {
    /// Every live worker's registration.
    pub workers: Vec<WorkerRegistration>,
}

impl Serving {
    /// Reads the registrations.
    pub async fn read(store: &dyn Store) -> Result<Self> {
        let mut workers = Vec::new();
        for r in list_all(store, registration::COLLECTION).await? {
            match r.decode::<WorkerRegistration>() {
                Ok(w) => workers.push(w),
                Err(e) => {
                    tracing::warn!(key = %r.key, error = %e, "skipping an unreadable worker registration")
                }
            }
        }
        Ok(Self { workers })
    }

    /// Whether some live worker fetches from `queue`.
    pub fn serves_queue(&self, queue: &str) -> bool {
        self.workers.iter().any(|w| w.serves_queue(queue))
    }

    /// Why a job of `kind` on `queue` would wait for a worker that is not there, if it would.
    pub fn warning(&self, queue: &str, kind: &str) -> Option<String> {
        if !self.serves_queue(queue) {
            return Some(format!(
                "no live worker serves queue `{queue}`: the job waits until one does \
                 (start one with `conveyor worker --queues {queue}=4`)"
            ));
        }
        if !self.workers.iter().any(|w| w.serves(queue, kind)) {
            return Some(format!(
                "no live worker on queue `{queue}` has a handler for kind `{kind}`: the job \
                 waits until one does (check the kind's spelling, or deploy a worker that \
                 registers it)"
            ));
        }
        None
    }

    /// The warnings for a set of (queue, kind) pairs, each once, in order.
    pub fn warnings<'a>(&self, jobs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<String> {
        let mut seen = BTreeSet::new();
        jobs.into_iter()
            .filter(|pair| seen.insert(*pair))
            .filter_map(|(queue, kind)| self.warning(queue, kind))
            .collect()
    }
}

/// The registrations as read at most once per [`ServingCache::TTL`]: every enqueue's answer
/// warns about queues and kinds no live worker serves, and reading the whole collection on
/// each enqueue would put a scan on the hottest path. Registrations change at heartbeat pace
/// (seconds), so a second-old view warns exactly as a fresh one would in all but the second
/// a worker starts or stops.
#[derive(Debug, Default)]
pub struct ServingCache {
    last: Mutex<Option<(Instant, Arc<Serving>)>>,
}

impl ServingCache {
    /// How long a read is used.
    pub const TTL: Duration = Duration::from_secs(1);

    /// The registrations, read again when the last read is older than [`Self::TTL`].
    pub async fn get(&self, store: &dyn Store) -> Result<Arc<Serving>> {
        let cached = self
            .lock()
            .as_ref()
            .filter(|(at, _)| at.elapsed() < Self::TTL)
            .map(|(_, serving)| serving.clone());
        if let Some(serving) = cached {
            return Ok(serving);
        }
        let fresh = Arc::new(Serving::read(store).await?);
        *self.lock() = Some((Instant::now(), fresh.clone()));
        Ok(fresh)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Instant, Arc<Serving>)>> {
        // A panic while holding the lock cannot leave a half-written value: recover it.
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
