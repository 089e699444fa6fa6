//! Remote workers: processes in any language that claim jobs over HTTP, run them, and report
//! how each attempt ended.
//!
//! The rules are the native runtime's: a claim is the store's [`Store::fetch`] (the lease,
//! `attempt` + 1), a heartbeat its [`Store::heartbeat`], and an outcome goes through the
//! runtime's [`transition`] (retry backoff, attempts exhausted → `dead`, a snooze that does
//! not use an attempt) to [`Store::finish`]. An outcome is accepted only from the worker that
//! holds the attempt's lease: once the lease expired and the job was rescued (and perhaps
//! claimed again), or the job finished, a late outcome is refused as a conflict and changes
//! nothing. A remote worker that stops heartbeating loses its leases to the ordinary rescue.
//! A completion may carry the job's result (size-limited as a native handler's, by
//! [`within_result_limit`]); a running attempt may report progress, accepted under the same
//! lease check as an outcome.
//!
//! [`RemoteWorkers`] keeps what one API server remembers between requests: the paused queues
//! (read at most once a second, as native workers do) and each remote worker's registration,
//! written to the store's `workers` collection so `GET /v1/workers` lists it beside the
//! native ones.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use conveyor_worker::clock::StoreClock;
use conveyor_worker::job::{DEFAULT_MAX_RESULT_BYTES, Progress};
use conveyor_worker::runtime::pause::{self, QueueSettings};
use conveyor_worker::runtime::registration::{self, QueueLoad, WorkerRegistration};
use conveyor_worker::runtime::{Ended, transition, within_result_limit};
use conveyor_worker::store::meta::{MetaQuery, Put};
use conveyor_worker::store::{FetchRequest, JobFilter, Page, StoreEvent};
use conveyor_worker::{
    Error as StoreError, Job, JobError, JobId, JobState, Outcome, RetryPolicy, Store,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Error, Result};

/// Longest worker id, in characters.
pub const MAX_WORKER_ID: usize = 128;
/// Most queues one claim names.
pub const MAX_CLAIM_QUEUES: usize = 32;
/// Most jobs one claim takes, and most outcomes one finish reports.
pub const MAX_BATCH: usize = 1000;
/// Longest lease a claim or heartbeat asks for, in seconds.
pub const MAX_LEASE_SECONDS: u32 = 3600;
/// Longest a claim waits for a job, in seconds.
pub const MAX_WAIT_SECONDS: u32 = 30;
/// Longest snooze or retry delay, in seconds (five years, as an enqueue's delay).
pub const MAX_DELAY_SECONDS: f64 = 158_112_000.0;
/// Longest error message or cause, in characters.
pub const MAX_MESSAGE: usize = 10_000;
/// Most causes in one error.
pub const MAX_CAUSES: usize = 32;
/// Longest traceback, in bytes.
pub const MAX_TRACEBACK: usize = 64 * 1024;

/// How often a waiting claim looks again without a wake-up: the store's notifications are
/// lossy, and jobs that become due (a retry's backoff ending) send none of their own.
const POLL: Duration = Duration::from_secs(1);
/// How long the paused-queue list is reused (native workers read it as often).
const PAUSE_TTL: Duration = pause::WATCH_INTERVAL;
/// A remote worker's registration lives at least this long after its last request.
const REGISTRATION_TTL: Duration = Duration::from_secs(60);
/// A worker this API server has not heard from in this long is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(600);

fn default_limit() -> u32 {
    1
}

fn default_lease() -> u32 {
    30
}

fn default_true() -> bool {
    true
}

/// A queue's name: 1-128 ASCII letters, digits, `.`, `_`, `-`, `:`.
#[derive(ToSchema)]
#[schema(pattern = r"^[A-Za-z0-9._:-]{1,128}$")]
#[allow(dead_code)]
struct QueueName(String);

/// A remote worker's id: 1-128 characters, none of them a control character.
#[derive(ToSchema)]
#[schema(pattern = r"^[^\x00-\x1f\x7f-\x9f]{1,128}$")]
#[allow(dead_code)]
struct WorkerIdText(String);

/// A claim: up to `limit` due jobs from `queues`, leased to `worker_id` for `lease_seconds`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// The claiming worker (its lease owner name; 1-128 characters without control
    /// characters). Unique per worker process.
    #[schema(value_type = WorkerIdText)]
    pub worker_id: String,
    /// Queues to claim from, in order (1-32 queue names).
    #[schema(min_items = 1, max_items = 32, value_type = Vec<QueueName>)]
    pub queues: Vec<String>,
    /// At most this many jobs (1-1000, default 1).
    #[serde(default = "default_limit")]
    #[schema(minimum = 1, maximum = 1000, default = 1)]
    pub limit: u32,
    /// Lease length in seconds (1-3600, default 30); heartbeats renew it.
    #[serde(default = "default_lease")]
    #[schema(minimum = 1, maximum = 3600, default = 30)]
    pub lease_seconds: u32,
    /// With no job due, wait up to this many seconds for one (0-30, default 0: answer at once).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 30, default = 0)]
    pub wait_seconds: u32,
}

