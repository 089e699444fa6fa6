//! One fetch loop per queue: claim as many jobs as there are free slots, in one statement.
//!
//! A fetch that fails may still have claimed its jobs: the store applied it, then the
//! connection dropped before the answer arrived (a store restart). Those jobs are `running`
//! under this worker's name, and the heartbeat keeps renewing their leases, yet nothing here
//! runs them. So after a failed fetch, before fetching again, the loop asks the store which
//! of the queue's jobs it leases to this worker and runs the ones it does not hold.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Completion, QueueState, Shared, execute};
use crate::error::Result;
use crate::job::Job;
use crate::metrics::{self, JobSeries};
use crate::store::FetchRequest;

/// The metrics series of each kind seen on one queue, looked up in the registry once per
/// kind so recording a job takes no lock.
#[derive(Default)]
pub(crate) struct SeriesCache(HashMap<String, Arc<JobSeries>>);

impl SeriesCache {
    pub(crate) fn get(&mut self, job: &Job) -> Arc<JobSeries> {
        if let Some(s) = self.0.get(job.kind.as_str()) {
            return s.clone();
        }
        let s = metrics::global().jobs.get(&[&job.queue, &job.kind]);
        self.0.insert(job.kind.clone(), s.clone());
        s
    }
}

pub(crate) async fn run(
    shared: Arc<Shared>,
    state: Arc<QueueState>,
    jobs: TaskTracker,
    done: mpsc::Sender<Completion>,
    shutdown: CancellationToken,
) {
    let queue = &state.config;
    let wake = &state.wake;
    let slots = &state.slots;
    let mut series = SeriesCache::default();
    let batch = (shared.config.fetch_batch.min(queue.concurrency)).max(1);
    // With a backlog, wait until a quarter of a batch is free so every fetch claims a
    // worthwhile batch instead of one job per round trip. When the queue is dry, one free
    // slot is enough: the next job should start the moment it arrives.
    let low_water = (batch / 4).max(1);
    let mut backlog = false;
    // Set by a failed fetch, cleared once the store has been asked for lost claims.
    let mut recheck = false;
    loop {
        if recheck {
            match adopt(&shared, &state, &mut series, &jobs, &done, &shutdown).await {
                Ok(true) => recheck = false,
                Ok(false) => return, // shutting down
                Err(e) => {
                    tracing::warn!(queue = %queue.name, error = %e, "looking for claims lost with a failed fetch failed; asking again next round");
                }
            }
        }
        // A paused queue fetches nothing; the pause watcher wakes this loop on resume.
        if state.paused.load(Ordering::Relaxed) {
            backlog = false;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(shared.config.poll_interval) => {}
            }
            continue;
        }
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
                shared.held().extend(claimed.iter().map(|j| j.id));
                for job in claimed {
                    let slot = permit.split(1);
                    if slot.is_none() {
                        // The store returned more than asked; it still runs, over the limit
                        // for a moment, rather than being stranded in `running`.
                        tracing::error!(queue = %queue.name, "store returned more jobs than requested");
                    }
                    let s = series.get(&job);
                    jobs.spawn(execute::run(
                        shared.clone(),
                        job,
                        slot,
                        done.clone(),
                        s,
                        state.clone(),
                    ));
                }
                drop(permit);
                if backlog {
                    continue;
                }
            }
            Err(e) => {
                backlog = false;
                recheck = true;
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

/// Runs the jobs the store leases to this worker on `queue` that no fetch here returned.
/// Returns `false` if shutdown began while it waited for a free slot (the rest stay leased;
/// once this worker stops renewing them, the rescuer retries them).
async fn adopt(
    shared: &Arc<Shared>,
    state: &Arc<QueueState>,
    series: &mut SeriesCache,
    jobs: &TaskTracker,
    done: &mpsc::Sender<Completion>,
    shutdown: &CancellationToken,
) -> Result<bool> {
    // What this process holds is read before the store is asked: a job whose outcome is
    // written while the store answers would otherwise look running there and unheld here.
    // Nothing is added meanwhile: only this loop fetches this queue's jobs.
    let queue = state.config.name.as_str();
    let slots: &Arc<Semaphore> = &state.slots;
    let held = shared.held().clone();
    let lost: Vec<_> = shared
        .store
        .leased_to(&shared.worker_id, queue)
        .await?
        .into_iter()
        .filter(|j| !held.contains(&j.id))
        .collect();
    if !lost.is_empty() {
        tracing::warn!(
            queue,
            jobs = lost.len(),
            "running jobs whose claim was applied by a fetch that failed (its answer was lost)"
        );
    }
    for job in lost {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return Ok(false),
            },
        };
        shared.held().insert(job.id);
        let s = series.get(&job);
        jobs.spawn(execute::run(
            shared.clone(),
            job,
            Some(slot),
            done.clone(),
            s,
            state.clone(),
        ));
    }
    Ok(true)
}
