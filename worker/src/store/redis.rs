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
//! | `{P:Q}:job:<id>` | hash: the job (args, tags and metadata as JSON strings; times as microseconds). The id and queue are in the key; empty tags and `{}` metadata are left out |
//! | `{P:Q}:hist:<id>` | string: the job's attempt history, one JSON record per line (`APPEND`ed as attempts end; absent until the first ends). Apart from the hash so that the hash's values stay short and Redis keeps it in its compact listpack encoding |
//! | `{P:Q}:ready` | zset of `available` jobs, score `priority · 10¹³ + run_at_ms`: fetch pops the head |
//! | `{P:Q}:delayed` | zset of `scheduled` and `retryable` jobs by `run_at` (µs) |
//! | `{P:Q}:leases` | zset of `running` jobs by lease deadline (µs): the rescuer's work list, and the listing and count of running jobs |
//! | `{P:Q}:w:<worker>` | set of the jobs a worker runs: its heartbeat |
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
//! `P:cancel` when a running job's cancel is requested. One subscriber connection per store
//! forwards them to [`Store::subscribe`]; the store also wakes its own process directly, and
//! the runtime polls, so a lost message only costs a poll.

mod meta;
mod tls;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{FromRedisValue, Pipeline, Script};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

use super::{
    CancelResult, FetchRequest, Finish, JobFilter, Page, QueueStats, RescueReport, RetentionPolicy,
    Store, StoreEvent, StoreOptions, check_page, redact_url, rescue_finish,
};
use crate::clock::StoreClock;
use crate::error::{Error, Result};
use crate::job::{AttemptRecord, Enqueued, Job, JobId, JobState, NewJob};
use crate::retry_policy::RetryPolicy;

/// Jobs per script call for bulk work (enqueue, promotion, pruning, bulk edits).
pub const CHUNK: usize = 1000;
/// The prefix when the URL names none.
pub const DEFAULT_PREFIX: &str = "conveyor";
/// Data layout version kept in `P:version`; `migrate` writes it, `ping` checks it.
const LAYOUT_VERSION: i64 = 2;
/// How long an idempotency key claim lasts if its insert never confirms it.
const CLAIM_MS: u64 = 60_000;
/// How long an enqueue waits for another enqueue's claim on the same key to be confirmed.
const CLAIM_WAIT: Duration = Duration::from_secs(5);
/// Claims of at most this many jobs come back with the jobs' hashes in the fetch script's
/// answer (one round trip, for latency); larger ones read the hashes in a second round trip,
/// which costs the server far less per job.
const FETCH_INLINE: usize = 16;
/// Pipelines one bulk enqueue keeps in flight at once.
const IN_FLIGHT: usize = 4;
/// Jobs per part of a bulk enqueue (see `RedisStore::insert`).
const ENQUEUE_PART: usize = 250;
/// How old the measured offset to the server's clock may be before an insert measures it
/// again (one `TIME`): clocks drift by far less than a millisecond in that time.
const CLOCK_MAX_AGE: Duration = Duration::from_secs(10);

macro_rules! queue_script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("redis/prelude.lua"),
                "\n",
                include_str!(concat!("redis/", $file))
            ))
        })
    };
}

static FETCH: LazyLock<Script> = queue_script!("fetch.lua");
static FINISH: LazyLock<Script> = queue_script!("finish.lua");
static HEARTBEAT: LazyLock<Script> = queue_script!("heartbeat.lua");
static RESCUE_SCAN: LazyLock<Script> = queue_script!("rescue_scan.lua");
static CANCEL: LazyLock<Script> = queue_script!("cancel.lua");
static RETRY: LazyLock<Script> = queue_script!("retry.lua");
static DELETE: LazyLock<Script> = queue_script!("delete.lua");
static PRUNE: LazyLock<Script> = queue_script!("prune.lua");
static PROMOTE: LazyLock<Script> = queue_script!("promote.lua");
static STATS: LazyLock<Script> = queue_script!("stats.lua");
static KEY_KEEP: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("redis/key_keep.lua")));
static KEY_FREE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("redis/key_free.lua")));

fn all_scripts() -> [&'static Script; 12] {
    [
        &FETCH,
        &FINISH,
        &HEARTBEAT,
        &RESCUE_SCAN,
        &CANCEL,
        &RETRY,
        &DELETE,
        &PRUNE,
        &PROMOTE,
        &STATS,
        &KEY_KEEP,
        &KEY_FREE,
    ]
}

/// Key names under one prefix.
#[derive(Clone, Debug)]
struct Keys {
    prefix: String,
}

impl Keys {
    /// The hash-tagged base of every key of `queue`.
    fn queue(&self, queue: &str) -> String {
        format!("{{{}:{queue}}}", self.prefix)
    }
    /// The set that holds every job of `queue` in `state`: `s:<state>`, or the lease set for
    /// running jobs.
    fn state_set(&self, queue: &str, state: JobState) -> String {
        match state {
            JobState::Running => format!("{}:leases", self.queue(queue)),
            _ => format!("{}:s:{}", self.queue(queue), state.as_str()),
        }
    }
    fn index(&self) -> String {
        format!("{}:index", self.prefix)
    }
    fn queues(&self) -> String {
        format!("{}:queues", self.prefix)
    }
    fn version(&self) -> String {
        format!("{}:version", self.prefix)
    }
    fn idempotency(&self, key: &str) -> String {
        format!("{}:key:{key}", self.prefix)
    }
    fn jobs_channel(&self) -> String {
        format!("{}:jobs", self.prefix)
    }
    fn cancel_channel(&self) -> String {
        format!("{}:cancel", self.prefix)
    }
}

/// Most claimed jobs whose queue [`RunningQueues`] remembers.
const RUNNING_CACHE: usize = 100_000;

/// The queue of each job this store claimed and has not yet written an outcome for, so a
/// completion batch goes straight to its queue's script instead of first asking `P:index`.
/// Past [`RUNNING_CACHE`] entries further claims are not remembered, and an outcome for a job
/// not found here (a rescue, a job adopted after a lost fetch answer) looks its queue up.
#[derive(Default)]
struct RunningQueues(std::sync::Mutex<HashMap<JobId, Arc<str>>>);

impl RunningQueues {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Arc<str>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remember(&self, queue: &str, ids: impl Iterator<Item = JobId>) {
        let queue: Arc<str> = Arc::from(queue);
        let mut map = self.map();
        for id in ids {
            if map.len() >= RUNNING_CACHE {
                break;
            }
            map.insert(id, queue.clone());
        }
    }

    fn lookup(&self, ids: &[JobId]) -> Vec<Option<Arc<str>>> {
        let map = self.map();
        ids.iter().map(|id| map.get(id).cloned()).collect()
    }

    fn forget(&self, ids: &[JobId]) {
        let mut map = self.map();
        for id in ids {
            map.remove(id);
        }
    }
}

/// The Redis store. Cheap to clone; clones share the connection and the subscriber.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    /// What the server check at connect warned about.
    warnings: Arc<Vec<String>>,
    keys: Arc<Keys>,
    running: Arc<RunningQueues>,
    events: broadcast::Sender<StoreEvent>,
    /// The server's clock as seen from here, for the one decision not made in a script: whether
    /// a job being inserted is due (the insert is a plain `MULTI`).
    clock: Arc<StoreClock>,
    /// Stops the subscriber task when the last clone is dropped.
    _subscriber: Arc<DropGuard>,
}

/// Splits `?prefix=…` off a Redis URL; returns the URL to connect with and the prefix.
fn split_prefix(url: &str) -> Result<(String, String)> {
    let bad = |reason: String| Error::BadUrl {
        url: redact_url(url),
        reason,
    };
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut prefix = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("prefix", value)) => prefix = Some(value.to_string()),
            // Read by `allow_eviction`.
            Some(("allow_eviction", _)) => {}
            _ => rest.push(pair),
        }
    }
    let prefix = prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_string());
    let ok = !prefix.is_empty()
        && prefix.len() <= 64
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
    if !ok {
        return Err(bad(format!(
            "prefix `{prefix}` must be 1-64 ASCII letters, digits, '.', '_', '-' or ':'"
        )));
    }
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((url, prefix))
}

/// The URL's `allow_eviction=true|false` (default false): whether to start on a server whose
/// `maxmemory-policy` may evict keys (see [`check_server`], which `RedisStore::connect`
/// runs). [`split_prefix`] leaves it out of the URL the client connects with.
fn allow_eviction(url: &str) -> Result<bool> {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let mut allow = false;
    for pair in query.split('&') {
        if let Some(("allow_eviction", value)) = pair.split_once('=') {
            allow = match value {
                "true" | "1" => true,
                "false" | "0" => false,
                other => {
                    return Err(Error::BadUrl {
                        url: redact_url(url),
                        reason: format!("allow_eviction must be true or false, not `{other}`"),
                    });
                }
            };
        }
    }
    Ok(allow)
}

/// Reads `INFO <section>` as field → value, or `None` when the server refuses the command
/// (an ACL without `+info`, a renamed command). Only an unreachable server is an error.
async fn server_info(
    conn: &ConnectionManager,
    section: &str,
) -> Result<Option<HashMap<String, String>>> {
    let mut conn = conn.clone();
    let text: String = match ::redis::cmd("INFO")
        .arg(section)
        .query_async(&mut conn)
        .await
    {
        Ok(text) => text,
        Err(e)
            if e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_connection_refusal() =>
        {
            return Err(e.into());
        }
        Err(_) => return Ok(None),
    };
    Ok(Some(
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect(),
    ))
}

