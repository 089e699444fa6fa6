//! The Postgres backend: production, and many worker processes on many machines.
//!
//! - Fetch is one statement: `FOR UPDATE SKIP LOCKED` picks a batch by priority then
//!   `run_at`, and the same statement claims it (state, attempt, lease).
//! - Enqueue, finish and rescue write whole batches with one `unnest` statement each.
//! - Wake-up: a statement-level trigger NOTIFYs `conveyor_jobs` with the queue name when
//!   ready jobs are inserted (by any client, including the SQL function `conveyor.enqueue`);
//!   cancel requests NOTIFY `conveyor_cancel`. One LISTEN connection per store forwards them
//!   to [`Store::subscribe`]; the runtime also polls, so a lost notification only costs a poll.
//! - Change events ([`StoreEvent::JobsChanged`]) on `conveyor_events`: inserts from the same
//!   insert trigger, finished attempts (completion, rescue) from the completion statement
//!   itself, operator actions and promotion from one more statement after them. Claims and
//!   heartbeats send nothing: a claim is announced in this process only. So the hot path
//!   pays one notification per completion batch, not per statement or per job
//!   (docs/decisions/0006-job-results-and-events.md). A store announces its own changes in
//!   process as soon as they commit, and marks what it sends with its origin, so its LISTEN
//!   task skips them when they come back: in process, a job's changes arrive in the order
//!   they were made, whichever process makes the next one.
//! - Transactional enqueue: [`enqueue_in`] and [`enqueue_many_in`] take the application's own
//!   connection or transaction, so the job exists iff that transaction commits.

mod meta;
mod pooler;
pub mod queries;

pub use self::pooler::Pooler;
use self::pooler::{Conn, Db, classify};

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, Postgres, QueryBuilder, Row};
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

use super::PgSessionSettings;
use super::{
    CancelResult, FetchRequest, Finish, JobChange, JobFilter, Page, QueueStats, RescueReport,
    RetentionPolicy, Store, StoreEvent, StoreOptions, check_migrations, check_page, rescue_finish,
    sql_from_states, sql_state_in,
};
use crate::clock::StoreClock;
use crate::error::{Error, Result};
use crate::job::{AttemptRecord, Enqueued, Job, JobId, JobState, NewJob, OperatorAction, Progress};
use crate::retry_policy::RetryPolicy;

/// Jobs per queue and state as the count triggers keep them (migration 0005): the folded
/// totals and the deltas not yet folded, one row each, to be summed.
const COUNTS: &str = "SELECT queue, state, n FROM conveyor.job_counts \
     UNION ALL SELECT queue, state, n FROM conveyor.job_count_deltas";

/// Rows per bulk INSERT statement on the caller's connection.
const INSERT_CHUNK: usize = 5000;
/// Rows per statement when a pooled bulk enqueue is split across connections.
const PARALLEL_CHUNK: usize = 1250;
/// Statements of one pooled bulk enqueue in flight at once (each on its own connection): the
/// server parses JSON and maintains indexes on as many cores as it has. A batch of up to
/// `PARALLEL_CHUNK` jobs is one statement on one connection.
const PARALLEL_INSERTS: usize = 4;
/// How old the measured offset to the server's clock may be before it is measured again.
const CLOCK_MAX_AGE: Duration = Duration::from_secs(10);
const JOBS_CHANNEL: &str = "conveyor_jobs";
const CANCEL_CHANNEL: &str = "conveyor_cancel";
/// Job state changes (`migrations/postgres/0004_results.sql` describes the payload).
const EVENTS_CHANNEL: &str = "conveyor_events";
/// Changes per `conveyor_events` notification: an entry is at most 47 bytes, so a payload
/// stays under NOTIFY's 8000-byte limit (the SQL that sends them uses the same number).
const ANNOUNCE_CHUNK: usize = 100;

/// The Postgres store. Cheap to clone; clones share the pool and the listener.
#[derive(Clone)]
pub struct PgStore {
    /// Every statement runs on this (see [`pooler`]).
    pool: Db,
    pooler: Pooler,
    /// No LISTEN task (transaction pooling without `listen_url`): this store's own wake-ups
    /// are delivered in process, other processes' are found by polling.
    polling: bool,
    events: broadcast::Sender<StoreEvent>,
    /// Marks this store's `conveyor_events` notifications (random per store), so its LISTEN
    /// task skips the changes it already announced in process.
    origin: std::sync::Arc<str>,
    /// The server's clock as seen from here, for the expiry times of shared records (computed
    /// here, since each statement returns the record it wrote).
    clock: std::sync::Arc<StoreClock>,
    /// Stops the LISTEN task when the last clone is dropped.
    _listener: std::sync::Arc<DropGuard>,
}

