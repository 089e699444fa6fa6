//! The Postgres backend: production, and many worker processes on many machines.
//!
//! - Fetch is one statement: `FOR UPDATE SKIP LOCKED` picks a batch by priority then
//!   `run_at`, and the same statement claims it (state, attempt, lease).
//! - Enqueue, finish and rescue write whole batches with one `unnest` statement each.
//! - Wake-up: a statement-level trigger NOTIFYs `conveyor_jobs` with the queue name when
//!   ready jobs are inserted (by any client, including the SQL function `conveyor.enqueue`);
//!   cancel requests NOTIFY `conveyor_cancel`. One LISTEN connection per store forwards them
//!   to [`Store::subscribe`]; the runtime also polls, so a lost notification only costs a poll.
//! - Transactional enqueue: [`enqueue_in`] and [`enqueue_many_in`] take the application's own
//!   connection or transaction, so the job exists iff that transaction commits.

mod meta;
pub mod queries;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{PgConnection, Postgres, QueryBuilder, Row};
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

use super::{
    CancelResult, FetchRequest, Finish, JobFilter, Page, QueueStats, RescueReport, RetentionPolicy,
    Store, StoreEvent, StoreOptions, check_migrations, check_page, rescue_finish,
};
use crate::error::{Error, Result};
use crate::job::{AttemptRecord, Enqueued, Job, JobId, JobState, NewJob};
use crate::retry_policy::RetryPolicy;

/// Rows per bulk INSERT statement on the caller's connection.
const INSERT_CHUNK: usize = 5000;
/// Rows per statement when a pooled bulk enqueue is split across connections.
const PARALLEL_CHUNK: usize = 1250;
/// Statements of one pooled bulk enqueue in flight at once (each on its own connection): the
/// server parses JSON and maintains indexes on as many cores as it has. A batch of up to
/// `PARALLEL_CHUNK` jobs is one statement on one connection.
const PARALLEL_INSERTS: usize = 4;
const JOBS_CHANNEL: &str = "conveyor_jobs";
const CANCEL_CHANNEL: &str = "conveyor_cancel";

/// The Postgres store. Cheap to clone; clones share the pool and the listener.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    events: broadcast::Sender<StoreEvent>,
    /// Stops the LISTEN task when the last clone is dropped.
    _listener: std::sync::Arc<DropGuard>,
}

impl PgStore {
    /// Connects a pool to `url` and starts the LISTEN task.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Self> {
        // No ping before each acquire: it would add a round trip to every call, and a broken
        // connection fails the call anyway, which every caller already retries or reports.
        let pool = PgPoolOptions::new()
            .test_before_acquire(false)
            .max_connections(options.max_connections.max(2))
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        let (events, _) = broadcast::channel(4096);
        let stop = CancellationToken::new();
        tokio::spawn(listen(pool.clone(), events.clone(), stop.clone()));
        Ok(Self {
            pool,
            events,
            _listener: std::sync::Arc::new(stop.drop_guard()),
        })
    }

    /// The connection pool, for applications that share the database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn notify_queues(&self, queues: impl IntoIterator<Item = String>) -> Result<()> {
        let queues: Vec<String> = queues
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if !queues.is_empty() {
            sqlx::query("SELECT pg_notify($1, q) FROM unnest($2::text[]) AS q")
                .bind(JOBS_CHANNEL)
                .bind(&queues)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Why an operation on `id` changed nothing: it is missing, or in the wrong state.
    async fn refusal(&self, id: JobId, action: &'static str) -> Error {
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

/// Forwards NOTIFYs to subscribers until `stop`, reconnecting after errors.
async fn listen(pool: PgPool, events: broadcast::Sender<StoreEvent>, stop: CancellationToken) {
    let mut delay = Duration::from_millis(100);
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "LISTEN connection failed; polling covers the gap");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        if let Err(e) = listener.listen_all([JOBS_CHANNEL, CANCEL_CHANNEL]).await {
            tracing::warn!(error = %e, "LISTEN failed; retrying");
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            continue;
        }
        delay = Duration::from_millis(100);
        loop {
            let n = tokio::select! {
                _ = stop.cancelled() => return,
                n = listener.recv() => n,
            };
            match n {
                Ok(n) => {
                    let event = if n.channel() == CANCEL_CHANNEL {
                        match n.payload().parse::<Uuid>() {
                            Ok(id) => StoreEvent::CancelRequested { id: JobId(id) },
                            Err(_) => continue,
                        }
                    } else {
                        StoreEvent::JobsAvailable {
                            queue: n.payload().to_string(),
                        }
                    };
                    let _ = events.send(event);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                    break;
                }
            }
        }
    }
}

