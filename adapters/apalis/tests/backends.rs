//! apalis workers on every Conveyor backend (SQLite, Postgres, Redis, and Postgres through
//! PgBouncer): jobs complete; failures retry with the backoff and then go `dead` with every
//! attempt recorded; a worker dropped mid-job loses its lease and the job is run once more,
//! elsewhere; a late outcome of a rescued attempt is refused and surfaced; idempotent
//! enqueues and pushes dedupe; two workers share a queue with each job run once; shutdown
//! finishes the running jobs and hands the unstarted ones back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apalis_core::backend::TaskSink;
use apalis_core::error::{AbortError, BoxDynError};
use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::data::Data;
use apalis_core::task::task_id::TaskId;
use apalis_core::worker::builder::WorkerBuilder;
use apalis_core::worker::context::WorkerContext;
use apalis_core::worker::event::Event;
use apalis_core::worker::ext::event_listener::EventListenerExt;
use conveyor_apalis::{Config, ConveyorBackend};
use conveyor_tests::{backend_tests, eventually};
use conveyor_worker::store::{FetchRequest, JobFilter};
use conveyor_worker::{AttemptOutcome, Job, JobArgs, JobId, JobState, NewJob, RetryPolicy, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Resize {
    n: u32,
}

impl JobArgs for Resize {
    const KIND: &'static str = "image.resize";
    const QUEUE: &'static str = "images";
    const MAX_ATTEMPTS: i32 = 3;
    const UNIQUE_FOR: Option<Duration> = Some(Duration::from_secs(3600));

    fn retry_policy() -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_millis(10),
            jitter: 0.0,
            ..RetryPolicy::default()
        }
    }
}

/// What the handlers saw, shared through apalis's `Data`.
#[derive(Default)]
struct Probe {
    /// Task id → how many times a handler returned for it.
    runs: Mutex<HashMap<String, usize>>,
    started: AtomicUsize,
    /// Handlers wait on this when the test holds them.
    release: Notify,
    errors: Mutex<Vec<String>>,
}

impl Probe {
    fn ran(&self, id: &TaskId) {
        *self.runs.lock().unwrap().entry(id.to_string()).or_default() += 1;
    }

    fn runs_of(&self, id: JobId) -> usize {
        self.runs
            .lock()
            .unwrap()
            .get(&id.to_string())
            .copied()
            .unwrap_or(0)
    }
}

fn fast(config: Config) -> Config {
    config
        .poll_interval(Duration::from_millis(100))
        .lease(Duration::from_secs(2), Duration::from_millis(500))
}

fn backend(store: &Arc<dyn Store>, worker: &str) -> ConveyorBackend<Resize> {
    ConveyorBackend::for_args_with(
        store.clone(),
        fast(Config::for_args::<Resize>()).worker_id(worker),
    )
}

async fn ok(_: Resize, id: TaskId, probe: Data<Arc<Probe>>) -> Result<(), BoxDynError> {
    probe.started.fetch_add(1, Ordering::SeqCst);
    probe.ran(&id);
    Ok(())
}

async fn held(_: Resize, id: TaskId, probe: Data<Arc<Probe>>) -> Result<(), BoxDynError> {
    probe.started.fetch_add(1, Ordering::SeqCst);
    probe.release.notified().await;
    probe.ran(&id);
    Ok(())
}

async fn failing(r: Resize, probe: Data<Arc<Probe>>) -> Result<(), BoxDynError> {
    probe.started.fetch_add(1, Ordering::SeqCst);
    if r.n == 0 {
        return Err(AbortError::new("bad image").into());
    }
    Err(std::io::Error::other(format!("resize {} failed", r.n)).into())
}

/// An apalis worker on its own task; stopped through its context.
struct Running {
    ctx: WorkerContext,
    handle: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        eventually(10, "the worker to start", || async {
            self.ctx.is_running().then_some(())
        })
        .await;
        self.ctx.stop().unwrap();
        tokio::time::timeout(Duration::from_secs(20), self.handle)
            .await
            .expect("the worker stopped within 20 s")
            .expect("the worker task did not panic");
    }
}

