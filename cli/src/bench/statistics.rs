//! `conveyor bench --analyze / --preload-finished`: the Postgres job table as a production
//! server leaves it. Autovacuum ANALYZEs a table on its own whenever enough rows changed
//! (statistics taken at an arbitrary instant: before a batch runs, mid-run), and a store that
//! has run for a while holds many finished jobs. Plans that trust statistics go wrong at
//! exactly those points, so the benchmark can put the store there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use conveyor_worker::store::{self, JobFilter};
use conveyor_worker::{AttemptOutcome, AttemptRecord, JobState, Store};
use sqlx::{Connection, PgConnection};

async fn connect(url: &str) -> anyhow::Result<PgConnection> {
    PgConnection::connect(url)
        .await
        .with_context(|| format!("opening a second connection to {}", store::redact_url(url)))
}

/// `ANALYZE` on the job tables; returns how long it took.
pub async fn analyze(url: &str) -> anyhow::Result<Duration> {
    let mut conn = connect(url).await?;
    let started = Instant::now();
    sqlx::raw_sql("ANALYZE conveyor.jobs, conveyor.job_keys")
        .execute(&mut conn)
        .await
        .context(
            "ANALYZE conveyor.jobs failed (the role needs to own the table, or be a superuser)",
        )?;
    let took = started.elapsed();
    let _ = conn.close().await;
    Ok(took)
}

/// Waits until half of the `total` jobs of `queue` have been claimed, then runs ANALYZE;
/// returns how long it took, or `None` when no job waits any more before that (a run too
/// short to catch halfway).
pub async fn analyze_halfway(
    store: Arc<dyn Store>,
    url: String,
    queue: String,
    total: u64,
) -> anyhow::Result<Option<Duration>> {
    // Counting waiting jobs reads the fetch index only; counting finished ones would read
    // the table, and slow the run it measures.
    let waiting = JobFilter {
        queue: Some(queue),
        states: vec![JobState::Available],
        ..JobFilter::default()
    };
    loop {
        let left = store.count(&waiting).await?;
        if left == 0 {
            return Ok(None);
        }
        if left <= total / 2 {
            return analyze(&url).await.map(Some);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Inserts `n` completed jobs into `queue` with one `INSERT … SELECT generate_series`, then
/// runs `VACUUM ANALYZE` on the table; returns how long both took.
pub async fn preload_finished(url: &str, n: u64, queue: &str) -> anyhow::Result<Duration> {
    let mut conn = connect(url).await?;
    let started = Instant::now();
    let now = Utc::now();
    // The history a completed job has, so the rows are as wide as real ones.
    let attempts = serde_json::to_string(&[AttemptRecord {
        attempt: 1,
        started_at: now,
        finished_at: now,
        worker: Some("bench-preload".into()),
        outcome: AttemptOutcome::Completed,
        error: None,
        causes: Vec::new(),
        duration_ms: 0,
    }])?;
    sqlx::query(
        "INSERT INTO conveyor.jobs (id, queue, kind, args, state, attempt, max_attempts, run_at, \
         created_at, attempted_at, finalized_at, attempts) \
         SELECT conveyor.uuid_v7(), $2, 'bench.noop', '{}', 'completed', 1, 20, $3, $3, $3, $3, \
         $4::jsonb FROM generate_series(1, $1)",
    )
    .bind(i64::try_from(n).context("--preload-finished is too large")?)
    .bind(queue)
    .bind(now)
    .bind(attempts)
    .execute(&mut conn)
    .await
    .context("inserting the preloaded finished jobs failed")?;
    sqlx::raw_sql("VACUUM ANALYZE conveyor.jobs")
        .execute(&mut conn)
        .await
        .context("VACUUM ANALYZE conveyor.jobs failed (the role needs to own the table)")?;
    let took = started.elapsed();
    let _ = conn.close().await;
    Ok(took)
}