impl PgStore {
    /// Connects a pool to `url` and starts the LISTEN task.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Self> {
        let (url, pooler) = pooler_setting(url, options.pooler)?;
        let connect_options = pg_options(&url)?;
        probe(&url, &connect_options, pooler).await?;
        // No ping before each acquire: it would add a round trip to every call, and a broken
        // connection fails the call anyway, which every caller already retries or reports.
        let pool = PgPoolOptions::new()
            .test_before_acquire(false)
            .max_connections(options.max_connections.max(2))
            .acquire_timeout(Duration::from_secs(10));
        // Per-connection settings would leak to other clients through a transaction-mode
        // pooler: there the operator sets them on the role or the pooler (docs/operations.md).
        let session = match pooler {
            Pooler::Transaction => None,
            Pooler::None | Pooler::Session => options.pg_session.as_ref(),
        };
        let pool = with_session_settings(pool, session)
            .connect_with(connect_options)
            .await
            .map_err(|e| classify(explain_connect_error(&url, e), pooler))?;
        let (events, _) = broadcast::channel(4096);
        let stop = CancellationToken::new();
        let listen_on = match (&options.listen_url, pooler) {
            (Some(direct), _) => {
                let direct = pooler_setting(direct, Pooler::None)?.0;
                tracing::info!(
                    listen_url = %super::redact_url(&direct),
                    %pooler,
                    "wake-ups: LISTEN on database.listen_url"
                );
                // Lazy: an unreachable listen URL is retried by the LISTEN task (and logged),
                // while polling covers the gap. Two connections: a lost one is closed in the
                // background while its replacement connects.
                Some(
                    PgPoolOptions::new()
                        .max_connections(2)
                        .connect_lazy_with(pg_options(&direct)?),
                )
            }
            (None, Pooler::Transaction) => {
                tracing::info!(
                    %pooler,
                    "wake-ups: polling, no LISTEN (a transaction-mode pooler cannot carry it; set database.listen_url to a direct Postgres URL for instant wake-ups): new jobs are found within worker.poll_interval, cancel requests at the next heartbeat"
                );
                None
            }
            (None, Pooler::Session) => {
                tracing::info!(%pooler, "wake-ups: LISTEN through the session-mode pooler");
                Some(pool.clone())
            }
            (None, Pooler::None) => Some(pool.clone()),
        };
        let polling = listen_on.is_none();
        let origin: std::sync::Arc<str> = format!("{:016x}", rand::random::<u64>()).into();
        if let Some(listen_pool) = listen_on {
            tokio::spawn(listen(
                listen_pool,
                events.clone(),
                stop.clone(),
                origin.clone(),
            ));
        }
        Ok(Self {
            pool: Db::new(pool, pooler),
            pooler,
            polling,
            events,
            origin,
            clock: Default::default(),
            _listener: std::sync::Arc::new(stop.drop_guard()),
        })
    }

    /// Now on the server's clock, estimated from the offset measured at most
    /// [`CLOCK_MAX_AGE`] ago.
    pub(crate) async fn clock_now(&self) -> Result<DateTime<Utc>> {
        self.clock.now_fresh(self, CLOCK_MAX_AGE).await
    }

    /// The connection pool, for applications that share the database. Behind a
    /// transaction-mode pooler, statements on it must be unnamed (`.persistent(false)`) and
    /// inside a transaction; see docs/operations.md.
    pub fn pool(&self) -> &PgPool {
        self.pool.inner()
    }

    /// The pooler mode the store was opened with.
    pub fn pooler(&self) -> Pooler {
        self.pooler
    }

    /// Whether every migration this binary carries is applied, read without writing or
    /// locking anything (so a routine start needs no lock and works on a busy database).
    /// `false` also when something is off (a failed or unknown migration, a changed
    /// checksum): the full run then reports it.
    async fn migrations_current(&self, migrator: &sqlx::migrate::Migrator) -> Result<bool> {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(&self.pool)
            .await?;
        if !exists {
            return Ok(false);
        }
        let applied: HashMap<i64, (Vec<u8>, bool)> = sqlx::query_as::<_, (i64, Vec<u8>, bool)>(
            "SELECT version, checksum, success FROM _sqlx_migrations",
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|(v, sum, ok)| (v, (sum, ok)))
        .collect();
        for m in migrator.iter() {
            if m.migration_type.is_down_migration() {
                continue;
            }
            match applied.get(&m.version) {
                Some((sum, true)) if sum[..] == m.checksum[..] => {}
                _ => return Ok(false),
            }
        }
        // Every migration this binary knows is applied. Any others come from a newer release
        // that migrated the store first (a rolling upgrade, or a rollback of the binary): its
        // migrations only add, so this release runs on the schema as it is.
        Ok(true)
    }

    /// Applies pending migrations on a connection of its own, in one transaction that first
    /// takes sqlx's migration lock as a transaction-level advisory lock: unlike sqlx's
    /// session-level lock it cannot outlive the transaction on a pooler's server connection,
    /// and a second process waits for the first and then finds nothing to do.
    async fn apply_migrations(&self, mut migrator: sqlx::migrate::Migrator) -> Result<()> {
        migrator.set_locking(false);
        // Migrations of a newer release already applied are not this binary's to judge
        // (see `migrations_current`).
        migrator.set_ignore_missing(true);
        let options = self.pool.inner().connect_options();
        let mut conn = PgConnection::connect_with(&options).await?;
        let result = async {
            let mut tx = conn.begin().await?;
            // Behind a transaction-mode pooler the migrator's named statements live on the
            // server connection this transaction pins: start it clean and leave it clean.
            sqlx::raw_sql("DEALLOCATE ALL").execute(&mut *tx).await?;
            let database: String = sqlx::query_scalar("SELECT current_database()")
                .persistent(false)
                .fetch_one(&mut *tx)
                .await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .persistent(false)
                .bind(pooler::migration_lock_id(&database))
                .execute(&mut *tx)
                .await?;
            // `run` wants `Acquire` for every lifetime, which an async trait method cannot
            // prove; `run_direct` is what sqlx offers for that ("not general enough").
            migrator.run_direct(None, &mut *tx, false).await?;
            sqlx::raw_sql("DEALLOCATE ALL").execute(&mut *tx).await?;
            tx.commit().await?;
            Ok::<_, Error>(())
        }
        .await;
        let _ = conn.close().await;
        result
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
            if self.polling {
                for queue in queues {
                    let _ = self.events.send(StoreEvent::JobsAvailable { queue });
                }
            }
        }
        Ok(())
    }

    /// Announces this store's committed changes in this process. Those also NOTIFYed carry
    /// [`PgStore::origin`], so the LISTEN task skips them when they come back; claims are
    /// announced here only (a notification would cost every fetch).
    fn announce_here(&self, changes: Vec<JobChange>) {
        if !changes.is_empty() && self.events.receiver_count() > 0 {
            let _ = self.events.send(StoreEvent::JobsChanged {
                changes: changes.into(),
            });
        }
    }

    /// Announces an operator action's or a promotion's changes to every process (one more
    /// statement: these are not on the hot path) and, without LISTEN, to this one.
    async fn announce(&self, changes: Vec<JobChange>) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        sqlx::query(queries::ANNOUNCE)
            .bind(payloads(&self.origin, &changes))
            .execute(&self.pool)
            .await?;
        self.announce_here(changes);
        Ok(())
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