/// A claimed job: what the worker needs to run it, and the attempt to report its outcome for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClaimedJob {
    /// Job id.
    #[schema(value_type = String, format = Uuid)]
    pub id: JobId,
    /// Queue.
    pub queue: String,
    /// Kind (selects the handler).
    pub kind: String,
    /// Handler arguments.
    pub args: serde_json::Value,
    /// This attempt's number (1-based); send it back with the outcome.
    pub attempt: i32,
    /// Attempt budget.
    pub max_attempts: i32,
    /// Priority (smaller runs first).
    pub priority: i16,
    /// Labels.
    pub tags: Vec<String>,
    /// Application metadata.
    pub metadata: serde_json::Value,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// When the lease runs out unless a heartbeat renews it.
    pub lease_expires_at: Option<DateTime<Utc>>,
}

impl From<Job> for ClaimedJob {
    fn from(j: Job) -> Self {
        Self {
            id: j.id,
            queue: j.queue,
            kind: j.kind,
            args: j.args,
            attempt: j.attempt,
            max_attempts: j.max_attempts,
            priority: j.priority,
            tags: j.tags,
            metadata: j.metadata,
            created_at: j.created_at,
            lease_expires_at: j.lease_expires_at,
        }
    }
}

/// A heartbeat: renew the leases of the jobs the worker still runs.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    /// The worker.
    #[schema(value_type = WorkerIdText)]
    pub worker_id: String,
    /// The jobs it runs now (at most 1000).
    #[schema(value_type = Vec<uuid::Uuid>, max_items = 1000)]
    pub job_ids: Vec<JobId>,
    /// New lease length in seconds (1-3600, default 30).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 3600)]
    pub lease_seconds: Option<u32>,
}

/// What a heartbeat renewed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatResponse {
    /// Leases renewed.
    #[schema(value_type = Vec<String>)]
    pub renewed: Vec<JobId>,
    /// Jobs this worker no longer holds (rescued, finished, or never its own): stop them and
    /// report nothing, their outcome would be refused.
    #[schema(value_type = Vec<String>)]
    pub lost: Vec<JobId>,
    /// Among `renewed`, jobs someone asked to cancel: stop them and report them (fail).
    #[schema(value_type = Vec<String>)]
    pub cancel_requested: Vec<JobId>,
}

/// The error of a failed attempt, as the worker saw it.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoteError {
    /// Top-level message (1-10000 characters).
    #[schema(min_length = 1, max_length = 10000)]
    pub message: String,
    /// Its causes, outermost first (at most 32).
    #[serde(default)]
    #[schema(max_items = 32)]
    pub causes: Vec<String>,
    /// The stack trace (at most 64 KiB), kept in the attempt history.
    #[serde(default)]
    pub traceback: Option<String>,
}

/// `complete`: the attempt succeeded.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteRequest {
    /// The worker that holds the lease.
    #[schema(value_type = WorkerIdText)]
    pub worker_id: String,
    /// The attempt the claim gave.
    #[schema(minimum = 1)]
    pub attempt: i32,
    /// What the job produced, any JSON value, kept with the job (`GET /v1/jobs/{id}` shows
    /// it). Over 64 KiB serialized the attempt fails instead, saying so.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
}

/// `progress`: how far a running attempt has got.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProgressRequest {
    /// The worker that holds the lease.
    #[schema(value_type = WorkerIdText)]
    pub worker_id: String,
    /// The attempt the claim gave.
    #[schema(minimum = 1)]
    pub attempt: i32,
    /// How far, 0 to 100.
    #[schema(minimum = 0, maximum = 100)]
    pub percent: f32,
    /// What it is doing; at most 1024 bytes are kept (a longer message is cut).
    #[serde(default)]
    pub message: Option<String>,
}

/// `fail`: the attempt failed.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailRequest {
    /// The worker that holds the lease.
    #[schema(value_type = WorkerIdText)]
    pub worker_id: String,
    /// The attempt the claim gave.
    #[schema(minimum = 1)]
    pub attempt: i32,
    /// What went wrong.
    pub error: RemoteError,
    /// `true` (default): retry after the backoff (or `retry_after_seconds`), `dead` once
    /// attempts are used up; `false`: `dead` now.
    #[serde(default = "default_true")]
    pub retryable: bool,
    /// Retry after this many seconds instead of the backoff.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 158_112_000)]
    pub retry_after_seconds: Option<f64>,
}

/// `snooze`: run again later without using an attempt.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnoozeRequest {
    /// The worker that holds the lease.
    #[schema(value_type = WorkerIdText)]
    pub worker_id: String,
    /// The attempt the claim gave.
    #[schema(minimum = 1)]
    pub attempt: i32,
    /// Run again after this many seconds.
    #[schema(minimum = 0, maximum = 158_112_000)]
    pub seconds: f64,
}

/// How an attempt ended, in a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FinishOutcome {
    /// Succeeded.
    Complete,
    /// Failed (`error` required).
    Fail,
    /// Run again after `seconds`, without using an attempt.
    Snooze,
}

