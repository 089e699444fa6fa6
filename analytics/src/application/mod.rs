//! The application's rollups: a declared query over the application's Postgres, run once per
//! window, its result replacing the window's rows of a summary table.
//!
//! Where to start reading:
//! - [`config`]: `[analytics.rollups.<name>]` — database, query, target, window, lateness,
//!   schedule — checked when the config loads.
//! - [`Rollups::run_window`]: one window, exactly once. In one transaction of the
//!   application's database it claims the window's row in `conveyor_rollup_windows` (a
//!   second run of the same window waits there for the first to commit), deletes the target's
//!   rows of the window, inserts the query's result, checks that every row inserted falls in
//!   the window, and advances the rollup's watermark in `conveyor_rollup_watermarks` (it
//!   never moves back). A run that fails or is killed commits nothing; one that runs again
//!   replaces the window whole: a retried, rescued or duplicated job writes the same rows.
//! - [`Rollups::run_scheduled`]: what the schedule `analytics.<name>` runs: every window
//!   that ended since the watermark, and again those that ended within `lateness` of it.
//! - [`Rollups::backfill`]: one idempotent `analytics.rollup` job per window of a period
//!   not yet done; run again after a crash, it enqueues only what is missing.
//! - [`Rollups::status`]: watermark, lag, last error, windows done and pending.
//! - [`sql`]: the query's named parameters made positional, quoted names.

pub mod config;
pub mod sql;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use conveyor_worker::store::JobFilter;
use conveyor_worker::{
    JobContext, JobError, JobState, KindOptions, NewJob, Outcome, Registry, Store,
};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Column, Executor, Row, SqlSafeStr, Statement};

pub use config::{AnalyticsConfig, RollupConfig};

/// The job kind: args [`RollupArgs`].
pub const KIND: &str = "analytics.rollup";

/// Which windows are done, one row per rollup and window (in the application's database).
pub const WINDOWS_TABLE: &str = "conveyor_rollup_windows";
/// Each rollup's watermark and last error (in the application's database).
pub const WATERMARKS_TABLE: &str = "conveyor_rollup_watermarks";

const CREATE_TABLES: &str = "
CREATE TABLE IF NOT EXISTS conveyor_rollup_windows (
    name text NOT NULL,
    window_start timestamptz NOT NULL,
    window_end timestamptz NOT NULL,
    rows bigint NOT NULL DEFAULT 0,
    runs integer NOT NULL DEFAULT 1,
    finished_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, window_start)
);
CREATE TABLE IF NOT EXISTS conveyor_rollup_watermarks (
    name text PRIMARY KEY,
    watermark timestamptz,
    last_run_at timestamptz,
    last_error text,
    last_error_at timestamptz,
    last_error_window timestamptz
)";

/// What went wrong in a rollup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No rollup of that name is configured.
    #[error("no rollup named `{0}`: declare it as [analytics.rollups.{0}] (configured: {1})")]
    Unknown(String, String),
    /// The request itself is wrong (a bad period, a window not on the rollup's grid).
    #[error("{0}")]
    Invalid(String),
    /// The rollup's query or target does not fit (fix the config).
    #[error("rollup `{name}`: {message}")]
    Query {
        /// The rollup.
        name: String,
        /// What does not fit and how to fix it.
        message: String,
    },
    /// The application's database failed.
    #[error("rollup `{name}`: {what}: {source}")]
    Database {
        /// The rollup.
        name: String,
        /// What it was doing.
        what: &'static str,
        /// The database's error.
        #[source]
        source: sqlx::Error,
    },
    /// Conveyor's own store failed.
    #[error(transparent)]
    Store(#[from] conveyor_worker::Error),
}

impl Error {
    /// Bad input or config (exit status 2, HTTP 422) rather than a failure.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, Error::Unknown(..) | Error::Invalid(_))
    }
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// An `analytics.rollup` job's args: one window, or (without `window_start`) a scheduled run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollupArgs {
    /// The rollup.
    pub name: String,
    /// The window to run; absent: every window due (the schedule's run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_start: Option<DateTime<Utc>>,
}