/// `CONFIG GET name`, or `None` where the server does not allow it (managed Redis often
/// disables or renames CONFIG).
async fn config_get(conn: &ConnectionManager, name: &str) -> Option<String> {
    let mut conn = conn.clone();
    let pairs: Vec<String> = ::redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query_async(&mut conn)
        .await
        .ok()?;
    pairs.get(1).cloned()
}

/// Checks the settings a job store depends on; `server` (the redacted URL) names the server
/// in messages.
///
/// - A `maxmemory-policy` other than `noeviction` lets Redis delete keys when memory runs
///   short: jobs disappear, an idempotency key is taken again by a second job, index sets
///   point at deleted jobs, API keys vanish, all without an error. Such a server is refused
///   (read from `INFO memory`, which managed Redis allows where it disables CONFIG), unless
///   the URL says `allow_eviction=true`; then it is a warning.
/// - Without AOF and without RDB snapshots a restart brings the server back empty: a warning.
///
/// Returns the warnings.
pub async fn check_server(
    conn: &ConnectionManager,
    server: &str,
    allow_eviction: bool,
) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    let memory = server_info(conn, "memory").await?;
    let policy = match memory.as_ref().and_then(|m| m.get("maxmemory_policy")) {
        Some(p) => Some(p.clone()),
        None => config_get(conn, "maxmemory-policy").await,
    };
    match policy.as_deref() {
        Some("noeviction") => {}
        Some(policy) => {
            let problem = eviction_problem(server, policy);
            if !allow_eviction {
                return Err(Error::Unsupported(format!(
                    "{problem} Set `maxmemory-policy noeviction` (`CONFIG SET maxmemory-policy noeviction` and `CONFIG REWRITE`, in redis.conf, or in your provider's parameter group), or, if the risk is understood, add `allow_eviction=true` to the store URL"
                )));
            }
            warnings.push(format!("{problem} Starting anyway: the store URL says allow_eviction=true."));
        }
        None => warnings.push(format!(
            "could not read the maxmemory-policy of Redis at {server}; it must be noeviction, or Redis may delete jobs when memory runs short"
        )),
    }
    let persistence = server_info(conn, "persistence").await?;
    let aof = persistence.and_then(|p| p.get("aof_enabled").map(|v| v == "1"));
    let save = config_get(conn, "save").await;
    warnings.extend(persistence_warnings(server, aof, save.as_deref()));
    Ok(warnings)
}

fn eviction_problem(server: &str, policy: &str) -> String {
    format!(
        "Redis at {server} has maxmemory-policy `{policy}`: when memory runs short it deletes keys, and Conveyor's jobs, idempotency keys, indexes and API keys are keys, so jobs are lost without an error."
    )
}

/// Why a restart of the server would lose the store: a warning unless the append-only file
/// (`aof`, from `INFO persistence`) or RDB snapshots (`save`, from `CONFIG GET save`) are on.
/// `None` is a setting the server would not tell (managed Redis often refuses `CONFIG`).
pub fn persistence_warnings(server: &str, aof: Option<bool>, save: Option<&str>) -> Vec<String> {
    const FIX: &str = "turn on the append-only file (`appendonly yes`, `appendfsync everysec`) or snapshots (`save 60 1000`) in redis.conf or your provider's settings";
    let snapshots = save.map(|s| !s.trim().is_empty());
    match (aof, snapshots) {
        (Some(true), _) | (_, Some(true)) => Vec::new(),
        (Some(false), Some(false)) => vec![format!(
            "Redis at {server} has neither the append-only file nor RDB snapshots on: if it restarts, every job, schedule and API key is gone. For a job store, {FIX}"
        )],
        _ => vec![format!(
            "could not confirm that Redis at {server} persists its data (it did not tell whether the append-only file or snapshots are on): unless they or your provider's persistence are on, a restart loses every job, schedule and API key. For a job store, {FIX}"
        )],
    }
}

/// Logs each warning once per process, however many stores connect.
fn log_once(warnings: &[String]) {
    static LOGGED: LazyLock<std::sync::Mutex<BTreeSet<String>>> = LazyLock::new(Default::default);
    let mut logged = LOGGED.lock().unwrap_or_else(|e| e.into_inner());
    for w in warnings {
        if logged.insert(w.clone()) {
            tracing::warn!("{w}");
        }
    }
}

/// What Redis answers when it refuses a write at `maxmemory` (policy `noeviction`).
const OOM_REPLY: &str = "OOM command not allowed";

/// A Redis error as this crate's: an out-of-memory refusal, alone or inside a pipeline, a
/// transaction or a script, becomes [`Error::StoreFull`] saying what to do; anything else is
/// [`Error::Redis`].
pub(crate) fn store_error(e: ::redis::RedisError) -> Error {
    if e.code() == Some("OOM") || e.to_string().contains(OOM_REPLY) {
        Error::StoreFull(out_of_memory())
    } else {
        Error::Redis(e)
    }
}