/// The pooler mode: `?pooler=` in the URL (taken out of it) or the configured one; both set
/// and different is an error. Returns the URL sqlx may see.
fn pooler_setting(url: &str, configured: Pooler) -> Result<(String, Pooler)> {
    let (url, from_url) = pooler::split_url(url)?;
    let pooler = match from_url {
        None => configured,
        Some(p) if configured == Pooler::None || configured == p => p,
        Some(p) => {
            return Err(Error::invalid(
                "database.pooler",
                format!(
                    "the URL says pooler={p} but database.pooler = \"{configured}\"; set one of them"
                ),
            ));
        }
    };
    Ok((url, pooler))
}

/// Connection options for `url`. sqlx sends `extra_float_digits=2` at startup by default,
/// which PgBouncer refuses unless listed in `ignore_startup_parameters`; Postgres 12 and
/// later already send the shortest exact text for floats at the default of 1, and Conveyor
/// reads floats in binary anyway, so it is left out.
///
/// TLS follows libpq: `sslmode` in the URL (or `PGSSLMODE`) decides, and without either the
/// default is `prefer` (TLS when the server offers it, unverified) — except to a loopback
/// address or a Unix socket, where encryption protects nothing and would cost about half
/// the enqueue rate, so the connection is plain.
fn pg_options(url: &str) -> Result<PgConnectOptions> {
    let options = url.parse::<PgConnectOptions>()?.extra_float_digits(None);
    let sslmode_given = std::env::var_os("PGSSLMODE").is_some()
        || url::Url::parse(url)
            .map(|u| u.query_pairs().any(|(k, _)| k == "sslmode"))
            .unwrap_or(true);
    if !sslmode_given && is_local(options.get_host()) {
        return Ok(options.ssl_mode(sqlx::postgres::PgSslMode::Disable));
    }
    Ok(options)
}

/// A loopback host or a Unix socket folder.
fn is_local(host: &str) -> bool {
    host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Sets `settings` on every new connection of the pool (the LISTEN connection included), in
/// one round trip, so nothing Conveyor runs inherits the server's isolation level or timeouts.
/// `None` (behind a transaction-mode pooler) sets nothing.
fn with_session_settings(
    pool: PgPoolOptions,
    settings: Option<&PgSessionSettings>,
) -> PgPoolOptions {
    let Some(settings) = settings else {
        return pool;
    };
    let sql = session_sql(settings);
    pool.after_connect(move |conn, _| {
        let sql = sql.clone();
        Box::pin(async move {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(conn)
                .await?;
            Ok(())
        })
    })
}

/// The statement [`with_session_settings`] runs: `set_config` per setting, with values that
/// are integers of milliseconds (nothing user-typed reaches the SQL text).
fn session_sql(settings: &PgSessionSettings) -> String {
    let ms = |d: Duration| d.as_millis().min(i32::MAX as u128);
    format!(
        "SELECT set_config('default_transaction_isolation', 'read committed', false), \
         set_config('statement_timeout', '{}', false), \
         set_config('lock_timeout', '{}', false), \
         set_config('idle_in_transaction_session_timeout', '{}', false), \
         CASE WHEN current_setting('server_version_num')::int >= 140000 \
           THEN set_config('idle_session_timeout', '0', false) END",
        ms(settings.statement_timeout),
        ms(settings.lock_timeout),
        ms(settings.idle_in_transaction_timeout),
    )
}

/// Adds what to do to TLS failures, the ones an operator meets first with a managed Postgres.
/// One connection made directly, before the pool: the pool retries a failed connect until its
/// acquire timeout and then reports only that it timed out, while a direct attempt reports at
/// once what went wrong (refused, unknown host, bad password, no such database).
async fn probe(url: &str, options: &PgConnectOptions, pooler: Pooler) -> Result<()> {
    use sqlx::Connection;
    let attempt = tokio::time::timeout(
        Duration::from_secs(10),
        sqlx::postgres::PgConnection::connect_with(options),
    )
    .await;
    match attempt {
        Ok(Ok(conn)) => {
            // Closing is a courtesy to the server; a failure here changes nothing.
            let _ = conn.close().await;
            Ok(())
        }
        Ok(Err(e)) => Err(classify(explain_connect_error(url, e), pooler)),
        Err(_) => Err(Error::Database(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer from {} within 10 s", super::redact_url(url)),
        )))),
    }
}

