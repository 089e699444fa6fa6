//! Transactional enqueue on Postgres: a job enqueued inside the application's transaction
//! exists if and only if that transaction commits — through the Rust API
//! (`store::postgres::enqueue_in` / `enqueue_many_in`) and through the SQL function
//! `conveyor.enqueue(...)` that any language can call.

use std::sync::Arc;
use std::time::Duration;

use conveyor_tests::{TestStore, eventually};
use conveyor_worker::runtime::{QueueConfig, Worker, WorkerConfig};
use conveyor_worker::store::{FetchRequest, postgres};
use conveyor_worker::{JobId, JobState, NewJob, Registry, Store};
use serde_json::json;
use sqlx::{Connection, PgConnection, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

async fn setup() -> Option<(TestStore, PgConnection)> {
    let t = TestStore::postgres().await?;
    let conn = PgConnection::connect(&t.url)
        .await
        .expect("a second connection to the test database opens");
    Some((t, conn))
}

async fn exists(s: &Arc<dyn Store>, id: JobId) -> bool {
    s.get(id).await.expect("get works").is_some()
}

async fn fetch_ids(s: &Arc<dyn Store>, queue: &str) -> Vec<JobId> {
    s.fetch(FetchRequest {
        queue,
        limit: 100,
        worker: "tx-test",
        lease: Duration::from_secs(30),
    })
    .await
    .expect("fetch works")
    .into_iter()
    .map(|j| j.id)
    .collect()
}

async fn sql_enqueue(conn: &mut PgConnection, queue: &str, key: Option<&str>) -> JobId {
    let row = sqlx::query(
        "SELECT conveyor.enqueue(queue => $1, kind => 'noop', args => '{\"from\":\"sql\"}', \
         idempotency_key => $2) AS id",
    )
    .bind(queue)
    .bind(key)
    .fetch_one(conn)
    .await
    .expect("conveyor.enqueue accepts valid input");
    JobId(row.get::<Uuid, _>("id"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_enqueue_in_commits_with_the_transaction() {
    let Some((t, mut conn)) = setup().await else {
        return;
    };
    let mut tx = conn.begin().await.unwrap();
    let one = postgres::enqueue_in(&mut tx, NewJob::new("noop", json!({})).queue("tx"))
        .await
        .unwrap();
    let many = postgres::enqueue_many_in(
        &mut tx,
        (0..3)
            .map(|i| NewJob::new("noop", json!({ "i": i })).queue("tx"))
            .collect(),
    )
    .await
    .unwrap();
    assert!(!one.duplicate);
    assert_eq!(one.state, JobState::Available);
    assert!(
        !exists(&t.store, one.id).await,
        "another connection must not see an uncommitted job"
    );
    assert!(
        fetch_ids(&t.store, "tx").await.is_empty(),
        "an uncommitted job is not fetchable"
    );
    tx.commit().await.unwrap();

    assert!(exists(&t.store, one.id).await);
    for e in &many {
        assert!(exists(&t.store, e.id).await);
    }
    let mut fetched = fetch_ids(&t.store, "tx").await;
    fetched.sort();
    let mut expected: Vec<_> = std::iter::once(one.id)
        .chain(many.iter().map(|e| e.id))
        .collect();
    expected.sort();
    assert_eq!(fetched, expected, "every committed job is fetchable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_enqueue_in_vanishes_with_a_rollback() {
    let Some((t, mut conn)) = setup().await else {
        return;
    };
    let mut tx = conn.begin().await.unwrap();
    let one = postgres::enqueue_in(
        &mut tx,
        NewJob::new("noop", json!({}))
            .queue("tx")
            .idempotency_key("rolled-back"),
    )
    .await
    .unwrap();
    let many =
        postgres::enqueue_many_in(&mut tx, vec![NewJob::new("noop", json!({})).queue("tx"); 2])
            .await
            .unwrap();
    tx.rollback().await.unwrap();

    assert!(!exists(&t.store, one.id).await);
    for e in &many {
        assert!(!exists(&t.store, e.id).await);
    }
    assert!(fetch_ids(&t.store, "tx").await.is_empty());

    // The key was never taken: a later enqueue with it inserts a new job.
    let again = t
        .store
        .enqueue(
            NewJob::new("noop", json!({}))
                .queue("tx")
                .idempotency_key("rolled-back"),
        )
        .await
        .unwrap();
    assert!(!again.duplicate);
    assert_ne!(again.id, one.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_enqueue_in_dedupes_inside_one_transaction_and_against_committed_jobs() {
    let Some((t, mut conn)) = setup().await else {
        return;
    };
    let committed = t
        .store
        .enqueue(NewJob::new("noop", json!({})).idempotency_key("held"))
        .await
        .unwrap();

    let mut tx = conn.begin().await.unwrap();
    let first = postgres::enqueue_in(&mut tx, NewJob::new("noop", json!({})).idempotency_key("k"))
        .await
        .unwrap();
    let second = postgres::enqueue_in(&mut tx, NewJob::new("noop", json!({})).idempotency_key("k"))
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate, "the same key twice in one transaction");
    assert_eq!(second.id, first.id);

    let batch = postgres::enqueue_many_in(
        &mut tx,
        vec![
            NewJob::new("noop", json!({})).idempotency_key("held"),
            NewJob::new("noop", json!({})).idempotency_key("fresh"),
            NewJob::new("noop", json!({})).idempotency_key("k"),
        ],
    )
    .await
    .unwrap();
    assert!(batch[0].duplicate);
    assert_eq!(batch[0].id, committed.id);
    assert!(!batch[1].duplicate, "one duplicate does not fail the batch");
    assert!(batch[2].duplicate);
    assert_eq!(batch[2].id, first.id);
    tx.commit().await.unwrap();

    assert!(exists(&t.store, first.id).await);
    assert!(exists(&t.store, batch[1].id).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_function_commit_runs_the_job_and_rollback_leaves_nothing() {
    let Some((t, mut conn)) = setup().await else {
        return;
    };
    let mut registry = Registry::new();
    conveyor_jobs::register_builtin(&mut registry);
    let worker = Worker::new(
        t.store.clone(),
        registry,
        WorkerConfig {
            queues: vec![QueueConfig {
                name: "sql".into(),
                concurrency: 2,
            }],
            poll_interval: Duration::from_millis(200),
            ..WorkerConfig::default()
        },
    )
    .expect("valid worker config");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker.run(shutdown.clone()));

    // Rolled back: never visible, never run.
    let mut tx = conn.begin().await.unwrap();
    let gone = sql_enqueue(&mut tx, "sql", Some("sql-rb")).await;
    tx.rollback().await.unwrap();

    // Committed: the worker picks it up and completes it.
    let mut tx = conn.begin().await.unwrap();
    let id = sql_enqueue(&mut tx, "sql", Some("sql-ok")).await;
    let same = sql_enqueue(&mut tx, "sql", Some("sql-ok")).await;
    assert_eq!(
        same, id,
        "the same key twice in one transaction yields one job"
    );
    assert!(!exists(&t.store, id).await, "invisible before commit");
    tx.commit().await.unwrap();

    let store = t.store.clone();
    let done = eventually(20, "the SQL-enqueued job to complete", || {
        let store = store.clone();
        async move {
            let j = store.get(id).await.unwrap()?;
            (j.state == JobState::Completed).then_some(j)
        }
    })
    .await;
    assert_eq!(done.kind, "noop");
    assert_eq!(done.queue, "sql");
    assert_eq!(done.args, json!({"from": "sql"}));
    assert_eq!(done.attempts.len(), 1);

    // A later call with the committed key still answers with the same job.
    assert_eq!(sql_enqueue(&mut conn, "sql", Some("sql-ok")).await, id);
    assert!(!exists(&t.store, gone).await);

    shutdown.cancel();
    running
        .await
        .expect("worker task did not panic")
        .expect("worker shut down cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_function_rejects_bad_input_with_a_clear_message() {
    let Some((t, mut conn)) = setup().await else {
        return;
    };
    let cases = [
        (
            "SELECT conveyor.enqueue('bad queue!', 'noop')",
            "invalid queue name",
        ),
        ("SELECT conveyor.enqueue('q', '')", "invalid kind name"),
        (
            "SELECT conveyor.enqueue('q', 'noop', max_attempts => 0)",
            "invalid max_attempts",
        ),
        (
            "SELECT conveyor.enqueue('q', 'noop', metadata => '[1]')",
            "invalid metadata",
        ),
        (
            "SELECT conveyor.enqueue('q', 'noop', idempotency_key => '')",
            "invalid idempotency_key",
        ),
    ];
    for (sql, expected) in cases {
        let err = sqlx::query(sql)
            .execute(&mut conn)
            .await
            .expect_err(sql)
            .to_string();
        assert!(err.contains(expected), "{sql}: got {err}");
    }
    let listed = t
        .store
        .list(&Default::default(), Default::default())
        .await
        .unwrap();
    assert!(listed.is_empty(), "nothing was inserted: {listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_released_with_their_job_and_orphans_are_reclaimed() {
    let Some((t, mut conn)) = setup().await else {
        return;
    };
    let first = t
        .store
        .enqueue(NewJob::new("noop", json!({})).idempotency_key("gone"))
        .await
        .unwrap();
    assert_eq!(key_rows(&mut conn).await, 1);

    // Deleting the job (discard, purge, prune all delete) frees its key.
    t.store.discard(first.id).await.unwrap();
    assert_eq!(key_rows(&mut conn).await, 0);
    let second = t
        .store
        .enqueue(NewJob::new("noop", json!({})).idempotency_key("gone"))
        .await
        .unwrap();
    assert!(!second.duplicate);

    // TRUNCATE skips delete triggers and leaves the key without a holder: both enqueue
    // paths reclaim it instead of answering with a job that does not exist.
    sqlx::query("TRUNCATE conveyor.jobs")
        .execute(&mut conn)
        .await
        .unwrap();
    let third = t
        .store
        .enqueue(NewJob::new("noop", json!({})).idempotency_key("gone"))
        .await
        .unwrap();
    assert!(!third.duplicate);
    assert!(exists(&t.store, third.id).await);
    sqlx::query("TRUNCATE conveyor.jobs")
        .execute(&mut conn)
        .await
        .unwrap();
    let from_sql = sql_enqueue(&mut conn, "default", Some("gone")).await;
    assert!(exists(&t.store, from_sql).await);
    assert_eq!(key_rows(&mut conn).await, 1);
}

async fn key_rows(conn: &mut PgConnection) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM conveyor.job_keys")
        .fetch_one(conn)
        .await
        .unwrap()
}
