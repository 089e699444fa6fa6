//! The SQLite backend: the embedded default (`conveyor serve` with no setup).
//!
//! One database file in WAL mode. SQLite allows one writer at a time, so every write goes
//! through a pool of exactly one connection (writes queue in-process instead of spinning on
//! `SQLITE_BUSY`), and reads use a small pool of their own that WAL lets run beside the writer.
//! Several processes on one file still work: each write transaction starts with
//! `BEGIN IMMEDIATE` and waits out the other process's writer within the busy timeout.
//!
//! Times are stored as microseconds since the Unix epoch. Wake-ups: a broadcast channel fed
//! at once by this store's own writes, and by a watcher that notices other processes'
//! commits (`PRAGMA data_version`, every 50 ms).

mod meta;

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::ConnectOptions;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

use super::{
    CancelResult, FetchRequest, Finish, JobChange, JobFilter, Page, QueueStats, RescueReport,
    RetentionPolicy, Store, StoreEvent, StoreOptions, check_migrations, check_page,
    sql_from_states, sql_state_in,
};
use crate::error::{Error, Result};
use crate::job::{Enqueued, Job, JobId, JobState, NewJob, OperatorAction, Progress};
use crate::retry_policy::RetryPolicy;

/// The jobs whose history holds an error: the `jobs_errors` index's WHERE term, written
/// exactly as the index has it (migration 0005), so that error-text filters read the index.
const HAS_ERROR: &str = "instr(attempts, '\"error\":') > 0";

/// Rows per multi-row INSERT: 11 parameters a row stays far below SQLite's 32,766 limit.
const INSERT_CHUNK: usize = 500;
/// Ids per heartbeat statement: far below SQLite's 32,766 parameters, and above any
/// worker's concurrency, so a beat is one statement.
const HEARTBEAT_CHUNK: usize = 10_000;

const COLUMNS: &str = "id, queue, kind, args, priority, state, attempt, max_attempts, run_at, \
    created_at, attempted_at, finalized_at, lease_owner, lease_expires_at, cancel_requested_at, \
    idempotency_key, tags, metadata, attempts, result, progress";

const WAITING: &str = "('scheduled','available','retryable')";

/// The SQLite store. Cheap to clone; clones share the pools and the wake-up channel.
#[derive(Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    events: broadcast::Sender<StoreEvent>,
    /// Stops the watcher task when the last clone is dropped.
    _watcher: Arc<DropGuard>,
}

/// How often the watcher looks for commits by other processes.
const WATCH_INTERVAL: Duration = Duration::from_millis(50);

/// Wakes this process's workers for jobs that other processes enqueue into the same file.
///
/// `PRAGMA data_version` on a connection of its own changes whenever any other connection
/// commits. When it does (and someone is listening), one index seek per queue finds the
/// queues with waiting jobs, and each gets a wake-up. Commits of this process change it too,
/// which costs at most one extra, usually empty, fetch per queue per interval.
async fn watch_other_writers(
    options: SqliteConnectOptions,
    events: broadcast::Sender<StoreEvent>,
    stop: CancellationToken,
) {
    let mut conn: Option<sqlx::SqliteConnection> = None;
    let mut last: Option<i64> = None;
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if conn.is_none() {
            conn = options.connect().await.ok();
        }
        let Some(c) = conn.as_mut() else { continue };
        let version: i64 = match sqlx::query_scalar("PRAGMA data_version")
            .fetch_one(&mut *c)
            .await
        {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "SQLite watcher: reconnecting");
                conn = None;
                continue;
            }
        };
        let changed = last.is_some_and(|l| l != version);
        last = Some(version);
        if !changed || events.receiver_count() == 0 {
            continue;
        }
        // Which jobs another process changed is unknown: those who wait on a job re-read it.
        let _ = events.send(StoreEvent::JobsChanged {
            changes: Arc::from(Vec::new()),
        });
        // A loose index scan over jobs_fetch: one seek per distinct queue, however long the
        // queues are. Fails harmlessly before the first migration.
        let queues: Vec<Option<String>> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "WITH RECURSIVE q(name) AS ( \
               SELECT (SELECT min(queue) FROM jobs WHERE state IN {WAITING}) \
               UNION ALL \
               SELECT (SELECT min(queue) FROM jobs WHERE state IN {WAITING} AND queue > q.name) \
               FROM q WHERE q.name IS NOT NULL) \
             SELECT name FROM q WHERE name IS NOT NULL"
        )))
        .fetch_all(&mut *c)
        .await
        .unwrap_or_default();
        for queue in queues.into_iter().flatten() {
            let _ = events.send(StoreEvent::JobsAvailable { queue });
        }
    }
}

/// SQLite creates a missing file but not a missing folder, and says only "unable to open
/// database file": name the folder and how to make it.
fn check_folder(file: &std::path::Path) -> Result<()> {
    match file.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(folder) if !folder.exists() => Err(Error::NoDatabase(format!(
            "the folder {} does not exist, so the SQLite file {} cannot be created there: \
             create the folder (`mkdir -p {}`) or point database.url at a file in an existing one",
            folder.display(),
            file.display(),
            folder.display()
        ))),
        _ => Ok(()),
    }
}

