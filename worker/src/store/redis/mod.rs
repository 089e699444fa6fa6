//! The Redis backend: the highest throughput, and many worker processes on many machines.
//!
//! Every step that touches more than one key is one Lua script (`EVALSHA`, scripts in
//! `store/redis/*.lua`) or, where nothing needs deciding, one `MULTI` transaction (the
//! insert of new jobs), so no step ever leaves a job in two states or in none.
//!
//! # Keys
//!
//! `P` is the key prefix (`?prefix=…` in the URL, default `conveyor`). Every key of queue `Q`
//! starts with the hash tag `{P:Q}`, so a queue lives in one Redis Cluster slot and its scripts
//! never cross slots:
//!
//! | key | what |
//! |---|---|
//! | `{P:Q}:job:<id>` | hash: the job (args, tags and metadata as JSON strings; times as microseconds; `result` and `progress` as JSON once written). The id and queue are in the key; empty tags and `{}` metadata are left out |
//! | `{P:Q}:hist:<id>` | string: the job's attempt history, one JSON record per line (`APPEND`ed as attempts end; absent until the first ends). Apart from the hash so that the hash's values stay short and Redis keeps it in its compact listpack encoding |
//! | `{P:Q}:ready` | zset of `available` jobs, score `priority · 10¹³ + run_at_ms`: fetch pops the head |
//! | `{P:Q}:delayed` | zset of `scheduled` and `retryable` jobs by `run_at` (µs) |
//! | `{P:Q}:leases` | zset of `running` jobs by lease deadline (µs): the rescuer's work list, and the listing and count of running jobs |
//! | `{P:Q}:w:<worker>` | set of the jobs a worker runs |
//! | `{P:Q}:s:<state>` | zset per state but `running`, all scores 0, so members sort by id: listings and counts |
//! | `{P:Q}:fin:<state>`, `{P:Q}:fink:<state>` | finished jobs by `finalized_at`, without and with an idempotency key: the pruner |
//!
//! A few small global keys sit outside any queue's slot: `P:index` (hash, job id → queue, for
//! [`Store::get`] and every call that starts from an id), `P:queues` (set of queue names),
//! `P:version` (the data layout) and one `P:key:<idempotency key>` per key (`queue/id` of the
//! holder). They are read and written by single-key commands beside the queue's scripts.
//! Operations that span queues walk `P:queues` and run one script per queue: `list`, `count`,
//! `queue_stats`, `heartbeat`, `promote_due`, `rescue_expired`, `prune`, `retry_matching` and
//! `purge`. The store talks to one server through a [`ConnectionManager`]; there is no
//! cluster client yet. The layout is what would let the same scripts run unchanged on a
//! cluster: each names one key of its queue in `KEYS` (so a cluster client routes it to the
//! right node) and builds the others from the same hash tag, so they share its slot.
//!
//! # Costs
//!
//! Nothing scans a whole list per job, nothing uses `KEYS`, and no script unpacks an unbounded
//! list: enqueue works in parts of [`ENQUEUE_PART`] jobs, promotion, pruning and bulk edits in
//! chunks of [`CHUNK`]. Fetch pops the head of the ready set and first promotes at most
//! [`CHUNK`] due delayed jobs. Counting by state and queue is a `ZCARD` per set. Listing
//! merges the per-state sets newest first and reads one page of jobs at a time (running jobs
//! come from the lease set, read whole: it holds at most the workers' combined concurrency);
//! filters on kind, tag, creation time or error text are applied to each page as it is read,
//! so a selective filter of that kind (above all `error_contains`, which parses every attempt
//! history it reads) costs a walk over the matching states — slower than the SQL backends'
//! indexes.
//!
//! Scores are doubles: `run_at` ordering among ready jobs is exact to the millisecond for
//! priorities up to about ±900 and coarser beyond; equal scores fall back to id order.
//!
//! # Idempotency keys
//!
//! A key is claimed with `SET P:key:<k> queue/id NX PX 60000` before the insert and made
//! permanent (`PERSIST`, in the insert's pipeline) right after it, then lives exactly as long
//! as its job: deleting the job (prune, discard, purge) frees it. So duplicates behave as on
//! the SQL backends, including the pruner keeping a keyed finished job for
//! `RetentionPolicy::idempotency`. The claim's expiry only covers an enqueue that died
//! between claim and insert; a confirmed key whose job is gone is found and freed by the next
//! enqueue that wants it. A key and its job live in different slots, so they are separate
//! steps, ordered so that a crash leaves at worst a claim that expires or a key that the next
//! enqueue frees. The plain `PERSIST` assumes an insert follows its claim within the claim's
//! 60 s (as the expiry itself does). An enqueue whose answer was lost can be repeated: see
//! the comment on `RedisStore::insert`. A part whose insert Redis refused (out of memory)
//! frees its claims and index entries at once (`RedisStore::run_insert`).
//!
//! # Server settings
//!
//! [`check_server`] runs at connect: a `maxmemory-policy` that may evict keys is refused
//! (unless `?allow_eviction=true`), and no persistence is a warning. A Redis at `maxmemory`
//! refuses writes; that error is [`Error::StoreFull`] (`store_error`). Reads, deletes and
//! a start on a current layout write nothing Redis refuses, so they keep working; the fetch
//! script is refused whole (see `fetch.lua`), so no job is claimed that could not finish.
//!
//! # Wake-up
//!
//! Scripts `PUBLISH` the queue name on `P:jobs` when jobs become ready and the job id on
//! `P:cancel` when a running job's cancel is requested. Job state changes (enqueue, claim,
//! outcomes, rescue, retry, cancel) are published on `P:events` as `<id> <state>` entries by
//! one publisher task per store, in the order they were made, without the step waiting for
//! it (`events::publish_loop`). One subscriber connection per store
//! forwards them to [`Store::subscribe`]; the store also wakes its own process directly, and
//! the runtime polls, so a lost message only costs a poll.
//!
//! # Modules
//!
//! This file holds the store, its connection and the [`Store`] impl, which hands each step to
//! the module that does it:
//!
//! | module | what |
//! |---|---|
//! | `url`, `tls` | the URL's parameters: prefix, eviction switch, certificates |
//! | `server` | the server checks at connect, and Redis errors as this crate's |
//! | `layout` | key names ([`Keys`](layout::Keys)) and the data layout version (`migrate`, `ping`) |
//! | `script` | the Lua scripts (`*.lua` beside this file, each queue script after `prelude.lua`) |
//! | `codec` | a job's hash read back into a [`Job`], times and scores as Redis keeps them |
//! | `enqueue` | inserting jobs: parts, id reservations, the `MULTI`, undo and repair |
//! | `idempotency` | key claims, confirmations and frees |
//! | `lease` | fetch, finish (outcomes) and heartbeat: running jobs and their leases |
//! | `query` | `get`, `list`, `count`, `queue_stats`: reading jobs by filter |
//! | `operator` | retry, cancel, discard, purge |
//! | `maintenance` | promote, rescue, prune |
//! | `events` | wake-ups: the subscriber task and the channels |
//! | `meta` | the shared records ([`MetaStore`](crate::store::meta::MetaStore)) |