fn job_from_row(row: &PgRow) -> Result<Job> {
    let state: String = row.try_get("state")?;
    let attempts: sqlx::types::Json<Vec<AttemptRecord>> = row.try_get("attempts")?;
    Ok(Job {
        id: JobId(row.try_get("id")?),
        queue: row.try_get("queue")?,
        kind: row.try_get("kind")?,
        args: row.try_get("args")?,
        priority: row.try_get("priority")?,
        state: state.parse()?,
        attempt: row.try_get("attempt")?,
        max_attempts: row.try_get("max_attempts")?,
        run_at: row.try_get("run_at")?,
        created_at: row.try_get("created_at")?,
        attempted_at: row.try_get("attempted_at")?,
        finalized_at: row.try_get("finalized_at")?,
        lease_owner: row.try_get("lease_owner")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        cancel_requested_at: row.try_get("cancel_requested_at")?,
        idempotency_key: row.try_get("idempotency_key")?,
        tags: row.try_get("tags")?,
        metadata: row.try_get("metadata")?,
        attempts: attempts.0,
    })
}

fn after(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    super::after(now, d)
}

fn before(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    super::before(now, d)
}

/// Appends `filter` as `AND …` clauses.
fn push_filter(qb: &mut QueryBuilder<Postgres>, filter: &JobFilter) {
    if !filter.states.is_empty() {
        let states: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
        qb.push(" AND state = ANY(").push_bind(states).push(")");
    }
    if let Some(q) = &filter.queue {
        qb.push(" AND queue = ").push_bind(q.clone());
    }
    if let Some(k) = &filter.kind {
        qb.push(" AND kind = ").push_bind(k.clone());
    }
    if let Some(t) = &filter.tag {
        qb.push(" AND ").push_bind(t.clone()).push(" = ANY(tags)");
    }
    if let Some(t) = filter.created_after {
        qb.push(" AND created_at >= ").push_bind(t);
    }
    if let Some(t) = filter.created_before {
        qb.push(" AND created_at < ").push_bind(t);
    }
    if let Some(text) = &filter.error_contains {
        let pattern = format!("%{}%", super::sqlite::escape_like(text));
        qb.push(
            " AND EXISTS (SELECT 1 FROM jsonb_array_elements(attempts) a, LATERAL \
             (SELECT a->>'error' UNION ALL \
              SELECT jsonb_array_elements_text(coalesce(a->'causes', '[]'::jsonb))) m(msg) \
             WHERE m.msg ILIKE ",
        )
        .push_bind(pattern)
        .push(" ESCAPE '\\')");
    }
    if !filter.ids.is_empty() {
        let ids: Vec<Uuid> = filter.ids.iter().map(|i| i.0).collect();
        qb.push(" AND id = ANY(").push_bind(ids).push(")");
    }
}

/// Enqueues one job on the caller's connection or transaction: the job exists iff that
/// transaction commits. Same idempotency rules as [`Store::enqueue`]. Wakes workers at commit.
pub async fn enqueue_in(conn: &mut PgConnection, job: NewJob) -> Result<Enqueued> {
    let mut out = enqueue_many_in(conn, vec![job]).await?;
    out.pop()
        .ok_or_else(|| Error::Unsupported("enqueue returned no answer".into()))
}