impl SqliteStore {
    /// Opens (creating if missing) the database a URL names: `sqlite://relative/file.db`,
    /// `sqlite:///absolute/file.db`, `sqlite:file.db`, or `sqlite::memory:`.
    ///
    /// `?max_page_count=N` (Conveyor's own parameter, not SQLite's URL syntax) caps the file
    /// at N pages on every connection: past it, writes fail as on a full disk. It is a quota
    /// for a shared volume, and how the tests fill a store without filling a disk.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Self> {
        let memory = url.contains(":memory:") || url.contains("mode=memory");
        let (url, max_pages) = take_max_page_count(url)?;
        let url = url.as_str();
        let mut connect = SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::BadUrl {
                url: url.to_string(),
                reason: e.to_string(),
            })?
            .create_if_missing(true)
            .journal_mode(if memory {
                SqliteJournalMode::Memory
            } else {
                SqliteJournalMode::Wal
            })
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            .pragma("temp_store", "memory")
            .pragma("cache_size", "-32000");
        if let Some(n) = max_pages {
            connect = connect.pragma("max_page_count", n.to_string());
        }
        if !memory {
            check_folder(connect.get_filename())?;
        }
        // An in-memory database exists per connection: one connection serves everything.
        // No ping before each acquire: each one is a round trip to SQLite's thread.
        let writer = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .after_release(|conn, _| Box::pin(still_usable(conn)))
            .connect_with(connect.clone())
            .await?;
        let watch_options = connect.clone().read_only(true).pragma("cache_size", "-500");
        let reader = if memory {
            writer.clone()
        } else {
            SqlitePoolOptions::new()
                .test_before_acquire(false)
                .max_connections(options.max_connections.clamp(1, 8))
                // Small caches for readers: every commit by the writer makes each reader
                // drop its whole cache at its next read, so a large one only costs time
                // (clearing it) and memory.
                .connect_with(connect.read_only(true).pragma("cache_size", "-2000"))
                .await?
        };
        let (events, _) = broadcast::channel(1024);
        let stop = CancellationToken::new();
        if !memory {
            tokio::spawn(watch_other_writers(
                watch_options,
                events.clone(),
                stop.clone(),
            ));
        }
        Ok(Self {
            writer,
            reader,
            events,
            _watcher: Arc::new(stop.drop_guard()),
        })
    }

    fn wake(&self, queues: impl IntoIterator<Item = String>) {
        for queue in queues.into_iter().collect::<BTreeSet<_>>() {
            let _ = self.events.send(StoreEvent::JobsAvailable { queue });
        }
    }

    async fn begin(&self) -> Result<sqlx::Transaction<'static, Sqlite>> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }
}

/// Whether a writer connection may go back to the pool: not if a transaction is still open
/// on it, or sqlx believes one is.
///
/// A transaction ended by an error is rolled back when its `Transaction` is dropped. But
/// SQLite itself rolls the whole transaction back on some errors (`SQLITE_FULL`, `SQLITE_IOERR`,
/// `SQLITE_NOMEM`, a failed `COMMIT`), so that `ROLLBACK` then fails with "no transaction is
/// active", and sqlx, which counts transactions itself and only decrements on success, keeps
/// a depth of 1 on a connection that is in none. Every later `BEGIN IMMEDIATE` on it fails with
/// "attempted to call begin_with at non-zero transaction depth": with one writer connection,
/// every write of the process, for good. Closing such a connection instead lets the pool open
/// a fresh one for the next write.
async fn still_usable(conn: &mut sqlx::SqliteConnection) -> sqlx::Result<bool> {
    use sqlx::Connection;
    // Nothing queued can raise the depth, so zero now is zero for good: the common case
    // costs no round trip.
    if !conn.is_in_transaction() {
        return Ok(true);
    }
    // The rollback a dropped `Transaction` queued runs on the connection's worker thread;
    // a round trip after it makes sure it ran before the depth is read again.
    conn.ping().await?;
    if conn.is_in_transaction() {
        tracing::warn!(
            "closing the SQLite writer connection: a failed write left it inside a transaction; the next write opens a fresh one"
        );
        return Ok(false);
    }
    Ok(true)
}

/// Splits Conveyor's `max_page_count` parameter off a SQLite URL (sqlx refuses parameters it
/// does not know).
fn take_max_page_count(url: &str) -> Result<(String, Option<u64>)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), None));
    };
    let mut max = None;
    let mut rest = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("max_page_count", v)) => {
                max = Some(v.parse::<u64>().map_err(|_| Error::BadUrl {
                    url: url.to_string(),
                    reason: format!("max_page_count must be a whole number of pages, got `{v}`"),
                })?);
            }
            _ => rest.push(pair),
        }
    }
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((url, max))
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

