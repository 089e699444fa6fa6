//! One fetch loop per queue: claim as many jobs as there are free slots, in one statement.

use std::sync::Arc;

use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{QueueConfig, Shared, execute};
use crate::store::{FetchRequest, Finish};

pub(crate) async fn run(
    shared: Arc<Shared>,
    queue: QueueConfig,
    wake: Arc<Notify>,
    jobs: TaskTracker,
    done: mpsc::Sender<Finish>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(queue.concurrency as usize));
    let batch = (shared.config.fetch_batch.min(queue.concurrency)).max(1);
    // With a backlog, wait until a quarter of a batch is free so every fetch claims a
    // worthwhile batch instead of one job per round trip. When the queue is dry, one free
    // slot is enough: the next job should start the moment it arrives.
    let low_water = (batch / 4).max(1);
    let mut backlog = false;
    loop {
        let need = if backlog { low_water } else { 1 };
        let mut permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = slots.clone().acquire_many_owned(need) => match p {
                Ok(p) => p,
                Err(_) => return, // the semaphore is never closed; nothing to do if it were
            },
        };
        let extra = (slots.available_permits() as u32).min(batch - need);
        if extra > 0
            && let Ok(more) = slots.clone().try_acquire_many_owned(extra)
        {
            permit.merge(more);
        }
        let want = permit.num_permits();
        let request = FetchRequest {
            queue: &queue.name,
            limit: want as u32,
            worker: &shared.worker_id,
            lease: shared.config.lease,
        };
        match shared.store.fetch(request).await {
            Ok(claimed) => {
                backlog = claimed.len() == want;
                for job in claimed {
                    let Some(slot) = permit.split(1) else {
                        // The store returned more than asked; it still runs, over the limit
                        // for a moment, rather than being stranded in `running`.
                        tracing::error!(queue = %queue.name, "store returned more jobs than requested");
                        jobs.spawn(execute::run(shared.clone(), job, None, done.clone()));
                        continue;
                    };
                    jobs.spawn(execute::run(shared.clone(), job, Some(slot), done.clone()));
                }
                drop(permit);
                if backlog {
                    continue;
                }
            }
            Err(e) => {
                backlog = false;
                drop(permit);
                tracing::warn!(queue = %queue.name, error = %e, "fetch failed; retrying after the poll interval");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(shared.config.poll_interval) => {}
        }
    }
}
