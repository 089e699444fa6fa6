//! `conveyor bench --workload admin`: how long the reads an admin's pages make take on a big
//! store. Fills the store with `--preload-finished` finished jobs (default 1,000,000) in bulk
//! SQL — completed, dead with varied errors, cancelled; spread over queues, kinds and a day —
//! plus a few thousand waiting ones, then times each read several times and prints the median.
//! SQLite and Postgres (Redis keeps its counts in its own structures).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::Utc;
use conveyor_worker::store::{self, JobFilter, Page, StoreOptions};
use conveyor_worker::{AttemptOutcome, AttemptRecord, JobState, NewJob};
use serde::Serialize;
use sqlx::{ConnectOptions, Connection};

use super::{BenchArgs, BenchBackend};

/// Times each read this many times; the median is reported.
const RUNS: usize = 7;
/// Queues and kinds the preloaded jobs are spread over.
const QUEUES: u64 = 8;
const KINDS: u64 = 16;

#[derive(Serialize)]
struct Timing {
    read: &'static str,
    median_ms: f64,
    max_ms: f64,
    answer: String,
}

/// Runs the workload.
pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let n = if args.preload_finished == 0 {
        1_000_000
    } else {
        args.preload_finished
    };
    let store = store::connect(&args.url, StoreOptions::default())
        .await
        .with_context(|| format!("opening {}", store::redact_url(&args.url)))?;
    if store.count(&JobFilter::default()).await? > 0 {
        bail!(
            "--workload admin fills the store itself; give it an empty one (a new SQLite file \
             or a new Postgres database)"
        );
    }
    let started = Instant::now();
    match args.backend {
        BenchBackend::Postgres => preload_postgres(&args.url, n).await?,
        BenchBackend::Sqlite => preload_sqlite(&args.url, n).await?,
        BenchBackend::Redis => bail!("--workload admin runs on sqlite and postgres"),
    }
    // A few thousand waiting jobs beside them, enqueued as an application would.
    for chunk in 0..4 {
        let jobs: Vec<NewJob> = (0..1000)
            .map(|i| {
                NewJob::new(format!("kind{}", i % KINDS), serde_json::json!({"i": i}))
                    .queue(format!("q{}", (chunk * 1000 + i) % QUEUES))
            })
            .collect();
        store.enqueue_many(jobs).await?;
    }
    if !args.json {
        eprintln!(
            "preloaded {n} finished and 4,000 waiting jobs in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }

    let hour_ago = Utc::now() - chrono::Duration::hours(1);
    let page = Page {
        before: None,
        limit: 50,
    };
    let mut timings = Vec::new();
    macro_rules! time {
        ($name:expr, $body:expr) => {{
            let mut took = Vec::with_capacity(RUNS);
            let mut answer = String::new();
            for _ in 0..RUNS {
                let t = Instant::now();
                let out = $body;
                took.push(t.elapsed());
                answer = out;
            }
            took.sort();
            timings.push(Timing {
                read: $name,
                median_ms: ms(took[RUNS / 2]),
                max_ms: ms(took[RUNS - 1]),
                answer,
            });
        }};
    }
    time!("queue overview (counts per queue and state)", {
        format!("{} queues", store.queue_stats().await?.len())
    });
    time!("count of dead jobs", {
        store
            .count(&JobFilter::state(JobState::Dead))
            .await?
            .to_string()
    });
    time!("count of completed jobs in one queue", {
        store
            .count(&JobFilter {
                states: vec![JobState::Completed],
                queue: Some("q3".into()),
                ..JobFilter::default()
            })
            .await?
            .to_string()
    });
    time!("newest jobs, first page", {
        format!(
            "{} jobs",
            store.list(&JobFilter::default(), page).await?.len()
        )
    });
    time!("dead letters, first page", {
        format!(
            "{} jobs",
            store
                .list(&JobFilter::state(JobState::Dead), page)
                .await?
                .len()
        )
    });
    time!("dead letters by error text", {
        format!(
            "{} jobs",
            store
                .list(
                    &JobFilter {
                        states: vec![JobState::Dead],
                        error_contains: Some("certificate has expired".into()),
                        ..JobFilter::default()
                    },
                    page
                )
                .await?
                .len()
        )
    });
    time!("any job by error text", {
        format!(
            "{} jobs",
            store
                .list(
                    &JobFilter {
                        error_contains: Some("certificate has expired".into()),
                        ..JobFilter::default()
                    },
                    page
                )
                .await?
                .len()
        )
    });
    time!("kind, created in the last hour", {
        format!(
            "{} jobs",
            store
                .list(
                    &JobFilter {
                        kind: Some("kind7".into()),
                        created_after: Some(hour_ago),
                        ..JobFilter::default()
                    },
                    page
                )
                .await?
                .len()
        )
    });
    time!("rare kind, created in the last hour", {
        format!(
            "{} jobs",
            store
                .list(
                    &JobFilter {
                        kind: Some("rare".into()),
                        created_after: Some(hour_ago),
                        ..JobFilter::default()
                    },
                    page
                )
                .await?
                .len()
        )
    });

    if args.json {
        println!(
            "{}",
            serde_json::json!({"backend": store.backend_name().await?, "finished_jobs": n, "reads": timings})
        );
    } else {
        println!(
            "{:<46} {:>10} {:>10}  answer",
            "read", "median ms", "max ms"
        );
        for t in &timings {
            println!(
                "{:<46} {:>10.2} {:>10.2}  {}",
                t.read, t.median_ms, t.max_ms, t.answer
            );
        }
    }
    Ok(())
}

/// A dead job's history: one failed attempt with `error`, as the store writes it.
fn attempts(error: &str) -> anyhow::Result<String> {
    let now = Utc::now();
    Ok(serde_json::to_string(&[AttemptRecord {
        attempt: 1,
        started_at: now,
        finished_at: now,
        worker: Some("bench-preload".into()),
        outcome: AttemptOutcome::Failed,
        error: Some(error.into()),
        causes: Vec::new(),
        duration_ms: 3,
        traceback: None,
    }])?)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One job in 50 is dead, one in 200 cancelled, the rest completed; one job in 50,000
/// died of an expired certificate (the needle the error searches look for); one job in
/// 10,000 is of kind `rare`. Created one every `86_400_000 / n` ms over the last day.
async fn preload_postgres(url: &str, n: u64) -> anyhow::Result<()> {
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    let mut conn = sqlx::PgConnection::connect_with(&options.disable_statement_logging()).await?;
    sqlx::query(
        "INSERT INTO conveyor.jobs (id, queue, kind, args, state, attempt, max_attempts, run_at, \
         created_at, attempted_at, finalized_at, attempts) \
         SELECT conveyor.uuid_v7(), 'q' || (i % $2), \
                CASE WHEN i % 10000 = 7 THEN 'rare' ELSE 'kind' || (i % $3) END, '{}', \
                CASE WHEN i % 50 = 0 THEN 'dead' WHEN i % 200 = 1 THEN 'cancelled' \
                     ELSE 'completed' END, \
                1, 1, t, t, t, t + interval '3 ms', \
                CASE WHEN i % 50000 = 0 THEN $5::jsonb WHEN i % 50 = 0 THEN $4::jsonb \
                     ELSE '[]'::jsonb END \
         FROM (SELECT i, now() - (($1 - i) * (86400000.0 / $1)) * interval '1 ms' AS t \
               FROM generate_series(1, $1) i) s",
    )
    .bind(i64::try_from(n)?)
    .bind(QUEUES as i64)
    .bind(KINDS as i64)
    .bind(attempts("upstream answered 503 Service Unavailable")?)
    .bind(attempts("TLS handshake: certificate has expired")?)
    .execute(&mut conn)
    .await
    .context("preloading finished jobs")?;
    sqlx::raw_sql("VACUUM ANALYZE conveyor.jobs")
        .execute(&mut conn)
        .await?;
    Ok(())
}

async fn preload_sqlite(url: &str, n: u64) -> anyhow::Result<()> {
    let options: sqlx::sqlite::SqliteConnectOptions = url.parse()?;
    let mut conn =
        sqlx::SqliteConnection::connect_with(&options.disable_statement_logging()).await?;
    let now_us = Utc::now().timestamp_micros();
    // Ids as the store makes them: 48 bits of milliseconds, then random bits (UUIDv7 layout).
    sqlx::query(
        "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?1), \
         t(i, at) AS (SELECT i, ?4 - (?1 - i) * (86400000000 / ?1) FROM s) \
         INSERT INTO jobs (id, queue, kind, args, state, attempt, max_attempts, run_at, \
                           created_at, attempted_at, finalized_at, attempts) \
         SELECT unhex(printf('%012x', at / 1000)) || randomblob(10), 'q' || (i % ?2), \
                CASE WHEN i % 10000 = 7 THEN 'rare' ELSE 'kind' || (i % ?3) END, '{}', \
                CASE WHEN i % 50 = 0 THEN 'dead' WHEN i % 200 = 1 THEN 'cancelled' \
                     ELSE 'completed' END, \
                1, 1, at, at, at, at + 3000, \
                CASE WHEN i % 50000 = 0 THEN ?6 WHEN i % 50 = 0 THEN ?5 ELSE '[]' END \
         FROM t",
    )
    .bind(i64::try_from(n)?)
    .bind(QUEUES as i64)
    .bind(KINDS as i64)
    .bind(now_us)
    .bind(attempts("upstream answered 503 Service Unavailable")?)
    .bind(attempts("TLS handshake: certificate has expired")?)
    .execute(&mut conn)
    .await
    .context("preloading finished jobs")?;
    sqlx::raw_sql("ANALYZE").execute(&mut conn).await?;
    Ok(())
}
