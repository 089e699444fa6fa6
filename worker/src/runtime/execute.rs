//! Runs one job: handler under timeout, panic catching and cancellation; then the outcome.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::transition::{Ended, transition};
use super::{Completion, QueueState, Shared};
use crate::handler::{JobContext, JobError, Outcome};
use crate::job::{Job, JobId, JobState};
use crate::metrics::JobSeries;
use crate::retry_policy::RetryPolicy;
use crate::store::Finish;

pub(crate) async fn run(
    shared: Arc<Shared>,
    job: Job,
    slot: Option<OwnedSemaphorePermit>,
    done: mpsc::Sender<Completion>,
    series: Arc<JobSeries>,
    queue: Arc<QueueState>,
) {
    let span = tracing::info_span!(
        "job",
        job.id = %job.id,
        job.kind = %job.kind,
        job.queue = %job.queue,
        job.attempt = job.attempt,
    );
    async move {
        let mut holding = Holding {
            shared: &shared,
            id: job.id,
            handed_over: false,
        };
        let job = Arc::new(job);
        // Times are on the store's clock: the claim's time came from the store, and the end
        // of the attempt (and any retry's due time) is this machine's clock plus its offset.
        let started_at = job.attempted_at.unwrap_or_else(|| shared.clock.now());
        if let Ok(wait) = (started_at - job.run_at).to_std() {
            series.queue_wait.observe(wait);
        }
        let token = CancellationToken::new();
        shared
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(job.id, token.clone());

        let registered = shared.registry.get(&job.kind).cloned();
        let ended = match &registered {
            None => Ended::NoHandler,
            Some(reg) => {
                let ctx = JobContext::new(job.clone(), shared.worker_id.clone(), token.clone())
                    .with_clock(shared.clock.clone())
                    .with_progress(shared.store.clone());
                let fut = AssertUnwindSafe(reg.call(job.args.clone(), ctx)).catch_unwind();
                let ended = supervise(
                    fut,
                    reg.options.timeout,
                    &token,
                    &shared.interrupt,
                    shared.config.cancel_grace,
                )
                .await;
                super::transition::within_result_limit(ended, shared.config.max_result_bytes)
            }
        };

        shared
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&job.id);
        match &ended {
            Ended::Returned(o) if o.is_done() => tracing::debug!("job completed"),
            other => tracing::info!(ended = ?other, "job attempt ended"),
        }
        let finished_at = shared.clock.now();
        // Nothing between the handler's return and the store write may strand the job: a
        // panic here (a retry policy, a record that cannot be built) would leave it
        // `running` under this worker's live heartbeat. The job goes back to the queue with
        // the panic recorded instead.
        let finish = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let default_policy = RetryPolicy::default();
            let policy = registered
                .as_ref()
                .map_or(&default_policy, |r| &r.options.retry);
            let finish = transition(
                &job,
                ended,
                policy,
                &shared.worker_id,
                started_at,
                finished_at,
            );
            record(&series, &finish);
            finish
        }))
        .unwrap_or_else(|panic| {
            let msg = panic_message(panic.as_ref());
            tracing::error!(panic = %msg, "deciding the job's next state panicked; it goes back to the queue");
            given_back(&job, &shared.worker_id, started_at, finished_at, &msg)
        });
        queue.finished.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The slot travels with the outcome and is freed once the outcome is written: while
        // outcomes cannot be written (a full disk), the queue stops claiming jobs it could
        // not finish. The completer outlives every job task, so this only fails if it
        // crashed; then the lease expires and the rescuer retries the job.
        if done.send(Completion { finish, _slot: slot }).await.is_ok() {
            // The completer takes the job out of `held` once its outcome is written.
            holding.handed_over = true;
        } else {
            // Nothing can write this outcome any more: the job leaves `held` (so its lease is
            // no longer renewed), and it counts as a failing write, so the heartbeat stops
            // renewing this worker's other leases after one lease; the rescuer gives the jobs
            // to another worker instead of them staying `running` here.
            shared.write_failed();
            tracing::error!("completer is gone; the job will be rescued when its lease expires");
        }
    }
    .instrument(span)
    .await
}

/// Keeps a job in [`Shared::held`] (whose leases the heartbeat renews) while its task owns
/// it: if the task ends without handing the outcome to the completer (it panicked, was
/// dropped, or the completer is gone), the job leaves `held`, its lease is no longer renewed,
/// and the rescuer gives it back to the queue once the lease expires.
struct Holding<'a> {
    shared: &'a Shared,
    id: JobId,
    handed_over: bool,
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        if !self.handed_over {
            self.shared.held().remove(&self.id);
        }
    }
}

/// Counts the attempt's outcome and times it.
fn record(series: &JobSeries, finish: &Finish) {
    series.execution.observe(std::time::Duration::from_millis(
        finish.record.duration_ms.max(0) as u64,
    ));
    match finish.state {
        JobState::Completed => series.completed.inc(),
        JobState::Retryable => {
            series.failed.inc();
            series.retried.inc();
        }
        JobState::Dead => {
            series.failed.inc();
            series.dead.inc();
        }
        JobState::Cancelled => series.cancelled.inc(),
        // Snoozed or given back at shutdown: not an outcome.
        _ => {}
    }
}

