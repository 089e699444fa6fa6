//! The store: one trait ([`Store`]) over the backends that keep jobs.
//!
//! - [`sqlite`]: the embedded default (one file, WAL, in-process wake-up).
//! - [`postgres`]: production and many machines (`FOR UPDATE SKIP LOCKED` fetch, LISTEN/NOTIFY
//!   wake-up, transactional enqueue with the application's own connection).
//! - [`redis`]: the highest throughput (one Lua script per step, keys hash-tagged per queue
//!   for Redis Cluster, PUBLISH wake-up).
//!
//! The runtime only ever talks to `dyn Store`; [`connect`] picks the backend from a URL.
//! Every backend passes the conformance suite in `tests/`.

pub mod feed;
pub mod meta;
pub mod postgres;
pub mod redis;
pub mod sqlite;
pub mod wait;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

pub use self::meta::MetaStore;
pub use self::postgres::Pooler;
use crate::error::{Error, Result};
use crate::job::{AttemptRecord, Enqueued, Job, JobId, JobState, NewJob, OperatorAction, Progress};
use crate::retry_policy::RetryPolicy;

/// Connection settings shared by the backends.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Pool size.
    pub max_connections: u32,
    /// Postgres: the connection pooler in front of the database, if any (docs/operations.md,
    /// "PgBouncer"). `?pooler=` in the URL says the same.
    pub pooler: Pooler,
    /// Postgres: a direct URL (not through the pooler) for LISTEN. Without one, a store behind
    /// a transaction-mode pooler polls instead.
    pub listen_url: Option<String>,
    /// Postgres: the settings Conveyor sets on each of its own connections instead of
    /// inheriting the server's, role's or database's defaults. `None` sets nothing: behind a
    /// transaction-mode pooler a per-connection setting would leak to other clients, so there
    /// the operator sets them on the pooler or the role (docs/operations.md, Server settings).
    pub pg_session: Option<PgSessionSettings>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_connections: 10,
            pooler: Pooler::None,
            listen_url: None,
            pg_session: Some(PgSessionSettings::default()),
        }
    }
}

/// What Conveyor's own Postgres connections run with, whatever the server's defaults say.
///
/// The isolation level is always `read committed`: the fetch (`FOR UPDATE SKIP LOCKED`), the
/// completion and the rescue are written for it, and under `serializable` concurrent workers
/// fail each other with "could not serialize access". The timeouts are Conveyor's own so a
/// server default meant for interactive sessions (a 1 s `statement_timeout`, say) does not
/// cancel a bulk enqueue, and so a stuck Conveyor process cannot hold locks forever.
/// A zero duration turns that timeout off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgSessionSettings {
    /// `statement_timeout`: the longest any one statement may run (default 5 minutes, long
    /// enough for a migration over a large table).
    pub statement_timeout: Duration,
    /// `lock_timeout`: the longest a statement waits for a lock (default 0: wait, bounded by
    /// `statement_timeout`; migrations wait on an advisory lock while another process migrates).
    pub lock_timeout: Duration,
    /// `idle_in_transaction_session_timeout`: how long a transaction may sit idle before the
    /// server ends the session (default 1 minute; Conveyor's own transactions never wait on
    /// anything but the database, so only a stuck process hits it).
    pub idle_in_transaction_timeout: Duration,
}

impl Default for PgSessionSettings {
    fn default() -> Self {
        Self {
            statement_timeout: Duration::from_secs(300),
            lock_timeout: Duration::ZERO,
            idle_in_transaction_timeout: Duration::from_secs(60),
        }
    }
}