fn after(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    super::after(now, d)
}

fn job_from_row(row: &SqliteRow) -> Result<Job> {
    let state: String = row.try_get("state")?;
    let opt = |name: &str| -> Result<Option<DateTime<Utc>>> {
        Ok(row.try_get::<Option<i64>, _>(name)?.map(from_micros))
    };
    Ok(Job {
        id: JobId(row.try_get::<Uuid, _>("id")?),
        queue: row.try_get("queue")?,
        kind: row.try_get("kind")?,
        args: serde_json::from_str(row.try_get::<&str, _>("args")?)?,
        priority: row.try_get::<i64, _>("priority")? as i16,
        state: state.parse()?,
        attempt: row.try_get::<i64, _>("attempt")? as i32,
        max_attempts: row.try_get::<i64, _>("max_attempts")? as i32,
        run_at: from_micros(row.try_get("run_at")?),
        created_at: from_micros(row.try_get("created_at")?),
        attempted_at: opt("attempted_at")?,
        finalized_at: opt("finalized_at")?,
        lease_owner: row.try_get("lease_owner")?,
        lease_expires_at: opt("lease_expires_at")?,
        cancel_requested_at: opt("cancel_requested_at")?,
        idempotency_key: row.try_get("idempotency_key")?,
        tags: serde_json::from_str(row.try_get::<&str, _>("tags")?)?,
        metadata: serde_json::from_str(row.try_get::<&str, _>("metadata")?)?,
        attempts: serde_json::from_str(row.try_get::<&str, _>("attempts")?)?,
        result: row
            .try_get::<Option<&str>, _>("result")?
            .map(serde_json::from_str)
            .transpose()?,
        progress: row
            .try_get::<Option<&str>, _>("progress")?
            .map(serde_json::from_str)
            .transpose()?,
    })
}

/// Appends `filter` as `AND …` clauses.
fn push_filter(qb: &mut QueryBuilder<Sqlite>, filter: &JobFilter) {
    // States are written as literals (they are fixed names, never user text) so SQLite can
    // match the partial indexes: one state as `state = '…'`, the three waiting states as the
    // exact `WAITING` term of jobs_fetch.
    let states: BTreeSet<JobState> = filter.states.iter().copied().collect();
    let waiting: BTreeSet<JobState> = [
        JobState::Scheduled,
        JobState::Available,
        JobState::Retryable,
    ]
    .into();
    if states == waiting {
        qb.push(format!(" AND state IN {WAITING}"));
    } else if states.len() == 1 {
        qb.push(format!(" AND state = '{}'", filter.states[0].as_str()));
    } else if !states.is_empty() {
        let list: Vec<String> = states.iter().map(|s| format!("'{}'", s.as_str())).collect();
        qb.push(format!(" AND state IN ({})", list.join(", ")));
    }
    if let Some(q) = &filter.queue {
        qb.push(" AND queue = ").push_bind(q.clone());
    }
    if let Some(k) = &filter.kind {
        qb.push(" AND kind = ").push_bind(k.clone());
    }
    if let Some(t) = &filter.tag {
        qb.push(" AND EXISTS (SELECT 1 FROM json_each(jobs.tags) WHERE json_each.value = ")
            .push_bind(t.clone())
            .push(")");
    }
    if let Some(t) = filter.created_after {
        qb.push(" AND created_at >= ").push_bind(micros(t));
    }
    if let Some(t) = filter.created_before {
        qb.push(" AND created_at < ").push_bind(micros(t));
    }
    if let Some(text) = &filter.error_contains {
        let pattern = format!("%{}%", escape_like(&text.to_lowercase()));
        qb.push(" AND ").push(HAS_ERROR);
        if super::json_keeps_as_is(text) {
            // A cheap first pass over the history's text: it holds the words as they are
            // unless JSON escapes them. The exact test below decides.
            qb.push(" AND lower(attempts) LIKE ")
                .push_bind(pattern.clone())
                .push(" ESCAPE '\\'");
        }
        qb.push(
            " AND EXISTS (SELECT 1 FROM json_each(jobs.attempts) a WHERE \
             lower(coalesce(json_extract(a.value, '$.error'), '')) LIKE ",
        )
        .push_bind(pattern.clone())
        .push(
            " ESCAPE '\\' OR EXISTS (SELECT 1 FROM json_each(a.value, '$.causes') c \
             WHERE lower(c.value) LIKE ",
        )
        .push_bind(pattern)
        .push(" ESCAPE '\\'))");
    }
    if !filter.ids.is_empty() {
        qb.push(" AND id IN (");
        let mut sep = qb.separated(", ");
        for id in &filter.ids {
            sep.push_bind(id.0);
        }
        qb.push(")");
    }
}