/// The message of [`Error::StoreFull`] on Redis.
fn out_of_memory() -> String {
    "Redis is out of memory: it reached `maxmemory` and refuses writes (reads still work). Give it room: raise `maxmemory` (`CONFIG SET maxmemory <bytes>`, redis.conf, or your provider's settings), delete dead jobs (`conveyor dead purge --all`), or shorten `maintenance.pruner.retention` so finished jobs are deleted sooner".into()
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
        Ok(Self {
            conn,
            warnings: Arc::new(warnings),
            keys,
            running: Arc::default(),
            events,
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

    fn wake(&self, queues: impl IntoIterator<Item = String>) {
        for queue in queues.into_iter().collect::<BTreeSet<_>>() {
            let _ = self.events.send(StoreEvent::JobsAvailable { queue });
        }
    }

    /// Runs a pipeline; if the server lost its script cache (a restart), loads the scripts
    /// and runs it once more. Every pipeline here is safe to repeat after `NOSCRIPT`: a script
    /// that was not found did not run, and the plain commands beside it are idempotent.
    async fn run<T: FromRedisValue>(&self, pipe: &Pipeline) -> Result<T> {
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
    async fn eval<T: FromRedisValue>(&self, inv: &::redis::ScriptInvocation<'_>) -> Result<T> {
        let mut conn = self.conn.clone();
        Ok(inv.invoke_async(&mut conn).await?)
    }

    async fn load_scripts(&self) -> Result<()> {
        let mut pipe = ::redis::pipe();
        for s in all_scripts() {
            pipe.load_script(s).ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    async fn queues(&self) -> Result<Vec<String>> {
        let mut conn = self.conn.clone();
        let mut queues: Vec<String> = ::redis::cmd("SMEMBERS")
            .arg(self.keys.queues())
            .query_async(&mut conn)
            .await?;
        queues.sort();
        Ok(queues)
    }

    /// The queue of each id (`None`: no such job).
    async fn queues_of(&self, ids: &[JobId]) -> Result<Vec<Option<String>>> {
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
    async fn load_jobs(&self, refs: &[(String, JobId)]) -> Result<Vec<Job>> {
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

    /// Removes deleted jobs from the global index and frees their idempotency keys.
    async fn forget(&self, deleted: &[(String, JobId, String)]) -> Result<()> {
        if deleted.is_empty() {
            return Ok(());
        }
        for chunk in deleted.chunks(CHUNK) {
            let mut pipe = ::redis::pipe();
            let mut hdel = ::redis::cmd("HDEL");
            hdel.arg(self.keys.index());
            for (_, id, _) in chunk {
                hdel.arg(id.to_string());
            }
            pipe.add_command(hdel).ignore();
            for (queue, id, key) in chunk.iter().filter(|(_, _, k)| !k.is_empty()) {
                pipe.invoke_script(
                    KEY_FREE
                        .key(self.keys.idempotency(key))
                        .arg(format!("{queue}/{id}")),
                )
                .ignore();
            }
            self.run::<()>(&pipe).await?;
        }
        Ok(())
    }

    /// Runs the delete script over `ids` of one queue; returns per id the status and key.
    async fn delete_in(
        &self,
        queue: &str,
        ids: &[JobId],
        mode: &str,
    ) -> Result<Vec<(String, String)>> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(CHUNK) {
            let mut inv = DELETE.prepare_invoke();
            inv.key(format!("{}:ready", self.keys.queue(queue)))
                .arg(self.keys.queue(queue))
                .arg(mode);
            for id in chunk {
                inv.arg(id.to_string());
            }
            let flat: Vec<String> = self.eval(&inv).await?;
            let mut deleted = Vec::new();
            for (id, pair) in chunk.iter().zip(flat.chunks(2)) {
                if pair[0] == "ok" {
                    deleted.push((queue.to_string(), *id, pair[1].clone()));
                }
                out.push((pair[0].clone(), pair[1].clone()));
            }
            self.forget(&deleted).await?;
        }
        Ok(out)
    }

    /// Runs the retry script over `ids` of one queue; returns one status per id.
    async fn retry_in(&self, queue: &str, ids: &[JobId]) -> Result<Vec<String>> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(CHUNK) {
            let mut inv = RETRY.prepare_invoke();
            inv.key(format!("{}:ready", self.keys.queue(queue)))
                .arg(self.keys.queue(queue))
                .arg(self.keys.jobs_channel())
                .arg(queue);
            for id in chunk {
                inv.arg(id.to_string());
            }
            let answers: Vec<String> = self.eval(&inv).await?;
            if answers.iter().any(|a| a == "ok") {
                self.wake([queue.to_string()]);
            }
            out.extend(answers);
        }
        Ok(out)
    }

    /// Applies outcomes queue by queue; returns the ids applied. With `guard`, an outcome
    /// applies only if the job's lease expired before it (the rescuer's condition).
    async fn apply(&self, outcomes: &[Finish], guard: Option<DateTime<Utc>>) -> Result<Vec<JobId>> {
        let ids: Vec<JobId> = outcomes.iter().map(|f| f.id).collect();
        let mut queues: Vec<Option<String>> = self
            .running
            .lookup(&ids)
            .into_iter()
            .map(|q| q.map(|q| q.to_string()))
            .collect();
        let unknown: Vec<JobId> = ids
            .iter()
            .zip(&queues)
            .filter(|(_, q)| q.is_none())
            .map(|(id, _)| *id)
            .collect();
        if !unknown.is_empty() {
            let mut found = self.queues_of(&unknown).await?.into_iter();
            for q in queues.iter_mut().filter(|q| q.is_none()) {
                *q = found.next().flatten();
            }
        }
        let mut by_queue: BTreeMap<String, Vec<&Finish>> = BTreeMap::new();
        for (f, q) in outcomes.iter().zip(queues) {
            if let Some(q) = q {
                by_queue.entry(q).or_default().push(f);
            }
        }
        let mut invocations = Vec::new();
        for (queue, fs) in &by_queue {
            for chunk in fs.chunks(CHUNK) {
                let mut inv = FINISH.prepare_invoke();
                inv.key(format!("{}:ready", self.keys.queue(queue)))
                    .arg(self.keys.queue(queue))
                    .arg(self.keys.jobs_channel())
                    .arg(queue)
                    .arg(guard.map(micros).unwrap_or_default());
                for f in chunk {
                    let terminal = f.state.is_terminal();
                    inv.arg(f.id.to_string())
                        .arg(f.attempt)
                        .arg(f.state.as_str())
                        .arg(match (terminal, f.run_at) {
                            (false, Some(at)) => micros(at),
                            _ => String::new(),
                        })
                        .arg(if terminal {
                            micros(f.record.finished_at)
                        } else {
                            String::new()
                        })
                        .arg(f.attempt_delta)
                        .arg(serde_json::to_string(&f.record)?);
                }
                invocations.push((queue.clone(), inv));
            }
        }
        if invocations.is_empty() {
            self.running.forget(&ids);
            return Ok(Vec::new());
        }
        let mut pipe = ::redis::pipe();
        for (_, inv) in &invocations {
            pipe.invoke_script(inv);
        }
        let answers: Vec<Vec<String>> = self.run(&pipe).await?;
        // Every outcome got its answer, applied or stale: none of these jobs runs here now.
        self.running.forget(&ids);
        let next: HashMap<JobId, JobState> = outcomes.iter().map(|f| (f.id, f.state)).collect();
        let mut applied = Vec::new();
        let mut woken = Vec::new();
        for ((queue, _), ids) in invocations.iter().zip(answers) {
            for id in ids {
                let id: JobId = id.parse()?;
                if next.get(&id) == Some(&JobState::Available) {
                    woken.push(queue.clone());
                }
                applied.push(id);
            }
        }
        self.wake(woken);
        Ok(applied)
    }

    /// Per (queue, state) source, the next ids strictly below `before`, newest first: at most
    /// `n` of them overall, with their queue.
    async fn candidates(
        &self,
        sources: &[(String, JobState)],
        before: Option<JobId>,
        n: usize,
    ) -> Result<Vec<(JobId, String)>> {
        if sources.is_empty() {
            return Ok(Vec::new());
        }
        let max = match before {
            Some(id) => format!("({id}"),
            None => "+".to_string(),
        };
        let mut pipe = ::redis::pipe();
        for (queue, state) in sources {
            if *state == JobState::Running {
                // Running jobs are the lease set, ordered by deadline: read it whole (it holds
                // at most the workers' combined concurrency) and cut the page here.
                pipe.cmd("ZRANGE")
                    .arg(format!("{}:leases", self.keys.queue(queue)))
                    .arg(0)
                    .arg(-1);
            } else {
                pipe.cmd("ZRANGE")
                    .arg(format!("{}:s:{}", self.keys.queue(queue), state.as_str()))
                    .arg(&max)
                    .arg("-")
                    .arg("BYLEX")
                    .arg("REV")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(n);
            }
        }
        let lists: Vec<Vec<String>> = self.run(&pipe).await?;
        let mut all = Vec::new();
        for ((queue, _), ids) in sources.iter().zip(lists) {
            for id in ids {
                let id = id.parse::<JobId>()?;
                if before.is_none_or(|b| id < b) {
                    all.push((id, queue.clone()));
                }
            }
        }
        all.sort_by_key(|c| std::cmp::Reverse(c.0));
        all.dedup_by(|a, b| a.0 == b.0);
        all.truncate(n);
        Ok(all)
    }

    /// The (queue, state) sets a filter reads, limited to `allowed` states.
    async fn sources(
        &self,
        filter: &JobFilter,
        allowed: &[JobState],
    ) -> Result<Vec<(String, JobState)>> {
        let queues = match &filter.queue {
            Some(q) => vec![q.clone()],
            None => self.queues().await?,
        };
        let states: Vec<JobState> = allowed
            .iter()
            .copied()
            .filter(|s| filter.states.is_empty() || filter.states.contains(s))
            .collect();
        Ok(queues
            .iter()
            .flat_map(|q| states.iter().map(move |s| (q.clone(), *s)))
            .collect())
    }

    /// One page of jobs matching `filter` in `allowed` states, newest first, strictly older
    /// than `before`.
    /// Applies `action` to every job matching `filter` in `allowed` states, a page at a time
    /// and one script call per queue within a page; returns how many it applied to. Each page
    /// is acted on as it is read, and the id cursor never meets a job twice.
    async fn for_each_page(
        &self,
        filter: &JobFilter,
        allowed: &[JobState],
        action: Bulk,
    ) -> Result<u64> {
        let mut n = 0u64;
        let mut cursor = None;
        loop {
            let jobs = self.page(filter, allowed, cursor, CHUNK).await?;
            let full = jobs.len() == CHUNK;
            cursor = jobs.last().map(|j| j.id);
            let mut by_queue: BTreeMap<String, Vec<JobId>> = BTreeMap::new();
            for j in jobs {
                by_queue.entry(j.queue).or_default().push(j.id);
            }
            for (queue, ids) in by_queue {
                n += match action {
                    Bulk::Retry => {
                        let answers = self.retry_in(&queue, &ids).await?;
                        answers.iter().filter(|a| *a == "ok").count()
                    }
                    Bulk::Purge => {
                        let answers = self.delete_in(&queue, &ids, "finished").await?;
                        answers.iter().filter(|(s, _)| s == "ok").count()
                    }
                } as u64;
            }
            if !full {
                return Ok(n);
            }
        }
    }

    async fn page(
        &self,
        filter: &JobFilter,
        allowed: &[JobState],
        before: Option<JobId>,
        limit: usize,
    ) -> Result<Vec<Job>> {
        let keep = |j: &Job| allowed.contains(&j.state) && matches(j, filter);
        if !filter.ids.is_empty() {
            let mut ids: Vec<JobId> = filter
                .ids
                .iter()
                .copied()
                .filter(|id| before.is_none_or(|b| *id < b))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            ids.reverse();
            let mut out = Vec::new();
            for chunk in ids.chunks(CHUNK) {
                let queues = self.queues_of(chunk).await?;
                let refs: Vec<(String, JobId)> = chunk
                    .iter()
                    .zip(queues)
                    .filter_map(|(id, q)| q.map(|q| (q, *id)))
                    .collect();
                out.extend(self.load_jobs(&refs).await?.into_iter().filter(keep));
                if out.len() >= limit {
                    break;
                }
            }
            out.truncate(limit);
            return Ok(out);
        }
        let sources = self.sources(filter, allowed).await?;
        // Without filters on the job's fields every candidate matches: read exactly a page.
        let refine = filter.kind.is_some()
            || filter.tag.is_some()
            || filter.created_after.is_some()
            || filter.created_before.is_some()
            || filter.error_contains.is_some();
        let batch = if refine { limit.max(200) } else { limit };
        let mut cursor = before;
        let mut out = Vec::new();
        loop {
            let refs = self.candidates(&sources, cursor, batch).await?;
            let Some(last) = refs.last() else { break };
            cursor = Some(last.0);
            let exhausted = refs.len() < batch;
            let refs: Vec<(String, JobId)> = refs.into_iter().map(|(id, q)| (q, id)).collect();
            for job in self.load_jobs(&refs).await? {
                if keep(&job) {
                    out.push(job);
                    if out.len() == limit {
                        return Ok(out);
                    }
                }
            }
            if exhausted {
                break;
            }
        }
        Ok(out)
    }

    /// Claims keys and caller-chosen ids, then inserts. See [`Store::enqueue_many`].
    ///
    /// The batch is cut into parts of at most [`ENQUEUE_PART`] jobs of one queue. Each part
    /// takes two round trips (its key claims, then its insert), and up to [`IN_FLIGHT`] parts
    /// are under way at once on the one connection, so the server works on one part while
    /// the client prepares the next.
    ///
    /// A call that fails may have been applied in part: parts that completed, and parts whose
    /// insert reached Redis but whose answer was lost (the connection dropped). Repeating the
    /// call is safe for jobs with a key: if a part's claims lost their answer, its claims were
    /// freed here; if an insert's answer was lost, its jobs exist and the retry gets them
    /// back as duplicates (and confirms their claims); jobs of parts never sent are inserted
    /// by the retry. Jobs without a key are inserted again; a caller-chosen id makes such a
    /// retry fail with "already exists" instead.
    async fn insert(&self, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>> {
        for job in &jobs {
            job.validate()?;
        }
        // Whether a job is due is decided on the server's clock (estimated here, measured
        // again every few seconds), not on this machine's.
        let now = self.clock_now().await?;
        let batch = Incoming::new(&jobs, now);
        // Duplicates within the batch follow the first job with their key.
        let mut first_with_key: HashMap<&str, usize> = HashMap::new();
        let mut follows: Vec<(usize, usize)> = Vec::new();
        let mut by_queue: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, job) in jobs.iter().enumerate() {
            if let Some(key) = job.idempotency_key.as_deref() {
                if let Some(&first) = first_with_key.get(key) {
                    follows.push((i, first));
                    continue;
                }
                first_with_key.insert(key, i);
            }
            by_queue.entry(job.queue.as_str()).or_default().push(i);
        }
        let parts: Vec<(&str, &[usize])> = by_queue
            .iter()
            .flat_map(|(queue, members)| members.chunks(ENQUEUE_PART).map(move |c| (*queue, c)))
            .collect();
        // Once a part fails, parts not yet started are not started: the call fails anyway,
        // and what it leaves applied stays as small as it can.
        let failing = AtomicBool::new(false);
        let sends: Vec<_> = parts
            .iter()
            .map(|&(queue, part)| {
                let failing = &failing;
                let batch = &batch;
                async move {
                    if failing.load(Ordering::Relaxed) {
                        return Err(None);
                    }
                    let result = self.insert_part(batch, queue, part).await;
                    if result.is_err() {
                        failing.store(true, Ordering::Relaxed);
                    }
                    result.map_err(Some)
                }
            })
            .collect();
        let results: Vec<PartResult> = futures::stream::iter(sends)
            .buffered(IN_FLIGHT)
            .collect()
            .await;
        let mut answers: Vec<Option<Enqueued>> = vec![None; jobs.len()];
        let mut woken = Vec::new();
        let mut failed = None;
        for (&(queue, _), result) in parts.iter().zip(results) {
            match result {
                Ok(done) => {
                    for (i, answer) in done {
                        if !answer.duplicate && answer.state == JobState::Available {
                            woken.push(queue.to_string());
                        }
                        answers[i] = Some(answer);
                    }
                }
                Err(Some(e)) => {
                    failed.get_or_insert(e);
                }
                Err(None) => {}
            }
        }
        woken.dedup();
        self.wake(woken);
        if let Some(e) = failed {
            let stored = answers.iter().filter(|a| a.is_some()).count();
            return Err(match e {
                Error::StoreFull(msg) if stored > 0 => Error::StoreFull(format!(
                    "{msg}. {stored} of the {} jobs of this enqueue were stored (or found to exist) before that; once Redis has room, sending the same jobs again returns those with an idempotency key as duplicates and enqueues jobs without one a second time",
                    jobs.len()
                )),
                e => e,
            });
        }
        for (i, first) in follows {
            answers[i] = answers[first].clone().map(|a| Enqueued {
                duplicate: true,
                ..a
            });
        }
        answers
            .into_iter()
            .map(|a| a.ok_or_else(|| Error::Unsupported("enqueue left a job unanswered".into())))
            .collect()
    }

    /// One part of a batch (jobs of one queue): claims its keys, reserves its caller-chosen
    /// ids, inserts the jobs that are not duplicates. Returns an answer per job of the part.
    async fn insert_part(
        &self,
        batch: &Incoming<'_>,
        queue: &str,
        part: &[usize],
    ) -> Result<Vec<(usize, Enqueued)>> {
        let jobs = batch.jobs;
        let keyed: Vec<usize> = part
            .iter()
            .copied()
            .filter(|&i| jobs[i].idempotency_key.is_some())
            .collect();
        let held = match self.claim_keys(batch, &keyed).await {
            Ok(held) => held,
            Err(e) => {
                // The claims may have been applied and only their answer lost: free the
                // ones this call made, so a retry of the call is not kept waiting.
                self.release_claims(batch, &keyed).await;
                return Err(e);
            }
        };
        let mut out = Vec::with_capacity(part.len());
        let mut claimed = Vec::new();
        let mut duplicates = BTreeSet::new();
        for (&i, holder) in keyed.iter().zip(held) {
            match holder {
                None => claimed.push(i),
                Some(answer) => {
                    duplicates.insert(i);
                    out.push((i, answer));
                }
            }
        }
        let inserting: Vec<usize> = part
            .iter()
            .copied()
            .filter(|i| !duplicates.contains(i))
            .collect();
        if let Err(e) = self.reserve_ids(batch, &inserting).await {
            self.release_claims(batch, &claimed).await;
            return Err(e);
        }
        if inserting.is_empty() {
            return Ok(out);
        }
        let pipe = self.insert_pipeline(batch, queue, &inserting)?;
        self.run_insert(&pipe, batch, queue, &inserting, &claimed)
            .await?;
        out.extend(inserting.into_iter().map(|i| {
            (
                i,
                Enqueued {
                    id: batch.ids[i],
                    state: batch.states[i],
                    duplicate: false,
                },
            )
        }));
        Ok(out)
    }

    /// One part's insert: queue registry and id index, then one `MULTI` with the jobs'
    /// hashes and their state indexes (plain writes of new keys: nothing to decide, so no
    /// script), then the confirmations of the part's key claims (a claim expires unless
    /// confirmed). The ids are new (generated, or reserved by [`Self::reserve_ids`]).
    fn insert_pipeline(
        &self,
        batch: &Incoming<'_>,
        queue: &str,
        part: &[usize],
    ) -> Result<Pipeline> {
        let (jobs, ids) = (batch.jobs, &batch.id_text);
        let base = self.keys.queue(queue);
        let mut pipe = ::redis::pipe();
        // Every reply comes back, errors included: `run_insert` tells from them what applied.
        pipe.ignore_errors();
        for cmd in self.registry_writes(batch, queue, part) {
            pipe.add_command(cmd);
        }
        // Inside the transaction every reply is kept too: a command Redis refuses as it is
        // queued (out of memory) is why the whole transaction is then refused.
        pipe.cmd("MULTI").ignore();
        // Sized up front: each member is an id of 36 bytes and a score of up to 20.
        let zadd = |key: String| {
            let mut cmd = ::redis::Cmd::with_capacity(2 + 2 * part.len(), 64 + 60 * part.len());
            cmd.arg("ZADD").arg(key);
            cmd
        };
        let mut listed = zadd(format!("{base}:s:available"));
        let mut ordered = zadd(format!("{base}:ready"));
        let mut later = zadd(format!("{base}:s:scheduled"));
        let mut delayed = zadd(format!("{base}:delayed"));
        let (mut ready, mut waiting) = (false, false);
        for &i in part {
            let job = &jobs[i];
            let run_at = job.due_at(batch.now);
            let args = serde_json::to_string(&job.args)?;
            let mut hset = ::redis::Cmd::with_capacity(24, 256 + job.kind.len() + args.len());
            hset.arg("HSET")
                .arg(format!("{base}:job:{}", ids[i]))
                .arg("kind")
                .arg(&job.kind)
                .arg("args")
                .arg(args)
                .arg("priority")
                .arg(job.priority)
                .arg("state")
                .arg(batch.states[i].as_str())
                .arg("attempt")
                .arg(0)
                .arg("max_attempts")
                .arg(job.max_attempts)
                .arg("run_at")
                .arg(run_at.timestamp_micros())
                .arg("created_at")
                .arg(batch.now.timestamp_micros());
            // An empty key, tags or metadata is not stored (readers take none, [] and {}).
            if let Some(key) = &job.idempotency_key {
                hset.arg("idempotency_key").arg(key);
            }
            if !job.tags.is_empty() {
                hset.arg("tags").arg(serde_json::to_string(&job.tags)?);
            }
            match &job.metadata {
                serde_json::Value::Object(m) if m.is_empty() => {}
                other => {
                    hset.arg("metadata").arg(serde_json::to_string(other)?);
                }
            }
            pipe.add_command(hset);
            if batch.states[i] == JobState::Available {
                listed.arg(0).arg(&ids[i]);
                ready_score(&mut ordered, job.priority, run_at);
                ordered.arg(&ids[i]);
                ready = true;
            } else {
                later.arg(0).arg(&ids[i]);
                delayed.arg(run_at.timestamp_micros()).arg(&ids[i]);
                waiting = true;
            }
        }
        if ready {
            pipe.add_command(listed);
            pipe.add_command(ordered);
            pipe.cmd("PUBLISH").arg(self.keys.jobs_channel()).arg(queue);
        }
        if waiting {
            pipe.add_command(later);
            pipe.add_command(delayed);
        }
        pipe.cmd("EXEC");
        // A plain PERSIST: the key was claimed by this call a moment ago and a claim lasts
        // CLAIM_MS, so it is still ours unless this insert stalled for longer than that.
        for &i in part {
            if let Some(key) = &jobs[i].idempotency_key {
                pipe.cmd("PERSIST").arg(self.keys.idempotency(key)).ignore();
            }
        }
        Ok(pipe)
    }

    /// The writes before a part's transaction: the queue into the queue registry, generated
    /// ids into the id index (caller-chosen ones were reserved there already).
    fn registry_writes(
        &self,
        batch: &Incoming<'_>,
        queue: &str,
        part: &[usize],
    ) -> Vec<::redis::Cmd> {
        let mut sadd = ::redis::cmd("SADD");
        sadd.arg(self.keys.queues()).arg(queue);
        let mut cmds = vec![sadd];
        let generated: Vec<usize> = part
            .iter()
            .copied()
            .filter(|&i| batch.jobs[i].id.is_none())
            .collect();
        if !generated.is_empty() {
            let mut hset = ::redis::cmd("HSET");
            hset.arg(self.keys.index());
            for &i in &generated {
                hset.arg(&batch.id_text[i]).arg(queue);
            }
            cmds.push(hset);
        }
        cmds
    }

    /// Runs a part's insert pipeline (see [`Self::insert_pipeline`]) and leaves the part
    /// either applied whole or, as far as the answers tell, not at all:
    ///
    /// - transaction refused (Redis out of memory refuses it whole): nothing of it applied,
    ///   so the part's ids leave the index and its key claims are freed (the `PERSIST`s
    ///   after `EXEC` ran regardless). A retry of the call inserts these jobs; no key is left
    ///   pointing at a job that does not exist.
    /// - transaction applied but a write before it refused (memory freed by someone else in
    ///   between): the refused writes are sent again, so the jobs are listed and found.
    /// - no answer (connection lost): the insert may have been applied, and its key
    ///   confirmations with it or not: every claim whose job exists is confirmed, so the key
    ///   outlives the claim's expiry. Unconfirmed claims of jobs that do not exist expire.
    async fn run_insert(
        &self,
        pipe: &Pipeline,
        batch: &Incoming<'_>,
        queue: &str,
        inserting: &[usize],
        claimed: &[usize],
    ) -> Result<()> {
        let mut replies: Vec<::redis::Value> = match self.run(pipe).await {
            Ok(replies) => replies,
            Err(e) => {
                self.confirm_existing(batch, claimed).await;
                return Err(e);
            }
        };
        let exec = replies.pop().map(::redis::Value::extract_error);
        // Why a transaction was refused: the first command refused before or inside it.
        let cause = |replies: Vec<::redis::Value>, exec: ::redis::RedisError| {
            replies
                .into_iter()
                .find_map(|r| r.extract_error().err())
                .unwrap_or(exec)
        };
        match exec {
            Some(Ok(::redis::Value::Array(results))) => {
                if let Some(e) = results.into_iter().find_map(|r| r.extract_error().err()) {
                    // A command inside the transaction failed on its own (a key of the wrong
                    // type: data not written by this version). The others applied.
                    self.confirm_existing(batch, claimed).await;
                    return Err(Error::Unsupported(format!(
                        "Redis failed a write while enqueueing into queue `{queue}`: {e}"
                    )));
                }
            }
            Some(Err(e)) => {
                self.undo_insert(batch, inserting, claimed).await;
                return Err(cause(replies, e).into());
            }
            other => {
                self.confirm_existing(batch, claimed).await;
                return Err(Error::Unsupported(format!(
                    "Redis answered a transaction with {other:?}"
                )));
            }
        }
        // The transaction applied, so every command inside it was queued: a refused reply
        // is one of the writes before it.
        if replies
            .iter()
            .any(|r| matches!(r, ::redis::Value::ServerError(_)))
        {
            let mut repair = ::redis::pipe();
            for cmd in self.registry_writes(batch, queue, inserting) {
                repair.add_command(cmd).ignore();
            }
            if let Err(e) = self.run::<()>(&repair).await {
                tracing::error!(queue, error = %e, "jobs were inserted but could not be entered into the queue registry and id index; a retry of the enqueue repairs it");
                return Err(e);
            }
        }
        Ok(())
    }

    /// After a refused insert transaction: takes the part's ids out of the index and frees
    /// its key claims (only those this call still holds). Neither step is a write Redis
    /// refuses when out of memory.
    async fn undo_insert(&self, batch: &Incoming<'_>, inserting: &[usize], claimed: &[usize]) {
        let mut pipe = ::redis::pipe();
        for chunk in inserting.chunks(CHUNK) {
            let mut hdel = ::redis::cmd("HDEL");
            hdel.arg(self.keys.index());
            for &i in chunk {
                hdel.arg(&batch.id_text[i]);
            }
            pipe.add_command(hdel).ignore();
        }
        if let Err(e) = self.run::<()>(&pipe).await {
            tracing::warn!(error = %e, "could not take the ids of a refused enqueue out of the index; lookups of them find no job");
        }
        self.release_claims(batch, claimed).await;
    }

    /// Claims the idempotency keys of `which` jobs. Per job: `None` when claimed (insert it),
    /// or the holder's answer (a duplicate).
    async fn claim_keys(
        &self,
        batch: &Incoming<'_>,
        which: &[usize],
    ) -> Result<Vec<Option<Enqueued>>> {
        if which.is_empty() {
            return Ok(Vec::new());
        }
        let value = |i: usize| batch.holder(i);
        let key = |i: usize| self.keys.idempotency(batch.key(i));
        let pipes: Vec<Pipeline> = which
            .chunks(CHUNK)
            .map(|chunk| {
                let mut pipe = ::redis::pipe();
                for &i in chunk {
                    pipe.cmd("SET")
                        .arg(key(i))
                        .arg(value(i))
                        .arg("NX")
                        .arg("PX")
                        .arg(CLAIM_MS);
                }
                pipe
            })
            .collect();
        let sends: Vec<_> = pipes.iter().map(|pipe| self.run(pipe)).collect();
        let answers: Vec<Result<Vec<Option<String>>>> = futures::stream::iter(sends)
            .buffered(IN_FLIGHT)
            .collect()
            .await;
        let mut out = Vec::with_capacity(which.len());
        let mut won = Vec::with_capacity(which.len());
        for answer in answers {
            won.extend(answer?.into_iter().map(|a| a.is_some()));
        }
        for (&i, won) in which.iter().zip(won) {
            if won {
                out.push(None);
            } else {
                out.push(self.settle_key(&key(i), &value(i)).await?);
            }
        }
        Ok(out)
    }

    /// Resolves a lost claim: the holder's answer, or `None` once the key was won after all
    /// (its holder had gone).
    async fn settle_key(&self, key: &str, value: &str) -> Result<Option<Enqueued>> {
        let deadline = tokio::time::Instant::now() + CLAIM_WAIT;
        loop {
            let mut pipe = ::redis::pipe();
            pipe.cmd("GET").arg(key).cmd("PTTL").arg(key);
            let (holder, ttl): (Option<String>, i64) = self.run(&pipe).await?;
            if let Some((queue, id)) = holder.as_deref().and_then(|h| h.split_once('/')) {
                let id: JobId = id.parse()?;
                let mut conn = self.conn.clone();
                let state: Option<String> = ::redis::cmd("HGET")
                    .arg(format!("{}:job:{id}", self.keys.queue(queue)))
                    .arg("state")
                    .query_async(&mut conn)
                    .await?;
                if let Some(state) = state {
                    if ttl >= 0 {
                        // The job exists but its claim was never confirmed (an insert whose
                        // answer was lost): confirm it now, before it expires.
                        self.eval::<i64>(KEY_KEEP.key(key).arg(holder.as_deref()))
                            .await?;
                    }
                    return Ok(Some(Enqueued {
                        id,
                        state: state.parse()?,
                        duplicate: true,
                    }));
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(Error::Unsupported(format!(
                        "idempotency key `{}` is claimed by an enqueue that has not finished; try again",
                        key.strip_prefix(&format!("{}:key:", self.keys.prefix))
                            .unwrap_or(key)
                    )));
                }
                if ttl == -1 {
                    // Confirmed, yet its job is gone: deleted before the key could be freed.
                    self.eval::<i64>(KEY_FREE.key(key).arg(holder.as_deref()))
                        .await?;
                } else {
                    // Another enqueue claimed it and is inserting its job right now.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            let mut conn = self.conn.clone();
            let won: Option<String> = ::redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("NX")
                .arg("PX")
                .arg(CLAIM_MS)
                .query_async(&mut conn)
                .await?;
            if won.is_some() {
                return Ok(None);
            }
        }
    }

    /// Frees claims made by an enqueue that then failed (only those this call still holds).
    async fn release_claims(&self, batch: &Incoming<'_>, claimed: &[usize]) {
        if claimed.is_empty() {
            return;
        }
        let mut pipe = ::redis::pipe();
        for &i in claimed {
            pipe.invoke_script(
                KEY_FREE
                    .key(self.keys.idempotency(batch.key(i)))
                    .arg(batch.holder(i)),
            )
            .ignore();
        }
        if let Err(e) = self.run::<()>(&pipe).await {
            tracing::warn!(error = %e, "could not free idempotency key claims; they expire in a minute");
        }
    }

    /// After a failed insert: confirms the claims of `claimed` jobs that exist after all.
    async fn confirm_existing(&self, batch: &Incoming<'_>, claimed: &[usize]) {
        let attempt = async {
            for chunk in claimed.chunks(CHUNK) {
                let mut pipe = ::redis::pipe();
                for &i in chunk {
                    pipe.cmd("EXISTS").arg(format!(
                        "{}:job:{}",
                        self.keys.queue(&batch.jobs[i].queue),
                        batch.id_text[i]
                    ));
                }
                let exists: Vec<bool> = self.run(&pipe).await?;
                let mut pipe = ::redis::pipe();
                for (&i, _) in chunk.iter().zip(exists).filter(|(_, e)| *e) {
                    pipe.invoke_script(
                        KEY_KEEP
                            .key(self.keys.idempotency(batch.key(i)))
                            .arg(batch.holder(i)),
                    )
                    .ignore();
                }
                self.run::<()>(&pipe).await?;
            }
            Ok::<(), Error>(())
        };
        if let Err(e) = attempt.await {
            tracing::warn!(error = %e, "could not check the key claims of a failed enqueue; a retry of it confirms them");
        }
    }

    /// Enters caller-chosen ids into the global index, refusing one that exists (in any
    /// queue). On refusal nothing stays reserved.
    async fn reserve_ids(&self, batch: &Incoming<'_>, which: &[usize]) -> Result<()> {
        let (jobs, ids) = (batch.jobs, &batch.ids);
        let chosen: Vec<usize> = which
            .iter()
            .copied()
            .filter(|&i| jobs[i].id.is_some())
            .collect();
        if chosen.is_empty() {
            return Ok(());
        }
        let mut pipe = ::redis::pipe();
        // Every reply comes back, errors included, so a part refused half-way (Redis out of
        // memory) undoes exactly the reservations it made.
        pipe.ignore_errors();
        for &i in &chosen {
            pipe.cmd("HSETNX")
                .arg(self.keys.index())
                .arg(ids[i].to_string())
                .arg(&jobs[i].queue);
        }
        let set: Vec<::redis::Value> = self.run(&pipe).await?;
        let taken = set.iter().position(|s| matches!(s, ::redis::Value::Int(0)));
        let refused = set.iter().find_map(|s| s.clone().extract_error().err());
        if taken.is_none() && refused.is_none() {
            return Ok(());
        }
        let mut undo = ::redis::cmd("HDEL");
        undo.arg(self.keys.index());
        let mut any = false;
        for (&i, s) in chosen.iter().zip(&set) {
            if matches!(s, ::redis::Value::Int(1)) {
                undo.arg(ids[i].to_string());
                any = true;
            }
        }
        if any {
            let mut conn = self.conn.clone();
            undo.query_async::<()>(&mut conn).await?;
        }
        match (refused, taken) {
            (Some(e), _) => Err(e.into()),
            (None, Some(pos)) => Err(Error::invalid(
                "id",
                format!("job id {} already exists", ids[chosen[pos]]),
            )),
            (None, None) => Ok(()),
        }
    }

    /// Why an operation on `id` changed nothing: it is missing, or in the wrong state.
    fn refusal(id: JobId, status: &str, action: &'static str) -> Error {
        match status.parse::<JobState>() {
            Ok(state) => Error::WrongState { id, state, action },
            Err(_) => Error::NotFound(id),
        }
    }
}

/// Forwards published wake-ups to subscribers until `stop`, reconnecting after errors.
async fn subscribe_loop(
    client: ::redis::Client,
    keys: Arc<Keys>,
    events: broadcast::Sender<StoreEvent>,
    stop: CancellationToken,
) {
    let jobs = keys.jobs_channel();
    let cancel = keys.cancel_channel();
    let mut delay = Duration::from_millis(100);
    loop {
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            c = client.get_async_pubsub() => c,
        };
        let mut pubsub = match connected {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "Redis subscriber connection failed; polling covers the gap");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        if let Err(e) = pubsub.subscribe(&[&jobs, &cancel]).await {
            tracing::warn!(error = %e, "SUBSCRIBE failed; retrying");
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            continue;
        }
        delay = Duration::from_millis(100);
        let mut stream = pubsub.on_message();
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return,
                m = stream.next() => m,
            };
            let Some(msg) = msg else {
                tracing::warn!("Redis subscriber connection lost; reconnecting");
                break;
            };
            let Ok(payload) = msg.get_payload::<String>() else {
                continue;
            };
            let event = if msg.get_channel_name() == cancel {
                match payload.parse::<Uuid>() {
                    Ok(id) => StoreEvent::CancelRequested { id: JobId(id) },
                    Err(_) => continue,
                }
            } else {
                StoreEvent::JobsAvailable { queue: payload }
            };
            let _ = events.send(event);
        }
    }
}

/// A bulk enqueue part's answers (job index, answer), or why it has none: its error, or
/// `None` when it was not started because another part failed.
type PartResult = std::result::Result<Vec<(usize, Enqueued)>, Option<Error>>;

/// A batch being enqueued, with what every part of it needs computed once.
struct Incoming<'a> {
    jobs: &'a [NewJob],
    now: DateTime<Utc>,
    ids: Vec<JobId>,
    /// The ids as text, as they appear in keys and sets.
    id_text: Vec<String>,
    states: Vec<JobState>,
}

impl<'a> Incoming<'a> {
    fn new(jobs: &'a [NewJob], now: DateTime<Utc>) -> Self {
        let ids: Vec<JobId> = jobs
            .iter()
            .map(|j| j.id.unwrap_or_else(JobId::new))
            .collect();
        let id_text = ids.iter().map(JobId::to_string).collect();
        let states = jobs
            .iter()
            .map(|j| {
                if j.due_at(now) > now {
                    JobState::Scheduled
                } else {
                    JobState::Available
                }
            })
            .collect();
        Incoming {
            jobs,
            now,
            ids,
            id_text,
            states,
        }
    }

    /// Job `i`'s idempotency key (empty when it has none).
    fn key(&self, i: usize) -> &str {
        self.jobs[i].idempotency_key.as_deref().unwrap_or_default()
    }

    /// What job `i`'s key claim holds: `queue/id`.
    fn holder(&self, i: usize) -> String {
        format!("{}/{}", self.jobs[i].queue, self.id_text[i])
    }
}

/// Adds a ready job's score in `{P:Q}:ready` to `cmd`, as `ready_score` in `prelude.lua`
/// computes it: priority · 10¹³ + run_at in whole milliseconds (clamped to 13 digits), in
/// double precision. Up to priority ±900 the sum is an integer below 2⁵³, sent as one.
fn ready_score(cmd: &mut ::redis::Cmd, priority: i16, run_at: DateTime<Utc>) {
    let ms = run_at
        .timestamp_micros()
        .div_euclid(1000)
        .clamp(0, 9_999_999_999_999);
    let score = f64::from(priority) * 1e13 + ms as f64;
    if score.abs() < 9.0e15 {
        cmd.arg(score as i64);
    } else {
        cmd.arg(score);
    }
}

fn micros(t: DateTime<Utc>) -> String {
    t.timestamp_micros().to_string()
}

fn after(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    super::after(now, d)
}

/// A lease length in whole microseconds, added to the server's clock in the scripts.
fn lease_micros(d: Duration) -> String {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).to_string()
}

fn before(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    super::before(now, d)
}

/// Adds the reads of one job to `pipe`: its hash, then its attempt history.
fn read_job(pipe: &mut Pipeline, base: &str, id: impl std::fmt::Display) {
    pipe.cmd("HGETALL")
        .arg(format!("{base}:job:{id}"))
        .cmd("GET")
        .arg(format!("{base}:hist:{id}"));
}

/// A job from its hash's field/value list and its history (one JSON record per line). The
/// id and queue come from the hash's key; fields left out at enqueue take their defaults (no
/// key, no tags, `{}`, no attempts). Jobs written before the history had a key of its own
/// hold their earlier attempts as a JSON array in the hash's `attempts` field.
fn job_from_fields(
    queue: &str,
    id: JobId,
    flat: Vec<String>,
    history: Option<String>,
) -> Result<Job> {
    let mut map: HashMap<String, String> = HashMap::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        map.insert(k, v);
    }
    let corrupt = |field: &str| {
        Error::Unsupported(format!("stored job {id} is missing or has a bad `{field}`"))
    };
    let text = |field: &str| map.get(field).cloned().ok_or_else(|| corrupt(field));
    let int = |field: &str| -> Result<i64> {
        map.get(field)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| corrupt(field))
    };
    let time = |field: &str| -> Result<Option<DateTime<Utc>>> {
        match map.get(field) {
            None => Ok(None),
            Some(v) => v
                .parse::<i64>()
                .ok()
                .and_then(DateTime::from_timestamp_micros)
                .map(Some)
                .ok_or_else(|| corrupt(field)),
        }
    };
    let required = |field: &str| time(field)?.ok_or_else(|| corrupt(field));
    Ok(Job {
        id,
        queue: queue.to_string(),
        kind: text("kind")?,
        args: serde_json::from_str(&text("args")?)?,
        priority: i16::try_from(int("priority")?).map_err(|_| corrupt("priority"))?,
        state: text("state")?.parse()?,
        attempt: i32::try_from(int("attempt")?).map_err(|_| corrupt("attempt"))?,
        max_attempts: i32::try_from(int("max_attempts")?).map_err(|_| corrupt("max_attempts"))?,
        run_at: required("run_at")?,
        created_at: required("created_at")?,
        attempted_at: time("attempted_at")?,
        finalized_at: time("finalized_at")?,
        lease_owner: map.get("lease_owner").cloned(),
        lease_expires_at: time("lease_expires_at")?,
        cancel_requested_at: time("cancel_requested_at")?,
        idempotency_key: map.get("idempotency_key").cloned(),
        tags: match map.get("tags") {
            Some(v) => serde_json::from_str(v)?,
            None => Vec::new(),
        },
        metadata: match map.get("metadata") {
            Some(v) => serde_json::from_str(v)?,
            None => serde_json::Value::Object(Default::default()),
        },
        attempts: {
            let mut attempts = match map.get("attempts") {
                Some(v) => serde_json::from_str::<Vec<AttemptRecord>>(v)?,
                None => Vec::new(),
            };
            for line in history.as_deref().unwrap_or_default().lines() {
                attempts.push(serde_json::from_str(line)?);
            }
            attempts
        },
    })
}