/// Enqueues many jobs on the caller's connection or transaction, one statement per 5,000.
pub async fn enqueue_many_in(conn: &mut PgConnection, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>> {
    for job in &jobs {
        job.validate()?;
    }
    let now = Utc::now();
    let mut answers = Vec::with_capacity(jobs.len());
    for chunk in jobs.chunks(INSERT_CHUNK) {
        answers.extend(insert_chunk(conn, chunk, now).await?);
    }
    Ok(answers)
}

/// A primary-key violation on insert means the caller reused a job id: say which.
fn existing_id(e: sqlx::Error) -> Error {
    if let sqlx::Error::Database(db) = &e
        && db.constraint() == Some("jobs_pkey")
    {
        let id = db
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .and_then(|pg| pg.detail())
            .and_then(|d| d.split(['(', ')']).nth(3))
            .and_then(|id| id.parse::<Uuid>().ok());
        return Error::invalid(
            "id",
            match id {
                Some(id) => format!("job id {} already exists", JobId(id)),
                None => "a job with this id already exists".into(),
            },
        );
    }
    e.into()
}

async fn insert_pooled(
    pool: &PgPool,
    chunk: &[NewJob],
    now: DateTime<Utc>,
) -> Result<Vec<Enqueued>> {
    let mut conn = pool.acquire().await?;
    insert_chunk(&mut conn, chunk, now).await
}

async fn insert_chunk(
    conn: &mut PgConnection,
    chunk: &[NewJob],
    now: DateTime<Utc>,
) -> Result<Vec<Enqueued>> {
    let n = chunk.len();
    let mut ids = Vec::with_capacity(n);
    let mut queues = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut args = Vec::with_capacity(n);
    let mut priorities = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut max_attempts = Vec::with_capacity(n);
    let mut run_ats = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut tags = Vec::with_capacity(n);
    let mut metadata = Vec::with_capacity(n);
    for job in chunk {
        let run_at = job.run_at.unwrap_or(now);
        ids.push(job.id.unwrap_or_else(JobId::new).0);
        queues.push(job.queue.as_str());
        kinds.push(job.kind.as_str());
        args.push(serde_json::to_string(&job.args)?);
        priorities.push(job.priority);
        states.push(if run_at > now {
            "scheduled"
        } else {
            "available"
        });
        max_attempts.push(job.max_attempts);
        run_ats.push(run_at);
        keys.push(job.idempotency_key.as_deref());
        tags.push(serde_json::to_string(&job.tags)?);
        metadata.push(serde_json::to_string(&job.metadata)?);
    }
    let mut pending: Vec<usize> = (0..n).collect();
    let mut answers: Vec<Option<Enqueued>> = vec![None; n];
    // A duplicate's holder can be pruned between the insert and the lookup; then the row is
    // inserted again. Three rounds are far more than that race ever needs.
    for _ in 0..3 {
        fn pick<'a>(v: &[&'a str], at: &[usize]) -> Vec<&'a str> {
            at.iter().map(|&i| v[i]).collect()
        }
        let inserted: HashSet<Uuid> = sqlx::query_scalar(queries::ENQUEUE)
            .bind(pending.iter().map(|&i| ids[i]).collect::<Vec<_>>())
            .bind(pick(&queues, &pending))
            .bind(pick(&kinds, &pending))
            .bind(
                pending
                    .iter()
                    .map(|&i| args[i].as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(pending.iter().map(|&i| priorities[i]).collect::<Vec<_>>())
            .bind(pick(&states, &pending))
            .bind(pending.iter().map(|&i| max_attempts[i]).collect::<Vec<_>>())
            .bind(pending.iter().map(|&i| run_ats[i]).collect::<Vec<_>>())
            .bind(now)
            .bind(pending.iter().map(|&i| keys[i]).collect::<Vec<_>>())
            .bind(
                pending
                    .iter()
                    .map(|&i| tags[i].as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                pending
                    .iter()
                    .map(|&i| metadata[i].as_str())
                    .collect::<Vec<_>>(),
            )
            .fetch_all(&mut *conn)
            .await
            .map_err(existing_id)?
            .into_iter()
            .collect();

        let mut dup_keys = Vec::new();
        for &i in &pending {
            if inserted.contains(&ids[i]) {
                answers[i] = Some(Enqueued {
                    id: JobId(ids[i]),
                    state: states[i].parse()?,
                    duplicate: false,
                });
            } else if let Some(k) = keys[i] {
                dup_keys.push(k);
            } else {
                return Err(Error::invalid(
                    "id",
                    format!("job id {} already exists", ids[i]),
                ));
            }
        }
        if dup_keys.is_empty() {
            break;
        }
        let holders: HashMap<String, (Uuid, String)> = sqlx::query(queries::KEY_HOLDERS)
            .bind(&dup_keys)
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| -> Result<_> {
                Ok((
                    r.try_get::<String, _>("idempotency_key")?,
                    (r.try_get("id")?, r.try_get::<String, _>("state")?),
                ))
            })
            .collect::<Result<_>>()?;
        let mut again = Vec::new();
        for &i in &pending {
            if answers[i].is_some() {
                continue;
            }
            match keys[i].and_then(|k| holders.get(k)) {
                Some((id, state)) => {
                    answers[i] = Some(Enqueued {
                        id: JobId(*id),
                        state: state.parse()?,
                        duplicate: true,
                    })
                }
                None => again.push(i),
            }
        }
        pending = again;
        if pending.is_empty() {
            break;
        }
        // No job holds these keys any more: free them and insert again.
        let orphans: Vec<&str> = pending.iter().filter_map(|&i| keys[i]).collect();
        sqlx::query(queries::FREE_ORPHAN_KEYS)
            .bind(&orphans)
            .execute(&mut *conn)
            .await?;
    }
    answers
        .into_iter()
        .map(|a| {
            a.ok_or_else(|| {
                Error::Unsupported(
                    "an idempotency key kept changing hands during enqueue; try again".into(),
                )
            })
        })
        .collect()
}