/// One outcome in a batch.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FinishItem {
    /// Job id.
    #[schema(value_type = String, format = Uuid)]
    pub id: JobId,
    /// The attempt the claim gave.
    #[schema(minimum = 1)]
    pub attempt: i32,
    /// How it ended.
    pub outcome: FinishOutcome,
    /// `fail` only: what went wrong.
    #[serde(default)]
    pub error: Option<RemoteError>,
    /// `fail` only: as in the fail route (default true).
    #[serde(default)]
    pub retryable: Option<bool>,
    /// `fail` only: retry after this many seconds instead of the backoff.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 158_112_000)]
    pub retry_after_seconds: Option<f64>,
    /// `snooze` only: run again after this many seconds.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 158_112_000)]
    pub seconds: Option<f64>,
    /// `complete` only: the job's result, as in the complete route.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
}

/// Many outcomes at once (the batched form of complete, fail and snooze).
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FinishRequest {
    /// The worker that holds the leases.
    #[schema(value_type = WorkerIdText)]
    pub worker_id: String,
    /// 1-1000 outcomes, at most one per job.
    #[schema(min_items = 1, max_items = 1000)]
    pub items: Vec<FinishItem>,
}

/// What became of one outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FinishResult {
    /// Job id.
    #[schema(value_type = String, format = Uuid)]
    pub id: JobId,
    /// 200 applied; 403 the job's queue is outside the key's queues; 404 no such job; 409 the
    /// attempt is not this worker's lease any more (nothing changed).
    pub status: u16,
    /// The job's new state, when applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub state: Option<JobState>,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A checked outcome.
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    /// Succeeded, with the job's result if it has one.
    Complete(Option<serde_json::Value>),
    /// Failed.
    Fail {
        /// What went wrong.
        error: RemoteError,
        /// Whether attempts that remain are used.
        retryable: bool,
        /// Delay override.
        retry_after: Option<Duration>,
    },
    /// Run again later without using an attempt.
    Snooze(Duration),
}

fn check_worker_id(worker_id: &str) -> Result<()> {
    let n = worker_id.chars().count();
    if n == 0 || n > MAX_WORKER_ID || worker_id.chars().any(char::is_control) {
        return Err(StoreError::invalid(
            "worker_id",
            format!("must be 1 to {MAX_WORKER_ID} characters without control characters"),
        )
        .into());
    }
    Ok(())
}

fn check_lease(field: &str, seconds: u32) -> Result<Duration> {
    if !(1..=MAX_LEASE_SECONDS).contains(&seconds) {
        return Err(StoreError::invalid(
            field,
            format!("must be between 1 and {MAX_LEASE_SECONDS} seconds, got {seconds}"),
        )
        .into());
    }
    Ok(Duration::from_secs(u64::from(seconds)))
}