/// One window written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowReport {
    /// Start of the window.
    pub window_start: DateTime<Utc>,
    /// End of the window (exclusive).
    pub window_end: DateTime<Utc>,
    /// Rows the query gave, now the window's rows in the target.
    pub rows: u64,
    /// Rows of an earlier run of the window that these replaced.
    pub replaced: u64,
    /// How many times the window has been written, this run included.
    pub runs: u32,
}

/// A scheduled run: the job's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunReport {
    /// The rollup.
    pub name: String,
    /// Windows written.
    pub windows: u32,
    /// Rows written, all windows.
    pub rows: u64,
    /// First window's start.
    pub from: DateTime<Utc>,
    /// Last window's end.
    pub to: DateTime<Utc>,
    /// Whether windows are still due (the run stopped at `max_windows_per_run`).
    pub behind: bool,
}

/// What a backfill enqueued.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackfillReport {
    /// The rollup.
    pub name: String,
    /// First window's start.
    pub from: DateTime<Utc>,
    /// Last window's end.
    pub to: DateTime<Utc>,
    /// Windows in the period.
    pub windows: u64,
    /// Windows already written, left alone.
    pub done: u64,
    /// Jobs enqueued now.
    pub enqueued: u64,
    /// Windows whose job was already enqueued (an earlier backfill's, still held by its key).
    pub already_enqueued: u64,
}

/// `conveyor analytics status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RollupStatus {
    /// The rollup.
    pub name: String,
    /// The target table.
    pub target: String,
    /// Window size, e.g. `1h`.
    pub window: String,
    /// Allowed lateness.
    pub lateness: String,
    /// End of the latest window written (never moves back).
    pub watermark: Option<DateTime<Utc>>,
    /// How far the watermark is behind the end of the last complete window, in seconds.
    pub lag_seconds: Option<i64>,
    /// When a window was last written.
    pub last_run_at: Option<DateTime<Utc>>,
    /// The last failed run's error, if it failed after the last window written.
    pub last_error: Option<String>,
    /// When it failed.
    pub last_error_at: Option<DateTime<Utc>>,
    /// The window it failed on.
    pub last_error_window: Option<DateTime<Utc>>,
    /// Windows written.
    pub windows_done: u64,
    /// The first and last window written.
    pub first_window: Option<DateTime<Utc>>,
    /// The last window written.
    pub last_window: Option<DateTime<Utc>>,
    /// Windows without rows between the first and the last written (a backfill not
    /// finished, or windows lost to a dead job).
    pub windows_missing: u64,
    /// This rollup's jobs waiting or running.
    pub jobs_pending: u64,
    /// This rollup's jobs dead (see `conveyor dead list --tag analytics:NAME`).
    pub jobs_dead: u64,
}

/// The rollup service: one per process, shared by the kind, the CLI and the schedules.
pub struct Rollups {
    config: AnalyticsConfig,
    urls: BTreeMap<String, String>,
    store: Arc<dyn Store>,
    pools: Mutex<HashMap<String, PgPool>>,
    /// Databases whose bookkeeping tables exist.
    prepared: tokio::sync::Mutex<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for Rollups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollups")
            .field("rollups", &self.config.rollups.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn secs(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX)
}

/// The tag every job of rollup `name` carries.
pub fn tag(name: &str) -> String {
    format!("analytics:{name}")
}

/// The idempotency key of rollup `name`'s job for the window starting at `start`.
pub fn idempotency_key(name: &str, start: DateTime<Utc>) -> String {
    format!("analytics.rollup:{name}:{}", start.timestamp())
}

impl Rollups {
    /// The configured rollups; `urls` is each one's database URL
    /// ([`AnalyticsConfig::database_urls`]). Connections open on first use.
    pub fn new(
        config: AnalyticsConfig,
        urls: BTreeMap<String, String>,
        store: Arc<dyn Store>,
    ) -> Self {
        Self {
            config,
            urls,
            store,
            pools: Mutex::new(HashMap::new()),
            prepared: tokio::sync::Mutex::new(Default::default()),
        }
    }

    /// The settings.
    pub fn config(&self) -> &AnalyticsConfig {
        &self.config
    }