macro_rules! start {
    ($name:expr, $backend:expr, $probe:expr, $handler:expr) => {{
        let ctx = WorkerContext::new($name);
        let probe: Arc<Probe> = $probe.clone();
        let events = probe.clone();
        let worker = WorkerBuilder::new(&ctx)
            .backend($backend)
            .data(probe)
            .on_event(move |_, ev| {
                if let Event::Error(e) = ev {
                    events.errors.lock().unwrap().push(e.to_string());
                }
            })
            .build($handler);
        let handle = tokio::spawn(async move {
            worker
                .run()
                .await
                .expect("the worker ran without a backend error");
        });
        Running { ctx, handle }
    }};
}

async fn wait_for(s: &Arc<dyn Store>, id: JobId, state: JobState) -> Job {
    eventually(20, &format!("job {id} to become {state}"), || {
        let s = s.clone();
        async move {
            let j = s.get(id).await.unwrap()?;
            (j.state == state).then_some(j)
        }
    })
    .await
}

async fn enqueue(b: &ConveyorBackend<Resize>, n: u32) -> JobId {
    let e = b.enqueue(&Resize { n }).await.unwrap();
    assert!(!e.duplicate);
    e.id
}

async fn jobs_complete(s: Arc<dyn Store>) {
    let b = backend(&s, "w1");
    let mut ids = Vec::new();
    for n in 1..=5 {
        ids.push(enqueue(&b, n).await);
    }
    let probe = Arc::new(Probe::default());
    let w = start!("resize", b, probe, ok);
    for id in &ids {
        let job = wait_for(&s, *id, JobState::Completed).await;
        assert_eq!(job.attempt, 1);
        assert_eq!(job.attempts.len(), 1, "{:?}", job.attempts);
        assert_eq!(job.attempts[0].outcome, AttemptOutcome::Completed);
        assert_eq!(job.attempts[0].worker.as_deref(), Some("w1"));
        assert_eq!(probe.runs_of(*id), 1);
    }
    w.stop().await;
}

async fn failures_retry_then_dead_letter(s: Arc<dyn Store>) {
    let b = backend(&s, "w1");
    let retried = enqueue(&b, 7).await;
    let aborted = enqueue(&b, 0).await;
    let probe = Arc::new(Probe::default());
    let w = start!("resize", b, probe, failing);
    let job = wait_for(&s, retried, JobState::Dead).await;
    // MAX_ATTEMPTS = 3: three attempts, each failure recorded with the handler's error.
    assert_eq!(job.attempt, 3);
    assert_eq!(job.attempts.len(), 3, "{:?}", job.attempts);
    for (i, a) in job.attempts.iter().enumerate() {
        assert_eq!(a.attempt, i as i32 + 1);
        assert_eq!(a.outcome, AttemptOutcome::Failed);
        assert_eq!(a.error.as_deref(), Some("resize 7 failed"));
    }
    // The waits between attempts came from the retry policy (10 ms, 20 ms): each attempt
    // started after the previous one ended.
    assert!(job.attempts[1].started_at >= job.attempts[0].finished_at);
    // apalis's AbortError: dead at once, without using the other attempts.
    let job = wait_for(&s, aborted, JobState::Dead).await;
    assert_eq!(job.attempts.len(), 1);
    assert_eq!(job.attempts[0].error.as_deref(), Some("bad image"));
    w.stop().await;
}

async fn args_that_do_not_decode_go_dead(s: Arc<dyn Store>) {
    let id = s
        .enqueue(NewJob::new(Resize::KIND, serde_json::json!({"n": "twelve"})).queue(Resize::QUEUE))
        .await
        .unwrap()
        .id;
    let probe = Arc::new(Probe::default());
    let w = start!("resize", backend(&s, "w1"), probe, ok);
    let job = wait_for(&s, id, JobState::Dead).await;
    let error = job.last_error().unwrap_or_default();
    assert!(
        error.starts_with("args do not match kind `image.resize`"),
        "{error}"
    );
    assert_eq!(probe.started.load(Ordering::SeqCst), 0);
    w.stop().await;
}