/// Escapes LIKE wildcards so user text matches literally.
pub(crate) fn escape_like(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Applies outcomes inside an open write transaction; returns the number applied and the
/// queues that got a job ready to run now.
async fn apply_finishes(
    tx: &mut sqlx::SqliteConnection,
    outcomes: &[Finish],
) -> Result<(u64, Vec<String>, Vec<JobChange>)> {
    // One statement for the whole batch: the outcomes travel as one JSON array and are joined
    // to the jobs by id, so a batch costs one call into SQLite, not one per job. The unary
    // `+` keeps the planner from driving the join from the state index, which would re-read
    // the JSON for every running job; the batch drives it, one id lookup per outcome.
    let rows: Vec<serde_json::Value> = outcomes
        .iter()
        .map(|f| {
            let terminal = f.state.is_terminal();
            let mut row = serde_json::json!({
                "id": f.id.0.simple().to_string(),
                "attempt": f.attempt,
                "state": f.state.as_str(),
                "run_at": if terminal { None } else { f.run_at.map(micros) },
                "finalized_at": terminal.then(|| micros(f.record.finished_at)),
                "delta": f.attempt_delta,
                "record": f.record,
            });
            // Only an outcome with a result carries the key: `value->'result'` is then its
            // JSON text (a JSON null included), else SQL NULL, which keeps the column.
            if let (Some(result), Some(map)) = (&f.result, row.as_object_mut()) {
                map.insert("result".into(), result.clone());
            }
            row
        })
        .collect();
    let applied = sqlx::query(
        "WITH u AS (SELECT unhex(value->>'id') AS id, value->>'attempt' AS attempt, \
           value->>'state' AS state, value->>'run_at' AS run_at, \
           value->>'finalized_at' AS finalized_at, value->>'delta' AS delta, \
           value->'record' AS record, value->'result' AS result FROM json_each(?1)) \
         UPDATE jobs SET state = u.state, run_at = coalesce(u.run_at, jobs.run_at), \
           finalized_at = u.finalized_at, attempt = jobs.attempt + u.delta, \
           attempts = json_insert(jobs.attempts, '$[#]', json(u.record)), \
           lease_owner = NULL, lease_expires_at = NULL, cancel_requested_at = NULL, \
           result = coalesce(u.result, jobs.result) \
         FROM u WHERE jobs.id = u.id AND +jobs.state = 'running' AND jobs.attempt = u.attempt \
         RETURNING jobs.id, jobs.queue, jobs.state",
    )
    .bind(serde_json::to_string(&rows)?)
    .fetch_all(&mut *tx)
    .await?;
    let mut ready = Vec::new();
    let mut changes = Vec::with_capacity(applied.len());
    for row in &applied {
        let state: JobState = row.try_get::<&str, _>("state")?.parse()?;
        if state == JobState::Available {
            ready.push(row.try_get("queue")?);
        }
        changes.push(JobChange {
            id: JobId(row.try_get("id")?),
            state,
        });
    }
    Ok((applied.len() as u64, ready, changes))
}

/// Inserts `jobs` in multi-row statements, answering each (new, or the key's holder).
/// Returns false when a keyed job was not inserted yet its holder is gone (possible only
/// outside a transaction, when the pruner ran in between); the caller then retries.
async fn insert_jobs(
    conn: &mut sqlx::SqliteConnection,
    jobs: &[NewJob],
    now: DateTime<Utc>,
    answers: &mut Vec<Enqueued>,
    ready: &mut Vec<String>,
) -> Result<bool> {
    for chunk in jobs.chunks(INSERT_CHUNK) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO jobs (id, queue, kind, args, priority, state, max_attempts, run_at, \
             created_at, idempotency_key, tags, metadata) ",
        );
        let mut rows = Vec::with_capacity(chunk.len());
        for job in chunk {
            let run_at = job.due_at(now);
            let state = if run_at > now {
                JobState::Scheduled
            } else {
                JobState::Available
            };
            rows.push((
                job,
                job.id.unwrap_or_else(JobId::new),
                state,
                run_at,
                serde_json::to_string(&job.args)?,
                serde_json::to_string(&job.tags)?,
                serde_json::to_string(&job.metadata)?,
            ));
        }
        qb.push_values(
            &rows,
            |mut b, (job, id, state, run_at, args, tags, metadata)| {
                b.push_bind(id.0)
                    .push_bind(job.queue.as_str())
                    .push_bind(job.kind.as_str())
                    .push_bind(args.as_str())
                    .push_bind(i64::from(job.priority))
                    .push_bind(state.as_str())
                    .push_bind(job.max_attempts)
                    .push_bind(micros(*run_at))
                    .push_bind(micros(now))
                    .push_bind(job.idempotency_key.as_deref())
                    .push_bind(tags.as_str())
                    .push_bind(metadata.as_str());
            },
        );
        qb.push(" ON CONFLICT DO NOTHING RETURNING id");
        let inserted: std::collections::HashSet<Uuid> = qb
            .build()
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| r.try_get::<Uuid, _>("id"))
            .collect::<Result<_, _>>()?;
        for (job, id, state, ..) in &rows {
            if inserted.contains(&id.0) {
                if *state == JobState::Available {
                    ready.push(job.queue.clone());
                }
                answers.push(Enqueued {
                    id: *id,
                    state: *state,
                    duplicate: false,
                });
                continue;
            }
            // Not inserted: another job holds the key (or, absurdly, the id).
            let holder = match &job.idempotency_key {
                Some(key) => {
                    sqlx::query("SELECT id, state FROM jobs WHERE idempotency_key = ?")
                        .bind(key)
                        .fetch_optional(&mut *conn)
                        .await?
                }
                None => None,
            };
            let Some(holder) = holder else {
                if job.idempotency_key.is_some() {
                    // The holder was pruned after the insert saw it (autocommit only).
                    return Ok(false);
                }
                return Err(Error::invalid("id", format!("job id {id} already exists")));
            };
            let state: String = holder.try_get("state")?;
            answers.push(Enqueued {
                id: JobId(holder.try_get("id")?),
                state: state.parse()?,
                duplicate: true,
            });
        }
    }
    Ok(true)
}