    fn rollup(&self, name: &str) -> Result<&RollupConfig> {
        self.config.rollups.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.config.rollups.keys().map(String::as_str).collect();
            Error::Unknown(
                name.to_string(),
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                },
            )
        })
    }

    /// The application database's pool for rollup `name`, its bookkeeping tables made.
    async fn pool(&self, name: &str) -> Result<PgPool> {
        let url = self
            .urls
            .get(name)
            .ok_or_else(|| Error::Invalid(format!("rollup `{name}` has no database URL")))?;
        let pool = {
            let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            match pools.get(url) {
                Some(p) => p.clone(),
                None => {
                    let p = PgPoolOptions::new()
                        .max_connections(4)
                        .acquire_timeout(Duration::from_secs(10))
                        .connect_lazy(url)
                        .map_err(|source| Error::Database {
                            name: name.into(),
                            what: "cannot use the database URL",
                            source,
                        })?;
                    pools.insert(url.clone(), p.clone());
                    p
                }
            }
        };
        let mut prepared = self.prepared.lock().await;
        if !prepared.contains(url) {
            let db = |source| Error::Database {
                name: name.into(),
                what: "cannot create the rollup bookkeeping tables",
                source,
            };
            let mut tx = pool.begin().await.map_err(db)?;
            // Two processes creating the tables at once would collide in the catalog.
            tx.execute("SELECT pg_advisory_xact_lock(hashtext('conveyor_rollup_tables'))")
                .await
                .map_err(db)?;
            tx.execute(CREATE_TABLES).await.map_err(db)?;
            tx.commit().await.map_err(db)?;
            prepared.insert(url.clone());
        }
        Ok(pool)
    }

    /// The start of rollup `name`'s window holding `t`.
    pub fn window_start(&self, name: &str, t: DateTime<Utc>) -> Result<DateTime<Utc>> {
        let w = self.rollup(name)?.window_secs();
        let s = t.timestamp().div_euclid(w) * w;
        DateTime::from_timestamp(s, 0).ok_or_else(|| Error::Invalid(format!("{t} is out of range")))
    }

    /// Writes one window of rollup `name` exactly once (see the module's documentation).
    pub async fn run_window(&self, name: &str, start: DateTime<Utc>) -> Result<WindowReport> {
        let rollup = self.rollup(name)?;
        if self.window_start(name, start)? != start {
            return Err(Error::Invalid(format!(
                "rollup `{name}`: {start} is not the start of a window (windows of {} start at multiples of it since 1970-01-01T00:00:00Z)",
                humantime::format_duration(rollup.window)
            )));
        }
        let end = start + TimeDelta::seconds(rollup.window_secs());
        let pool = self.pool(name).await?;
        match self.write_window(name, rollup, &pool, start, end).await {
            Ok(report) => Ok(report),
            Err(e) => {
                // Best effort: the job's attempt keeps the error anyway.
                let recorded = sqlx::query(
                    "INSERT INTO conveyor_rollup_watermarks (name, last_error, last_error_at, last_error_window)
                     VALUES ($1, $2, now(), $3)
                     ON CONFLICT (name) DO UPDATE SET last_error = EXCLUDED.last_error,
                         last_error_at = EXCLUDED.last_error_at, last_error_window = EXCLUDED.last_error_window",
                )
                .bind(name)
                .bind(e.to_string())
                .bind(start)
                .execute(&pool)
                .await;
                if let Err(why) = recorded {
                    tracing::warn!(rollup = name, error = %why, "cannot record the rollup's error");
                }
                Err(e)
            }
        }
    }

    async fn write_window(
        &self,
        name: &str,
        rollup: &RollupConfig,
        pool: &PgPool,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Result<WindowReport> {
        let db = |what: &'static str| {
            move |source| Error::Database {
                name: name.into(),
                what,
                source,
            }
        };
        let bad = |message: String| Error::Query {
            name: name.into(),
            message,
        };
        let query = sql::Query::parse(&rollup.query).map_err(&bad)?;
        let target = sql::table_name(&rollup.target).map_err(&bad)?;
        let window_column = sql::identifier(&rollup.window_column).map_err(&bad)?;

        let mut tx = pool.begin().await.map_err(db("cannot begin"))?;
        // Windows are UTC; a `timestamp` column compares in UTC too.
        tx.execute("SET LOCAL TIME ZONE 'UTC'")
            .await
            .map_err(db("cannot set the time zone"))?;
        // Claim the window: a second run of it (a duplicate job, two replicas) waits here
        // until this one commits, then replaces what it wrote.
        let runs: i32 = sqlx::query_scalar(
            "INSERT INTO conveyor_rollup_windows (name, window_start, window_end, rows, runs, finished_at)
             VALUES ($1, $2, $3, 0, 1, now())
             ON CONFLICT (name, window_start) DO UPDATE
                 SET runs = conveyor_rollup_windows.runs + 1, window_end = EXCLUDED.window_end
             RETURNING runs",
        )
        .bind(name)
        .bind(start)
        .bind(end)
        .fetch_one(&mut *tx)
        .await
        .map_err(db("cannot claim the window"))?;

        let described = (&mut *tx)
            .prepare(sqlx::AssertSqlSafe(query.sql.clone()).into_sql_str())
            .await
            .map_err(db("the query does not prepare"))?;
        let mut columns = Vec::new();
        for (i, c) in described.columns().iter().enumerate() {
            let col = c.name();
            if col == "?column?" {
                return Err(bad(format!(
                    "the query's column {} has no name: name it as the target's column with AS",
                    i + 1
                )));
            }
            columns.push(sql::identifier(col).map_err(|e| {
                bad(format!(
                    "the query's column {}: {e}; name it as the target's column with AS",
                    i + 1
                ))
            })?);
        }
        if !columns.contains(&window_column) {
            return Err(bad(format!(
                "the query's result has no column `{}` (window_column): each row must say which window it belongs to",
                rollup.window_column
            )));
        }
        let replaced = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {target} WHERE {window_column} >= $1 AND {window_column} < $2"
        )))
        .bind(start)
        .bind(end)
        .execute(&mut *tx)
        .await
        .map_err(db("cannot delete the window's earlier rows"))?
        .rows_affected();
        let insert = format!(
            "WITH inserted AS (INSERT INTO {target} ({cols}) {q} RETURNING {window_column} AS w)
             SELECT count(*)::bigint,
                    (count(*) FILTER (WHERE w IS NULL OR w < $1 OR w >= $2))::bigint
             FROM inserted",
            cols = columns.join(", "),
            q = query.sql,
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(insert))
            .bind(start)
            .bind(end)
            .fetch_one(&mut *tx)
            .await
            .map_err(db("cannot insert the query's result"))?;
        let rows: i64 = row.get(0);
        let outside: i64 = row.get(1);
        if outside > 0 {
            return Err(bad(format!(
                "{outside} of the window's {rows} rows have `{}` outside [{start}, {end}): a run of the window again would not replace them; \
                 make the query's `{}` fall inside :window_start and :window_end",
                rollup.window_column, rollup.window_column
            )));
        }
        sqlx::query("UPDATE conveyor_rollup_windows SET rows = $3, finished_at = now() WHERE name = $1 AND window_start = $2")
            .bind(name)
            .bind(start)
            .bind(rows)
            .execute(&mut *tx)
            .await
            .map_err(db("cannot record the window"))?;
        sqlx::query(
            "INSERT INTO conveyor_rollup_watermarks (name, watermark, last_run_at) VALUES ($1, $2, now())
             ON CONFLICT (name) DO UPDATE SET
                 watermark = GREATEST(conveyor_rollup_watermarks.watermark, EXCLUDED.watermark),
                 last_run_at = EXCLUDED.last_run_at",
        )
        .bind(name)
        .bind(end)
        .execute(&mut *tx)
        .await
        .map_err(db("cannot advance the watermark"))?;
        tx.commit().await.map_err(db("cannot commit the window"))?;
        Ok(WindowReport {
            window_start: start,
            window_end: end,
            rows: rows as u64,
            replaced,
            runs: runs as u32,
        })
    }

    /// The watermark of rollup `name`.
    async fn watermark(&self, name: &str, pool: &PgPool) -> Result<Option<DateTime<Utc>>> {
        sqlx::query_scalar::<_, Option<DateTime<Utc>>>(
            "SELECT watermark FROM conveyor_rollup_watermarks WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(pool)
        .await
        .map(Option::flatten)
        .map_err(|source| Error::Database {
            name: name.into(),
            what: "cannot read the watermark",
            source,
        })
    }

    /// The schedule's run at `now`: every complete window from `lateness` before the
    /// watermark (the first time: before the last complete window) on, at most
    /// `max_windows_per_run`.
    pub async fn run_scheduled(&self, name: &str, now: DateTime<Utc>) -> Result<RunReport> {
        let rollup = self.rollup(name)?;
        let width = TimeDelta::seconds(rollup.window_secs());
        let pool = self.pool(name).await?;
        let current = self.window_start(name, now)?; // windows before it are complete
        // The first run: the last complete window (and those within `lateness` before it).
        let mark = self
            .watermark(name, &pool)
            .await?
            .unwrap_or(current - width);
        let from = self.window_start(name, mark.min(current) - secs(rollup.lateness))?;
        let limit = from + width * self.config.max_windows_per_run as i32;
        let to = current.min(limit);
        let mut report = RunReport {
            name: name.into(),
            windows: 0,
            rows: 0,
            from,
            to,
            behind: to < current,
        };
        let mut at = from;
        while at < to {
            let w = self.run_window(name, at).await?;
            report.windows += 1;
            report.rows += w.rows;
            at += width;
        }
        Ok(report)
    }

    /// The windows of rollup `name` between `from` and `to` (`from` rounded down and `to` up
    /// to the window grid; windows not complete at `now` left to the schedule).
    pub fn windows(
        &self,
        name: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Vec<DateTime<Utc>>> {
        let rollup = self.rollup(name)?;
        if from >= to {
            return Err(Error::Invalid(format!(
                "--from ({from}) must be before --to ({to})"
            )));
        }
        let width = TimeDelta::seconds(rollup.window_secs());
        let first = self.window_start(name, from)?;
        let mut end = self.window_start(name, to - TimeDelta::nanoseconds(1))? + width;
        let complete = self.window_start(name, now)?;
        end = end.min(complete);
        let count = (end - first).num_seconds().max(0) / rollup.window_secs();
        if count > 1_000_000 {
            return Err(Error::Invalid(format!(
                "{count} windows of {} between {from} and {to}: at most 1000000 per backfill; split the period",
                humantime::format_duration(rollup.window)
            )));
        }
        Ok((0..count as i32).map(|i| first + width * i).collect())
    }

    /// Enqueues one `analytics.rollup` job per window of `[from, to)` not yet written, each
    /// under its window's idempotency key. `progress(windows handled so far, total)`.
    pub async fn backfill(
        &self,
        name: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<BackfillReport> {
        let now = self.store.now().await?;
        let windows = self.windows(name, from, to, now)?;
        let (Some(&first), Some(&last)) = (windows.first(), windows.last()) else {
            return Err(Error::Invalid(format!(
                "no complete window of rollup `{name}` between {from} and {to} (now is {now})"
            )));
        };
        let width = TimeDelta::seconds(self.rollup(name)?.window_secs());
        let pool = self.pool(name).await?;
        let done: std::collections::HashSet<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT window_start FROM conveyor_rollup_windows
             WHERE name = $1 AND window_start >= $2 AND window_start <= $3",
        )
        .bind(name)
        .bind(first)
        .bind(last)
        .fetch_all(&pool)
        .await
        .map_err(|source| Error::Database {
            name: name.into(),
            what: "cannot read which windows are done",
            source,
        })?
        .into_iter()
        .collect();
        let mut report = BackfillReport {
            name: name.into(),
            from: first,
            to: last + width,
            windows: windows.len() as u64,
            done: 0,
            enqueued: 0,
            already_enqueued: 0,
        };
        let total = windows.len() as u64;
        let mut handled = 0;
        for chunk in windows.chunks(500) {
            let mut jobs = Vec::new();
            for &start in chunk {
                if done.contains(&start) {
                    report.done += 1;
                    continue;
                }
                let args = serde_json::to_value(RollupArgs {
                    name: name.into(),
                    window_start: Some(start),
                })
                .map_err(conveyor_worker::Error::from)?;
                let mut job = NewJob::new(KIND, args)
                    .queue(self.config.queue.clone())
                    .tags([tag(name)]);
                job.idempotency_key = Some(idempotency_key(name, start));
                jobs.push(job);
            }
            if !jobs.is_empty() {
                for e in self.store.enqueue_many(jobs).await? {
                    if e.duplicate {
                        report.already_enqueued += 1;
                    } else {
                        report.enqueued += 1;
                    }
                }
            }
            handled += chunk.len() as u64;
            progress(handled, total);
        }
        Ok(report)
    }

    /// Rollup `name`'s progress.
    pub async fn status(&self, name: &str) -> Result<RollupStatus> {
        let rollup = self.rollup(name)?;
        let now = self.store.now().await?;
        let pool = self.pool(name).await?;
        let db = |source| Error::Database {
            name: name.into(),
            what: "cannot read the rollup's progress",
            source,
        };
        let mark = sqlx::query(
            "SELECT watermark, last_run_at, last_error, last_error_at, last_error_window
             FROM conveyor_rollup_watermarks WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&pool)
        .await
        .map_err(db)?;
        let windows = sqlx::query(
            "SELECT count(*)::bigint, min(window_start), max(window_start)
             FROM conveyor_rollup_windows WHERE name = $1",
        )
        .bind(name)
        .fetch_one(&pool)
        .await
        .map_err(db)?;
        let done: i64 = windows.get(0);
        let first: Option<DateTime<Utc>> = windows.get(1);
        let last: Option<DateTime<Utc>> = windows.get(2);
        let span = match (first, last) {
            (Some(f), Some(l)) => (l - f).num_seconds() / rollup.window_secs() + 1,
            _ => 0,
        };
        let get = |col: &str| -> Option<DateTime<Utc>> {
            mark.as_ref().and_then(|r| r.try_get(col).ok().flatten())
        };
        let watermark = get("watermark");
        let last_run_at = get("last_run_at");
        let last_error_at = get("last_error_at");
        // An error older than the last window written is history, not the current state.
        let failing = match (last_error_at, last_run_at) {
            (Some(e), Some(r)) => e > r,
            (Some(_), None) => true,
            _ => false,
        };
        let complete = self.window_start(name, now)?;
        let count = |states: Vec<JobState>| {
            let filter = JobFilter {
                states,
                kind: Some(KIND.into()),
                tag: Some(tag(name)),
                ..JobFilter::default()
            };
            async move { self.store.count(&filter).await }
        };
        Ok(RollupStatus {
            name: name.into(),
            target: rollup.target.clone(),
            window: humantime::format_duration(rollup.window).to_string(),
            lateness: humantime::format_duration(rollup.lateness).to_string(),
            watermark,
            lag_seconds: watermark.map(|w| (complete - w).num_seconds().max(0)),
            last_run_at,
            last_error: if failing {
                mark.as_ref()
                    .and_then(|r| r.try_get::<Option<String>, _>("last_error").ok().flatten())
            } else {
                None
            },
            last_error_at: last_error_at.filter(|_| failing),
            last_error_window: get("last_error_window").filter(|_| failing),
            windows_done: done as u64,
            first_window: first,
            last_window: last,
            windows_missing: (span - done).max(0) as u64,
            jobs_pending: count(vec![
                JobState::Scheduled,
                JobState::Available,
                JobState::Running,
                JobState::Retryable,
            ])
            .await?,
            jobs_dead: count(vec![JobState::Dead]).await?,
        })
    }
}

/// Registers `analytics.rollup`: with `window_start`, that window (its [`WindowReport`] is
/// the job's result); without, the schedule's run ([`RunReport`]). A rollup no longer
/// configured, or a window off its grid, fails the job for good; anything else is retried
/// like any job, and a retry writes the same rows.
pub fn register(registry: &mut Registry, rollups: Arc<Rollups>) {
    let options = KindOptions {
        timeout: Some(Duration::from_secs(3600)),
        ..KindOptions::default()
    };
    registry.register_with(KIND, options, move |args: RollupArgs, _ctx: JobContext| {
        let rollups = rollups.clone();
        async move {
            let result = match args.window_start {
                Some(start) => rollups.run_window(&args.name, start).await.and_then(|r| {
                    Ok(serde_json::to_value(r).map_err(conveyor_worker::Error::from)?)
                }),
                None => {
                    let now = rollups.store.now().await?;
                    rollups.run_scheduled(&args.name, now).await.and_then(|r| {
                        Ok(serde_json::to_value(r).map_err(conveyor_worker::Error::from)?)
                    })
                }
            };
            match result {
                Ok(value) => Ok(Outcome::DoneWith(value)),
                Err(e) if e.is_bad_input() => Ok(Outcome::Fail(JobError::new(e.to_string()))),
                Err(e) => Err(e.into()),
            }
        }
    });
}