/// Applies outcomes in one statement; returns (applied, queues with a job ready now).
async fn apply_finishes(
    conn: &mut PgConnection,
    outcomes: &[Finish],
) -> Result<(u64, Vec<String>)> {
    // A consistent row order keeps two concurrent batches from deadlocking.
    let mut sorted: Vec<&Finish> = outcomes.iter().collect();
    sorted.sort_by_key(|f| f.id);
    let ids: Vec<Uuid> = sorted.iter().map(|f| f.id.0).collect();
    let attempts: Vec<i32> = sorted.iter().map(|f| f.attempt).collect();
    let states: Vec<&str> = sorted.iter().map(|f| f.state.as_str()).collect();
    let run_ats: Vec<Option<DateTime<Utc>>> = sorted
        .iter()
        .map(|f| {
            if f.state.is_terminal() {
                None
            } else {
                f.run_at
            }
        })
        .collect();
    let finalized: Vec<Option<DateTime<Utc>>> = sorted
        .iter()
        .map(|f| f.state.is_terminal().then_some(f.record.finished_at))
        .collect();
    let deltas: Vec<i32> = sorted.iter().map(|f| f.attempt_delta).collect();
    let records: Vec<String> = sorted
        .iter()
        .map(|f| serde_json::to_string(&f.record))
        .collect::<Result<_, _>>()?;
    let rows = sqlx::query(queries::FINISH)
        .bind(ids)
        .bind(attempts)
        .bind(states)
        .bind(run_ats)
        .bind(finalized)
        .bind(deltas)
        .bind(records)
        .fetch_all(&mut *conn)
        .await?;
    let mut ready = Vec::new();
    for row in &rows {
        if row.try_get::<&str, _>("state")? == "available" {
            ready.push(row.try_get("queue")?);
        }
    }
    Ok((rows.len() as u64, ready))
}

#[async_trait]
impl Store for PgStore {
    async fn backend_name(&self) -> Result<String> {
        let v: String = sqlx::query_scalar("SHOW server_version")
            .fetch_one(&self.pool)
            .await?;
        Ok(format!("Postgres {v}"))
    }

    async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("../migrations/postgres")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        let latest = sqlx::migrate!("../migrations/postgres")
            .iter()
            .map(|m| m.version)
            .max()
            .unwrap_or(0);
        sqlx::query("SELECT 1 FROM conveyor.jobs LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await?;
        check_migrations(applied, latest)
    }

    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>> {
        // Validate everything first, so bad input inserts nothing.
        for job in &jobs {
            job.validate()?;
        }
        let now = Utc::now();
        let parallel = PARALLEL_INSERTS
            .min(self.pool.options().get_max_connections() as usize / 2)
            .max(1);
        let mut chunks = jobs.chunks(PARALLEL_CHUNK);
        let mut in_flight = FuturesOrdered::new();
        let mut answers = Vec::with_capacity(jobs.len());
        loop {
            while in_flight.len() < parallel {
                let Some(chunk) = chunks.next() else { break };
                in_flight.push_back(insert_pooled(&self.pool, chunk, now));
            }
            match in_flight.next().await {
                Some(done) => answers.extend(done?),
                None => break,
            }
        }
        // Wake this process's workers at once for the queues that got a job ready now,
        // without waiting for the NOTIFY the insert trigger sends (that one still reaches
        // every other process).
        let ready: BTreeSet<&str> = jobs
            .iter()
            .zip(&answers)
            .filter(|(_, a)| !a.duplicate && a.state == JobState::Available)
            .map(|(j, _)| j.queue.as_str())
            .collect();
        for queue in ready {
            let _ = self.events.send(StoreEvent::JobsAvailable {
                queue: queue.to_string(),
            });
        }
        Ok(answers)
    }