/// Opens the store a URL names (`sqlite://file.db`, `sqlite::memory:`, `postgres://…` with
/// libpq's `sslmode`/`sslrootcert`/`sslcert`/`sslkey`, `redis://host:6379/0?prefix=conveyor`
/// or `rediss://…?tls_ca_file=…`) and applies its migrations.
pub async fn connect(url: &str, options: StoreOptions) -> Result<Arc<dyn Store>> {
    let store: Arc<dyn Store> = if url.starts_with("sqlite:") {
        Arc::new(sqlite::SqliteStore::connect(url, &options).await?)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Arc::new(postgres::PgStore::connect(url, &options).await?)
    } else if url.starts_with("redis://") || url.starts_with("rediss://") {
        Arc::new(self::redis::RedisStore::connect(url, &options).await?)
    } else {
        return Err(Error::BadUrl {
            url: redact_url(url),
            reason: "unknown scheme".into(),
        });
    };
    store.migrate().await?;
    Ok(store)
}

/// Makes ring the process's rustls crypto provider, once. sqlx names its provider itself, but
/// the redis crate asks rustls for the process default, which rustls can only pick on its own
/// while exactly one provider is compiled in: installing it keeps `rediss://` working if
/// another dependency ever enables a second one.
pub(crate) fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // An error means a provider is installed already, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The URL with any password replaced by `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let creds = &url[scheme_end + 3..at];
            match creds.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &creds[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// What the runtime writes back when an attempt ends (or is given back). Applied only if the
/// job is still `running` at `attempt`, so a late write from a worker whose lease was rescued
/// changes nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct Finish {
    /// The job.
    pub id: JobId,
    /// The attempt this outcome belongs to.
    pub attempt: i32,
    /// The next state: completed, retryable, scheduled (snooze), available (released),
    /// cancelled or dead.
    pub state: JobState,
    /// The new `run_at` for retryable/scheduled/available; ignored for terminal states.
    pub run_at: Option<DateTime<Utc>>,
    /// Added to `attempt`: -1 when the attempt should not count (snooze, shutdown release).
    pub attempt_delta: i32,
    /// Appended to the attempt history.
    pub record: AttemptRecord,
    /// The handler's result, kept with a `completed` job (checked against the size limit
    /// before it gets here, [`crate::job::check_result`]). `None` writes nothing: a job
    /// without a result costs the completion nothing.
    pub result: Option<serde_json::Value>,
}

impl Finish {
    /// Whether `job`, read back after a [`Store::finish`] that applied fewer outcomes than it
    /// was given, shows this outcome: its history holds this attempt's record, written by
    /// this worker at this time. A `false` means the lease had ended first (the job was
    /// rescued, perhaps claimed again, or finished) and the outcome changed nothing.
    pub fn landed(&self, job: &Job) -> bool {
        job.attempts.iter().any(|a| {
            a.attempt == self.attempt
                && a.outcome == self.record.outcome
                && a.worker == self.record.worker
                && (a.finished_at - self.record.finished_at)
                    .num_milliseconds()
                    .abs()
                    < 1
        })
    }
}

/// What a fetch claims.
#[derive(Clone, Debug)]
pub struct FetchRequest<'a> {
    /// Queue to claim from.
    pub queue: &'a str,
    /// At most this many jobs.
    pub limit: u32,
    /// The claiming worker's id (becomes `lease_owner`).
    pub worker: &'a str,
    /// Lease length; the worker's heartbeat renews it.
    pub lease: Duration,
}

/// Which jobs a listing or bulk operation touches. Empty fields match everything.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JobFilter {
    /// Any of these states (empty: all).
    #[serde(default)]
    pub states: Vec<JobState>,
    /// Exactly this queue.
    pub queue: Option<String>,
    /// Exactly this kind.
    pub kind: Option<String>,
    /// Has this tag.
    pub tag: Option<String>,
    /// Created at or after.
    pub created_after: Option<DateTime<Utc>>,
    /// Created before.
    pub created_before: Option<DateTime<Utc>>,
    /// Some attempt's error message or cause contains this text (case-insensitive).
    pub error_contains: Option<String>,
    /// Only these ids (empty: any).
    #[serde(default)]
    pub ids: Vec<JobId>,
}

