//! `conveyor bench --analyze / --preload-finished`: the Postgres job table as a production
//! server leaves it. Autovacuum ANALYZEs a table on its own whenever enough rows changed
//! (statistics taken at an arbitrary instant: before a batch runs, mid-run), and a store that
//! has run for a while holds many finished jobs. Plans that trust statistics go wrong at
//! exactly those points, so the benchmark can put the store there.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use conveyor_worker::store;
use conveyor_worker::{AttemptOutcome, AttemptRecord};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};

use super::Probe;

async fn connect(url: &str) -> anyhow::Result<PgConnection> {
    let options: PgConnectOptions = url
        .parse()
        .with_context(|| format!("reading the Postgres URL {}", store::redact_url(url)))?;
    // The bulk insert and VACUUM are slow on purpose; sqlx would log each as a slow statement.
    PgConnection::connect_with(&options.disable_statement_logging())
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

/// Waits until the handlers have run half of the `total` jobs, then runs ANALYZE; returns
/// how long it took, or `None` when the run ended first. Watches the handlers' own count
/// rather than the store, so that the wait adds no statement to the run it measures.
pub async fn analyze_halfway(
    url: String,
    probe: Arc<Probe>,
    total: u64,
) -> anyhow::Result<Option<Duration>> {
    loop {
        let ran = probe.ran.load(Ordering::Relaxed);
        if ran >= total {
            return Ok(None);
        }
        if ran >= total / 2 {
            return analyze(&url).await.map(Some);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
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
        traceback: None,
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
