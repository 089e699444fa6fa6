//! A store that stops taking writes mid-run, then takes them again: a full disk under SQLite
//! (`?max_page_count=`, with another connection filling the file to it, then freeing the
//! space), a Postgres whose outcome writes fail (a trigger raising `disk_full` on every
//! finished attempt, then dropped).
//!
//! While outcomes cannot be written the worker holds at most its concurrency of jobs, stops
//! renewing their leases once the failure outlasts a lease, and still shuts down within the
//! grace period plus the flush bound. Once writes work again every outcome lands: nothing
//! lost, nothing held, no job run twice unless its outcome was given up at shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use conveyor_tests::{TestStore, eventually};
use conveyor_worker::runtime::{FLUSH_BOUND, QueueConfig, Worker, WorkerConfig};
use conveyor_worker::store::meta::{Expect, Put};
use conveyor_worker::store::{self, JobFilter, StoreOptions};
use conveyor_worker::{
    Error, JobContext, JobId, JobState, KindOptions, NewJob, Outcome, Registry, RetryPolicy, Store,
};
use serde_json::json;
use sqlx::Connection;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const CONCURRENCY: u32 = 4;
const LEASE: Duration = Duration::from_secs(2);
const GRACE: Duration = Duration::from_secs(1);

/// How a test makes the store refuse writes and take them again.
enum Fault {
    /// Another connection, not capped, fills the file up to the store's `max_page_count`
    /// with a table of blobs, leaving `slack` pages free, and frees the space by emptying it.
    Sqlite { file: String, limit: i64 },
    /// A trigger on `conveyor.jobs` that fails every update ending a running attempt with
    /// SQLSTATE 53100, as a full disk would.
    Postgres { url: String },
}