impl JobFilter {
    /// True when the filter names nothing but states and a queue: a count the per-queue
    /// totals answer without reading jobs.
    pub fn counts_by_queue_and_state(&self) -> bool {
        self.kind.is_none()
            && self.tag.is_none()
            && self.created_after.is_none()
            && self.created_before.is_none()
            && self.error_contains.is_none()
            && self.ids.is_empty()
    }

    /// Jobs in one state.
    pub fn state(state: JobState) -> Self {
        Self {
            states: vec![state],
            ..Self::default()
        }
    }
}

/// Keyset pagination: newest first, strictly older than `before`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// Continue after this id (the last id of the previous page).
    pub before: Option<JobId>,
    /// Page size, 1..=1000.
    pub limit: u32,
}

impl Default for Page {
    fn default() -> Self {
        Self {
            before: None,
            limit: 50,
        }
    }
}

/// The result of a cancel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelResult {
    /// It was waiting and is now `cancelled`.
    Cancelled,
    /// It is running: its worker was asked to stop it and will record `cancelled`.
    Requested,
}

/// Counts for one queue.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueStats {
    /// Queue name.
    pub queue: String,
    /// Jobs per state (states with no jobs are absent).
    pub counts: BTreeMap<JobState, i64>,
    /// Age of the oldest job that is ready to run (available, or scheduled/retryable and due).
    pub oldest_available_age: Option<Duration>,
}

/// How long finished jobs are kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    /// Completed jobs are deleted this long after they finished.
    #[serde(with = "humantime_serde")]
    pub completed: Duration,
    /// Cancelled jobs likewise.
    #[serde(with = "humantime_serde")]
    pub cancelled: Duration,
    /// Dead jobs likewise.
    #[serde(with = "humantime_serde")]
    pub dead: Duration,
    /// A finished job that holds an idempotency key is kept at least this long, so late
    /// retries of the enqueue still find it.
    #[serde(with = "humantime_serde")]
    pub idempotency: Duration,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Self {
            completed: Duration::from_secs(DAY),
            cancelled: Duration::from_secs(30 * DAY),
            dead: Duration::from_secs(30 * DAY),
            idempotency: Duration::from_secs(DAY),
        }
    }
}

/// What one rescue pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RescueReport {
    /// Back to `retryable`.
    pub retried: u64,
    /// Attempts exhausted: `dead`.
    pub dead: u64,
    /// A cancel had been requested: `cancelled`.
    pub cancelled: u64,
}

impl RescueReport {
    /// Counts one rescued attempt by where [`rescue_finish`] sent it.
    pub fn count(&mut self, f: &Finish) {
        match f.state {
            JobState::Cancelled => self.cancelled += 1,
            JobState::Dead => self.dead += 1,
            _ => self.retried += 1,
        }
    }
}

/// A wake-up from the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreEvent {
    /// Jobs were inserted (or retried) on this queue and may be fetched now.
    JobsAvailable {
        /// The queue.
        queue: String,
    },
    /// Someone asked to cancel this running job.
    CancelRequested {
        /// The job.
        id: JobId,
    },
    /// Jobs entered new states (enqueued, claimed, finished, retried, cancelled, rescued),
    /// in any process on the store: Postgres NOTIFYs `conveyor_events` (all but claims,
    /// which only the claiming process hears of), Redis publishes on `P:events`, SQLite
    /// announces its own process's changes.
    /// Empty `changes` means "jobs changed, which is unknown" (SQLite, when another process
    /// wrote the file): a reader re-reads what it waits for.
    JobsChanged {
        /// The changes, in the order the store made them.
        changes: Arc<[JobChange]>,
    },
}

/// One job's new state, as [`StoreEvent::JobsChanged`] carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobChange {
    /// The job.
    pub id: JobId,
    /// The state it entered.
    pub state: JobState,
}