fn check_seconds(field: &str, seconds: f64) -> Result<Duration> {
    if !seconds.is_finite() || !(0.0..=MAX_DELAY_SECONDS).contains(&seconds) {
        return Err(StoreError::invalid(
            field,
            format!("must be between 0 and {MAX_DELAY_SECONDS} seconds, got {seconds}"),
        )
        .into());
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn check_error(field: &str, e: &RemoteError) -> Result<()> {
    let n = e.message.chars().count();
    if n == 0 || n > MAX_MESSAGE {
        return Err(StoreError::invalid(
            format!("{field}.message"),
            format!("must be 1 to {MAX_MESSAGE} characters"),
        )
        .into());
    }
    if e.causes.len() > MAX_CAUSES {
        return Err(StoreError::invalid(
            format!("{field}.causes"),
            format!("at most {MAX_CAUSES} causes, got {}", e.causes.len()),
        )
        .into());
    }
    if let Some(i) = e
        .causes
        .iter()
        .position(|c| c.chars().count() > MAX_MESSAGE)
    {
        return Err(StoreError::invalid(
            format!("{field}.causes[{i}]"),
            format!("at most {MAX_MESSAGE} characters"),
        )
        .into());
    }
    if e.traceback
        .as_ref()
        .is_some_and(|t| t.len() > MAX_TRACEBACK)
    {
        return Err(StoreError::invalid(
            format!("{field}.traceback"),
            format!("at most {MAX_TRACEBACK} bytes"),
        )
        .into());
    }
    Ok(())
}

fn check_attempt(field: &str, attempt: i32) -> Result<()> {
    if attempt < 1 {
        return Err(StoreError::invalid(
            field,
            format!("must be the attempt the claim gave (1 or more), got {attempt}"),
        )
        .into());
    }
    Ok(())
}

/// The body of a single-job outcome route (complete, fail, snooze): whose lease, which
/// attempt, and the outcome it reports.
pub trait ReportRequest {
    /// The worker that holds the lease.
    fn worker_id(&self) -> &str;
    /// The attempt the claim gave.
    fn attempt(&self) -> i32;
    /// The outcome, its own fields checked.
    fn outcome(&self) -> Result<Report>;

    /// Checks every field (the lease's, then the outcome's) and answers the outcome.
    fn check(&self) -> Result<Report> {
        check_lease_fields(self.worker_id(), self.attempt())?;
        self.outcome()
    }
}

/// The fields that name a lease: every single-job route's (outcomes and progress).
fn check_lease_fields(worker_id: &str, attempt: i32) -> Result<()> {
    check_worker_id(worker_id)?;
    check_attempt("attempt", attempt)
}

impl ProgressRequest {
    /// Checks every field: the lease's, and a percent between 0 and 100.
    pub fn check(&self) -> Result<()> {
        check_lease_fields(&self.worker_id, self.attempt)?;
        if !self.percent.is_finite() || !(0.0..=100.0).contains(&self.percent) {
            return Err(StoreError::invalid(
                "percent",
                format!("must be between 0 and 100, got {}", self.percent),
            )
            .into());
        }
        Ok(())
    }
}

impl ReportRequest for CompleteRequest {
    fn worker_id(&self) -> &str {
        &self.worker_id
    }
    fn attempt(&self) -> i32 {
        self.attempt
    }
    fn outcome(&self) -> Result<Report> {
        Ok(Report::Complete(self.result.clone()))
    }
}

impl ReportRequest for FailRequest {
    fn worker_id(&self) -> &str {
        &self.worker_id
    }
    fn attempt(&self) -> i32 {
        self.attempt
    }
    fn outcome(&self) -> Result<Report> {
        check_error("error", &self.error)?;
        let retry_after = self
            .retry_after_seconds
            .map(|s| check_seconds("retry_after_seconds", s))
            .transpose()?;
        Ok(Report::Fail {
            error: self.error.clone(),
            retryable: self.retryable,
            retry_after,
        })
    }
}

impl ReportRequest for SnoozeRequest {
    fn worker_id(&self) -> &str {
        &self.worker_id
    }
    fn attempt(&self) -> i32 {
        self.attempt
    }
    fn outcome(&self) -> Result<Report> {
        Ok(Report::Snooze(check_seconds("seconds", self.seconds)?))
    }
}

impl FinishItem {
    /// Checks it; `field` is its place in the batch (`items[3]`).
    pub fn check(&self, field: &str) -> Result<Report> {
        check_attempt(&format!("{field}.attempt"), self.attempt)?;
        let only = |name: &str, present: bool, outcome: &str| -> Result<()> {
            if present {
                return Err(StoreError::invalid(
                    format!("{field}.{name}"),
                    format!("is only for outcome `{outcome}`"),
                )
                .into());
            }
            Ok(())
        };
        match self.outcome {
            FinishOutcome::Complete => {
                only("error", self.error.is_some(), "fail")?;
                only("retryable", self.retryable.is_some(), "fail")?;
                only(
                    "retry_after_seconds",
                    self.retry_after_seconds.is_some(),
                    "fail",
                )?;
                only("seconds", self.seconds.is_some(), "snooze")?;
                Ok(Report::Complete(self.result.clone()))
            }
            FinishOutcome::Fail => {
                only("seconds", self.seconds.is_some(), "snooze")?;
                only("result", self.result.is_some(), "complete")?;
                let error = self.error.clone().ok_or_else(|| {
                    Error::from(StoreError::invalid(
                        format!("{field}.error"),
                        "is required for outcome `fail`: {\"message\": \"…\"}",
                    ))
                })?;
                check_error(&format!("{field}.error"), &error)?;
                let retry_after = self
                    .retry_after_seconds
                    .map(|s| check_seconds(&format!("{field}.retry_after_seconds"), s))
                    .transpose()?;
                Ok(Report::Fail {
                    error,
                    retryable: self.retryable.unwrap_or(true),
                    retry_after,
                })
            }
            FinishOutcome::Snooze => {
                only("error", self.error.is_some(), "fail")?;
                only("result", self.result.is_some(), "complete")?;
                only("retryable", self.retryable.is_some(), "fail")?;
                only(
                    "retry_after_seconds",
                    self.retry_after_seconds.is_some(),
                    "fail",
                )?;
                let seconds = self.seconds.ok_or_else(|| {
                    Error::from(StoreError::invalid(
                        format!("{field}.seconds"),
                        "is required for outcome `snooze`",
                    ))
                })?;
                Ok(Report::Snooze(check_seconds(
                    &format!("{field}.seconds"),
                    seconds,
                )?))
            }
        }
    }
}

impl FinishRequest {
    /// Checks it: the worker id, 1-1000 items, each id once, each item's fields.
    pub fn check(&self) -> Result<Vec<(JobId, i32, Report)>> {
        check_worker_id(&self.worker_id)?;
        if self.items.is_empty() || self.items.len() > MAX_BATCH {
            return Err(StoreError::invalid(
                "items",
                format!(
                    "must hold 1 to {MAX_BATCH} outcomes, got {}",
                    self.items.len()
                ),
            )
            .into());
        }
        let mut seen = HashSet::with_capacity(self.items.len());
        let mut out = Vec::with_capacity(self.items.len());
        for (i, item) in self.items.iter().enumerate() {
            let field = format!("items[{i}]");
            if !seen.insert(item.id) {
                return Err(StoreError::invalid(
                    format!("{field}.id"),
                    format!("job {} is reported twice in this batch", item.id),
                )
                .into());
            }
            out.push((item.id, item.attempt, item.check(&field)?));
        }
        Ok(out)
    }
}

/// A checked claim.
#[derive(Clone, Debug)]
struct Claim {
    queues: Vec<String>,
    limit: u32,
    lease: Duration,
    wait: Duration,
}

impl ClaimRequest {
    fn check(&self) -> Result<Claim> {
        check_worker_id(&self.worker_id)?;
        if self.queues.is_empty() || self.queues.len() > MAX_CLAIM_QUEUES {
            return Err(StoreError::invalid(
                "queues",
                format!(
                    "must name 1 to {MAX_CLAIM_QUEUES} queues, got {}",
                    self.queues.len()
                ),
            )
            .into());
        }
        let mut queues: Vec<String> = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            conveyor_worker::job::check_name("queue", q).map_err(|e| match e {
                StoreError::InvalidInput { message, .. } => StoreError::InvalidInput {
                    field: format!("queues[{i}]"),
                    message,
                },
                other => other,
            })?;
            if !queues.contains(q) {
                queues.push(q.clone());
            }
        }
        if !(1..=MAX_BATCH as u32).contains(&self.limit) {
            return Err(StoreError::invalid(
                "limit",
                format!("must be between 1 and {MAX_BATCH}, got {}", self.limit),
            )
            .into());
        }
        let lease = check_lease("lease_seconds", self.lease_seconds)?;
        if self.wait_seconds > MAX_WAIT_SECONDS {
            return Err(StoreError::invalid(
                "wait_seconds",
                format!(
                    "must be between 0 and {MAX_WAIT_SECONDS}, got {}",
                    self.wait_seconds
                ),
            )
            .into());
        }
        Ok(Claim {
            queues,
            limit: self.limit,
            lease,
            wait: Duration::from_secs(u64::from(self.wait_seconds)),
        })
    }
}

/// What this API server remembers of one remote worker, for its registration.
#[derive(Debug)]
struct Seen {
    started_at: DateTime<Utc>,
    host: String,
    last_request: Instant,
    written: Option<Instant>,
    queues: BTreeMap<String, QueueSeen>,
}

#[derive(Debug, Default)]
struct QueueSeen {
    limit: u32,
    running: u64,
    finished: u64,
    previous: Option<(u64, Instant)>,
}

/// The remote-worker operations over one store, with what one API server remembers between
/// requests (paused queues, the registrations it writes).
pub struct RemoteWorkers {
    store: Arc<dyn Store>,
    policy: RetryPolicy,
    clock: StoreClock,
    paused: std::sync::Mutex<Option<(Instant, HashSet<String>)>>,
    seen: std::sync::Mutex<HashMap<String, Seen>>,
    rotate: AtomicUsize,
    max_result_bytes: usize,
}

impl std::fmt::Debug for RemoteWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteWorkers")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl RemoteWorkers {
    /// Over `store`, retrying failed attempts with the default [`RetryPolicy`] (a native
    /// kind's policy is its own; a remote worker's kinds are unknown here, so it overrides
    /// the backoff per attempt with `retry_after_seconds`).
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            policy: RetryPolicy::default(),
            clock: StoreClock::new(),
            paused: std::sync::Mutex::new(None),
            seen: std::sync::Mutex::new(HashMap::new()),
            rotate: AtomicUsize::new(0),
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
        }
    }

    /// With results limited to `limit` bytes serialized (default
    /// [`DEFAULT_MAX_RESULT_BYTES`], as `worker.max_result_bytes`).
    pub fn with_max_result_bytes(mut self, limit: usize) -> Self {
        self.max_result_bytes = limit;
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Claims up to `limit` jobs from the request's queues for `worker_id`. `allowed`: the
    /// queues the caller's key is restricted to (`None`: any); a queue outside them is
    /// [`Error::Forbidden`]. Paused queues give nothing. With nothing due it waits up to
    /// `wait_seconds`, woken by the store's notifications (and looking again every second).
    /// `host`: where the request came from, for the worker's registration.
    pub async fn claim(
        &self,
        request: &ClaimRequest,
        allowed: Option<&[String]>,
        host: &str,
    ) -> Result<Vec<ClaimedJob>> {
        let claim = request.check()?;
        if let Some(allowed) = allowed
            && let Some(q) = claim.queues.iter().find(|q| !allowed.contains(q))
        {
            return Err(Error::Forbidden(format!(
                "this key may claim from the queues {} only, not from `{q}`",
                allowed.join(", ")
            )));
        }
        let worker = request.worker_id.as_str();
        // Registered before the wait, not after it: a worker that has just started and is
        // long-polling an empty queue serves it, and an enqueue meanwhile must not warn that
        // nobody does.
        self.saw(worker, host, &claim, &[]).await;
        let mut events = self.store.subscribe();
        let deadline = tokio::time::Instant::now() + claim.wait;
        let jobs = loop {
            let jobs = self.fetch_round(worker, &claim).await?;
            let now = tokio::time::Instant::now();
            if !jobs.is_empty() || now >= deadline {
                break jobs;
            }
            let until = deadline.min(now + POLL);
            loop {
                match tokio::time::timeout_at(until, events.recv()).await {
                    Err(_) => break,
                    Ok(Ok(StoreEvent::JobsAvailable { queue }))
                        if claim.queues.contains(&queue) =>
                    {
                        break;
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => break,
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                        tokio::time::sleep_until(until).await;
                        break;
                    }
                }
            }
        };
        if !jobs.is_empty() {
            self.saw(worker, host, &claim, &jobs).await;
        }
        Ok(jobs.into_iter().map(ClaimedJob::from).collect())
    }

    /// One pass over the queues (starting at a different one each time, so a busy first
    /// queue does not starve the others), skipping paused ones.
    async fn fetch_round(&self, worker: &str, claim: &Claim) -> Result<Vec<Job>> {
        let paused = self.paused().await;
        let n = claim.queues.len();
        let start = self.rotate.fetch_add(1, Ordering::Relaxed) % n;
        let mut jobs = Vec::new();
        for i in 0..n {
            let queue = &claim.queues[(start + i) % n];
            let remaining = claim.limit as usize - jobs.len();
            if remaining == 0 {
                break;
            }
            if paused.contains(queue) {
                continue;
            }
            jobs.extend(
                self.store
                    .fetch(FetchRequest {
                        queue,
                        limit: remaining as u32,
                        worker,
                        lease: claim.lease,
                    })
                    .await?,
            );
        }
        Ok(jobs)
    }

    /// The paused queues, read at most once per [`PAUSE_TTL`]. A failed read keeps the last
    /// known list (none paused at first), as native workers do.
    async fn paused(&self) -> HashSet<String> {
        {
            let cached = self.paused.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, set)) = cached.as_ref()
                && at.elapsed() < PAUSE_TTL
            {
                return set.clone();
            }
        }
        let query = MetaQuery {
            limit: 1000,
            ..MetaQuery::default()
        };
        let mut cached = None;
        match self.store.meta_list(pause::COLLECTION, &query).await {
            Ok(records) => {
                let set: HashSet<String> = records
                    .iter()
                    .filter(|r| {
                        r.decode::<QueueSettings>()
                            .map(|s| s.paused)
                            .unwrap_or(false)
                    })
                    .map(|r| r.key.clone())
                    .collect();
                cached = Some(set);
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading queue settings failed; keeping the last known")
            }
        }
        let mut slot = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        match cached {
            Some(set) => {
                *slot = Some((Instant::now(), set.clone()));
                set
            }
            None => slot.as_ref().map(|(_, s)| s.clone()).unwrap_or_default(),
        }
    }

    /// Renews the leases of `job_ids` that `worker_id` holds; says which it no longer holds
    /// and which were asked to cancel. `allowed`: the caller's key's queues (`None`: any); a
    /// job on another queue is not renewed and comes back `lost`.
    pub async fn heartbeat(
        &self,
        request: &HeartbeatRequest,
        allowed: Option<&[String]>,
    ) -> Result<HeartbeatResponse> {
        check_worker_id(&request.worker_id)?;
        if request.job_ids.len() > MAX_BATCH {
            return Err(StoreError::invalid(
                "job_ids",
                format!("at most {MAX_BATCH} jobs, got {}", request.job_ids.len()),
            )
            .into());
        }
        let lease = check_lease(
            "lease_seconds",
            request.lease_seconds.unwrap_or(default_lease()),
        )?;
        let worker = request.worker_id.as_str();
        let mut ids = request.job_ids.clone();
        ids.sort();
        ids.dedup();
        if ids.is_empty() {
            self.touch(worker).await;
            return Ok(HeartbeatResponse::default());
        }
        let beat: Vec<JobId> = match allowed {
            None => ids.clone(),
            Some(allowed) => self
                .jobs(&ids)
                .await?
                .into_values()
                .filter(|j| allowed.contains(&j.queue))
                .map(|j| j.id)
                .collect(),
        };
        let cancel = if beat.is_empty() {
            Vec::new()
        } else {
            self.store.heartbeat(worker, &beat, lease).await?
        };
        let held: HashSet<JobId> = self
            .jobs(&beat)
            .await?
            .into_values()
            .filter(|j| j.state == JobState::Running && j.lease_owner.as_deref() == Some(worker))
            .map(|j| j.id)
            .collect();
        let (renewed, lost) = ids.into_iter().partition(|id| held.contains(id));
        self.touch(worker).await;
        Ok(HeartbeatResponse {
            renewed,
            lost,
            cancel_requested: cancel.into_iter().filter(|id| held.contains(id)).collect(),
        })
    }

    /// The jobs among `ids` that exist, by id (one listing; none for no ids, where the
    /// filter's empty id list would match every job).
    async fn jobs(&self, ids: &[JobId]) -> Result<HashMap<JobId, Job>> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let filter = JobFilter {
            ids: ids.to_vec(),
            ..JobFilter::default()
        };
        let page = Page {
            before: None,
            limit: MAX_BATCH as u32,
        };
        Ok(self
            .store
            .list(&filter, page)
            .await?
            .into_iter()
            .map(|j| (j.id, j))
            .collect())
    }

    /// Reports one attempt's outcome: the job's new state, [`StoreError::NotFound`] if there
    /// is no such job, [`Error::Forbidden`] if it is on a queue outside `allowed` (the
    /// caller's key's queues; `None`: any), [`StoreError::Conflict`] if the attempt is not
    /// `worker_id`'s lease any more.
    pub async fn report(
        &self,
        worker_id: &str,
        id: JobId,
        attempt: i32,
        report: Report,
        allowed: Option<&[String]>,
    ) -> Result<JobState> {
        let result = self
            .finish(worker_id, vec![(id, attempt, report)], allowed)
            .await?
            .pop()
            .ok_or_else(|| StoreError::Unsupported("finish returned no answer".into()))?;
        match (result.status, result.state) {
            (200, Some(state)) => Ok(state),
            (404, _) => Err(StoreError::NotFound(id).into()),
            (403, _) => Err(Error::Forbidden(result.error.unwrap_or_default())),
            _ => Err(StoreError::Conflict(result.error.unwrap_or_default()).into()),
        }
    }

    /// Reports many outcomes in one write; each gets its own answer, in input order: 200
    /// applied, 404 no such job, 403 a job on a queue outside `allowed` (the caller's key's
    /// queues; `None`: any), 409 not `worker_id`'s lease any more. Only the 200s change
    /// anything.
    pub async fn finish(
        &self,
        worker_id: &str,
        items: Vec<(JobId, i32, Report)>,
        allowed: Option<&[String]>,
    ) -> Result<Vec<FinishResult>> {
        check_worker_id(worker_id)?;
        let ids: Vec<JobId> = items.iter().map(|(id, _, _)| *id).collect();
        let jobs = self.jobs(&ids).await?;
        let now = self
            .clock
            .now_fresh(self.store.as_ref(), Duration::from_secs(10))
            .await?;
        let mut results = Vec::with_capacity(items.len());
        let mut finishes = Vec::new();
        for (id, attempt, report) in items {
            let Some(job) = jobs.get(&id) else {
                results.push(FinishResult {
                    id,
                    status: 404,
                    state: None,
                    error: Some(format!("job {id} not found")),
                });
                continue;
            };
            if let Some(allowed) = allowed
                && !allowed.contains(&job.queue)
            {
                results.push(FinishResult {
                    id,
                    status: 403,
                    state: None,
                    error: Some(format!(
                        "job {id} is on the queue `{}`; this key may report on the queues {} only",
                        job.queue,
                        allowed.join(", ")
                    )),
                });
                continue;
            }
            if let Some(why) = not_leased(job, worker_id, attempt) {
                results.push(FinishResult {
                    id,
                    status: 409,
                    state: None,
                    error: Some(why),
                });
                continue;
            }
            let (ended, traceback) = ended(report);
            let ended = within_result_limit(ended, self.max_result_bytes);
            let started_at = job.attempted_at.unwrap_or(now);
            let mut finish = transition(job, ended, &self.policy, worker_id, started_at, now);
            finish.record.traceback = traceback;
            results.push(FinishResult {
                id,
                status: 200,
                state: Some(finish.state),
                error: None,
            });
            finishes.push(finish);
        }
        if finishes.is_empty() {
            return Ok(results);
        }
        let expected = finishes.len() as u64;
        let applied = self.store.finish(finishes.clone()).await?;
        if applied < expected {
            // Some lease ended between the check and the write (the rescue got there first):
            // those outcomes were not applied. Which ones: the jobs whose history lacks the
            // record just written.
            let written = self.jobs(&ids).await?;
            for f in &finishes {
                let landed = written.get(&f.id).is_some_and(|j| f.landed(j));
                if !landed && let Some(r) = results.iter_mut().find(|r| r.id == f.id) {
                    r.status = 409;
                    r.state = None;
                    r.error = Some(format!(
                        "job {} attempt {} is no longer leased to worker {worker_id}: its lease ended while the outcome was written",
                        f.id, f.attempt
                    ));
                }
            }
        }
        self.finished(worker_id, &jobs, &results).await;
        Ok(results)
    }

    /// Records a running attempt's progress ([`Progress::reported`]: the percent clamped, the
    /// message cut to [`conveyor_worker::job::PROGRESS_MESSAGE_LIMIT`] bytes), under the outcome routes' rules:
    /// [`StoreError::NotFound`] if there is no such job, [`Error::Forbidden`] if it is on a
    /// queue outside `allowed`, [`StoreError::Conflict`] if the attempt is not
    /// `request.worker_id`'s lease (any more).
    pub async fn progress(
        &self,
        id: JobId,
        request: &ProgressRequest,
        allowed: Option<&[String]>,
    ) -> Result<()> {
        request.check()?;
        let worker = request.worker_id.as_str();
        let job = self
            .jobs(&[id])
            .await?
            .remove(&id)
            .ok_or(StoreError::NotFound(id))?;
        if let Some(allowed) = allowed
            && !allowed.contains(&job.queue)
        {
            return Err(Error::Forbidden(format!(
                "job {id} is on the queue `{}`; this key may report on the queues {} only",
                job.queue,
                allowed.join(", ")
            )));
        }
        if let Some(why) = not_leased(&job, worker, request.attempt) {
            return Err(StoreError::Conflict(why.replace("the outcome", "the progress")).into());
        }
        let now = self
            .clock
            .now_fresh(self.store.as_ref(), Duration::from_secs(10))
            .await?;
        let progress = Progress::reported(
            request.attempt,
            request.percent,
            request.message.clone(),
            now,
        );
        if !self.store.report_progress(id, &progress).await? {
            return Err(StoreError::Conflict(format!(
                "job {id} attempt {} is no longer running: the progress was not recorded",
                request.attempt
            ))
            .into());
        }
        self.touch(worker).await;
        Ok(())
    }

    /// Notes a claim in the worker's registration.
    async fn saw(&self, worker: &str, host: &str, claim: &Claim, jobs: &[Job]) {
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.retain(|_, s| s.last_request.elapsed() < FORGET_AFTER);
            let entry = seen.entry(worker.to_string()).or_insert_with(|| Seen {
                started_at: self.clock.now(),
                host: host.to_string(),
                last_request: Instant::now(),
                written: None,
                queues: BTreeMap::new(),
            });
            entry.last_request = Instant::now();
            entry.host = host.to_string();
            for q in &claim.queues {
                if !entry.queues.contains_key(q) {
                    // A queue the registration does not name yet: written now, not at the
                    // next due write, so nobody is told the queue has no worker.
                    entry.written = None;
                }
                entry.queues.entry(q.clone()).or_default().limit = claim.limit;
            }
            for j in jobs {
                if let Some(q) = entry.queues.get_mut(&j.queue) {
                    q.running += 1;
                }
            }
        }
        self.touch(worker).await;
    }

    /// Notes finished attempts in the worker's registration.
    async fn finished(&self, worker: &str, jobs: &HashMap<JobId, Job>, results: &[FinishResult]) {
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(entry) = seen.get_mut(worker) {
                entry.last_request = Instant::now();
                for r in results.iter().filter(|r| r.status == 200) {
                    if let Some(q) = jobs.get(&r.id).and_then(|j| entry.queues.get_mut(&j.queue)) {
                        q.running = q.running.saturating_sub(1);
                        q.finished += 1;
                    }
                }
            }
        }
        self.touch(worker).await;
    }

    /// Writes the worker's registration if it is due (a third of its TTL since the last).
    async fn touch(&self, worker: &str) {
        let record = {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let Some(entry) = seen.get_mut(worker) else {
                return;
            };
            entry.last_request = Instant::now();
            if entry
                .written
                .is_some_and(|at| at.elapsed() < REGISTRATION_TTL / 3)
            {
                return;
            }
            let now = Instant::now();
            entry.written = Some(now);
            let queues = entry
                .queues
                .iter_mut()
                .map(|(name, q)| {
                    let rate = match q.previous.replace((q.finished, now)) {
                        Some((before, at)) => {
                            let secs = now.duration_since(at).as_secs_f64();
                            if secs > 0.0 {
                                q.finished.saturating_sub(before) as f64 / secs
                            } else {
                                0.0
                            }
                        }
                        None => 0.0,
                    };
                    QueueLoad {
                        name: name.clone(),
                        concurrency: q.limit,
                        running: u32::try_from(q.running).unwrap_or(u32::MAX),
                        finished_per_second: rate,
                    }
                })
                .collect();
            WorkerRegistration {
                id: worker.to_string(),
                host: entry.host.clone(),
                pid: 0,
                started_at: entry.started_at,
                last_heartbeat: self.clock.now(),
                queues,
                kinds: None,
            }
        };
        let value = match serde_json::to_value(&record) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode a remote worker's registration");
                return;
            }
        };
        let put = Put::new(registration::COLLECTION, worker, &value).ttl(REGISTRATION_TTL);
        if let Err(e) = self.store.meta_put(put).await {
            tracing::warn!(worker, error = %e, "writing a remote worker's registration failed");
        }
    }
}