fn explain_connect_error(url: &str, e: sqlx::Error) -> Error {
    if let Some(db) = e.as_database_error()
        && db.code().as_deref() == Some("3D000")
    {
        return Error::NoDatabase(no_database_hint(url, db.message()));
    }
    // rustls' verdict arrives as an I/O error during the handshake or as a TLS error.
    let text = e.to_string();
    let hint = if text.contains("not valid for name") {
        Some(format!(
            "the server's TLS certificate does not name the host in the URL ({text}): with \
             sslmode=verify-full connect by a name the certificate lists ({})",
            super::redact_url(url)
        ))
    } else if text.contains("invalid peer certificate") {
        Some(format!(
            "the server's TLS certificate was not accepted ({text}): with sslmode=verify-ca or \
             verify-full, name the CA that signed it with sslrootcert=/path/ca.pem in the URL \
             ({}); with verify-full the URL's host must also be a name in the certificate",
            super::redact_url(url)
        ))
    } else if matches!(e, sqlx::Error::Tls(_)) {
        Some(format!(
            "TLS to Postgres failed ({text}); see docs/operations.md, TLS ({})",
            super::redact_url(url)
        ))
    } else {
        None
    };
    match hint {
        Some(hint) => Error::Database(sqlx::Error::Tls(hint.into())),
        None => e.into(),
    }
}

/// "database "x" does not exist", and the `createdb` command that makes it, for the URL's
/// host, port, user and database.
fn no_database_hint(url: &str, message: &str) -> String {
    let parsed = url::Url::parse(url).ok();
    let mut command = String::from("createdb");
    if let Some(u) = &parsed {
        if let Some(host) = u.host_str().filter(|h| !h.is_empty()) {
            command.push_str(&format!(" -h {host}"));
        }
        if let Some(port) = u.port() {
            command.push_str(&format!(" -p {port}"));
        }
        if !u.username().is_empty() {
            command.push_str(&format!(" -U {}", u.username()));
        }
    }
    let name = parsed
        .as_ref()
        .map(|u| u.path().trim_start_matches('/').to_string())
        .filter(|n| !n.is_empty());
    match name {
        Some(name) => format!(
            "{message}: create it with `{command} {name}`, or point database.url at an existing database"
        ),
        None => format!("{message}: name an existing database in database.url"),
    }
}