impl JobChange {
    /// `<id> <state>`, entries joined by `,`: how the Postgres and Redis events carry a batch.
    pub(crate) fn encode(changes: &[JobChange]) -> String {
        let mut out = String::with_capacity(changes.len() * 48);
        for (i, c) in changes.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&c.id.to_string());
            out.push(' ');
            out.push_str(c.state.as_str());
        }
        out
    }

    /// Reads [`JobChange::encode`]'s form; malformed entries are skipped.
    pub(crate) fn decode(payload: &str) -> Vec<JobChange> {
        payload
            .split(',')
            .filter_map(|entry| {
                let (id, state) = entry.split_once(' ')?;
                Some(JobChange {
                    id: id.parse().ok()?,
                    state: state.parse().ok()?,
                })
            })
            .collect()
    }
}

/// A job store. All methods are safe to call from many processes at once. Every store also
/// keeps small shared records ([`MetaStore`]).
#[async_trait]
pub trait Store: MetaStore + Send + Sync + 'static {
    /// A human name with the server version, e.g. `Postgres 15.19` or `SQLite 3.46.0`.
    async fn backend_name(&self) -> Result<String>;

    /// Applies pending migrations. Idempotent; safe to run concurrently.
    async fn migrate(&self) -> Result<()>;

    /// Succeeds if the store answers and its schema is current.
    async fn ping(&self) -> Result<()>;

    /// The store's clock: the one clock every process compares leases, due times and
    /// retention against, whatever its own machine's clock says (Postgres `now()`, Redis
    /// `TIME`). The default is this machine's clock, right for a store on one machine (SQLite).
    /// The maintenance services read it at the start of each pass; the worker runtime keeps
    /// its offset (see [`crate::clock::StoreClock`]).
    async fn now(&self) -> Result<DateTime<Utc>> {
        Ok(Utc::now())
    }

    /// Inserts one job, or returns the existing holder of its idempotency key. The default
    /// is a one-job [`Store::enqueue_many`], which every backend already makes a single step.
    async fn enqueue(&self, job: NewJob) -> Result<Enqueued> {
        self.enqueue_many(vec![job])
            .await?
            .pop()
            .ok_or_else(|| Error::Unsupported("enqueue returned no answer".into()))
    }

    /// Inserts many jobs in as few statements as the backend allows. Duplicates (against
    /// stored jobs or within the batch) come back as `duplicate` and do not fail the rest.
    /// The answers are in input order.
    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>>;

    /// Claims up to `limit` due jobs of a queue in one statement, by priority then `run_at`:
    /// they become `running`, `attempt` goes up by one, the lease is set.
    async fn fetch(&self, request: FetchRequest<'_>) -> Result<Vec<Job>>;

    /// Writes back attempt outcomes in one batch. Returns how many applied (an outcome for a
    /// job no longer running at that attempt is ignored).
    async fn finish(&self, outcomes: Vec<Finish>) -> Result<u64>;

    /// Renews the leases of the jobs in `held` that run under `worker`'s lease (one statement
    /// or script per call); returns the ids among them whose cancellation was requested.
    /// Only what the worker says it holds is renewed: a job leased to `worker` that its
    /// runtime no longer tracks keeps its deadline, expires and is rescued, instead of
    /// staying `running` for as long as the worker lives.
    async fn heartbeat(&self, worker: &str, held: &[JobId], lease: Duration) -> Result<Vec<JobId>>;

    /// One job with its attempt history.
    async fn get(&self, id: JobId) -> Result<Option<Job>>;

    /// Jobs matching `filter`, newest first, one page.
    async fn list(&self, filter: &JobFilter, page: Page) -> Result<Vec<Job>>;

    /// How many jobs match `filter`.
    async fn count(&self, filter: &JobFilter) -> Result<u64>;

    /// Makes a finished or waiting job `available` now with a fresh attempt budget
    /// (`attempt` = 0), keeping its history. A running job is refused.
    async fn retry(&self, id: JobId) -> Result<Job>;

    /// [`Store::retry`] for every non-running job matching `filter`; returns how many.
    async fn retry_matching(&self, filter: &JobFilter) -> Result<u64>;

    /// Cancels a waiting job, or asks the worker running it to stop. A finished job is refused.
    async fn cancel(&self, id: JobId) -> Result<CancelResult>;

    /// Deletes one job that is not running.
    async fn discard(&self, id: JobId) -> Result<()>;

    /// Deletes every finished (terminal) job matching `filter`; returns how many.
    async fn purge(&self, filter: &JobFilter) -> Result<u64>;

    /// Counts by state for every queue that has jobs.
    async fn queue_stats(&self) -> Result<Vec<QueueStats>>;

    /// Folds the bookkeeping behind [`Store::queue_stats`] into its totals, if the backend
    /// keeps any apart (Postgres: the per-statement deltas its triggers append); returns how
    /// many totals changed. Counts are exact either way; folding keeps reading them cheap.
    /// The pruner calls it on every pass.
    async fn fold_counts(&self) -> Result<u64> {
        Ok(0)
    }

    /// Moves up to `limit` due `scheduled`/`retryable` jobs to `available`; returns how many.
    async fn promote_due(&self, now: DateTime<Utc>, limit: u32) -> Result<u64>;

    /// Ends up to `limit` attempts whose lease expired before `now`: `retryable` (after the
    /// policy's backoff), `dead` when attempts are exhausted, `cancelled` when a cancel was
    /// requested. Each gets a `lease_expired` attempt record. Safe to run concurrently.
    async fn rescue_expired(
        &self,
        now: DateTime<Utc>,
        policy: &RetryPolicy,
        limit: u32,
    ) -> Result<RescueReport>;

    /// Deletes up to `limit` finished jobs past their retention at `now`; returns how many.
    async fn prune(&self, now: DateTime<Utc>, policy: &RetentionPolicy, limit: u32) -> Result<u64>;

    /// The jobs that finished (`finalized_at`) in `[from, to)`, grouped by queue, kind and
    /// final state, with their run times and waits in log buckets ([`crate::stats`]). The
    /// platform history's rollups are built from this; it reads only finished jobs through
    /// the finalized-time index.
    async fn finished_groups(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<crate::stats::FinishedGroup>>;

    /// The jobs of `kind` that finished in `[from, to)`, grouped by the string value of the
    /// top-level args field `field` (letters, digits and `_`) and final state, with their
    /// attempts and run times. The platform history's per-endpoint webhook rows are built
    /// from this. Backends without it answer `Unsupported`.
    async fn finished_groups_by_arg(
        &self,
        kind: &str,
        field: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<crate::stats::ArgGroup>> {
        let _ = (kind, field, from, to);
        Err(Error::Unsupported(
            "finished jobs grouped by an args field are not summarised on this backend".into(),
        ))
    }

    /// Wake-ups: new jobs per queue, cancel requests, job state changes. Lossy by design;
    /// the runtime also polls.
    fn subscribe(&self) -> broadcast::Receiver<StoreEvent>;

    /// Records a running attempt's progress: applied only while the job is `running` at
    /// `progress.attempt` (a late report from a rescued attempt changes nothing). Returns
    /// whether it applied. The runtime throttles the calls ([`crate::JobContext::progress`]).
    async fn report_progress(&self, id: JobId, progress: &Progress) -> Result<bool>;

    /// The `running` jobs of `queue` whose lease `worker` holds. After a failed fetch the
    /// runtime compares them with the jobs it knows it runs: a claim the store applied but
    /// whose answer was lost (the connection dropped mid-reply) shows up here and is run.
    /// Running jobs are few (bounded by the workers' concurrency), so the default pages
    /// through them with [`Store::list`].
    async fn leased_to(&self, worker: &str, queue: &str) -> Result<Vec<Job>> {
        const PAGE: u32 = 1000;
        let filter = JobFilter {
            states: vec![JobState::Running],
            queue: Some(queue.to_string()),
            ..JobFilter::default()
        };
        let mut out = Vec::new();
        let mut before = None;
        loop {
            let page = self
                .list(
                    &filter,
                    Page {
                        before,
                        limit: PAGE,
                    },
                )
                .await?;
            let full = page.len() == PAGE as usize;
            before = page.last().map(|j| j.id);
            out.extend(
                page.into_iter()
                    .filter(|j| j.lease_owner.as_deref() == Some(worker)),
            );
            if !full {
                return Ok(out);
            }
        }
    }
}

/// Readiness of a SQL schema: `applied` (the newest successful migration the database
/// records) must have reached `latest` (the newest this binary carries).
pub(crate) fn check_migrations(applied: Option<i64>, latest: i64) -> Result<()> {
    let applied = applied.unwrap_or(0);
    if applied < latest {
        return Err(Error::Unsupported(format!(
            "migrations pending: the database is at version {applied}, this binary needs {latest}; run `conveyor migrate`"
        )));
    }
    Ok(())
}

/// The write-back for a running job whose lease expired: `cancelled` if a cancel was
/// requested, `dead` if that was its last attempt, else `retryable` after the policy's backoff.
/// Shared by the backends so the rescue rule is the same everywhere.
#[allow(clippy::too_many_arguments)]
pub fn rescue_finish(
    id: JobId,
    attempt: i32,
    max_attempts: i32,
    owner: Option<String>,
    started_at: DateTime<Utc>,
    cancel_requested: bool,
    now: DateTime<Utc>,
    policy: &RetryPolicy,
) -> Finish {
    let (state, run_at) = if cancel_requested {
        (JobState::Cancelled, None)
    } else if attempt >= max_attempts {
        (JobState::Dead, None)
    } else {
        let delay =
            chrono::Duration::from_std(policy.delay(attempt)).unwrap_or(chrono::Duration::MAX);
        (JobState::Retryable, Some(now + delay))
    };
    let error = format!(
        "lease expired: worker {} stopped heartbeating",
        owner.as_deref().unwrap_or("(unknown)")
    );
    Finish {
        id,
        attempt,
        state,
        run_at,
        attempt_delta: 0,
        record: AttemptRecord {
            attempt,
            started_at,
            finished_at: now,
            worker: owner,
            outcome: crate::job::AttemptOutcome::LeaseExpired,
            error: Some(error),
            causes: Vec::new(),
            duration_ms: (now - started_at).num_milliseconds().max(0),
            traceback: None,
        },
        result: None,
    }
}

/// The latest instant Conveyor computes: the last microsecond of year 9999. Every backend
/// keeps it (Postgres timestamps end in 294276, SQLite's microseconds in 294247) and every
/// client parses it (RFC 3339 has four-digit years).
pub const LATEST: DateTime<Utc> = match DateTime::from_timestamp_micros(253_402_300_799_999_999) {
    Some(t) => t,
    None => DateTime::<Utc>::MAX_UTC,
};

/// The earliest instant Conveyor computes: the first of year 1 (Postgres keeps nothing
/// before 4713 BC).
pub const EARLIEST: DateTime<Utc> = match DateTime::from_timestamp_micros(-62_135_596_800_000_000) {
    Some(t) => t,
    None => DateTime::<Utc>::MIN_UTC,
};

/// `now + d`, saturating at [`LATEST`]: a retention, delay or TTL of a million years means
/// "as late as can be", never an overflow or a time the store cannot keep.
pub fn after(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(LATEST)
        .min(LATEST)
}

/// A lease length as the stores add it to their own clock (in a statement or a script):
/// whole microseconds, and at most what keeps the store's now plus it at or before
/// [`LATEST`] (a day is left for a store clock ahead of this machine's). So a lease of
/// `Duration::MAX` lasts "as long as can be", never an overflow, an error or a deadline the
/// store cannot read back.
pub(crate) fn lease_length(d: Duration) -> Duration {
    let room = (LATEST - Utc::now() - chrono::Duration::days(1))
        .to_std()
        .unwrap_or_default();
    let d = d.min(room);
    Duration::from_micros(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// `now - d`, saturating at [`EARLIEST`].
pub fn before(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .unwrap_or(EARLIEST)
        .max(EARLIEST)
}

/// The SQL condition on `state` that `states` spell, `state IN ('…', …)`: the same text in
/// both SQL dialects.
pub(crate) fn sql_state_in(states: &[JobState]) -> String {
    let names: Vec<String> = states.iter().map(|s| format!("'{}'", s.as_str())).collect();
    format!("state IN ({})", names.join(","))
}

/// The SQL condition on `state` for the jobs `action` may start from (see
/// [`OperatorAction::from_states`]).
pub(crate) fn sql_from_states(action: OperatorAction) -> String {
    sql_state_in(action.from_states())
}

/// True when JSON writes `text` inside a string exactly as it is (no quote, backslash or
/// control character, which JSON escapes): then a JSON document's text contains `text`
/// wherever one of its strings does, and a search may first match the document's text.
pub(crate) fn json_keeps_as_is(text: &str) -> bool {
    !text
        .chars()
        .any(|c| c == '"' || c == '\\' || c.is_control())
}

/// Checks a page request.
pub fn check_page(page: &Page) -> Result<()> {
    if page.limit == 0 || page.limit > 1000 {
        return Err(Error::invalid(
            "limit",
            format!("must be between 1 and 1000, got {}", page.limit),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_fragments_list_exactly_each_actions_states() {
        for action in OperatorAction::ALL {
            let sql = sql_from_states(action);
            let names = sql
                .strip_prefix("state IN (")
                .and_then(|rest| rest.strip_suffix(')'))
                .unwrap_or_else(|| panic!("{action}: `{sql}` is not a state IN list"));
            let states: Vec<JobState> = names
                .split(',')
                .map(|n| n.trim_matches('\'').parse().unwrap())
                .collect();
            assert_eq!(states, action.from_states(), "{action}: {sql}");
        }
        assert_eq!(
            sql_from_states(OperatorAction::Purge),
            "state IN ('completed','cancelled','dead')"
        );
    }

    #[test]
    fn a_lease_stays_within_the_instants_the_store_keeps() {
        let max = lease_length(Duration::MAX);
        let end = after(Utc::now(), max);
        assert!(
            end < LATEST && end > LATEST - chrono::Duration::days(2),
            "{end}"
        );
        assert_eq!(lease_length(Duration::ZERO), Duration::ZERO);
        assert_eq!(
            lease_length(Duration::from_nanos(30_000_001_500)),
            Duration::from_micros(30_000_001)
        );
    }

    #[test]
    fn time_arithmetic_saturates() {
        let now = Utc::now();
        assert_eq!(after(now, Duration::MAX), LATEST);
        assert_eq!(before(now, Duration::MAX), EARLIEST);
        assert_eq!(LATEST.to_rfc3339(), "9999-12-31T23:59:59.999999+00:00");
        assert_eq!(EARLIEST.to_rfc3339(), "0001-01-01T00:00:00+00:00");
        assert_eq!(
            after(now, Duration::from_secs(1)),
            now + chrono::Duration::seconds(1)
        );
    }

    #[test]
    fn job_changes_round_trip_and_skip_garbage() {
        let changes = vec![
            JobChange {
                id: JobId::new(),
                state: JobState::Running,
            },
            JobChange {
                id: JobId::new(),
                state: JobState::Completed,
            },
        ];
        let text = JobChange::encode(&changes);
        assert_eq!(JobChange::decode(&text), changes);
        assert_eq!(JobChange::decode(&format!("{text},nonsense,x y")), changes);
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://me:secret@db:5432/app"),
            "postgres://me:***@db:5432/app"
        );
        assert_eq!(redact_url("postgres://me@db/app"), "postgres://me@db/app");
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
    }
}