/// The filter's conditions on a job's own fields (states and queue are chosen by the sets
/// read, ids by lookup).
fn matches(job: &Job, filter: &JobFilter) -> bool {
    if !filter.states.is_empty() && !filter.states.contains(&job.state) {
        return false;
    }
    if filter.queue.as_ref().is_some_and(|q| *q != job.queue) {
        return false;
    }
    if filter.kind.as_ref().is_some_and(|k| *k != job.kind) {
        return false;
    }
    if filter.tag.as_ref().is_some_and(|t| !job.tags.contains(t)) {
        return false;
    }
    if filter.created_after.is_some_and(|t| job.created_at < t) {
        return false;
    }
    if filter.created_before.is_some_and(|t| job.created_at >= t) {
        return false;
    }
    if !filter.ids.is_empty() && !filter.ids.contains(&job.id) {
        return false;
    }
    if let Some(text) = &filter.error_contains {
        let needle = text.to_lowercase();
        let hit = job.attempts.iter().any(|a| {
            a.error
                .iter()
                .chain(a.causes.iter())
                .any(|m| m.to_lowercase().contains(&needle))
        });
        if !hit {
            return false;
        }
    }
    true
}

/// What [`RedisStore::for_each_page`] does to each page.
#[derive(Clone, Copy)]
enum Bulk {
    /// Admin retry (now, on the server's clock).
    Retry,
    /// Delete finished jobs.
    Purge,
}

