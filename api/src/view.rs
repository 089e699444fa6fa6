//! The JSON shapes the API answers with, documented in the OpenAPI schema.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use conveyor_worker::{AttemptOutcome, AttemptRecord, Job, JobState, Progress};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// A job state's name, as the OpenAPI document lists them: the values of [`JobState::ALL`].
pub struct JobStateName;

impl utoipa::PartialSchema for JobStateName {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::Type::String)
            .enum_values(Some(JobState::ALL.iter().map(ToString::to_string)))
            .description(Some("A job state (see docs/lifecycle.md)"))
            .into()
    }
}

impl ToSchema for JobStateName {}

/// A job with its attempt history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    /// Time-ordered id (a UUIDv7; `job_<uuid>` is accepted too).
    pub id: String,
    /// Queue.
    pub queue: String,
    /// Kind.
    pub kind: String,
    /// Handler arguments (any JSON).
    pub args: Value,
    /// Smaller runs first.
    pub priority: i16,
    /// Lifecycle state.
    #[schema(value_type = JobStateName)]
    pub state: JobState,
    /// Attempts so far.
    pub attempt: i32,
    /// Attempt budget.
    pub max_attempts: i32,
    /// When it may run.
    pub run_at: DateTime<Utc>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// When the latest attempt started.
    pub attempted_at: Option<DateTime<Utc>>,
    /// When it reached a terminal state.
    pub finalized_at: Option<DateTime<Utc>>,
    /// The worker holding its lease.
    pub lease_owner: Option<String>,
    /// When the lease runs out.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// When a cancel was requested while it ran.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// Deduplication key.
    pub idempotency_key: Option<String>,
    /// Labels.
    pub tags: Vec<String>,
    /// Application metadata.
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// Every finished attempt, oldest first.
    pub attempts: Vec<AttemptView>,
    /// What the handler returned when it completed the job (any JSON, at most
    /// `worker.max_result_bytes` serialized); absent when it returned nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The latest progress the running attempt reported; absent when none did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressView>,
}

/// A running attempt's progress report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProgressView {
    /// The attempt that reported it.
    pub attempt: i32,
    /// 0 to 100.
    #[schema(minimum = 0, maximum = 100)]
    pub percent: f32,
    /// What it is doing, if it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When it was reported.
    pub updated_at: DateTime<Utc>,
}

impl From<Progress> for ProgressView {
    fn from(p: Progress) -> Self {
        Self {
            attempt: p.attempt,
            percent: p.percent,
            message: p.message,
            updated_at: p.updated_at,
        }
    }
}

/// One attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AttemptView {
    /// 1-based.
    pub attempt: i32,
    /// Start.
    pub started_at: DateTime<Utc>,
    /// End.
    pub finished_at: DateTime<Utc>,
    /// Worker id.
    pub worker: Option<String>,
    /// `completed`, `failed`, `snoozed`, `cancelled`, `lease_expired`, `interrupted`.
    #[schema(value_type = String, example = "failed")]
    pub outcome: AttemptOutcome,
    /// Error message.
    pub error: Option<String>,
    /// Cause chain, outermost first.
    pub causes: Vec<String>,
    /// Wall time.
    pub duration_ms: i64,
    /// The stack trace a remote worker reported with the error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceback: Option<String>,
}

impl From<AttemptRecord> for AttemptView {
    fn from(a: AttemptRecord) -> Self {
        Self {
            attempt: a.attempt,
            started_at: a.started_at,
            finished_at: a.finished_at,
            worker: a.worker,
            outcome: a.outcome,
            error: a.error,
            causes: a.causes,
            duration_ms: a.duration_ms,
            traceback: a.traceback,
        }
    }
}

impl From<Job> for JobView {
    fn from(j: Job) -> Self {
        Self {
            id: j.id.to_string(),
            queue: j.queue,
            kind: j.kind,
            args: j.args,
            priority: j.priority,
            state: j.state,
            attempt: j.attempt,
            max_attempts: j.max_attempts,
            run_at: j.run_at,
            created_at: j.created_at,
            attempted_at: j.attempted_at,
            finalized_at: j.finalized_at,
            lease_owner: j.lease_owner,
            lease_expires_at: j.lease_expires_at,
            cancel_requested_at: j.cancel_requested_at,
            idempotency_key: j.idempotency_key,
            tags: j.tags,
            metadata: j.metadata,
            attempts: j.attempts.into_iter().map(Into::into).collect(),
            result: j.result,
            progress: j.progress.map(Into::into),
        }
    }
}

/// The answer to an enqueue: `201` for a new job, `200` with `duplicate: true` when an
/// existing job already held the idempotency key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EnqueueResponse {
    /// True when nothing was inserted: `job` is the existing holder of the idempotency key.
    pub duplicate: bool,
    /// The job.
    pub job: JobView,
    /// Why the job may wait longer than expected: no live worker serves its queue, or none
    /// on that queue has a handler for its kind. Empty when some worker will run it.
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// One answer of a batch enqueue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BatchItem {
    /// The job's id (new, or the duplicate's holder).
    pub id: String,
    /// Its state right after the enqueue.
    #[schema(value_type = JobStateName)]
    pub state: JobState,
    /// An existing job already held the idempotency key.
    pub duplicate: bool,
}

/// The answer to a batch enqueue, in input order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BatchResponse {
    /// How many were inserted.
    pub inserted: usize,
    /// How many were duplicates.
    pub duplicates: usize,
    /// One per input job.
    pub jobs: Vec<BatchItem>,
    /// Each queue or kind of the batch that no live worker serves, once (as in
    /// [`EnqueueResponse::warnings`]).
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// One page of jobs, newest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobPage {
    /// The jobs.
    pub jobs: Vec<JobView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// The answer to a cancel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CancelResponse {
    /// The job.
    pub id: String,
    /// `cancelled` (it was waiting) or `requested` (it runs; its worker stops it).
    pub result: String,
}

/// The answer to a discard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DiscardResponse {
    /// The deleted job.
    pub id: String,
    /// Always true.
    pub discarded: bool,
}

/// The answer to a bulk action.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BulkResponse {
    /// `retry`, `cancel` or `discard`.
    pub action: String,
    /// Nothing was changed; `matched` is what would be.
    pub dry_run: bool,
    /// Jobs the filter selects that the action applies to.
    pub matched: u64,
    /// Jobs changed (0 on a dry run).
    pub affected: u64,
    /// Bulk cancel stops after `api.bulk_cancel_limit` jobs: true when matching jobs remain.
    pub more: bool,
}

/// One queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QueueView {
    /// Name.
    pub name: String,
    /// Jobs by state (states without jobs are absent).
    #[schema(value_type = Object)]
    pub counts: BTreeMap<JobState, i64>,
    /// Age of the oldest ready job, in seconds.
    pub oldest_available_age_seconds: Option<f64>,
    /// Workers fetch nothing from a paused queue (it still accepts jobs).
    pub paused: bool,
    /// Attempts finished per second (any outcome) between the live workers' last two
    /// heartbeats, summed over those workers.
    pub throughput_per_second: f64,
    /// Jobs wait in it (available, scheduled or retryable) and no live worker fetches from
    /// it: they wait until a worker for this queue starts.
    #[serde(default)]
    pub unserved: bool,
}

/// A page of audit records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    /// Newest first.
    pub entries: Vec<crate::audit::AuditEntry>,
    /// Pass as `cursor` for the next page.
    pub next_cursor: Option<String>,
}