pub(crate) type Caught = Result<anyhow::Result<Outcome>, Box<dyn Any + Send>>;

/// Runs a handler's (panic-catching) future under its timeout, its cancel token (given
/// `cancel_grace` to stop on its own) and the worker's `interrupt`; how it ended.
pub(crate) async fn supervise(
    fut: impl Future<Output = Caught>,
    timeout: Option<std::time::Duration>,
    token: &CancellationToken,
    interrupt: &CancellationToken,
    cancel_grace: std::time::Duration,
) -> Ended {
    tokio::pin!(fut);
    let deadline = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    tokio::select! {
        // A handler that has returned is heard first: when it stops because of a cancel it
        // saw, its own outcome (and reason) is what happened, whichever woke this first.
        biased;
        r = &mut fut => return ended_from(r),
        _ = &mut deadline => {
            token.cancel();
            return Ended::TimedOut(timeout.unwrap_or_default());
        }
        _ = interrupt.cancelled() => {
            token.cancel();
            return Ended::Interrupted;
        }
        _ = token.cancelled() => {}
    }
    // A cancel was requested: the handler may finish or stop on its own within the grace
    // period; after that it is dropped. Work it completed still counts as completed.
    // A handler that stops by returning a cancel of its own keeps its reason.
    match tokio::time::timeout(cancel_grace, &mut fut).await {
        Ok(Ok(Ok(outcome))) if outcome.is_done() || matches!(outcome, Outcome::Cancel { .. }) => {
            Ended::Returned(outcome)
        }
        _ => Ended::Cancelled,
    }
}

fn ended_from(r: Caught) -> Ended {
    match r {
        Ok(Ok(outcome)) => Ended::Returned(outcome),
        Ok(Err(e)) => Ended::Failed(JobError::from_anyhow(&e)),
        Err(panic) => Ended::Failed(JobError::new(format!(
            "handler panicked: {}",
            panic_message(panic.as_ref())
        ))),
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

/// The outcome written when deciding the real one panicked: a failed attempt, retried after
/// the default backoff (or `dead` when it was the last), with the panic as its error. Built
/// from nothing that could panic again.
fn given_back(
    job: &Job,
    worker: &str,
    started_at: chrono::DateTime<chrono::Utc>,
    now: chrono::DateTime<chrono::Utc>,
    msg: &str,
) -> Finish {
    let last = job.attempt >= job.max_attempts;
    let error = format!("conveyor could not record this attempt's outcome (internal panic: {msg})");
    Finish {
        id: job.id,
        attempt: job.attempt,
        state: if last {
            JobState::Dead
        } else {
            JobState::Retryable
        },
        run_at: (!last).then(|| crate::store::after(now, std::time::Duration::from_secs(30))),
        attempt_delta: 0,
        record: crate::job::AttemptRecord {
            attempt: job.attempt,
            started_at,
            finished_at: now,
            worker: Some(worker.to_string()),
            outcome: crate::job::AttemptOutcome::Failed,
            error: Some(error),
            causes: Vec::new(),
            duration_ms: (now - started_at).num_milliseconds().max(0),
            traceback: None,
        },
        result: None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::handler::Registry;
    use crate::job::NewJob;
    use crate::runtime::{Worker, WorkerConfig};
    use crate::store::{self, FetchRequest, StoreOptions};

    /// A claimed job run to its end with the completer open or gone: whether it is still in
    /// `held` afterwards (whose leases the heartbeat renews), and whether the worker counts a
    /// failing write.
    async fn held_after_run(completer_gone: bool) -> (bool, bool) {
        let store = store::connect("sqlite::memory:", StoreOptions::default())
            .await
            .unwrap();
        store.migrate().await.unwrap();
        let mut registry = Registry::new();
        registry.register("t.ok", |_: serde_json::Value, _| async {
            Ok(Outcome::Done)
        });
        let worker = Worker::new(store.clone(), registry, WorkerConfig::default()).unwrap();
        let shared = worker.shared.clone();
        store
            .enqueue(NewJob::new("t.ok", serde_json::json!({})))
            .await
            .unwrap();
        let job = store
            .fetch(FetchRequest {
                queue: "default",
                limit: 1,
                worker: &shared.worker_id,
                lease: Duration::from_secs(30),
            })
            .await
            .unwrap()
            .pop()
            .expect("a job");
        let id = job.id;
        shared.held().insert(id);
        let (done, completions) = mpsc::channel(1);
        if completer_gone {
            drop(completions);
        } else {
            // Kept open (and unread) past the run: the outcome is handed over.
            std::mem::forget(completions);
        }
        let queue = shared.queues["default"].clone();
        run(shared.clone(), job, None, done, Arc::default(), queue).await;
        let held = shared.held().contains(&id);
        (held, shared.write_failing_for().is_some())
    }

    #[tokio::test]
    async fn a_job_whose_outcome_cannot_be_handed_over_leaves_held() {
        // Handed over: the completer takes it out of `held` once the outcome is written.
        assert_eq!(held_after_run(false).await, (true, false));
        // Nobody can write the outcome: the heartbeat must stop renewing its lease, so the
        // rescuer gives it to another worker instead of it staying `running` here.
        assert_eq!(held_after_run(true).await, (false, true));
    }
}