    async fn fetch(&self, request: FetchRequest<'_>) -> Result<Vec<Job>> {
        let now = Utc::now();
        let rows = sqlx::query(queries::FETCH)
            .bind(request.queue)
            .bind(now)
            .bind(i64::from(request.limit))
            .bind(request.worker)
            .bind(after(now, request.lease))
            .fetch_all(&self.pool)
            .await?;
        let mut jobs = rows.iter().map(job_from_row).collect::<Result<Vec<_>>>()?;
        jobs.sort_by_key(|a| (a.priority, a.run_at, a.id));
        Ok(jobs)
    }

    async fn finish(&self, outcomes: Vec<Finish>) -> Result<u64> {
        if outcomes.is_empty() {
            return Ok(0);
        }
        let mut conn = self.pool.acquire().await?;
        let (applied, ready) = apply_finishes(&mut conn, &outcomes).await?;
        drop(conn);
        self.notify_queues(ready).await?;
        Ok(applied)
    }

    async fn heartbeat(&self, worker: &str, lease: Duration) -> Result<Vec<JobId>> {
        let rows = sqlx::query(queries::HEARTBEAT)
            .bind(after(Utc::now(), lease))
            .bind(worker)
            .fetch_all(&self.pool)
            .await?;
        let mut cancel = Vec::new();
        for row in rows {
            if row
                .try_get::<Option<DateTime<Utc>>, _>("cancel_requested_at")?
                .is_some()
            {
                cancel.push(JobId(row.try_get("id")?));
            }
        }
        Ok(cancel)
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>> {
        let row = sqlx::query("SELECT * FROM conveyor.jobs WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn list(&self, filter: &JobFilter, page: Page) -> Result<Vec<Job>> {
        check_page(&page)?;
        let mut qb = QueryBuilder::<Postgres>::new("SELECT * FROM conveyor.jobs WHERE true");
        push_filter(&mut qb, filter);
        if let Some(before) = page.before {
            qb.push(" AND id < ").push_bind(before.0);
        }
        qb.push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::from(page.limit));
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn count(&self, filter: &JobFilter) -> Result<u64> {
        let mut qb = QueryBuilder::<Postgres>::new("SELECT count(*) FROM conveyor.jobs WHERE true");
        push_filter(&mut qb, filter);
        let n: i64 = qb.build_query_scalar().fetch_one(&self.pool).await?;
        Ok(n as u64)
    }

    async fn retry(&self, id: JobId) -> Result<Job> {
        let row = sqlx::query(
            "UPDATE conveyor.jobs SET state = 'available', attempt = 0, run_at = $1, \
             finalized_at = NULL, lease_owner = NULL, lease_expires_at = NULL, \
             cancel_requested_at = NULL WHERE id = $2 AND state <> 'running' RETURNING *",
        )
        .bind(Utc::now())
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => {
                let job = job_from_row(&row)?;
                self.notify_queues([job.queue.clone()]).await?;
                Ok(job)
            }
            None => Err(self.refusal(id, "retry").await),
        }
    }

    async fn retry_matching(&self, filter: &JobFilter) -> Result<u64> {
        let mut qb = QueryBuilder::<Postgres>::new(
            "UPDATE conveyor.jobs SET state = 'available', attempt = 0, finalized_at = NULL, \
             lease_owner = NULL, lease_expires_at = NULL, cancel_requested_at = NULL, run_at = ",
        );
        qb.push_bind(Utc::now()).push(" WHERE state <> 'running'");
        push_filter(&mut qb, filter);
        qb.push(" RETURNING queue");
        let queues: Vec<String> = qb.build_query_scalar().fetch_all(&self.pool).await?;
        let n = queues.len() as u64;
        self.notify_queues(queues).await?;
        Ok(n)
    }

    async fn cancel(&self, id: JobId) -> Result<CancelResult> {
        let now = Utc::now();
        let mut tx = self.pool.begin().await?;
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM conveyor.jobs WHERE id = $1 FOR UPDATE")
                .bind(id.0)
                .fetch_optional(&mut *tx)
                .await?;
        let state: JobState = match state {
            Some(s) => s.parse()?,
            None => return Err(Error::NotFound(id)),
        };
        let result = if state.is_waiting() {
            sqlx::query(
                "UPDATE conveyor.jobs SET state = 'cancelled', finalized_at = $1 WHERE id = $2",
            )
            .bind(now)
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
            CancelResult::Cancelled
        } else if state == JobState::Running {
            sqlx::query(
                "UPDATE conveyor.jobs SET cancel_requested_at = coalesce(cancel_requested_at, $1) \
                 WHERE id = $2",
            )
            .bind(now)
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CANCEL_CHANNEL)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
            CancelResult::Requested
        } else {
            return Err(Error::WrongState {
                id,
                state,
                action: "cancel",
            });
        };
        tx.commit().await?;
        Ok(result)
    }