#[async_trait]
impl Store for SqliteStore {
    async fn backend_name(&self) -> Result<String> {
        let v: String = sqlx::query_scalar("SELECT sqlite_version()")
            .fetch_one(&self.reader)
            .await?;
        Ok(format!("SQLite {v}"))
    }

    async fn migrate(&self) -> Result<()> {
        let mut migrator = sqlx::migrate!("migrations/sqlite");
        // A newer release may have migrated the store first (a rolling upgrade, or a rollback
        // of the binary): its migrations only add, so this release runs on the schema as it is.
        migrator.set_ignore_missing(true);
        migrator.run(&self.writer).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        let latest = sqlx::migrate!("migrations/sqlite")
            .iter()
            .map(|m| m.version)
            .max()
            .unwrap_or(0);
        sqlx::query("SELECT 1 FROM jobs LIMIT 1")
            .fetch_optional(&self.reader)
            .await?;
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.reader)
                .await?;
        check_migrations(applied, latest)
    }

    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>> {
        for job in &jobs {
            job.validate()?;
        }
        let now = Utc::now();
        let mut answers = Vec::with_capacity(jobs.len());
        let mut ready = Vec::new();
        if jobs.len() == 1 {
            // One job is one statement: no explicit transaction, so one call into SQLite
            // instead of three. Only a holder pruned between the insert and the lookup sends
            // it down the transactional path below.
            let mut conn = self.writer.acquire().await?;
            if insert_jobs(&mut conn, &jobs, now, &mut answers, &mut ready).await? {
                drop(conn);
                self.wake(ready);
                self.announce_enqueued(&answers);
                return Ok(answers);
            }
            answers.clear();
            ready.clear();
        }
        let mut tx = self.begin().await?;
        if !insert_jobs(&mut tx, &jobs, now, &mut answers, &mut ready).await? {
            return Err(Error::Unsupported(
                "an idempotency key's holder vanished inside a transaction".into(),
            ));
        }
        tx.commit().await?;
        self.wake(ready);
        self.announce_enqueued(&answers);
        Ok(answers)
    }

    async fn fetch(&self, request: FetchRequest<'_>) -> Result<Vec<Job>> {
        let now = Utc::now();
        let sql = format!(
            "UPDATE jobs SET state = 'running', attempt = attempt + 1, attempted_at = ?1, \
             lease_owner = ?2, lease_expires_at = ?3 \
             WHERE rowid IN (SELECT rowid FROM jobs WHERE queue = ?4 AND state IN {WAITING} \
             AND run_at <= ?1 ORDER BY priority, run_at, id LIMIT ?5) RETURNING {COLUMNS}"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(micros(now))
            .bind(request.worker)
            .bind(micros(after(now, request.lease)))
            .bind(request.queue)
            .bind(i64::from(request.limit))
            .fetch_all(&self.writer)
            .await?;
        let mut jobs = rows.iter().map(job_from_row).collect::<Result<Vec<_>>>()?;
        jobs.sort_by_key(|a| (a.priority, a.run_at, a.id));
        self.announce(jobs.iter().map(|j| JobChange {
            id: j.id,
            state: JobState::Running,
        }));
        Ok(jobs)
    }

    async fn finish(&self, outcomes: Vec<Finish>) -> Result<u64> {
        if outcomes.is_empty() {
            return Ok(0);
        }
        let mut tx = self.begin().await?;
        let (applied, ready, changes) = apply_finishes(&mut tx, &outcomes).await?;
        tx.commit().await?;
        self.wake(ready);
        self.announce(changes);
        Ok(applied)
    }

    async fn report_progress(&self, id: JobId, progress: &Progress) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE jobs SET progress = ?1 WHERE id = ?2 AND state = 'running' AND attempt = ?3",
        )
        .bind(serde_json::to_string(progress)?)
        .bind(id.0)
        .bind(progress.attempt)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn heartbeat(&self, worker: &str, held: &[JobId], lease: Duration) -> Result<Vec<JobId>> {
        let until = micros(after(Utc::now(), lease));
        let mut cancel = Vec::new();
        // One statement per beat unless a worker holds more jobs than SQLite takes parameters.
        for chunk in held.chunks(HEARTBEAT_CHUNK) {
            let mut qb = QueryBuilder::<Sqlite>::new("UPDATE jobs SET lease_expires_at = ");
            qb.push_bind(until)
                .push(" WHERE state = 'running' AND lease_owner = ")
                .push_bind(worker)
                .push(" AND id IN (");
            let mut ids = qb.separated(", ");
            for id in chunk {
                ids.push_bind(id.0);
            }
            qb.push(") RETURNING id, cancel_requested_at");
            for row in qb.build().fetch_all(&self.writer).await? {
                if row
                    .try_get::<Option<i64>, _>("cancel_requested_at")?
                    .is_some()
                {
                    cancel.push(JobId(row.try_get("id")?));
                }
            }
        }
        Ok(cancel)
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>> {
        let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = ?");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn list(&self, filter: &JobFilter, page: Page) -> Result<Vec<Job>> {
        check_page(&page)?;
        let mut qb = QueryBuilder::<Sqlite>::new(format!("SELECT {COLUMNS} FROM jobs WHERE 1=1"));
        push_filter(&mut qb, filter);
        if let Some(before) = page.before {
            qb.push(" AND id < ").push_bind(before.0);
        }
        qb.push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::from(page.limit));
        let rows = qb.build().fetch_all(&self.reader).await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn count(&self, filter: &JobFilter) -> Result<u64> {
        if filter.counts_by_queue_and_state() {
            // The totals the count triggers keep (migration 0004).
            let mut qb =
                QueryBuilder::<Sqlite>::new("SELECT coalesce(sum(n), 0) FROM job_counts WHERE 1=1");
            if !filter.states.is_empty() {
                qb.push(" AND ").push(sql_state_in(&filter.states));
            }
            if let Some(queue) = &filter.queue {
                qb.push(" AND queue = ").push_bind(queue.clone());
            }
            let n: i64 = qb.build_query_scalar().fetch_one(&self.reader).await?;
            return Ok(n.max(0) as u64);
        }
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT count(*) FROM jobs WHERE 1=1");
        push_filter(&mut qb, filter);
        let n: i64 = qb.build_query_scalar().fetch_one(&self.reader).await?;
        Ok(n as u64)
    }

    async fn retry(&self, id: JobId) -> Result<Job> {
        let sql = format!(
            "UPDATE jobs SET state = 'available', attempt = 0, run_at = ?1, finalized_at = NULL, \
             lease_owner = NULL, lease_expires_at = NULL, cancel_requested_at = NULL, \
             result = NULL, progress = NULL \
             WHERE id = ?2 AND {} RETURNING {COLUMNS}",
            sql_from_states(OperatorAction::Retry)
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(micros(Utc::now()))
            .bind(id.0)
            .fetch_optional(&self.writer)
            .await?;
        match row {
            Some(row) => {
                let job = job_from_row(&row)?;
                self.wake([job.queue.clone()]);
                self.announce([JobChange {
                    id: job.id,
                    state: job.state,
                }]);
                Ok(job)
            }
            None => Err(self.refusal(id, OperatorAction::Retry).await),
        }
    }

    async fn retry_matching(&self, filter: &JobFilter) -> Result<u64> {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "UPDATE jobs SET state = 'available', attempt = 0, finalized_at = NULL, \
             lease_owner = NULL, lease_expires_at = NULL, cancel_requested_at = NULL, \
             result = NULL, progress = NULL, run_at = ",
        );
        qb.push_bind(micros(Utc::now()))
            .push(format!(" WHERE {}", sql_from_states(OperatorAction::Retry)));
        push_filter(&mut qb, filter);
        qb.push(" RETURNING id, queue");
        let rows = qb.build().fetch_all(&self.writer).await?;
        let queues = rows
            .iter()
            .map(|r| r.try_get::<String, _>("queue"))
            .collect::<Result<Vec<_>, _>>()?;
        let changes = rows
            .iter()
            .map(|r| {
                Ok(JobChange {
                    id: JobId(r.try_get("id")?),
                    state: JobState::Available,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let n = queues.len() as u64;
        self.wake(queues);
        self.announce(changes);
        Ok(n)
    }

    async fn cancel(&self, id: JobId) -> Result<CancelResult> {
        let now = micros(Utc::now());
        let mut tx = self.begin().await?;
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM jobs WHERE id = ?")
            .bind(id.0)
            .fetch_optional(&mut *tx)
            .await?;
        let state: JobState = match state {
            Some(s) => s.parse()?,
            None => return Err(Error::NotFound(id)),
        };
        let result = if OperatorAction::CANCEL_AT_ONCE.contains(&state) {
            sqlx::query("UPDATE jobs SET state = 'cancelled', finalized_at = ?1 WHERE id = ?2")
                .bind(now)
                .bind(id.0)
                .execute(&mut *tx)
                .await?;
            CancelResult::Cancelled
        } else if OperatorAction::CANCEL_BY_REQUEST.contains(&state) {
            sqlx::query(
                "UPDATE jobs SET cancel_requested_at = coalesce(cancel_requested_at, ?1) WHERE id = ?2",
            )
            .bind(now)
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
            CancelResult::Requested
        } else {
            return Err(Error::WrongState {
                id,
                state,
                action: OperatorAction::Cancel,
            });
        };
        tx.commit().await?;
        if result == CancelResult::Requested {
            let _ = self.events.send(StoreEvent::CancelRequested { id });
        } else {
            self.announce([JobChange {
                id,
                state: JobState::Cancelled,
            }]);
        }
        Ok(result)
    }

    async fn discard(&self, id: JobId) -> Result<()> {
        let sql = format!(
            "DELETE FROM jobs WHERE id = ? AND {}",
            sql_from_states(OperatorAction::Discard)
        );
        let done = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .execute(&self.writer)
            .await?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(self.refusal(id, OperatorAction::Discard).await)
        }
    }

    async fn purge(&self, filter: &JobFilter) -> Result<u64> {
        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "DELETE FROM jobs WHERE {}",
            sql_from_states(OperatorAction::Purge)
        ));
        push_filter(&mut qb, filter);
        Ok(qb.build().execute(&self.writer).await?.rows_affected())
    }

    async fn finished_groups(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<crate::stats::FinishedGroup>> {
        use crate::stats::{GroupBuilder, bucket_of};
        use futures::TryStreamExt;
        // SQLite as bundled has no log function, so the rows are streamed and bucketed here:
        // in process, through the jobs_finalized index, one pass.
        let mut rows = sqlx::query(
            "SELECT queue, kind, state, run_at, attempted_at, finalized_at FROM jobs \
             WHERE finalized_at >= ?1 AND finalized_at < ?2",
        )
        .bind(micros(from))
        .bind(micros(to))
        .fetch(&self.reader);
        let mut groups = GroupBuilder::default();
        while let Some(row) = rows.try_next().await? {
            let queue: &str = row.try_get("queue")?;
            let kind: &str = row.try_get("kind")?;
            let state: JobState = row.try_get::<&str, _>("state")?.parse()?;
            let run_at: i64 = row.try_get("run_at")?;
            let attempted_at: Option<i64> = row.try_get("attempted_at")?;
            let finalized_at: i64 = row.try_get("finalized_at")?;
            let (rb, wb) = match attempted_at {
                Some(a) => (
                    Some(bucket_of(finalized_at - a)),
                    Some(bucket_of(a - run_at)),
                ),
                None => (None, None),
            };
            groups.add(queue, kind, state, rb, wb, 1);
        }
        Ok(groups.finish())
    }

    async fn finished_groups_by_arg(
        &self,
        kind: &str,
        field: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<crate::stats::ArgGroup>> {
        use crate::stats::{ArgGroupBuilder, bucket_of, valid_arg_field};
        use futures::TryStreamExt;
        if !valid_arg_field(field) {
            return Err(Error::invalid(
                "field",
                format!("`{field}` is not an args field name: use letters, digits and `_`"),
            ));
        }
        let mut rows = sqlx::query(
            "SELECT CASE WHEN json_type(args, ?3) = 'text' THEN json_extract(args, ?3) END AS v, \
                    state, attempt, attempted_at, finalized_at FROM jobs \
             WHERE finalized_at >= ?1 AND finalized_at < ?2 AND kind = ?4",
        )
        .bind(micros(from))
        .bind(micros(to))
        .bind(format!("$.{field}"))
        .bind(kind)
        .fetch(&self.reader);
        let mut groups = ArgGroupBuilder::default();
        while let Some(row) = rows.try_next().await? {
            let value: Option<&str> = row.try_get("v")?;
            let state: JobState = row.try_get::<&str, _>("state")?.parse()?;
            let attempt: i64 = row.try_get("attempt")?;
            let attempted_at: Option<i64> = row.try_get("attempted_at")?;
            let finalized_at: i64 = row.try_get("finalized_at")?;
            let rb = attempted_at.map(|a| bucket_of(finalized_at - a));
            groups.add(value, state, rb, 1, attempt.max(0) as u64);
        }
        Ok(groups.finish())
    }

    async fn queue_stats(&self) -> Result<Vec<QueueStats>> {
        let now = micros(Utc::now());
        // The totals the count triggers keep (migration 0004), not a scan of the jobs.
        let rows =
            sqlx::query("SELECT queue, state, n FROM job_counts WHERE n > 0 ORDER BY queue, state")
                .fetch_all(&self.reader)
                .await?;
        let mut stats: Vec<QueueStats> = Vec::new();
        for row in rows {
            let queue: String = row.try_get("queue")?;
            let state: JobState = row.try_get::<String, _>("state")?.parse()?;
            let n: i64 = row.try_get("n")?;
            match stats.last_mut() {
                Some(s) if s.queue == queue => {
                    s.counts.insert(state, n);
                }
                _ => stats.push(QueueStats {
                    queue,
                    counts: [(state, n)].into_iter().collect(),
                    oldest_available_age: None,
                }),
            }
        }
        let sql = format!(
            "SELECT queue, min(run_at) AS oldest FROM jobs WHERE state IN {WAITING} \
             AND run_at <= ?1 GROUP BY queue"
        );
        let oldest = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(now)
            .fetch_all(&self.reader)
            .await?;
        for row in oldest {
            let queue: String = row.try_get("queue")?;
            let at: i64 = row.try_get("oldest")?;
            if let Some(s) = stats.iter_mut().find(|s| s.queue == queue) {
                s.oldest_available_age = Some(Duration::from_micros((now - at).max(0) as u64));
            }
        }
        Ok(stats)
    }

    async fn promote_due(&self, now: DateTime<Utc>, limit: u32) -> Result<u64> {
        let rows = sqlx::query(
            "UPDATE jobs SET state = 'available' WHERE rowid IN (SELECT rowid FROM jobs \
             WHERE state IN ('scheduled','retryable') AND run_at <= ?1 LIMIT ?2) RETURNING queue",
        )
        .bind(micros(now))
        .bind(i64::from(limit))
        .fetch_all(&self.writer)
        .await?;
        let queues = rows
            .iter()
            .map(|r| r.try_get::<String, _>("queue"))
            .collect::<Result<Vec<_>, _>>()?;
        let n = queues.len() as u64;
        self.wake(queues);
        Ok(n)
    }

    async fn rescue_expired(
        &self,
        now: DateTime<Utc>,
        policy: &RetryPolicy,
        limit: u32,
    ) -> Result<RescueReport> {
        let mut tx = self.begin().await?;
        let rows = sqlx::query(
            "SELECT id, attempt, max_attempts, attempted_at, lease_owner, cancel_requested_at \
             FROM jobs WHERE state = 'running' AND lease_expires_at < ?1 LIMIT ?2",
        )
        .bind(micros(now))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        let mut report = RescueReport::default();
        let mut finishes = Vec::with_capacity(rows.len());
        for row in &rows {
            let attempt = row.try_get::<i64, _>("attempt")? as i32;
            let max = row.try_get::<i64, _>("max_attempts")? as i32;
            let owner: Option<String> = row.try_get("lease_owner")?;
            let started = row
                .try_get::<Option<i64>, _>("attempted_at")?
                .map_or(now, from_micros);
            let cancelled = row
                .try_get::<Option<i64>, _>("cancel_requested_at")?
                .is_some();
            let f = super::rescue_finish(
                JobId(row.try_get("id")?),
                attempt,
                max,
                owner,
                started,
                cancelled,
                now,
                policy,
            );
            report.count(&f);
            finishes.push(f);
        }
        let (_, _, changes) = apply_finishes(&mut tx, &finishes).await?;
        tx.commit().await?;
        self.announce(changes);
        Ok(report)
    }

    async fn prune(&self, now: DateTime<Utc>, policy: &RetentionPolicy, limit: u32) -> Result<u64> {
        let before = |d: Duration| micros(super::before(now, d));
        let done = sqlx::query(
            "DELETE FROM jobs WHERE rowid IN (SELECT rowid FROM jobs WHERE finalized_at IS NOT NULL \
             AND ((state = 'completed' AND finalized_at < ?1) \
               OR (state = 'cancelled' AND finalized_at < ?2) \
               OR (state = 'dead' AND finalized_at < ?3)) \
             AND (idempotency_key IS NULL OR finalized_at < ?4) LIMIT ?5)",
        )
        .bind(before(policy.completed))
        .bind(before(policy.cancelled))
        .bind(before(policy.dead))
        .bind(before(policy.idempotency))
        .bind(i64::from(limit))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }
}

impl SqliteStore {
    /// Tells this process's subscribers which jobs changed state (other processes on the
    /// file learn that something changed from the watcher).
    fn announce(&self, changes: impl IntoIterator<Item = JobChange>) {
        if self.events.receiver_count() == 0 {
            return;
        }
        let changes: Arc<[JobChange]> = changes.into_iter().collect();
        if !changes.is_empty() {
            let _ = self.events.send(StoreEvent::JobsChanged { changes });
        }
    }

    fn announce_enqueued(&self, answers: &[Enqueued]) {
        self.announce(answers.iter().filter(|a| !a.duplicate).map(|a| JobChange {
            id: a.id,
            state: a.state,
        }));
    }

    /// Why an operation on `id` changed nothing: it is missing, or in the wrong state.
    async fn refusal(&self, id: JobId, action: OperatorAction) -> Error {
        match self.get(id).await {
            Ok(Some(job)) => Error::WrongState {
                id,
                state: job.state,
                action,
            },
            Ok(None) => Error::NotFound(id),
            Err(e) => e,
        }
    }
}