/// Why `worker` may not report `attempt` of `job`, if it may not.
fn not_leased(job: &Job, worker: &str, attempt: i32) -> Option<String> {
    if job.state == JobState::Running
        && job.attempt == attempt
        && job.lease_owner.as_deref() == Some(worker)
    {
        return None;
    }
    let now = if job.state == JobState::Running {
        format!(
            "running attempt {} under worker {}",
            job.attempt,
            job.lease_owner.as_deref().unwrap_or("(none)")
        )
    } else {
        format!("{} at attempt {}", job.state, job.attempt)
    };
    Some(format!(
        "job {} attempt {attempt} is not leased to worker {worker} (the job is {now}); the outcome was not recorded",
        job.id
    ))
}

/// The runtime's view of a reported outcome, and the traceback to keep with it.
fn ended(report: Report) -> (Ended, Option<String>) {
    match report {
        Report::Complete(result) => (
            Ended::Returned(result.map_or(Outcome::Done, Outcome::DoneWith)),
            None,
        ),
        Report::Snooze(d) => (Ended::Returned(Outcome::Snooze(d)), None),
        Report::Fail {
            error,
            retryable,
            retry_after,
        } => {
            let mut job_error = JobError::new(error.message);
            job_error.causes = error.causes;
            let outcome = if retryable {
                Outcome::Retry {
                    after: retry_after,
                    error: job_error,
                }
            } else {
                Outcome::Fail(job_error)
            };
            (Ended::Returned(outcome), error.traceback)
        }
    }
}