async fn a_dropped_worker_loses_its_lease_and_the_job_runs_once_elsewhere(s: Arc<dyn Store>) {
    let first = backend(&s, "w1");
    let id = enqueue(&first, 1).await;
    let probe = Arc::new(Probe::default());
    let w = start!("resize", first, probe, held);
    eventually(10, "the job to start", || async {
        (probe.started.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    // Killed mid-job: its heartbeat stops with it.
    w.handle.abort();
    let _ = w.handle.await;
    // The lease (2 s) expires; the rescuer makes the job retryable.
    let policy = Resize::retry_policy();
    eventually(10, "the lease to expire and the job to be rescued", || {
        let s = s.clone();
        let policy = policy.clone();
        async move {
            let now = s.now().await.unwrap();
            let r = s.rescue_expired(now, &policy, 100).await.unwrap();
            (r.retried == 1).then_some(())
        }
    })
    .await;
    let second = Arc::new(Probe::default());
    let w2 = start!("resize", backend(&s, "w2"), second, ok);
    let job = wait_for(&s, id, JobState::Completed).await;
    assert_eq!(probe.runs_of(id), 0, "the dropped worker never finished it");
    assert_eq!(second.runs_of(id), 1);
    let outcomes: Vec<_> = job
        .attempts
        .iter()
        .map(|a| (a.attempt, a.worker.clone().unwrap_or_default(), a.outcome))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (1, "w1".to_string(), AttemptOutcome::LeaseExpired),
            (2, "w2".to_string(), AttemptOutcome::Completed),
        ]
    );
    w2.stop().await;
}

async fn a_late_outcome_of_a_rescued_attempt_is_refused(s: Arc<dyn Store>) {
    // One slot, taken by the held job: w1 cannot claim the job again once it is rescued.
    let b = ConveyorBackend::<Resize>::for_args_with(
        s.clone(),
        fast(Config::for_args::<Resize>())
            .worker_id("w1")
            .concurrency(1),
    );
    let id = enqueue(&b, 1).await;
    let probe = Arc::new(Probe::default());
    let w = start!("resize", b, probe, held);
    eventually(10, "the job to start", || async {
        (probe.started.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    // The rescuer, running 6 s ahead (well past w1's 2 s lease, as if w1's heartbeats had
    // stopped reaching the store), ends the lease; another worker claims and completes the
    // job once it is due (6 s from now).
    let later = s.now().await.unwrap() + chrono::Duration::seconds(6);
    let no_wait = RetryPolicy {
        base: Duration::ZERO,
        jitter: 0.0,
        ..RetryPolicy::default()
    };
    let r = s.rescue_expired(later, &no_wait, 100).await.unwrap();
    assert_eq!(r.retried, 1);
    let other = Arc::new(Probe::default());
    let w2 = start!("resize", backend(&s, "w2"), other, ok);
    wait_for(&s, id, JobState::Completed).await;
    w2.stop().await;
    // Now w1's handler returns: its outcome is refused, and the worker hears why.
    probe.release.notify_waiters();
    eventually(10, "w1 to report the refused outcome", || async {
        probe
            .errors
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.contains("the lease had ended"))
            .then_some(())
    })
    .await;
    let job = s.get(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Completed);
    let completed: Vec<_> = job
        .attempts
        .iter()
        .filter(|a| a.outcome == AttemptOutcome::Completed)
        .map(|a| a.worker.clone().unwrap_or_default())
        .collect();
    assert_eq!(completed, vec!["w2".to_string()], "{:?}", job.attempts);
    w.stop().await;
}

async fn idempotent_enqueues_and_pushes_dedupe(s: Arc<dyn Store>) {
    let mut b = backend(&s, "w1");
    // The kind's uniqueness window (JobArgs::UNIQUE_FOR): equal args make one job.
    let first = b.enqueue(&Resize { n: 5 }).await.unwrap();
    let again = b.enqueue(&Resize { n: 5 }).await.unwrap();
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!(again.id, first.id);
    b.push(Resize { n: 5 }).await.unwrap();
    // A task's own idempotency key replaces the derived one.
    for _ in 0..3 {
        let task = TaskBuilder::new(Resize { n: 6 })
            .idempotency_key("order-42")
            .build();
        b.push_task(task).await.unwrap();
    }
    b.push_bulk(vec![Resize { n: 5 }, Resize { n: 8 }])
        .await
        .unwrap();
    let filter = JobFilter {
        queue: Some(Resize::QUEUE.into()),
        ..JobFilter::default()
    };
    // n = 5 (once), n = 6 under `order-42` (once), n = 8.
    assert_eq!(s.count(&filter).await.unwrap(), 3);
    let keyed = s
        .list(&filter, Default::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|j| j.idempotency_key.as_deref() == Some("order-42"))
        .count();
    assert_eq!(keyed, 1);
}

async fn two_workers_share_a_queue_and_run_each_job_once(s: Arc<dyn Store>) {
    let b = backend(&s, "w1");
    let mut jobs = Vec::new();
    for n in 0..100u32 {
        jobs.push(
            Resize { n: n + 1000 }
                .to_job()
                .unwrap()
                .idempotency_key(format!("share-{n}")),
        );
    }
    let ids: Vec<JobId> = s
        .enqueue_many(jobs)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    let probe = Arc::new(Probe::default());
    let w1 = start!("resize-1", b, probe, ok);
    let w2 = start!("resize-2", backend(&s, "w2"), probe, ok);
    for id in &ids {
        let job = wait_for(&s, *id, JobState::Completed).await;
        assert_eq!(job.attempts.len(), 1, "{:?}", job.attempts);
    }
    w1.stop().await;
    w2.stop().await;
    let runs = probe.runs.lock().unwrap();
    assert_eq!(runs.len(), ids.len());
    assert!(runs.values().all(|n| *n == 1), "{runs:?}");
}

async fn shutdown_finishes_running_jobs_and_hands_back_the_rest(s: Arc<dyn Store>) {
    // The backend claims up to 5; the worker's own tower layer runs one at a time, so four
    // wait, claimed, in the backend.
    let b = ConveyorBackend::<Resize>::for_args_with(
        s.clone(),
        fast(Config::for_args::<Resize>())
            .worker_id("w1")
            .concurrency(5),
    );
    let mut ids = Vec::new();
    for n in 1..=5 {
        ids.push(enqueue(&b, n).await);
    }
    let probe = Arc::new(Probe::default());
    let ctx = WorkerContext::new("resize");
    let worker = WorkerBuilder::new(&ctx)
        .backend(b)
        .data(probe.clone())
        .layer(tower::limit::ConcurrencyLimitLayer::new(1))
        .build(held);
    let handle = tokio::spawn(async move { worker.run().await.unwrap() });
    eventually(10, "one job to start and five to be claimed", || {
        let s = s.clone();
        let probe = probe.clone();
        async move {
            let running = JobFilter {
                queue: Some(Resize::QUEUE.into()),
                states: vec![JobState::Running],
                ..JobFilter::default()
            };
            (probe.started.load(Ordering::SeqCst) == 1 && s.count(&running).await.unwrap() == 5)
                .then_some(())
        }
    })
    .await;
    ctx.stop().unwrap();
    // The running job is let finish.
    probe.release.notify_waiters();
    tokio::time::timeout(Duration::from_secs(20), handle)
        .await
        .expect("the worker stopped")
        .unwrap();
    let mut completed = 0;
    for id in &ids {
        let job = s.get(*id).await.unwrap().unwrap();
        match job.state {
            JobState::Completed => completed += 1,
            JobState::Available => {
                // Handed back without using an attempt.
                assert_eq!(job.attempt, 0, "{job:?}");
                assert_eq!(job.attempts[0].outcome, AttemptOutcome::Interrupted);
            }
            other => panic!("job {id} is {other}"),
        }
    }
    assert_eq!(completed, 1);
    // The store can hand them to the next worker at once.
    let claimed = s
        .fetch(FetchRequest {
            queue: Resize::QUEUE,
            limit: 10,
            worker: "w9",
            lease: Duration::from_secs(30),
        })
        .await
        .unwrap();
    assert_eq!(claimed.len(), 4);
}

backend_tests!(
    jobs_complete,
    failures_retry_then_dead_letter,
    args_that_do_not_decode_go_dead,
    a_dropped_worker_loses_its_lease_and_the_job_runs_once_elsewhere,
    a_late_outcome_of_a_rescued_attempt_is_refused,
    idempotent_enqueues_and_pushes_dedupe,
    two_workers_share_a_queue_and_run_each_job_once,
    shutdown_finishes_running_jobs_and_hands_back_the_rest,
);