mod codec;
mod enqueue;
mod events;
mod idempotency;
mod layout;
mod lease;
mod maintenance;
mod meta;
mod operator;
mod query;
mod script;
mod server;
mod tls;
mod url;

use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{FromRedisValue, Pipeline};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{
    CancelResult, FetchRequest, Finish, JobChange, JobFilter, Page, QueueStats, RescueReport,
    RetentionPolicy, Store, StoreEvent, StoreOptions, check_page, redact_url,
};
use crate::clock::StoreClock;
use crate::error::{Error, Result};
use crate::job::{Enqueued, Job, JobId, JobState, NewJob};
use crate::retry_policy::RetryPolicy;
use codec::{after, job_from_fields, read_job};
use events::subscribe_loop;
use layout::Keys;
use lease::RunningQueues;
use script::all_scripts;
use server::log_once;
pub(crate) use server::store_error;
pub use server::{check_server, persistence_warnings};
use url::{allow_eviction, split_prefix};

/// Jobs per script call for bulk work (enqueue, promotion, pruning, bulk edits).
pub const CHUNK: usize = 1000;
/// The prefix when the URL names none.
pub const DEFAULT_PREFIX: &str = "conveyor";
/// How old the measured offset to the server's clock may be before an insert measures it
/// again (one `TIME`): clocks drift by far less than a millisecond in that time.
const CLOCK_MAX_AGE: Duration = Duration::from_secs(10);

