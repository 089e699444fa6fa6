//! `conveyor bench --workload rollups`: an application rollup (`analytics.rollup`'s window
//! writes, docs/analytics.md) beside the same aggregation as one direct SQL statement, in the
//! same run, on the same events.
//!
//! `--jobs` events spread over one day are generated in a schema of the run's own
//! (`bench_rollup_<id>`, dropped at the end) with one `INSERT … SELECT generate_series`, then
//! indexed on their time and analyzed. Each of three rounds then
//! 1. rolls the day up through [`Rollups::run_window`], one hour window after another (what
//!    a backfill's jobs do, without the queue: each window its own transaction that claims
//!    the window, deletes its rows, inserts the query's result, checks it and advances the
//!    watermark), and
//! 2. runs the same aggregation as one `INSERT … SELECT … GROUP BY` over the whole day.
//!
//! Each prints events/s (events / wall time); the result line holds the medians.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{TimeDelta, Utc};
use conveyor_analytics::application::{AnalyticsConfig, RollupConfig, Rollups};
use serde::Serialize;
use sqlx::postgres::PgPool;

use super::{BenchArgs, BenchBackend, round};

/// The result line.
#[derive(Debug, Serialize)]
struct RollupBenchResult {
    system: &'static str,
    workload: &'static str,
    events: u64,
    windows: u32,
    rollup_events_s: f64,
    direct_events_s: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the workload on the Postgres database at `args.url`.
pub async fn run(
    args: &BenchArgs,
    store: std::sync::Arc<dyn conveyor_worker::Store>,
) -> anyhow::Result<()> {
    if args.backend != BenchBackend::Postgres {
        bail!("--workload rollups reads the application's Postgres: use --backend postgres");
    }
    let say = |msg: String| {
        if !args.json {
            errln!("{msg}");
        }
    };
    let pool = PgPool::connect(&args.url)
        .await
        .context("connecting to the database")?;
    let schema = format!(
        "bench_rollup_{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    );
    let result = measure(args, store, &pool, &schema, &say).await;
    let dropped = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE;
         DELETE FROM conveyor_rollup_windows WHERE name = '{schema}';
         DELETE FROM conveyor_rollup_watermarks WHERE name = '{schema}'"
    )))
    .execute(&pool)
    .await;
    let result = result?;
    dropped.context("dropping the benchmark's schema")?;
    if args.json {
        outln!("{}", serde_json::to_string(&result)?);
    }
    Ok(())
}

async fn measure(
    args: &BenchArgs,
    store: std::sync::Arc<dyn conveyor_worker::Store>,
    pool: &PgPool,
    schema: &str,
    say: &dyn Fn(String),
) -> anyhow::Result<RollupBenchResult> {
    let day = Utc::now()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .context("midnight")?;
    let day = day.and_utc() - TimeDelta::days(2);
    let t = Instant::now();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA {schema};
         CREATE TABLE {schema}.events (id bigserial PRIMARY KEY, at timestamptz NOT NULL,
             page int NOT NULL, amount int NOT NULL);
         CREATE TABLE {schema}.views (window_start timestamptz NOT NULL, page int NOT NULL,
             views bigint NOT NULL, amount bigint NOT NULL, PRIMARY KEY (window_start, page));
         CREATE TABLE {schema}.direct (LIKE {schema}.views INCLUDING ALL)"
    )))
    .execute(pool)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {schema}.events (at, page, amount)
         SELECT $1 + (i * 86400.0 / $2) * interval '1 second', i % 50, i % 97
         FROM generate_series(0, $2 - 1) AS i"
    )))
    .bind(day)
    .bind(args.jobs as i64)
    .execute(pool)
    .await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE INDEX ON {schema}.events (at); ANALYZE {schema}.events"
    )))
    .execute(pool)
    .await?;
    say(format!(
        "conveyor bench --workload rollups: {} events over one day generated in {:.1} s",
        args.jobs,
        t.elapsed().as_secs_f64()
    ));

    let mut config = AnalyticsConfig::default();
    config.rollups.insert(
        schema.to_string(),
        RollupConfig {
            database: args.url.clone(),
            query: format!(
                "SELECT :window_start AS window_start, page, count(*) AS views, sum(amount) AS amount
                 FROM {schema}.events WHERE at >= :window_start AND at < :window_end GROUP BY page"
            ),
            target: format!("{schema}.views"),
            window_column: "window_start".into(),
            window: Duration::from_secs(3600),
            lateness: Duration::ZERO,
            schedule: "* * * * *".into(),
        },
    );
    let urls = BTreeMap::from([(schema.to_string(), args.url.clone())]);
    let rollups = Rollups::new(config, urls, store);
    let events = args.jobs as f64;
    let (mut rolled, mut direct) = (Vec::new(), Vec::new());
    for round_no in 1..=3 {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "TRUNCATE {schema}.views, {schema}.direct"
        )))
        .execute(pool)
        .await?;
        let t = Instant::now();
        let mut rows = 0;
        for h in 0..24 {
            rows += rollups
                .run_window(schema, day + TimeDelta::hours(h))
                .await?
                .rows;
        }
        let secs = t.elapsed().as_secs_f64();
        rolled.push(events / secs);
        let t = Instant::now();
        let inserted = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {schema}.direct
             SELECT date_bin('1 hour', at, timestamptz '1970-01-01 00:00:00+00'), page, count(*), sum(amount)
             FROM {schema}.events GROUP BY 1, 2"
        )))
        .execute(pool)
        .await?
        .rows_affected();
        let dsecs = t.elapsed().as_secs_f64();
        direct.push(events / dsecs);
        if inserted != rows {
            bail!("the rollup wrote {rows} rows, the direct statement {inserted}");
        }
        say(format!(
            "round {round_no}: rollup (24 windows of 1 h, one transaction each) {secs:.3} s = {:.0} events/s; \
             direct INSERT … SELECT … GROUP BY {dsecs:.3} s = {:.0} events/s",
            events / secs,
            events / dsecs
        ));
    }
    let result = RollupBenchResult {
        system: "conveyor",
        workload: "rollups",
        events: args.jobs,
        windows: 24,
        rollup_events_s: round(median(rolled), 0),
        direct_events_s: round(median(direct), 0),
    };
    say(format!(
        "medians of 3: rollup {:.0} events/s, direct {:.0} events/s",
        result.rollup_events_s, result.direct_events_s
    ));
    Ok(result)
}