impl Fault {
    /// Makes outcome writes fail. On SQLite, `slack` pages stay free: enough for a fetch
    /// (which changes rows by a few bytes) and not for an outcome (a long error message).
    async fn fill(&self, slack: i64) {
        match self {
            Fault::Sqlite { file, limit } => {
                let mut c = sqlx::SqliteConnection::connect(file).await.unwrap();
                sqlx::query("CREATE TABLE IF NOT EXISTS filler (b BLOB)")
                    .execute(&mut c)
                    .await
                    .unwrap();
                loop {
                    let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
                        .fetch_one(&mut c)
                        .await
                        .unwrap();
                    let free: i64 = sqlx::query_scalar("PRAGMA freelist_count")
                        .fetch_one(&mut c)
                        .await
                        .unwrap();
                    if pages >= *limit && free == 0 {
                        break;
                    }
                    // A blob of about a page per row, so deleting a row frees a page.
                    sqlx::query(
                        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100) \
                         INSERT INTO filler SELECT zeroblob(3900) FROM n",
                    )
                    .execute(&mut c)
                    .await
                    .unwrap();
                }
                if slack > 0 {
                    sqlx::query(
                        "DELETE FROM filler WHERE rowid IN (SELECT rowid FROM filler LIMIT ?)",
                    )
                    .bind(slack)
                    .execute(&mut c)
                    .await
                    .unwrap();
                }
            }
            Fault::Postgres { url } => {
                let _ = slack;
                let mut c = sqlx::PgConnection::connect(url).await.unwrap();
                sqlx::raw_sql(
                    "CREATE OR REPLACE FUNCTION conveyor.test_disk_full() RETURNS trigger \
                       LANGUAGE plpgsql AS $$ BEGIN \
                       RAISE EXCEPTION 'could not extend file: No space left on device' \
                         USING ERRCODE = 'disk_full'; END $$; \
                     CREATE TRIGGER test_disk_full BEFORE UPDATE ON conveyor.jobs FOR EACH ROW \
                       WHEN (OLD.state = 'running' AND NEW.state <> 'running') \
                       EXECUTE FUNCTION conveyor.test_disk_full();",
                )
                .execute(&mut c)
                .await
                .unwrap();
            }
        }
    }

    async fn free(&self) {
        match self {
            Fault::Sqlite { file, .. } => {
                let mut c = sqlx::SqliteConnection::connect(file).await.unwrap();
                sqlx::query("DELETE FROM filler")
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
            Fault::Postgres { url } => {
                let mut c = sqlx::PgConnection::connect(url).await.unwrap();
                sqlx::query("DROP TRIGGER test_disk_full ON conveyor.jobs")
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
        }
    }
}

/// Counts each job's runs; jobs with `"gate": true` wait until the gate opens. A first
/// attempt fails with a long message (an outcome of many pages, which a nearly full SQLite
/// file cannot take); the second completes.
fn registry(runs: Arc<Mutex<HashMap<JobId, usize>>>, gate: watch::Receiver<bool>) -> Registry {
    let mut registry = Registry::new();
    let options = KindOptions {
        timeout: None,
        retry: RetryPolicy {
            base: Duration::from_millis(10),
            jitter: 0.0,
            ..RetryPolicy::default()
        },
    };
    registry.register_with(
        "probe",
        options,
        move |args: serde_json::Value, ctx: JobContext| {
            let (runs, mut gate) = (runs.clone(), gate.clone());
            async move {
                *runs.lock().unwrap().entry(ctx.job.id).or_default() += 1;
                if args["gate"] == json!(true) {
                    let _ = gate.wait_for(|open| *open).await;
                }
                if ctx.job.attempt == 1 {
                    anyhow::bail!("first attempt: {}", "x".repeat(64 * 1024));
                }
                Ok(Outcome::Done)
            }
        },
    );
    registry
}

fn config() -> WorkerConfig {
    WorkerConfig {
        queues: vec![QueueConfig {
            name: "default".into(),
            concurrency: CONCURRENCY,
        }],
        lease: LEASE,
        heartbeat: Duration::from_millis(300),
        poll_interval: Duration::from_millis(50),
        shutdown_grace: GRACE,
        ..WorkerConfig::default()
    }
}

async fn count(s: &Arc<dyn Store>, state: JobState) -> u64 {
    s.count(&JobFilter::state(state)).await.unwrap()
}

fn start(
    s: &Arc<dyn Store>,
    registry: Registry,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let worker = Worker::new(s.clone(), registry, config()).unwrap();
    let shutdown = CancellationToken::new();
    let run = worker.run(shutdown.clone());
    let handle = tokio::spawn(async move { run.await.expect("the worker stops without error") });
    (shutdown, handle)
}

async fn writes_fail_then_recover(s: Arc<dyn Store>, fault: Fault) {
    let runs = Arc::new(Mutex::new(HashMap::<JobId, usize>::new()));
    let (open_gate, gate) = watch::channel(false);
    let quick: Vec<NewJob> = (0..40).map(|_| NewJob::new("probe", json!({}))).collect();
    s.enqueue_many(quick).await.unwrap();
    fault.fill(10).await;

    // Writes fail: the worker claims its concurrency and no more.
    let (shutdown, handle) = start(&s, registry(runs.clone(), gate.clone()));
    eventually(10, "the worker to claim jobs", || {
        let runs = runs.clone();
        async move { (!runs.lock().unwrap().is_empty()).then_some(()) }
    })
    .await;
    let watch_until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < watch_until {
        let running = count(&s, JobState::Running).await;
        assert!(
            running <= u64::from(CONCURRENCY),
            "{running} jobs held by a worker of concurrency {CONCURRENCY} whose writes fail"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        count(&s, JobState::Completed).await < 40,
        "the store took every outcome: the fault did not bite"
    );

    // Failing for longer than a lease: the leases lapse, so a peer's rescuer could take them.
    eventually(10, "the stuck jobs' leases to expire", || {
        let s = s.clone();
        async move {
            let running = s
                .list(&JobFilter::state(JobState::Running), Default::default())
                .await
                .unwrap();
            let now = Utc::now();
            (!running.is_empty()
                && running
                    .iter()
                    .all(|j| j.lease_expires_at.is_some_and(|t| t < now)))
            .then_some(())
        }
    })
    .await;

    if let Fault::Postgres { .. } = fault {
        // SQLSTATE 53100 is a full disk to the operator, whichever statement met it.
        let later = Utc::now() + chrono::Duration::hours(1);
        let err = s
            .rescue_expired(later, &RetryPolicy::default(), 100)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::StoreFull(_)), "{err:?}");
        assert!(err.to_string().contains("disk is full"), "{err}");
    }

    // Space again: the same worker, on the same store connections, finishes everything.
    fault.free().await;
    eventually(15, "all 40 jobs completed once space is back", || {
        let s = s.clone();
        async move { (count(&s, JobState::Completed).await == 40).then_some(()) }
    })
    .await;
    {
        let runs = runs.lock().unwrap();
        assert_eq!(runs.len(), 40);
        assert!(
            runs.values().all(|n| *n == 2),
            "each job fails once and completes once: {runs:?}"
        );
    }

    // Full again while four jobs run: shutdown gives their outcomes up within its bound.
    let gated: Vec<NewJob> = (0..CONCURRENCY)
        .map(|_| NewJob::new("probe", json!({ "gate": true })))
        .collect();
    let gated: Vec<JobId> = s
        .enqueue_many(gated)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    eventually(10, "the gated jobs to run", || {
        let runs = runs.clone();
        let gated = gated.clone();
        async move {
            let runs = runs.lock().unwrap();
            gated.iter().all(|id| runs.contains_key(id)).then_some(())
        }
    })
    .await;
    fault.fill(0).await;
    open_gate.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = std::time::Instant::now();
    shutdown.cancel();
    let bound = GRACE + FLUSH_BOUND + Duration::from_secs(2);
    tokio::time::timeout(bound, handle)
        .await
        .unwrap_or_else(|_| panic!("shutdown took longer than {bound:?} with unwritable outcomes"))
        .unwrap();
    eprintln!(
        "shutdown with unwritable outcomes took {:?}",
        stopping.elapsed()
    );
    assert_eq!(
        count(&s, JobState::Running).await,
        u64::from(CONCURRENCY),
        "the given-up outcomes leave their jobs running until the rescuer"
    );

    // Space again; once their leases expire the rescuer retries the given-up jobs, and a new
    // worker runs them: nothing lost.
    fault.free().await;
    let fast = RetryPolicy {
        base: Duration::from_millis(10),
        jitter: 0.0,
        ..RetryPolicy::default()
    };
    let rescued = Arc::new(AtomicU64::new(0));
    eventually(10, "the given-up jobs to be rescued", || {
        let (s, fast, rescued) = (s.clone(), fast.clone(), rescued.clone());
        async move {
            let report = s.rescue_expired(Utc::now(), &fast, 100).await.unwrap();
            let total = rescued.fetch_add(report.retried, Ordering::SeqCst) + report.retried;
            (total == u64::from(CONCURRENCY)).then_some(())
        }
    })
    .await;
    let (shutdown, handle) = start(&s, registry(runs.clone(), gate));
    eventually(15, "every job completed", || {
        let s = s.clone();
        async move { (count(&s, JobState::Completed).await == 44).then_some(()) }
    })
    .await;
    shutdown.cancel();
    handle.await.unwrap();
    let runs = runs.lock().unwrap();
    for id in &gated {
        assert_eq!(runs[id], 2, "a job whose outcome was given up runs again");
    }
    assert_eq!(runs.values().filter(|n| **n == 2).count(), 44);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_full_disk_mid_run() {
    let t = TestStore::sqlite().await;
    let file = t.url.clone();
    // The worker's store is capped a little above what the file holds now; the test fills
    // the rest from a connection of its own.
    let pages: i64 = {
        let mut c = sqlx::SqliteConnection::connect(&file).await.unwrap();
        sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(&mut c)
            .await
            .unwrap()
    };
    // Room for every outcome once the filler is gone (44 jobs, 64 KiB error each).
    let limit = pages + 2000;
    let s = store::connect(
        &format!("{file}?max_page_count={limit}"),
        StoreOptions::default(),
    )
    .await
    .unwrap();
    writes_fail_then_recover(s, Fault::Sqlite { file, limit }).await;
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_failing_outcome_writes_mid_run() {
    let Some(t) = TestStore::postgres().await else {
        return;
    };
    let url = t.url.clone();
    writes_fail_then_recover(t.store.clone(), Fault::Postgres { url }).await;
    t.cleanup().await;
}

/// A write that meets a full disk says so, on SQLite and on Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_as_such() {
    let t = TestStore::sqlite().await;
    let mut c = sqlx::SqliteConnection::connect(&t.url).await.unwrap();
    let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
        .fetch_one(&mut c)
        .await
        .unwrap();
    let s = store::connect(
        &format!("{}?max_page_count={pages}", t.url),
        StoreOptions::default(),
    )
    .await
    .unwrap();
    let big = "x".repeat(100_000);
    // One job is one statement; two are a transaction (`BEGIN IMMEDIATE`).
    for n in [1, 2] {
        let jobs = (0..n)
            .map(|_| NewJob::new("probe", json!({ "big": big })))
            .collect();
        let err = s.enqueue_many(jobs).await.unwrap_err();
        assert!(matches!(err, Error::StoreFull(_)), "{err:?}");
        assert!(err.to_string().contains("database is full"), "{err}");
    }
    // A single-row write needs no statement journal, so SQLite answers SQLITE_FULL by
    // rolling back the whole transaction; sqlx's own ROLLBACK then fails.
    let value = json!({ "big": big });
    let err = s
        .meta_put(Put {
            collection: "test",
            key: "big",
            value: &value,
            expect: Expect::Any,
            ttl: None,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::StoreFull(_)), "{err:?}");
    // The failed transaction left the writer usable: the next transaction runs (and finds
    // no such job) instead of failing at `BEGIN`.
    let missing = JobId::new();
    let err = s.cancel(missing).await.unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    assert_eq!(count(&s, JobState::Available).await, 0);
    t.cleanup().await;
}