/// Forwards NOTIFYs to subscribers until `stop`, reconnecting after errors.
async fn listen(
    pool: PgPool,
    events: broadcast::Sender<StoreEvent>,
    stop: CancellationToken,
    origin: std::sync::Arc<str>,
) {
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
        if let Err(e) = listener
            .listen_all([JOBS_CHANNEL, CANCEL_CHANNEL, EVENTS_CHANNEL])
            .await
        {
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
                    } else if n.channel() == EVENTS_CHANNEL {
                        // `<origin>|<entries>`; this store's own were announced at commit.
                        let (from, entries) = n.payload().split_once('|').unwrap_or(("", ""));
                        if from == &*origin || entries.is_empty() {
                            continue;
                        }
                        StoreEvent::JobsChanged {
                            changes: JobChange::decode(entries).into(),
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

/// `conveyor_events` payloads for `changes` made by the store `origin`, [`ANNOUNCE_CHUNK`]
/// changes each: `<origin>|<entries>` (`migrations/postgres/0004_results.sql`).
fn payloads(origin: &str, changes: &[JobChange]) -> Vec<String> {
    changes
        .chunks(ANNOUNCE_CHUNK)
        .map(|c| format!("{origin}|{}", JobChange::encode(c)))
        .collect()
}

/// Jobs made `available` (by id, with their queues): their changes, and the queues to wake.
fn available(rows: Vec<(Uuid, String)>) -> (Vec<JobChange>, Vec<String>) {
    rows.into_iter()
        .map(|(id, queue)| {
            (
                JobChange {
                    id: JobId(id),
                    state: JobState::Available,
                },
                queue,
            )
        })
        .unzip()
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
        result: row.try_get("result")?,
        progress: row
            .try_get::<Option<sqlx::types::Json<Progress>>, _>("progress")?
            .map(|p| p.0),
    })
}

fn after(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    super::after(now, d)
}

/// A lease or delay as a Postgres interval, added to the store's `now()` in a statement.
/// A lease as a Postgres interval, capped by [`super::lease_length`].
fn interval(d: Duration) -> Result<sqlx::postgres::types::PgInterval> {
    let d = super::lease_length(d);
    sqlx::postgres::types::PgInterval::try_from(d).map_err(|e| {
        Error::invalid(
            "lease",
            format!("{d:?} does not fit a Postgres interval ({e}); use a shorter duration"),
        )
    })
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
        // The first term is the jobs_errors index's predicate (migration 0006): it lets the
        // planner read only the jobs that have an error.
        qb.push(" AND attempts @? '$[*].error'");
        if super::json_keeps_as_is(text) {
            // A cheap first pass over the history's text: it holds the words as they are
            // unless JSON escapes them. The exact test below decides.
            qb.push(" AND attempts::text ILIKE ")
                .push_bind(pattern.clone())
                .push(" ESCAPE '\\'");
        }
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
    let mut answers = Vec::with_capacity(jobs.len());
    let mut conn = Conn::borrowed(conn);
    for chunk in jobs.chunks(INSERT_CHUNK) {
        // No origin: the jobs exist once the caller commits, and every process (this one's
        // LISTEN task included) hears of them then.
        answers.extend(insert_chunk(&mut conn, chunk, "").await?);
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

async fn insert_pooled(pool: &Db, chunk: &[NewJob], origin: &str) -> Result<Vec<Enqueued>> {
    // One transaction, so a serialization failure or deadlock undoes the whole chunk and the
    // chunk can simply be sent again.
    retry_conflicts("enqueue", || async move {
        let mut tx = pool.begin().await?;
        let answers = insert_chunk(&mut tx, chunk, origin).await?;
        tx.commit().await?;
        Ok(answers)
    })
    .await
}

/// Runs `op` again when Postgres aborted it for a serialization failure (SQLSTATE 40001) or a
/// deadlock (40P01), with a short growing pause. Only for operations that are one statement or
/// one transaction of their own, which such an abort undid entirely, and that are idempotent
/// by their `WHERE` clauses: fetch, completion, rescue, a pooled enqueue chunk. Under the
/// session settings Conveyor sets (read committed) only deadlocks remain possible; serialization
/// failures happen when those settings are off (behind a pooler) and the server's default
/// isolation is `repeatable read` or `serializable`.
async fn retry_conflicts<T, F, Fut>(what: &'static str, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    const TRIES: u32 = 10;
    let mut pause = Duration::from_millis(2);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match op().await {
            Err(e) if attempt < TRIES && is_conflict(&e) => {
                tracing::debug!(operation = what, attempt, error = %e, "retrying after a serialization conflict");
                // Jitter, so the transactions that collided do not collide again in step.
                let jitter = rand::random_range(0..=pause.as_micros() as u64);
                tokio::time::sleep(pause + Duration::from_micros(jitter)).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

/// A serialization failure or deadlock: the statement or transaction was undone as a whole.
fn is_conflict(e: &Error) -> bool {
    match e {
        Error::Database(sqlx::Error::Database(db)) => {
            matches!(db.code().as_deref(), Some("40001" | "40P01"))
        }
        _ => false,
    }
}

/// Inserts one chunk. Due times, `created_at` and scheduled-or-available are decided by the
/// statement on the store's clock (`now()`: the transaction's start on the caller's
/// transaction), so a client whose clock is off neither delays nor advances a job.
async fn insert_chunk(
    conn: &mut Conn<'_>,
    chunk: &[NewJob],
    origin: &str,
) -> Result<Vec<Enqueued>> {
    let n = chunk.len();
    let mut ids = Vec::with_capacity(n);
    let mut queues = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut args = Vec::with_capacity(n);
    let mut priorities = Vec::with_capacity(n);
    let mut max_attempts = Vec::with_capacity(n);
    let mut run_ats = Vec::with_capacity(n);
    let mut delays = Vec::with_capacity(n);
    let longest_delay_us = (super::LATEST - Utc::now() - chrono::Duration::days(1))
        .num_microseconds()
        .unwrap_or(i64::MAX)
        .max(0);
    let mut keys = Vec::with_capacity(n);
    let mut tags = Vec::with_capacity(n);
    let mut metadata = Vec::with_capacity(n);
    for job in chunk {
        ids.push(job.id.unwrap_or_else(JobId::new).0);
        queues.push(job.queue.as_str());
        kinds.push(job.kind.as_str());
        args.push(serde_json::to_string(&job.args)?);
        priorities.push(job.priority);
        max_attempts.push(job.max_attempts);
        run_ats.push(job.run_at);
        // Microseconds after the store's now(); 0 for a job due now. A delay past
        // `store::LATEST` saturates there (less a day for clocks that differ), so the
        // statement's interval arithmetic never overflows.
        delays.push(job.delay.map_or(0, |d| {
            i64::try_from(d.as_micros())
                .unwrap_or(i64::MAX)
                .min(longest_delay_us)
        }));
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
        // Keys first, in the same statement: a keyed job is inserted only if its key row
        // was, so a key never has two holders. An id that already exists fails the whole
        // statement (and with it the key rows), reported as bad input below.
        let inserted: HashMap<Uuid, String> = sqlx::query_as::<_, (Uuid, String)>(queries::ENQUEUE)
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
            .bind(pending.iter().map(|&i| delays[i]).collect::<Vec<_>>())
            .bind(pending.iter().map(|&i| max_attempts[i]).collect::<Vec<_>>())
            .bind(pending.iter().map(|&i| run_ats[i]).collect::<Vec<_>>())
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
            .bind(origin)
            .fetch_all(&mut *conn)
            .await
            .map_err(existing_id)?
            .into_iter()
            .collect();

        let mut dup_keys = Vec::new();
        for &i in &pending {
            if let Some(state) = inserted.get(&ids[i]) {
                answers[i] = Some(Enqueued {
                    id: JobId(ids[i]),
                    state: state.parse()?,
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

/// Applies outcomes in one statement, which also NOTIFYs the changes marked with `origin`;
/// returns (applied, queues with a job ready now, the changes).
async fn apply_finishes(
    conn: &mut Conn<'_>,
    outcomes: &[Finish],
    origin: &str,
) -> Result<(u64, Vec<String>, Vec<JobChange>)> {
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
    let query = if sorted.iter().any(|f| f.result.is_some()) {
        let results: Vec<Option<String>> = sorted
            .iter()
            .map(|f| f.result.as_ref().map(serde_json::to_string).transpose())
            .collect::<Result<_, _>>()?;
        sqlx::query(queries::FINISH_WITH_RESULTS)
            .bind(ids)
            .bind(attempts)
            .bind(states)
            .bind(run_ats)
            .bind(finalized)
            .bind(deltas)
            .bind(records)
            .bind(results)
            .bind(origin)
    } else {
        sqlx::query(queries::FINISH)
            .bind(ids)
            .bind(attempts)
            .bind(states)
            .bind(run_ats)
            .bind(finalized)
            .bind(deltas)
            .bind(records)
            .bind(origin)
    };
    let rows = query.fetch_all(&mut *conn).await?;
    let mut ready = Vec::new();
    let mut changes = Vec::with_capacity(rows.len());
    for row in &rows {
        let state: JobState = row.try_get::<&str, _>("state")?.parse()?;
        if state == JobState::Available {
            ready.push(row.try_get("queue")?);
        }
        changes.push(JobChange {
            id: JobId(row.try_get("id")?),
            state,
        });
    }
    Ok((rows.len() as u64, ready, changes))
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
        let migrator = sqlx::migrate!("migrations/postgres");
        let current = self
            .migrations_current(&migrator)
            .await
            .map_err(|e| classify(e, self.pooler))?;
        if current {
            return Ok(());
        }
        self.apply_migrations(migrator)
            .await
            .map_err(|e| classify(e, self.pooler))
    }

    async fn now(&self) -> Result<DateTime<Utc>> {
        Ok(sqlx::query_scalar("SELECT now()")
            .fetch_one(&self.pool)
            .await?)
    }

    async fn ping(&self) -> Result<()> {
        let latest = sqlx::migrate!("migrations/postgres")
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
        let parallel = PARALLEL_INSERTS
            .min(self.pool.options().get_max_connections() as usize / 2)
            .max(1);
        let mut chunks = jobs.chunks(PARALLEL_CHUNK);
        let mut in_flight = FuturesOrdered::new();
        let mut answers = Vec::with_capacity(jobs.len());
        loop {
            while in_flight.len() < parallel {
                let Some(chunk) = chunks.next() else { break };
                in_flight.push_back(insert_pooled(&self.pool, chunk, &self.origin));
            }
            match in_flight.next().await {
                Some(done) => answers.extend(done?),
                None => break,
            }
        }
        // Announced before the wake-up below, so a listener hears of a job before this
        // process's workers can claim it.
        self.announce_here(
            answers
                .iter()
                .filter(|a| !a.duplicate)
                .map(|a| JobChange {
                    id: a.id,
                    state: a.state,
                })
                .collect(),
        );
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
        // Due-ness, the claim's time and the lease are all on the store's clock (`now()`),
        // never the worker's: a worker whose clock is behind must not hand out leases that
        // everyone else sees as expired, nor one ahead claim jobs before they are due.
        let request = &request;
        let rows = retry_conflicts("fetch", || async move {
            Ok(sqlx::query(queries::FETCH)
                .bind(request.queue)
                .bind(i64::from(request.limit))
                .bind(request.worker)
                .bind(interval(request.lease)?)
                .fetch_all(&self.pool)
                .await?)
        })
        .await?;
        let mut jobs = rows.iter().map(job_from_row).collect::<Result<Vec<_>>>()?;
        jobs.sort_by_key(|a| (a.priority, a.run_at, a.id));
        self.announce_here(
            jobs.iter()
                .map(|j| JobChange {
                    id: j.id,
                    state: JobState::Running,
                })
                .collect(),
        );
        Ok(jobs)
    }

    async fn finish(&self, outcomes: Vec<Finish>) -> Result<u64> {
        if outcomes.is_empty() {
            return Ok(0);
        }
        let outcomes = &outcomes;
        let (applied, ready, changes) = retry_conflicts("finish", || async move {
            let mut conn = self.pool.acquire().await?;
            let done = apply_finishes(&mut conn, outcomes, &self.origin).await?;
            conn.commit().await?;
            Ok(done)
        })
        .await?;
        self.notify_queues(ready).await?;
        self.announce_here(changes);
        Ok(applied)
    }

    async fn report_progress(&self, id: JobId, progress: &Progress) -> Result<bool> {
        let done = sqlx::query(queries::REPORT_PROGRESS)
            .bind(id.0)
            .bind(serde_json::to_string(progress)?)
            .bind(progress.attempt)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn heartbeat(&self, worker: &str, held: &[JobId], lease: Duration) -> Result<Vec<JobId>> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        // SKIP LOCKED: a row locked now is being completed or rescued; waiting for it could
        // deadlock with a completion batch, and the lease of a job that is finishing needs no
        // extension. A running job skipped now is extended at the next beat.
        let ids: Vec<uuid::Uuid> = held.iter().map(|id| id.0).collect();
        let rows = sqlx::query(queries::HEARTBEAT)
            .bind(interval(lease)?)
            .bind(worker)
            .bind(ids)
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
        if filter.counts_by_queue_and_state() {
            let mut qb = QueryBuilder::<Postgres>::new(format!(
                "SELECT coalesce(sum(n), 0)::bigint FROM ({COUNTS}) c WHERE true"
            ));
            if !filter.states.is_empty() {
                qb.push(" AND ").push(sql_state_in(&filter.states));
            }
            if let Some(queue) = &filter.queue {
                qb.push(" AND queue = ").push_bind(queue.clone());
            }
            let n: i64 = qb.build_query_scalar().fetch_one(&self.pool).await?;
            return Ok(n.max(0) as u64);
        }
        let mut qb = QueryBuilder::<Postgres>::new("SELECT count(*) FROM conveyor.jobs WHERE true");
        push_filter(&mut qb, filter);
        let n: i64 = qb.build_query_scalar().fetch_one(&self.pool).await?;
        Ok(n as u64)
    }

    async fn retry(&self, id: JobId) -> Result<Job> {
        let sql = format!(
            "UPDATE conveyor.jobs SET state = 'available', attempt = 0, run_at = now(), \
             finalized_at = NULL, lease_owner = NULL, lease_expires_at = NULL, \
             cancel_requested_at = NULL, result = NULL, progress = NULL \
             WHERE id = $1 AND {} RETURNING *",
            sql_from_states(OperatorAction::Retry)
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => {
                let job = job_from_row(&row)?;
                self.notify_queues([job.queue.clone()]).await?;
                self.announce(vec![JobChange {
                    id: job.id,
                    state: job.state,
                }])
                .await?;
                Ok(job)
            }
            None => Err(self.refusal(id, OperatorAction::Retry).await),
        }
    }

    async fn retry_matching(&self, filter: &JobFilter) -> Result<u64> {
        let mut qb = QueryBuilder::<Postgres>::new(format!(
            "UPDATE conveyor.jobs SET state = 'available', attempt = 0, finalized_at = NULL, \
             lease_owner = NULL, lease_expires_at = NULL, cancel_requested_at = NULL, \
             result = NULL, progress = NULL, run_at = now() WHERE {}",
            sql_from_states(OperatorAction::Retry)
        ));
        push_filter(&mut qb, filter);
        qb.push(" RETURNING id, queue");
        let rows: Vec<(Uuid, String)> = qb.build_query_as().fetch_all(&self.pool).await?;
        let n = rows.len() as u64;
        let (changes, queues) = available(rows);
        self.notify_queues(queues).await?;
        self.announce(changes).await?;
        Ok(n)
    }

    async fn cancel(&self, id: JobId) -> Result<CancelResult> {
        let mut tx = self.pool.begin().await?;
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM conveyor.jobs WHERE id = $1 FOR UPDATE")
                .bind(id.0)
                .fetch_optional(&mut tx)
                .await?;
        let state: JobState = match state {
            Some(s) => s.parse()?,
            None => return Err(Error::NotFound(id)),
        };
        let result = if OperatorAction::CANCEL_AT_ONCE.contains(&state) {
            sqlx::query(
                "UPDATE conveyor.jobs SET state = 'cancelled', finalized_at = now() WHERE id = $1",
            )
            .bind(id.0)
            .execute(&mut tx)
            .await?;
            sqlx::query(queries::ANNOUNCE)
                .bind(payloads(
                    &self.origin,
                    &[JobChange {
                        id,
                        state: JobState::Cancelled,
                    }],
                ))
                .execute(&mut tx)
                .await?;
            CancelResult::Cancelled
        } else if OperatorAction::CANCEL_BY_REQUEST.contains(&state) {
            sqlx::query(
                "UPDATE conveyor.jobs SET cancel_requested_at = coalesce(cancel_requested_at, now()) \
                 WHERE id = $1",
            )
            .bind(id.0)
            .execute(&mut tx)
            .await?;
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CANCEL_CHANNEL)
                .bind(id.to_string())
                .execute(&mut tx)
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
        if self.polling && result == CancelResult::Requested {
            let _ = self.events.send(StoreEvent::CancelRequested { id });
        }
        if result == CancelResult::Cancelled {
            self.announce_here(vec![JobChange {
                id,
                state: JobState::Cancelled,
            }]);
        }
        Ok(result)
    }

    async fn discard(&self, id: JobId) -> Result<()> {
        let sql = format!(
            "DELETE FROM conveyor.jobs WHERE id = $1 AND {}",
            sql_from_states(OperatorAction::Discard)
        );
        let done = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(self.refusal(id, OperatorAction::Discard).await)
        }
    }

    async fn purge(&self, filter: &JobFilter) -> Result<u64> {
        let mut qb = QueryBuilder::<Postgres>::new(format!(
            "DELETE FROM conveyor.jobs WHERE {}",
            sql_from_states(OperatorAction::Purge)
        ));
        push_filter(&mut qb, filter);
        Ok(qb.build().execute(&self.pool).await?.rows_affected())
    }

    async fn queue_stats(&self) -> Result<Vec<QueueStats>> {
        // Fold first unless another reader is folding: many dashboards open at once must not
        // queue behind each other's folds. The sum below is exact either way.
        sqlx::query(
            "SELECT CASE WHEN pg_try_advisory_xact_lock(hashtext('conveyor.fold_job_counts')) \
             THEN conveyor.fold_job_counts() ELSE 0 END",
        )
        .execute(&self.pool)
        .await?;
        let sql = format!(
            "SELECT queue, state, sum(n)::bigint AS n FROM ({COUNTS}) c \
             GROUP BY queue, state HAVING sum(n) > 0 ORDER BY queue"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
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
            "SELECT queue, now() - min(run_at) AS age FROM conveyor.jobs \
             WHERE state IN ('available','scheduled','retryable') AND run_at <= now() GROUP BY queue",
        )
        .fetch_all(&self.pool)
        .await?;
        for row in oldest {
            let queue: String = row.try_get("queue")?;
            let age: sqlx::postgres::types::PgInterval = row.try_get("age")?;
            if let Some(s) = stats.iter_mut().find(|s| s.queue == queue) {
                // The difference of two timestamps has days and microseconds, never months.
                let micros = age.microseconds + i64::from(age.days) * 86_400_000_000;
                s.oldest_available_age = u64::try_from(micros).ok().map(Duration::from_micros);
            }
        }
        Ok(stats)
    }

    async fn fold_counts(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT conveyor.fold_job_counts()")
            .fetch_one(&self.pool)
            .await?;
        Ok(n as u64)
    }

    async fn finished_groups(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<crate::stats::FinishedGroup>> {
        use crate::stats::{GroupBuilder, postgres_bucket_sql};
        // Grouped in the database: a minute of a busy store is a million rows, the answer a
        // few hundred. `finalized_at` ranges use the jobs_finalized index.
        let run = postgres_bucket_sql("finalized_at - attempted_at");
        let wait = postgres_bucket_sql("attempted_at - run_at");
        let sql = format!(
            "SELECT queue, kind, state, \
                    CASE WHEN attempted_at IS NULL THEN NULL ELSE {run} END AS rb, \
                    CASE WHEN attempted_at IS NULL THEN NULL ELSE {wait} END AS wb, \
                    count(*) AS n \
             FROM conveyor.jobs \
             WHERE finalized_at >= $1 AND finalized_at < $2 \
             GROUP BY 1, 2, 3, 4, 5"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(from)
            .bind(to)
            .fetch_all(&self.pool)
            .await?;
        let mut groups = GroupBuilder::default();
        for row in rows {
            let queue: String = row.try_get("queue")?;
            let kind: String = row.try_get("kind")?;
            let state: JobState = row.try_get::<String, _>("state")?.parse()?;
            let n: i64 = row.try_get("n")?;
            groups.add(
                &queue,
                &kind,
                state,
                row.try_get("rb")?,
                row.try_get("wb")?,
                n as u64,
            );
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
        use crate::stats::{ArgGroupBuilder, postgres_bucket_sql, valid_arg_field};
        if !valid_arg_field(field) {
            return Err(Error::invalid(
                "field",
                format!("`{field}` is not an args field name: use letters, digits and `_`"),
            ));
        }
        let run = postgres_bucket_sql("finalized_at - attempted_at");
        let sql = format!(
            "SELECT CASE WHEN jsonb_typeof(args -> $3) = 'string' THEN args ->> $3 END AS v, state, \
                    CASE WHEN attempted_at IS NULL THEN NULL ELSE {run} END AS rb, \
                    count(*) AS n, sum(attempt)::int8 AS a \
             FROM conveyor.jobs \
             WHERE finalized_at >= $1 AND finalized_at < $2 AND kind = $4 \
             GROUP BY 1, 2, 3"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(from)
            .bind(to)
            .bind(field)
            .bind(kind)
            .fetch_all(&self.pool)
            .await?;
        let mut groups = ArgGroupBuilder::default();
        for row in rows {
            let value: Option<String> = row.try_get("v")?;
            let state: JobState = row.try_get::<String, _>("state")?.parse()?;
            let n: i64 = row.try_get("n")?;
            let a: i64 = row.try_get("a")?;
            groups.add(
                value.as_deref(),
                state,
                row.try_get("rb")?,
                n as u64,
                a.max(0) as u64,
            );
        }
        Ok(groups.finish())
    }

    async fn promote_due(&self, now: DateTime<Utc>, limit: u32) -> Result<u64> {
        let rows: Vec<(Uuid, String)> = sqlx::query_as(queries::PROMOTE_DUE)
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        let n = rows.len() as u64;
        let (changes, queues) = available(rows);
        self.notify_queues(queues).await?;
        self.announce(changes).await?;
        Ok(n)
    }

    async fn rescue_expired(
        &self,
        now: DateTime<Utc>,
        policy: &RetryPolicy,
        limit: u32,
    ) -> Result<RescueReport> {
        let (report, changes) = retry_conflicts("rescue", || {
            rescue_once(&self.pool, now, policy, limit, &self.origin)
        })
        .await?;
        self.announce_here(changes);
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

/// One rescue pass in one transaction (see [`Store::rescue_expired`]).
async fn rescue_once(
    pool: &Db,
    now: DateTime<Utc>,
    policy: &RetryPolicy,
    limit: u32,
    origin: &str,
) -> Result<(RescueReport, Vec<JobChange>)> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(queries::RESCUE_EXPIRED)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&mut tx)
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
        report.count(&f);
        finishes.push(f);
    }
    let mut changes = Vec::new();
    if !finishes.is_empty() {
        // The completion statement announces these changes to every process.
        changes = apply_finishes(&mut tx, &finishes, origin).await?.2;
    }
    tx.commit().await?;
    Ok((report, changes))
}

#[cfg(test)]
mod tests {
    use sqlx::postgres::PgSslMode;

    use super::pg_options;

    #[test]
    fn tls_follows_the_url_and_is_off_only_for_local_servers_by_default() {
        if std::env::var_os("PGSSLMODE").is_some() {
            return;
        }
        let mode = |url: &str| pg_options(url).unwrap().get_ssl_mode();
        assert!(matches!(
            mode("postgres://u@127.0.0.1:5432/db"),
            PgSslMode::Disable
        ));
        assert!(matches!(
            mode("postgres://u@localhost/db"),
            PgSslMode::Disable
        ));
        assert!(matches!(
            mode("postgres://u@[::1]:5432/db"),
            PgSslMode::Disable
        ));
        assert!(matches!(
            mode("postgres://u@db.example.com/db"),
            PgSslMode::Prefer
        ));
        assert!(matches!(
            mode("postgres://u@127.0.0.1/db?sslmode=require"),
            PgSslMode::Require
        ));
        assert!(matches!(
            mode("postgres://u@db.example.com/db?sslmode=disable"),
            PgSslMode::Disable
        ));
    }
}
