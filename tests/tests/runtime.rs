//! The worker runtime against real stores: outcomes, retries, panics, timeouts, cancellation,
//! concurrency limits, several workers on one store, and graceful shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor_tests::{backend_tests, eventually};
use conveyor_worker::runtime::{QueueConfig, Worker, WorkerConfig};
use conveyor_worker::store::CancelResult;
use conveyor_worker::{
    AttemptOutcome, Job, JobContext, JobId, JobState, KindOptions, NewJob, Outcome, Registry,
    RetryPolicy, Store,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn config(queues: &[(&str, u32)]) -> WorkerConfig {
    WorkerConfig {
        queues: queues
            .iter()
            .map(|(name, concurrency)| QueueConfig {
                name: (*name).into(),
                concurrency: *concurrency,
            })
            .collect(),
        poll_interval: Duration::from_millis(100),
        shutdown_grace: Duration::from_secs(5),
        cancel_grace: Duration::from_millis(200),
        ..WorkerConfig::default()
    }
}

fn fast_retry() -> KindOptions {
    KindOptions {
        timeout: None,
        retry: RetryPolicy {
            base: Duration::from_millis(10),
            jitter: 0.0,
            ..RetryPolicy::default()
        },
    }
}

struct Running {
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<conveyor_worker::Result<()>>,
}

impl Running {
    fn start(store: &Arc<dyn Store>, registry: Registry, config: WorkerConfig) -> Self {
        let worker = Worker::new(store.clone(), registry, config).expect("valid config");
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(worker.run(shutdown.clone()));
        Self { shutdown, handle }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.handle
            .await
            .expect("worker task did not panic")
            .expect("worker shut down cleanly");
    }
}

async fn wait_for_state(s: &Arc<dyn Store>, id: JobId, state: JobState) -> Job {
    eventually(20, &format!("job {id} to become {state}"), || {
        let s = s.clone();
        async move {
            let j = s.get(id).await.unwrap()?;
            (j.state == state).then_some(j)
        }
    })
    .await
}

async fn jobs_run_to_completion(s: Arc<dyn Store>) {
    let mut registry = Registry::new();
    conveyor_jobs::register_builtin(&mut registry);
    let w = Running::start(&s, registry, config(&[("default", 4)]));
    let e = s
        .enqueue(NewJob::new("demo.echo", json!({"msg": "hi"})))
        .await
        .unwrap();
    let done = wait_for_state(&s, e.id, JobState::Completed).await;
    assert_eq!(done.attempt, 1);
    assert_eq!(done.attempts.len(), 1);
    assert_eq!(done.attempts[0].outcome, AttemptOutcome::Completed);
    assert!(done.finalized_at.is_some());
    assert!(done.lease_owner.is_none());
    w.stop().await;
}

async fn failures_retry_with_backoff_then_die_with_their_history(s: Arc<dyn Store>) {
    let mut registry = Registry::new();
    registry.register_with(
        "flaky",
        fast_retry(),
        |_: serde_json::Value, ctx: JobContext| async move {
            let io = std::io::Error::other("connection reset by peer");
            Err(anyhow::Error::new(io).context(format!("sending attempt {}", ctx.job.attempt)))
        },
    );
    let w = Running::start(&s, registry, config(&[("default", 2)]));
    let e = s
        .enqueue(NewJob::new("flaky", json!({})).max_attempts(3))
        .await
        .unwrap();
    let dead = wait_for_state(&s, e.id, JobState::Dead).await;
    assert_eq!(dead.attempt, 3);
    let outcomes: Vec<_> = dead.attempts.iter().map(|a| a.outcome).collect();
    assert_eq!(
        outcomes,
        vec![
            AttemptOutcome::Failed,
            AttemptOutcome::Failed,
            AttemptOutcome::Failed
        ]
    );
    assert_eq!(dead.attempts[2].error.as_deref(), Some("sending attempt 3"));
    assert_eq!(
        dead.attempts[2].causes,
        vec!["connection reset by peer".to_string()]
    );
    for pair in dead.attempts.windows(2) {
        assert!(
            pair[1].started_at >= pair[0].finished_at,
            "attempts are sequential"
        );
    }
    w.stop().await;
}

async fn panics_timeouts_and_bad_args_are_failed_attempts(s: Arc<dyn Store>) {
    #[derive(serde::Deserialize)]
    struct Typed {
        #[allow(dead_code)]
        count: u32,
    }
    let mut registry = Registry::new();
    registry
        .register(
            "panics",
            |_: serde_json::Value, _ctx: JobContext| async move {
                if true {
                    panic!("index out of bounds");
                }
                Ok(Outcome::Done)
            },
        )
        .register_with(
            "slow",
            KindOptions {
                timeout: Some(Duration::from_millis(100)),
                ..fast_retry()
            },
            |_: serde_json::Value, _ctx: JobContext| async move {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(Outcome::Done)
            },
        )
        .register("typed", |_: Typed, _ctx: JobContext| async move {
            Ok(Outcome::Done)
        });
    let w = Running::start(&s, registry, config(&[("default", 4)]));
    let p = s
        .enqueue(NewJob::new("panics", json!({})).max_attempts(1))
        .await
        .unwrap();
    let t = s
        .enqueue(NewJob::new("slow", json!({})).max_attempts(1))
        .await
        .unwrap();
    let b = s
        .enqueue(NewJob::new("typed", json!({"count": "many"})).max_attempts(5))
        .await
        .unwrap();

    let p = wait_for_state(&s, p.id, JobState::Dead).await;
    assert!(
        p.last_error()
            .unwrap()
            .contains("handler panicked: index out of bounds"),
        "{:?}",
        p.last_error()
    );
    let t = wait_for_state(&s, t.id, JobState::Dead).await;
    assert!(
        t.last_error().unwrap().contains("timed out after 100ms"),
        "{:?}",
        t.last_error()
    );
    assert!(t.attempts[0].duration_ms >= 100);
    let b = wait_for_state(&s, b.id, JobState::Dead).await;
    assert_eq!(b.attempt, 1, "args that cannot match never retry");
    assert!(
        b.last_error()
            .unwrap()
            .contains("args do not match kind `typed`"),
        "{:?}",
        b.last_error()
    );
    w.stop().await;
}

/// A worker without a handler for the kind (a rolling deploy, a shared queue) does not use
/// the job's attempts: the job waits for a worker that has the kind, which then runs it.
async fn a_kind_this_worker_lacks_waits_for_one_that_has_it(s: Arc<dyn Store>) {
    let old = Running::start(&s, Registry::new(), config(&[("default", 2)]));
    let u = s
        .enqueue(NewJob::new("invoice.send", json!({})).max_attempts(1))
        .await
        .unwrap();
    let waiting = eventually(20, "the job to wait for a worker with its kind", || {
        let s = s.clone();
        async move {
            let j = s.get(u.id).await.unwrap().unwrap();
            (j.state == JobState::Scheduled && !j.attempts.is_empty()).then_some(j)
        }
    })
    .await;
    assert_eq!(waiting.attempt, 0, "no attempt used");
    assert!(
        waiting
            .last_error()
            .unwrap()
            .contains("no handler for kind `invoice.send`"),
        "{:?}",
        waiting.last_error()
    );
    old.stop().await;

    let mut registry = Registry::new();
    registry.register(
        "invoice.send",
        |_: serde_json::Value, _ctx: JobContext| async move { Ok(Outcome::Done) },
    );
    let new = Running::start(&s, registry, config(&[("default", 2)]));
    let done = wait_for_state(&s, u.id, JobState::Completed).await;
    assert_eq!(
        done.attempt, 1,
        "its one attempt ran on the worker that has the kind"
    );
    new.stop().await;
}

async fn outcomes_snooze_cancel_fail_and_retry_after(s: Arc<dyn Store>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::new();
    let r = runs.clone();
    registry
        .register("snoozer", move |_: serde_json::Value, _ctx: JobContext| {
            let r = r.clone();
            async move {
                if r.fetch_add(1, Ordering::SeqCst) == 0 {
                    Ok(Outcome::Snooze(Duration::from_millis(50)))
                } else {
                    Ok(Outcome::Done)
                }
            }
        })
        .register(
            "quitter",
            |_: serde_json::Value, _ctx: JobContext| async move {
                Ok(Outcome::cancel("customer closed the account"))
            },
        )
        .register(
            "broken",
            |_: serde_json::Value, _ctx: JobContext| async move {
                Ok(Outcome::fail("payload rejected with 422"))
            },
        )
        .register(
            "later",
            |_: serde_json::Value, _ctx: JobContext| async move {
                Ok(Outcome::retry_after(
                    Duration::from_secs(600),
                    "429 Too Many Requests",
                ))
            },
        );
    let w = Running::start(&s, registry, config(&[("default", 4)]));
    let sn = s
        .enqueue(NewJob::new("snoozer", json!({})).max_attempts(1))
        .await
        .unwrap();
    let q = s.enqueue(NewJob::new("quitter", json!({}))).await.unwrap();
    let b = s.enqueue(NewJob::new("broken", json!({}))).await.unwrap();
    let l = s.enqueue(NewJob::new("later", json!({}))).await.unwrap();

    let sn = wait_for_state(&s, sn.id, JobState::Completed).await;
    assert_eq!(sn.attempt, 1, "a snooze does not use an attempt");
    assert_eq!(
        sn.attempts.iter().map(|a| a.outcome).collect::<Vec<_>>(),
        vec![AttemptOutcome::Snoozed, AttemptOutcome::Completed]
    );
    let q = wait_for_state(&s, q.id, JobState::Cancelled).await;
    assert_eq!(q.last_error(), Some("customer closed the account"));
    let b = wait_for_state(&s, b.id, JobState::Dead).await;
    assert_eq!(b.attempt, 1, "a permanent failure does not retry");
    let l = wait_for_state(&s, l.id, JobState::Retryable).await;
    let wait = (l.run_at - l.attempts[0].finished_at).num_seconds();
    assert!((599..=601).contains(&wait), "Retry-After honoured: {wait}s");
    w.stop().await;
}

async fn running_jobs_can_be_cancelled(s: Arc<dyn Store>) {
    let mut registry = Registry::new();
    conveyor_jobs::register_builtin(&mut registry);
    registry.register(
        "stubborn",
        |_: serde_json::Value, _ctx: JobContext| async move {
            // Ignores its cancel token: the runtime drops it after the cancel grace.
            tokio::time::sleep(Duration::from_secs(600)).await;
            Ok(Outcome::Done)
        },
    );
    let w = Running::start(&s, registry, config(&[("default", 4)]));
    let polite = s
        .enqueue(NewJob::new("demo.sleep", json!({"ms": 600_000})))
        .await
        .unwrap();
    let stubborn = s.enqueue(NewJob::new("stubborn", json!({}))).await.unwrap();
    wait_for_state(&s, polite.id, JobState::Running).await;
    wait_for_state(&s, stubborn.id, JobState::Running).await;

    assert_eq!(s.cancel(polite.id).await.unwrap(), CancelResult::Requested);
    assert_eq!(
        s.cancel(stubborn.id).await.unwrap(),
        CancelResult::Requested
    );
    let p = wait_for_state(&s, polite.id, JobState::Cancelled).await;
    assert_eq!(p.attempts[0].outcome, AttemptOutcome::Cancelled);
    assert!(p.attempts[0].duration_ms < 10_000, "stopped promptly");
    wait_for_state(&s, stubborn.id, JobState::Cancelled).await;
    w.stop().await;
}

async fn concurrency_limits_hold_per_queue(s: Arc<dyn Store>) {
    let now = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let peak = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let mut registry = Registry::new();
    let (n, p) = (now.clone(), peak.clone());
    registry.register("measure", move |_: serde_json::Value, ctx: JobContext| {
        let (n, p) = (n.clone(), p.clone());
        async move {
            let q = ctx.job.queue.clone();
            {
                let mut n = n.lock().unwrap();
                let c = n.entry(q.clone()).or_default();
                *c += 1;
                let mut p = p.lock().unwrap();
                let m = p.entry(q.clone()).or_default();
                *m = (*m).max(*c);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            *n.lock().unwrap().get_mut(&q).unwrap() -= 1;
            Ok(Outcome::Done)
        }
    });
    let jobs: Vec<NewJob> = (0..60)
        .map(|i| NewJob::new("measure", json!({})).queue(if i % 2 == 0 { "a" } else { "b" }))
        .collect();
    s.enqueue_many(jobs).await.unwrap();
    let w = Running::start(&s, registry, config(&[("a", 3), ("b", 7)]));
    eventually(30, "all 60 jobs completed", || {
        let s = s.clone();
        async move {
            let n = s
                .count(&conveyor_worker::store::JobFilter::state(
                    JobState::Completed,
                ))
                .await
                .unwrap();
            (n == 60).then_some(())
        }
    })
    .await;
    let peak = peak.lock().unwrap().clone();
    assert_eq!(
        peak.get("a"),
        Some(&3),
        "queue a never exceeds 3 and reaches it: {peak:?}"
    );
    assert_eq!(
        peak.get("b"),
        Some(&7),
        "queue b never exceeds 7 and reaches it: {peak:?}"
    );
    w.stop().await;
}

async fn two_workers_run_each_job_exactly_once(s: Arc<dyn Store>) {
    let runs = Arc::new(Mutex::new(HashMap::<JobId, usize>::new()));
    let make = |runs: Arc<Mutex<HashMap<JobId, usize>>>| {
        let mut registry = Registry::new();
        registry.register("count", move |_: serde_json::Value, ctx: JobContext| {
            let runs = runs.clone();
            async move {
                *runs.lock().unwrap().entry(ctx.job.id).or_default() += 1;
                Ok(Outcome::Done)
            }
        });
        registry
    };
    let a = Running::start(
        &s,
        make(runs.clone()),
        WorkerConfig {
            id: "worker-a".into(),
            ..config(&[("default", 8)])
        },
    );
    let b = Running::start(
        &s,
        make(runs.clone()),
        WorkerConfig {
            id: "worker-b".into(),
            ..config(&[("default", 8)])
        },
    );
    let ids = s
        .enqueue_many((0..500).map(|_| NewJob::new("count", json!({}))).collect())
        .await
        .unwrap();
    eventually(60, "all 500 jobs completed", || {
        let s = s.clone();
        async move {
            let n = s
                .count(&conveyor_worker::store::JobFilter::state(
                    JobState::Completed,
                ))
                .await
                .unwrap();
            (n == 500).then_some(())
        }
    })
    .await;
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 500);
    assert!(runs.values().all(|&n| n == 1), "no job ran twice");
    assert!(ids.iter().all(|e| runs.contains_key(&e.id)));
    a.stop().await;
    b.stop().await;
}

async fn shutdown_lets_jobs_finish_then_interrupts_the_rest(s: Arc<dyn Store>) {
    let mut registry = Registry::new();
    conveyor_jobs::register_builtin(&mut registry);
    let w = Running::start(
        &s,
        registry,
        WorkerConfig {
            shutdown_grace: Duration::from_millis(1500),
            ..config(&[("default", 4)])
        },
    );
    let short = s
        .enqueue(NewJob::new("demo.sleep", json!({"ms": 300})))
        .await
        .unwrap();
    let long = s
        .enqueue(NewJob::new("demo.sleep", json!({"ms": 600_000})))
        .await
        .unwrap();
    wait_for_state(&s, short.id, JobState::Running).await;
    wait_for_state(&s, long.id, JobState::Running).await;
    let started = std::time::Instant::now();
    w.stop().await;
    assert!(started.elapsed() < Duration::from_secs(10));

    let short = s.get(short.id).await.unwrap().unwrap();
    assert_eq!(
        short.state,
        JobState::Completed,
        "finished within the grace period"
    );
    let long = s.get(long.id).await.unwrap().unwrap();
    assert_eq!(long.state, JobState::Available, "given back to the queue");
    assert_eq!(long.attempt, 0, "an interrupted attempt does not count");
    assert_eq!(long.attempts[0].outcome, AttemptOutcome::Interrupted);
    assert!(long.lease_owner.is_none());
}

async fn delayed_jobs_start_without_another_enqueue(s: Arc<dyn Store>) {
    let mut registry = Registry::new();
    conveyor_jobs::register_builtin(&mut registry);
    let w = Running::start(&s, registry, config(&[("default", 2)]));
    // Let the worker go idle first, so only the poll can find the job.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = s
        .enqueue(
            NewJob::new("demo.echo", json!({"msg": "later"}))
                .run_at(chrono::Utc::now() + chrono::Duration::milliseconds(400)),
        )
        .await
        .unwrap();
    assert_eq!(e.state, JobState::Scheduled);
    wait_for_state(&s, e.id, JobState::Completed).await;
    w.stop().await;
}

/// A handler may ask for the longest delay there is (`Duration::MAX`: "not before the end of
/// time"). The next state saturates at the latest instant the store keeps; the job never
/// stays `running` under the worker's live heartbeat because computing it overflowed.
async fn extreme_delays_saturate_and_never_strand_a_job(s: Arc<dyn Store>) {
    let mut registry = Registry::new();
    registry
        .register(
            "forever.snooze",
            |_: serde_json::Value, _ctx: JobContext| async move {
                Ok(Outcome::Snooze(Duration::MAX))
            },
        )
        .register(
            "forever.retry",
            |_: serde_json::Value, _ctx: JobContext| async move {
                Ok(Outcome::retry_after(Duration::MAX, "come back never"))
            },
        )
        .register(
            "instant.retry",
            |_: serde_json::Value, _ctx: JobContext| async move {
                Ok(Outcome::retry_after(Duration::ZERO, "again at once"))
            },
        );
    let w = Running::start(&s, registry, config(&[("default", 4)]));
    let sn = s
        .enqueue(NewJob::new("forever.snooze", json!({})))
        .await
        .unwrap();
    let re = s
        .enqueue(NewJob::new("forever.retry", json!({})))
        .await
        .unwrap();
    let now = s
        .enqueue(NewJob::new("instant.retry", json!({})).max_attempts(3))
        .await
        .unwrap();
    let far = chrono::Utc::now() + chrono::Duration::days(365 * 1000);
    let sn = wait_for_state(&s, sn.id, JobState::Scheduled).await;
    assert!(
        sn.run_at > far,
        "snoozed until the end of time: {}",
        sn.run_at
    );
    assert_eq!(sn.attempts.len(), 1, "{:?}", sn.attempts);
    let re = wait_for_state(&s, re.id, JobState::Retryable).await;
    assert!(re.run_at > far, "retried at the end of time: {}", re.run_at);
    assert_eq!(re.last_error(), Some("come back never"));
    // A zero delay retries at once, through every attempt, to dead.
    let now = wait_for_state(&s, now.id, JobState::Dead).await;
    assert_eq!(now.attempts.len(), 3, "{:?}", now.attempts);
    w.stop().await;
}

backend_tests!(
    jobs_run_to_completion,
    failures_retry_with_backoff_then_die_with_their_history,
    panics_timeouts_and_bad_args_are_failed_attempts,
    outcomes_snooze_cancel_fail_and_retry_after,
    running_jobs_can_be_cancelled,
    concurrency_limits_hold_per_queue,
    two_workers_run_each_job_exactly_once,
    shutdown_lets_jobs_finish_then_interrupts_the_rest,
    delayed_jobs_start_without_another_enqueue,
    extreme_delays_saturate_and_never_strand_a_job,
    a_kind_this_worker_lacks_waits_for_one_that_has_it,
);

// The flows production conditions could break, again over TLS to Postgres and Redis and on a
// Postgres database with strict defaults (each Postgres test creates a database: the whole
// suite again would double its time).
conveyor_tests::production_backend_tests!(
    jobs_run_to_completion,
    running_jobs_can_be_cancelled,
    two_workers_run_each_job_exactly_once,
    delayed_jobs_start_without_another_enqueue,
);