/// The Redis store. Cheap to clone; clones share the connection and the subscriber.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    /// What the server check at connect warned about.
    warnings: Arc<Vec<String>>,
    keys: Arc<Keys>,
    running: Arc<RunningQueues>,
    events: broadcast::Sender<StoreEvent>,
    /// Job state changes on their way to `P:events` (see `events::publish_loop`); the
    /// publisher ends when the last clone is dropped.
    changes: tokio::sync::mpsc::UnboundedSender<Vec<JobChange>>,
    /// The server's clock as seen from here, for the one decision not made in a script: whether
    /// a job being inserted is due (the insert is a plain `MULTI`).
    clock: Arc<StoreClock>,
    /// Stops the subscriber task when the last clone is dropped.
    _subscriber: Arc<DropGuard>,
}

impl RedisStore {
    /// Connects to `redis://host:port/db[?prefix=name]` (or `rediss://` with TLS, see
    /// `tls.rs` for its certificate parameters) and starts the subscriber task.
    pub async fn connect(url: &str, _options: &StoreOptions) -> Result<Self> {
        let allow_eviction = allow_eviction(url)?;
        // One multiplexed connection serves every caller, so `max_connections` does not apply.
        let (conn_url, prefix) = split_prefix(url)?;
        let client = tls::client(url, &conn_url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            // Bulk scripts over thousands of jobs take longer than the client's 500 ms default.
            .set_response_timeout(Some(Duration::from_secs(30)))
            .set_number_of_retries(3);
        let conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(tls::explain)?;
        let keys = Arc::new(Keys { prefix });
        let warnings = check_server(&conn, &redact_url(url), allow_eviction).await?;
        log_once(&warnings);
        let (events, _) = broadcast::channel(4096);
        let stop = CancellationToken::new();
        tokio::spawn(subscribe_loop(
            client,
            keys.clone(),
            events.clone(),
            stop.clone(),
        ));
        let (changes, pending) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(events::publish_loop(
            conn.clone(),
            keys.events_channel(),
            pending,
        ));
        Ok(Self {
            conn,
            warnings: Arc::new(warnings),
            keys,
            running: Arc::default(),
            events,
            changes,
            clock: Arc::default(),
            _subscriber: Arc::new(stop.drop_guard()),
        })
    }

    /// Now on the server's clock, estimated from the offset measured at most
    /// [`CLOCK_MAX_AGE`] ago.
    pub(crate) async fn clock_now(&self) -> Result<DateTime<Utc>> {
        self.clock.now_fresh(self, CLOCK_MAX_AGE).await
    }

    /// The key prefix this store uses.
    pub fn prefix(&self) -> &str {
        &self.keys.prefix
    }

    /// What [`check_server`] found worth a warning when this store connected (each is logged
    /// once per process): no persistence, or eviction allowed by `allow_eviction=true`.
    pub fn server_warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Runs a pipeline; if the server lost its script cache (a restart), loads the scripts
    /// and runs it once more. Every pipeline here is safe to repeat after `NOSCRIPT`: a script
    /// that was not found did not run, and the plain commands beside it are idempotent.
    pub(super) async fn run<T: FromRedisValue>(&self, pipe: &Pipeline) -> Result<T> {
        let mut conn = self.conn.clone();
        match pipe.query_async(&mut conn).await {
            Ok(v) => Ok(v),
            Err(e)
                if e.kind() == ::redis::ErrorKind::Server(::redis::ServerErrorKind::NoScript) =>
            {
                self.load_scripts().await?;
                Ok(pipe.query_async(&mut conn).await?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Runs one script invocation (loading the script if the server does not have it).
    pub(super) async fn eval<T: FromRedisValue>(
        &self,
        inv: &::redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        let mut conn = self.conn.clone();
        Ok(inv.invoke_async(&mut conn).await?)
    }

    pub(super) async fn load_scripts(&self) -> Result<()> {
        let mut pipe = ::redis::pipe();
        for s in all_scripts() {
            pipe.load_script(s).ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    pub(super) async fn queues(&self) -> Result<Vec<String>> {
        let mut conn = self.conn.clone();
        let mut queues: Vec<String> = ::redis::cmd("SMEMBERS")
            .arg(self.keys.queues())
            .query_async(&mut conn)
            .await?;
        queues.sort();
        Ok(queues)
    }

    /// The queue of each id (`None`: no such job).
    pub(super) async fn queues_of(&self, ids: &[JobId]) -> Result<Vec<Option<String>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let mut cmd = ::redis::cmd("HMGET");
        cmd.arg(self.keys.index());
        for id in ids {
            cmd.arg(id.to_string());
        }
        Ok(cmd.query_async(&mut conn).await?)
    }

    /// Loads jobs by (queue, id); missing ones are skipped.
    pub(super) async fn load_jobs(&self, refs: &[(String, JobId)]) -> Result<Vec<Job>> {
        if refs.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = ::redis::pipe();
        for (queue, id) in refs {
            read_job(&mut pipe, &self.keys.queue(queue), id);
        }
        let rows: Vec<(Vec<String>, Option<String>)> = self.run(&pipe).await?;
        refs.iter()
            .zip(rows)
            .filter(|(_, (r, _))| !r.is_empty())
            .map(|((queue, id), (r, history))| job_from_fields(queue, *id, r, history))
            .collect()
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn backend_name(&self) -> Result<String> {
        let mut conn = self.conn.clone();
        let info: String = ::redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await?;
        let version = info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("(unknown version)")
            .trim();
        Ok(format!("Redis {version}"))
    }

    async fn migrate(&self) -> Result<()> {
        self.migrate_layout().await
    }

    async fn now(&self) -> Result<DateTime<Utc>> {
        let mut conn = self.conn.clone();
        let (secs, micros): (i64, u32) = ::redis::cmd("TIME").query_async(&mut conn).await?;
        DateTime::from_timestamp(secs, micros.saturating_mul(1000)).ok_or_else(|| {
            Error::Unsupported(format!(
                "Redis TIME answered {secs} s, {micros} µs: not a time"
            ))
        })
    }

    async fn ping(&self) -> Result<()> {
        self.check_layout().await
    }

    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>> {
        let answers = self.insert(jobs).await?;
        self.publish_changes(
            answers
                .iter()
                .filter(|a| !a.duplicate)
                .map(|a| JobChange {
                    id: a.id,
                    state: a.state,
                })
                .collect(),
        );
        Ok(answers)
    }

    async fn fetch(&self, request: FetchRequest<'_>) -> Result<Vec<Job>> {
        self.claim(request).await
    }

    async fn finish(&self, outcomes: Vec<Finish>) -> Result<u64> {
        if outcomes.is_empty() {
            return Ok(0);
        }
        Ok(self.apply(&outcomes, None).await?.len() as u64)
    }

    async fn heartbeat(&self, worker: &str, held: &[JobId], lease: Duration) -> Result<Vec<JobId>> {
        self.renew(worker, held, lease).await
    }

    async fn report_progress(&self, id: JobId, progress: &crate::job::Progress) -> Result<bool> {
        self.record_progress(id, progress).await
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>> {
        let Some(Some(queue)) = self.queues_of(&[id]).await?.pop() else {
            return Ok(None);
        };
        Ok(self.load_jobs(&[(queue, id)]).await?.pop())
    }

    async fn list(&self, filter: &JobFilter, page: Page) -> Result<Vec<Job>> {
        check_page(&page)?;
        self.page(filter, &JobState::ALL, page.before, page.limit as usize)
            .await
    }

    async fn count(&self, filter: &JobFilter) -> Result<u64> {
        self.count_matching(filter).await
    }

    async fn retry(&self, id: JobId) -> Result<Job> {
        let job = self.retry_one(id).await?;
        self.publish_changes(vec![JobChange {
            id: job.id,
            state: job.state,
        }]);
        Ok(job)
    }

    async fn retry_matching(&self, filter: &JobFilter) -> Result<u64> {
        self.retry_all(filter).await
    }

    async fn cancel(&self, id: JobId) -> Result<CancelResult> {
        let result = self.cancel_one(id).await?;
        if result == CancelResult::Cancelled {
            self.publish_changes(vec![JobChange {
                id,
                state: JobState::Cancelled,
            }]);
        }
        Ok(result)
    }

    async fn discard(&self, id: JobId) -> Result<()> {
        self.discard_one(id).await
    }

    async fn purge(&self, filter: &JobFilter) -> Result<u64> {
        self.purge_all(filter).await
    }

    async fn queue_stats(&self) -> Result<Vec<QueueStats>> {
        self.stats().await
    }

    async fn finished_groups(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<crate::stats::FinishedGroup>> {
        self.finished(from, to).await
    }

    async fn promote_due(&self, now: DateTime<Utc>, limit: u32) -> Result<u64> {
        self.promote(now, limit).await
    }

    async fn rescue_expired(
        &self,
        now: DateTime<Utc>,
        policy: &RetryPolicy,
        limit: u32,
    ) -> Result<RescueReport> {
        self.rescue(now, policy, limit).await
    }

    async fn prune(&self, now: DateTime<Utc>, policy: &RetentionPolicy, limit: u32) -> Result<u64> {
        self.prune_finished(now, policy, limit).await
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }
}