    async fn discard(&self, id: JobId) -> Result<()> {
        let done = sqlx::query("DELETE FROM conveyor.jobs WHERE id = $1 AND state <> 'running'")
            .bind(id.0)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(self.refusal(id, "discard").await)
        }
    }

    async fn purge(&self, filter: &JobFilter) -> Result<u64> {
        let mut qb = QueryBuilder::<Postgres>::new(
            "DELETE FROM conveyor.jobs WHERE state IN ('completed','cancelled','dead')",
        );
        push_filter(&mut qb, filter);
        Ok(qb.build().execute(&self.pool).await?.rows_affected())
    }

    async fn queue_stats(&self) -> Result<Vec<QueueStats>> {
        let now = Utc::now();
        let rows = sqlx::query(
            "SELECT queue, state, count(*) AS n FROM conveyor.jobs GROUP BY queue, state ORDER BY queue",
        )
        .fetch_all(&self.pool)
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
        let oldest = sqlx::query(
            "SELECT queue, min(run_at) AS oldest FROM conveyor.jobs \
             WHERE state IN ('available','scheduled','retryable') AND run_at <= $1 GROUP BY queue",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        for row in oldest {
            let queue: String = row.try_get("queue")?;
            let at: DateTime<Utc> = row.try_get("oldest")?;
            if let Some(s) = stats.iter_mut().find(|s| s.queue == queue) {
                s.oldest_available_age = (now - at).to_std().ok();
            }
        }
        Ok(stats)
    }

    async fn promote_due(&self, now: DateTime<Utc>, limit: u32) -> Result<u64> {
        let queues: Vec<String> = sqlx::query_scalar(queries::PROMOTE_DUE)
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        let n = queues.len() as u64;
        self.notify_queues(queues).await?;
        Ok(n)
    }

    async fn rescue_expired(
        &self,
        now: DateTime<Utc>,
        policy: &RetryPolicy,
        limit: u32,
    ) -> Result<RescueReport> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(queries::RESCUE_EXPIRED)
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
        let mut report = RescueReport::default();
        let mut finishes = Vec::with_capacity(rows.len());
        for row in &rows {
            let f = rescue_finish(
                JobId(row.try_get("id")?),
                row.try_get("attempt")?,
                row.try_get("max_attempts")?,
                row.try_get("lease_owner")?,
                row.try_get::<Option<DateTime<Utc>>, _>("attempted_at")?
                    .unwrap_or(now),
                row.try_get::<Option<DateTime<Utc>>, _>("cancel_requested_at")?
                    .is_some(),
                now,
                policy,
            );
            match f.state {
                JobState::Cancelled => report.cancelled += 1,
                JobState::Dead => report.dead += 1,
                _ => report.retried += 1,
            }
            finishes.push(f);
        }
        if !finishes.is_empty() {
            apply_finishes(&mut tx, &finishes).await?;
        }
        tx.commit().await?;
        Ok(report)
    }

    async fn prune(&self, now: DateTime<Utc>, policy: &RetentionPolicy, limit: u32) -> Result<u64> {
        let done = sqlx::query(queries::PRUNE)
            .bind(before(now, policy.completed))
            .bind(before(now, policy.cancelled))
            .bind(before(now, policy.dead))
            .bind(before(now, policy.idempotency))
            .bind(i64::from(limit))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }
}