const TERMINAL: [JobState; 3] = [JobState::Completed, JobState::Cancelled, JobState::Dead];
const NOT_RUNNING: [JobState; 6] = [
    JobState::Scheduled,
    JobState::Available,
    JobState::Retryable,
    JobState::Completed,
    JobState::Cancelled,
    JobState::Dead,
];

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
        let mut conn = self.conn.clone();
        let found: Option<i64> = ::redis::cmd("GET")
            .arg(self.keys.version())
            .query_async(&mut conn)
            .await?;
        if found.is_some_and(|v| v > LAYOUT_VERSION) {
            return Err(Error::Unsupported(format!(
                "the data under prefix `{}` has layout {}, newer than this binary's {LAYOUT_VERSION}; upgrade conveyor",
                self.keys.prefix,
                found.unwrap_or_default()
            )));
        }
        if found == Some(1) {
            // Layout 2 lists running jobs from the lease set, which always held them too: the
            // old per-queue set of running jobs goes. (It also keeps attempt histories apart
            // from the hash; readers still take the histories layout 1 kept in the hash.)
            let mut pipe = ::redis::pipe();
            for queue in self.queues().await? {
                pipe.cmd("DEL")
                    .arg(format!("{}:s:running", self.keys.queue(&queue)))
                    .ignore();
            }
            self.run::<()>(&pipe).await?;
        }
        // Nothing is written when the layout is current, so every process can start (and
        // read) on a Redis that is out of memory and refuses writes. Loading scripts is not
        // a write Redis refuses.
        if found != Some(LAYOUT_VERSION) {
            ::redis::cmd("SET")
                .arg(self.keys.version())
                .arg(LAYOUT_VERSION)
                .query_async::<()>(&mut conn)
                .await?;
        }
        self.load_scripts().await
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
        let mut conn = self.conn.clone();
        let found: Option<i64> = ::redis::cmd("GET")
            .arg(self.keys.version())
            .query_async(&mut conn)
            .await?;
        if found != Some(LAYOUT_VERSION) {
            return Err(Error::Unsupported(format!(
                "prefix `{}` has data layout {}, this binary needs {LAYOUT_VERSION}; run `conveyor migrate`",
                self.keys.prefix,
                found.map_or("none".to_string(), |v| v.to_string())
            )));
        }
        Ok(())
    }

    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>> {
        self.insert(jobs).await
    }

    async fn fetch(&self, request: FetchRequest<'_>) -> Result<Vec<Job>> {
        let base = self.keys.queue(request.queue);
        let mut inv = FETCH.prepare_invoke();
        inv.key(format!("{base}:ready"))
            .arg(&base)
            .arg(lease_micros(request.lease))
            .arg(request.limit)
            .arg(request.worker)
            .arg(CHUNK)
            .arg(FETCH_INLINE);
        let mut rows: Vec<(String, Vec<String>, Option<String>)> = self.eval(&inv).await?;
        if rows.iter().any(|(_, fields, _)| fields.is_empty()) {
            // A large claim: read the hashes with plain commands. These jobs are running
            // under this worker's lease, so nothing deletes them meanwhile; if this read
            // fails, the runtime adopts the claimed jobs as after any fetch whose answer was
            // lost.
            let mut pipe = ::redis::pipe();
            for (id, _, _) in &rows {
                read_job(&mut pipe, &base, id);
            }
            let hashes: Vec<(Vec<String>, Option<String>)> = self.run(&pipe).await?;
            for ((_, fields, history), (hash, h)) in rows.iter_mut().zip(hashes) {
                *fields = hash;
                *history = h;
            }
        }
        let mut jobs = rows
            .into_iter()
            .map(|(id, fields, history)| {
                job_from_fields(request.queue, id.parse()?, fields, history)
            })
            .collect::<Result<Vec<_>>>()?;
        jobs.sort_by_key(|a| (a.priority, a.run_at, a.id));
        self.running
            .remember(request.queue, jobs.iter().map(|j| j.id));
        Ok(jobs)
    }

    async fn finish(&self, outcomes: Vec<Finish>) -> Result<u64> {
        if outcomes.is_empty() {
            return Ok(0);
        }
        Ok(self.apply(&outcomes, None).await?.len() as u64)
    }

    async fn heartbeat(&self, worker: &str, lease: Duration) -> Result<Vec<JobId>> {
        let queues = self.queues().await?;
        if queues.is_empty() {
            return Ok(Vec::new());
        }
        let lease = lease_micros(lease);
        let mut pipe = ::redis::pipe();
        for queue in &queues {
            let base = self.keys.queue(queue);
            pipe.invoke_script(
                HEARTBEAT
                    .key(format!("{base}:leases"))
                    .arg(&base)
                    .arg(worker)
                    .arg(&lease),
            );
        }
        let cancel: Vec<Vec<String>> = self.run(&pipe).await?;
        cancel.into_iter().flatten().map(|id| id.parse()).collect()
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
        let by_sets_only = filter.ids.is_empty()
            && filter.kind.is_none()
            && filter.tag.is_none()
            && filter.created_after.is_none()
            && filter.created_before.is_none()
            && filter.error_contains.is_none();
        if by_sets_only {
            let sources = self.sources(filter, &JobState::ALL).await?;
            if sources.is_empty() {
                return Ok(0);
            }
            let mut pipe = ::redis::pipe();
            for (queue, state) in &sources {
                pipe.cmd("ZCARD").arg(self.keys.state_set(queue, *state));
            }
            let counts: Vec<u64> = self.run(&pipe).await?;
            return Ok(counts.into_iter().sum());
        }
        let mut n = 0u64;
        let mut cursor = None;
        loop {
            let jobs = self.page(filter, &JobState::ALL, cursor, CHUNK).await?;
            n += jobs.len() as u64;
            match jobs.last() {
                Some(last) if jobs.len() == CHUNK => cursor = Some(last.id),
                _ => return Ok(n),
            }
        }
    }

    async fn retry(&self, id: JobId) -> Result<Job> {
        let Some(Some(queue)) = self.queues_of(&[id]).await?.pop() else {
            return Err(Error::NotFound(id));
        };
        let status = self
            .retry_in(&queue, &[id])
            .await?
            .pop()
            .unwrap_or_default();
        if status != "ok" {
            return Err(Self::refusal(id, &status, "retry"));
        }
        self.load_jobs(&[(queue, id)])
            .await?
            .pop()
            .ok_or(Error::NotFound(id))
    }

    async fn retry_matching(&self, filter: &JobFilter) -> Result<u64> {
        self.for_each_page(filter, &NOT_RUNNING, Bulk::Retry).await
    }

    async fn cancel(&self, id: JobId) -> Result<CancelResult> {
        let Some(Some(queue)) = self.queues_of(&[id]).await?.pop() else {
            return Err(Error::NotFound(id));
        };
        let base = self.keys.queue(&queue);
        let mut inv = CANCEL.prepare_invoke();
        inv.key(format!("{base}:ready"))
            .arg(&base)
            .arg(self.keys.cancel_channel())
            .arg(id.to_string());
        let answer: Vec<String> = self.eval(&inv).await?;
        match answer.first().map(String::as_str) {
            Some("cancelled") => Ok(CancelResult::Cancelled),
            Some("requested") => {
                let _ = self.events.send(StoreEvent::CancelRequested { id });
                Ok(CancelResult::Requested)
            }
            Some("wrong") => Err(Self::refusal(
                id,
                answer.get(1).map_or("", String::as_str),
                "cancel",
            )),
            _ => Err(Error::NotFound(id)),
        }
    }

    async fn discard(&self, id: JobId) -> Result<()> {
        let Some(Some(queue)) = self.queues_of(&[id]).await?.pop() else {
            return Err(Error::NotFound(id));
        };
        let (status, _) = self
            .delete_in(&queue, &[id], "any")
            .await?
            .pop()
            .unwrap_or_default();
        if status == "ok" {
            Ok(())
        } else {
            Err(Self::refusal(id, &status, "discard"))
        }
    }

    async fn purge(&self, filter: &JobFilter) -> Result<u64> {
        self.for_each_page(filter, &TERMINAL, Bulk::Purge).await
    }

    async fn queue_stats(&self) -> Result<Vec<QueueStats>> {
        let queues = self.queues().await?;
        if queues.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = ::redis::pipe();
        for queue in &queues {
            let base = self.keys.queue(queue);
            let mut inv = STATS.prepare_invoke();
            inv.key(format!("{base}:ready")).arg(&base);
            for state in JobState::ALL {
                inv.arg(state.as_str());
            }
            pipe.invoke_script(&inv);
        }
        let rows: Vec<Vec<String>> = self.run(&pipe).await?;
        let mut stats = Vec::new();
        for (queue, row) in queues.into_iter().zip(rows) {
            let mut counts = BTreeMap::new();
            for (state, n) in JobState::ALL.iter().zip(&row) {
                let n: i64 = n.parse().unwrap_or(0);
                if n > 0 {
                    counts.insert(*state, n);
                }
            }
            if counts.is_empty() {
                continue;
            }
            let time = |i: usize| {
                row.get(i)
                    .and_then(|v| v.parse::<i64>().ok())
                    .and_then(DateTime::from_timestamp_micros)
            };
            // Ages are measured on the server's clock, which the script read.
            let (oldest, now) = (time(JobState::ALL.len()), time(JobState::ALL.len() + 1));
            stats.push(QueueStats {
                queue,
                counts,
                oldest_available_age: oldest
                    .zip(now)
                    .and_then(|(at, now)| (now - at).to_std().ok()),
            });
        }
        Ok(stats)
    }

    async fn promote_due(&self, now: DateTime<Utc>, limit: u32) -> Result<u64> {
        let mut left = limit as usize;
        let mut n = 0u64;
        for queue in self.queues().await? {
            let base = self.keys.queue(&queue);
            while left > 0 {
                let step = left.min(CHUNK);
                let moved: u64 = self
                    .eval(
                        PROMOTE
                            .key(format!("{base}:delayed"))
                            .arg(&base)
                            .arg(micros(now))
                            .arg(step)
                            .arg(self.keys.jobs_channel())
                            .arg(&queue),
                    )
                    .await?;
                n += moved;
                left -= moved as usize;
                if moved > 0 {
                    self.wake([queue.clone()]);
                }
                if (moved as usize) < step {
                    break;
                }
            }
            if left == 0 {
                break;
            }
        }
        Ok(n)
    }

    async fn rescue_expired(
        &self,
        now: DateTime<Utc>,
        policy: &RetryPolicy,
        limit: u32,
    ) -> Result<RescueReport> {
        let mut report = RescueReport::default();
        let mut left = limit as usize;
        for queue in self.queues().await? {
            if left == 0 {
                break;
            }
            let base = self.keys.queue(&queue);
            let flat: Vec<String> = self
                .eval(
                    RESCUE_SCAN
                        .key(format!("{base}:leases"))
                        .arg(&base)
                        .arg(micros(now))
                        .arg(left.min(CHUNK)),
                )
                .await?;
            let mut finishes = Vec::new();
            for row in flat.chunks(6) {
                let [id, attempt, max, started, owner, cancel] = row else {
                    continue;
                };
                let started = started
                    .parse::<i64>()
                    .ok()
                    .and_then(DateTime::from_timestamp_micros)
                    .unwrap_or(now);
                finishes.push(rescue_finish(
                    id.parse()?,
                    attempt.parse().unwrap_or(0),
                    max.parse().unwrap_or(1),
                    (!owner.is_empty()).then(|| owner.clone()),
                    started,
                    !cancel.is_empty(),
                    now,
                    policy,
                ));
            }
            if finishes.is_empty() {
                continue;
            }
            // Another rescuer may have taken some since the scan, or a heartbeat renewed
            // them: only the outcomes that applied are counted.
            let applied: BTreeSet<JobId> = self
                .apply(&finishes, Some(now))
                .await?
                .into_iter()
                .collect();
            for f in finishes.iter().filter(|f| applied.contains(&f.id)) {
                report.count(f);
            }
            left = left.saturating_sub(applied.len());
        }
        Ok(report)
    }

    async fn prune(&self, now: DateTime<Utc>, policy: &RetentionPolicy, limit: u32) -> Result<u64> {
        let cut = |d: Duration| micros(before(now, d));
        let keyed = |d: Duration| micros(before(now, d.max(policy.idempotency)));
        let mut left = limit as usize;
        let mut n = 0u64;
        for queue in self.queues().await? {
            let base = self.keys.queue(&queue);
            while left > 0 {
                let step = left.min(CHUNK);
                let flat: Vec<String> = self
                    .eval(
                        PRUNE
                            .key(format!("{base}:ready"))
                            .arg(&base)
                            .arg(step)
                            .arg(cut(policy.completed))
                            .arg(cut(policy.cancelled))
                            .arg(cut(policy.dead))
                            .arg(keyed(policy.completed))
                            .arg(keyed(policy.cancelled))
                            .arg(keyed(policy.dead)),
                    )
                    .await?;
                let deleted = flat
                    .chunks(2)
                    .map(|p| Ok((queue.clone(), p[0].parse()?, p[1].clone())))
                    .collect::<Result<Vec<(String, JobId, String)>>>()?;
                self.forget(&deleted).await?;
                n += deleted.len() as u64;
                left -= deleted.len();
                if deleted.len() < step {
                    break;
                }
            }
            if left == 0 {
                break;
            }
        }
        Ok(n)
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_comes_from_the_url() {
        assert_eq!(
            split_prefix("redis://h:6379/0").unwrap(),
            ("redis://h:6379/0".to_string(), "conveyor".to_string())
        );
        assert_eq!(
            split_prefix("redis://h/1?prefix=app_jobs&protocol=resp3").unwrap(),
            (
                "redis://h/1?protocol=resp3".to_string(),
                "app_jobs".to_string()
            )
        );
        assert!(split_prefix("redis://h/0?prefix=").is_err());
        assert!(split_prefix("redis://h/0?prefix={x}").is_err());
    }

    #[test]
    fn allow_eviction_comes_off_the_url() {
        assert!(!allow_eviction("redis://h/0").unwrap());
        assert!(allow_eviction("redis://h/0?prefix=a&allow_eviction=true").unwrap());
        assert!(!allow_eviction("redis://h/0?allow_eviction=false&protocol=resp3").unwrap());
        assert!(allow_eviction("redis://h/0?allow_eviction=yes").is_err());
        assert_eq!(
            split_prefix("redis://h/0?allow_eviction=true&protocol=resp3").unwrap(),
            (
                "redis://h/0?protocol=resp3".to_string(),
                "conveyor".to_string()
            )
        );
    }

    #[test]
    fn an_out_of_memory_refusal_is_a_full_store() {
        let oom = ::redis::RedisError::from((
            ::redis::ErrorKind::Extension,
            "pipeline",
            "OOM command not allowed when used memory > 'maxmemory'.".to_string(),
        ));
        assert!(matches!(store_error(oom), Error::StoreFull(m) if m.contains("maxmemory")));
        let other = ::redis::RedisError::from((::redis::ErrorKind::Io, "connection reset"));
        assert!(matches!(store_error(other), Error::Redis(_)));
    }

    #[test]
    fn persistence_warns_only_when_nothing_persists() {
        assert!(persistence_warnings("r", Some(true), Some("")).is_empty());
        assert!(persistence_warnings("r", Some(true), None).is_empty());
        assert!(persistence_warnings("r", Some(false), Some("3600 1 300 100")).is_empty());
        assert!(persistence_warnings("r", None, Some("60 1")).is_empty());
        assert!(persistence_warnings("r", Some(false), Some(""))[0].contains("neither"));
        assert!(persistence_warnings("r", Some(false), None)[0].contains("could not confirm"));
        assert!(persistence_warnings("r", None, None)[0].contains("could not confirm"));
    }

    #[test]
    fn queue_keys_share_one_hash_tag() {
        let keys = Keys {
            prefix: "conveyor".into(),
        };
        assert_eq!(keys.queue("default"), "{conveyor:default}");
        assert_eq!(keys.idempotency("order-1"), "conveyor:key:order-1");
    }
}
