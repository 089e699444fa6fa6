//! `/v1/jobs`: enqueue (one or a batch), get, list, and the operator actions (one job or in
//! bulk by filter).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use conveyor_admin::enqueue::JobRequest;
use conveyor_admin::job::cancel_name;
use conveyor_worker::store::{JobFilter, Page};
use conveyor_worker::{JobId, JobState};
use serde::Deserialize;
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{Auth, scope};
use crate::extract::{Body, JobIdParam, JobPath, Query, idempotency_key};
use crate::problem::Problem;
use crate::state::AppState;
use crate::view::{
    BatchItem, BatchResponse, BulkResponse, CancelResponse, DiscardResponse, EnqueueResponse,
    JobPage, JobStateName, JobView,
};
use conveyor_worker::job::MAX_JOB_KEY_LEN;

/// The route group.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(enqueue, list))
        .routes(routes!(enqueue_batch))
        .routes(routes!(get_job, discard))
        .routes(routes!(retry))
        .routes(routes!(cancel))
        .routes(routes!(bulk))
}

/// One job to enqueue.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnqueueRequest {
    /// The kind (selects the handler): 1-128 ASCII letters, digits, `.`, `_`, `-`, `:`;
    /// `webhook.deliver` and the backup kinds (`backup.run`, `backup.verify`,
    /// `backup.prune`: `POST /v1/backups`) are reserved.
    #[schema(
        pattern = r"^(?!(webhook\.deliver|backup\.run|backup\.verify|backup\.prune)$)[A-Za-z0-9._:-]{1,128}$"
    )]
    pub kind: String,
    /// The queue (same rules as `kind`). Default `default`; the webhook queue
    /// (`webhooks.queue`, default `webhooks`) is reserved.
    #[serde(default)]
    #[schema(pattern = r"^(?!webhooks$)[A-Za-z0-9._:-]{1,128}$")]
    pub queue: Option<String>,
    /// Handler arguments (any JSON; at most `api.args_limit` bytes serialized). Default `{}`.
    #[serde(default)]
    pub args: Option<Value>,
    /// Smaller runs first. Default 0.
    #[serde(default)]
    #[schema(minimum = -32768, maximum = 32767)]
    pub priority: i16,
    /// Attempts before the job goes dead. Default 20.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1000)]
    pub max_attempts: Option<i32>,
    /// Run no earlier than this (RFC 3339; from a day ago to five years ahead).
    #[serde(default)]
    pub run_at: Option<DateTime<Utc>>,
    /// Run after this many seconds (instead of `run_at`; at most five years).
    #[serde(default)]
    #[schema(maximum = 158_112_000)]
    pub delay_seconds: Option<u32>,
    /// Deduplication key (1-255 printable ASCII characters); the `Idempotency-Key` header
    /// does the same.
    #[serde(default)]
    #[schema(pattern = r"^[ -~]{1,255}$")]
    pub idempotency_key: Option<String>,
    /// Labels (at most 32, each 1-128 characters without control characters).
    #[serde(default)]
    #[schema(max_items = 32, value_type = Vec<Tag>)]
    pub tags: Vec<String>,
    /// Application metadata (a JSON object).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub metadata: Option<Value>,
}

/// A job's label: 1-128 characters, none of them a control character.
#[derive(ToSchema)]
#[schema(pattern = r"^[^\x00-\x1f\x7f-\x9f]{1,128}$")]
#[allow(dead_code)]
struct Tag(String);

/// A batch to enqueue.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// 1 to `api.batch_limit` (default 1,000) jobs.
    #[schema(min_items = 1, max_items = 1000)]
    pub jobs: Vec<EnqueueRequest>,
}

impl EnqueueRequest {
    /// The job as the admin layer takes it (which checks every field), with its key (from
    /// the body, the `Idempotency-Key` header, or a batch's derived key).
    fn into_request(self, idempotency_key: Option<String>) -> Result<JobRequest, Problem> {
        Ok(JobRequest {
            kind: self.kind,
            queue: self.queue,
            args: self.args,
            priority: self.priority,
            max_attempts: self.max_attempts,
            run_at: self.run_at,
            delay: self
                .delay_seconds
                .map(|s| std::time::Duration::from_secs(s.into())),
            idempotency_key,
            tags: self.tags,
            metadata: self.metadata,
        })
    }
}

/// The admin layer's `delay` is this API's `delay_seconds`.
fn api_fields(e: conveyor_admin::Error) -> Problem {
    match e {
        conveyor_admin::Error::Store(conveyor_worker::Error::InvalidInput { field, message }) => {
            Problem::invalid(field.replace("delay", "delay_seconds"), message)
        }
        other => other.into(),
    }
}

/// Enqueue one job.
#[utoipa::path(
    post, path = "/v1/jobs", tag = "jobs",
    request_body = EnqueueRequest,
    params(("Idempotency-Key" = Option<String>, Header, nullable = false, description = "Deduplication key (same as the `idempotency_key` field)", pattern = r"^[!-~]([ -~]{0,253}[!-~])?$")),
    responses(
        (status = 201, description = "Enqueued; `Location` names the job", body = EnqueueResponse),
        (status = 200, description = "Duplicate: an existing job holds the idempotency key (`Idempotent-Replayed: true`)", body = EnqueueResponse),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 413, body = Problem), (status = 415, body = Problem), (status = 422, body = Problem), (status = 429, body = Problem),
    ),
    security(("bearer" = ["enqueue"]))
)]
async fn enqueue(
    State(state): State<AppState>,
    _auth: Auth<scope::Enqueue>,
    headers: HeaderMap,
    Body(req): Body<EnqueueRequest>,
) -> Result<Response, Problem> {
    let mut req = req;
    let key = idempotency_key(req.idempotency_key.take(), &headers, MAX_JOB_KEY_LEN)?;
    let request = req.into_request(key)?;
    let outcome = state
        .admin()
        .enqueue(&_auth.actor(), request)
        .await
        .map_err(api_fields)?;
    let enqueued = outcome.enqueued;
    let stored = state
        .store
        .get(enqueued.id)
        .await?
        .ok_or_else(|| Problem::conflict("the job was deleted right after its enqueue"))?;
    let body = EnqueueResponse {
        duplicate: enqueued.duplicate,
        job: stored.into(),
        warnings: outcome.warnings,
    };
    Ok(super::created_answer(
        StatusCode::CREATED,
        enqueued.duplicate,
        &format!("/v1/jobs/{}", enqueued.id),
        body,
    ))
}

/// Enqueue a batch of jobs in one request (all valid, or none enqueued).
#[utoipa::path(
    post, path = "/v1/jobs/batch", tag = "jobs",
    request_body = BatchRequest,
    params(("Idempotency-Key" = Option<String>, Header, nullable = false, description = "Makes job i's key `<key>:<i>` for jobs without their own key", pattern = r"^[!-~]([ -~]{0,253}[!-~])?$")),
    responses(
        (status = 201, description = "At least one job was inserted", body = BatchResponse),
        (status = 200, description = "Every job was a duplicate", body = BatchResponse),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 413, body = Problem), (status = 415, body = Problem), (status = 422, body = Problem), (status = 429, body = Problem),
    ),
    security(("bearer" = ["enqueue"]))
)]
async fn enqueue_batch(
    State(state): State<AppState>,
    _auth: Auth<scope::Enqueue>,
    headers: HeaderMap,
    Body(req): Body<BatchRequest>,
) -> Result<Response, Problem> {
    let header_key = idempotency_key(None, &headers, MAX_JOB_KEY_LEN)?;
    let requests = req
        .jobs
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            let key = match r.idempotency_key.take() {
                Some(own) => Some(own),
                None => header_key.as_ref().map(|k| format!("{k}:{i}")),
            };
            r.into_request(key)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let outcome = state
        .admin()
        .enqueue_many(&_auth.actor(), requests)
        .await
        .map_err(api_fields)?;
    let answers = outcome.jobs;
    let duplicates = answers.iter().filter(|a| a.duplicate).count();
    let body = BatchResponse {
        inserted: answers.len() - duplicates,
        duplicates,
        jobs: answers
            .into_iter()
            .map(|a| BatchItem {
                id: a.id.to_string(),
                state: a.state,
                duplicate: a.duplicate,
            })
            .collect(),
        warnings: outcome.warnings,
    };
    let status = if body.inserted > 0 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(body)).into_response())
}

/// How long `GET /v1/jobs/{id}` may wait for the job to finish.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WaitParams {
    /// Wait up to this long for the job to finish (completed, cancelled or dead) before
    /// answering: a duration such as `30s`, `1m`, `500ms` or `1m 30s`, or bare seconds
    /// (`30`); at most 60s. The answer comes as soon as the job finishes, or when the wait
    /// runs out with the job as it is then (still `200`: check `state`). Absent, empty or `0`:
    /// answer at once.
    #[param(
        pattern = r"^([0-9]+|([0-9]+ *(ms|s|m|sec|secs|min|mins) *)*)$",
        example = "30s"
    )]
    pub wait: Option<String>,
}

/// `?wait=`, exactly as [`WaitParams::wait`]'s pattern states it (bare seconds, or numbers
/// each with a unit, `ms`, `s`/`sec`/`secs` or `m`/`min`/`mins`, spaces allowed after each),
/// at most [`conveyor_worker::store::wait::MAX_WAIT`].
fn parse_wait(text: Option<&str>) -> Result<Option<std::time::Duration>, Problem> {
    use std::time::Duration;
    let Some(text) = text else {
        return Ok(None);
    };
    let bad = || {
        Problem::invalid(
            "wait",
            format!("`{text}` is not a duration; use e.g. 30s, 1m, 500ms or bare seconds (30)"),
        )
    };
    let wait = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(text.parse().map_err(|_| bad())?)
    } else {
        let mut total = Duration::ZERO;
        let mut rest = text;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = rest[digits..].trim_start_matches(' ');
            let unit = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            let step = match &rest[..unit] {
                "ms" => Duration::from_millis(n),
                "s" | "sec" | "secs" => Duration::from_secs(n),
                "m" | "min" | "mins" => Duration::from_secs(n.saturating_mul(60)),
                _ => return Err(bad()),
            };
            total = total.saturating_add(step);
            rest = rest[unit..].trim_start_matches(' ');
        }
        total
    };
    conveyor_worker::store::wait::check_wait("wait", wait)?;
    Ok((!wait.is_zero()).then_some(wait))
}

/// A job as `key` may see it: args whose keys name a secret (`password`, `token`, `api_key`…)
/// are `"[redacted]"` except for `admin` keys (`conveyor_admin::job::args_as_seen_by`).
fn seen_by(key: &conveyor_admin::key::ApiKey, job: conveyor_worker::Job) -> JobView {
    let mut view = JobView::from(job);
    view.args = conveyor_admin::job::args_as_seen_by(key.scope, view.args);
    view
}

/// One job with its attempt history, its result and its progress. With `?wait=30s`, a
/// long poll: the answer comes when the job finishes or the wait runs out, whichever is
/// first (woken by the store's change events, not by polling). Args whose keys name a
/// secret (`password`, `token`, `api_key`, …) read `"[redacted]"` unless the key is `admin`.
#[utoipa::path(
    get, path = "/v1/jobs/{id}", tag = "jobs",
    params(JobIdParam, WaitParams),
    responses((status = 200, body = JobView), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, description = "`wait` is not a duration or is longer than 60s", body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn get_job(
    State(state): State<AppState>,
    auth: Auth<scope::Read>,
    JobPath(id): JobPath,
    Query(p): Query<WaitParams>,
) -> Result<axum::Json<JobView>, Problem> {
    let job = match parse_wait(p.wait.as_deref())? {
        None => state.store.get(id).await?,
        Some(wait) => {
            let store = state.store.clone();
            let draining = state.draining.clone();
            tokio::select! {
                job = conveyor_worker::store::wait::wait_for_end(store.as_ref(), id, wait) => job?,
                // A server shutting down answers waiting clients at once with the job as it is.
                _ = draining.cancelled() => store.get(id).await?,
            }
        }
    };
    match job {
        Some(job) => Ok(axum::Json(seen_by(&auth.key, job))),
        None => Err(Problem::not_found(format!("job {id} not found"))),
    }
}

/// Filters for listing jobs.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Comma-separated states, e.g. `dead,retryable`.
    #[param(
        pattern = r"^ *$|^ *(scheduled|available|running|retryable|completed|cancelled|dead) *(, *(scheduled|available|running|retryable|completed|cancelled|dead) *)*$"
    )]
    pub state: Option<String>,
    /// Exactly this queue.
    pub queue: Option<String>,
    /// Exactly this kind.
    pub kind: Option<String>,
    /// Has this tag.
    pub tag: Option<String>,
    /// Created at or after (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// Created before (RFC 3339).
    pub until: Option<DateTime<Utc>>,
    /// Some attempt's error contains this text (case-insensitive).
    pub error: Option<String>,
    /// Page size, 1-1000 (default 50).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[param(format = Uuid)]
    pub cursor: Option<String>,
}

fn parse_states(text: Option<&str>) -> Result<Vec<JobState>, Problem> {
    let Some(text) = text.filter(|t| !t.trim_matches(' ').is_empty()) else {
        return Ok(Vec::new());
    };
    text.split(',')
        .map(|s| {
            let s = s.trim_matches(' ');
            // Exactly the names the document lists (the CLI also takes other cases).
            JobState::ALL
                .into_iter()
                .find(|st| st.as_str() == s)
                .ok_or_else(|| {
                    Problem::invalid(
                        "state",
                        format!(
                            "unknown state `{s}`; use one of: {}",
                            JobState::ALL.map(|st| st.as_str()).join(", ")
                        ),
                    )
                })
        })
        .collect()
}

/// Jobs matching the filters, newest first, one page.
#[utoipa::path(
    get, path = "/v1/jobs", tag = "jobs", operation_id = "list_jobs",
    params(ListParams),
    responses((status = 200, body = JobPage), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn list(
    State(state): State<AppState>,
    auth: Auth<scope::Read>,
    Query(p): Query<ListParams>,
) -> Result<axum::Json<JobPage>, Problem> {
    let filter = JobFilter {
        states: parse_states(p.state.as_deref())?,
        queue: p.queue,
        kind: p.kind,
        tag: p.tag,
        created_after: p.since,
        created_before: p.until,
        error_contains: p.error,
        ids: Vec::new(),
    };
    let limit = p.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(Problem::invalid(
            "limit",
            format!("must be between 1 and 1000, got {limit}"),
        ));
    }
    let before = p
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<JobId>()
                .map_err(|_| Problem::invalid("cursor", "not a cursor from a previous page"))
        })
        .transpose()?;
    let jobs = state.store.list(&filter, Page { before, limit }).await?;
    let next_cursor = (jobs.len() == limit as usize)
        .then(|| jobs.last().map(|j| j.id.to_string()))
        .flatten();
    Ok(axum::Json(JobPage {
        jobs: jobs.into_iter().map(|j| seen_by(&auth.key, j)).collect(),
        next_cursor,
    }))
}

/// Make a job available now with a fresh attempt budget (history kept). Audited.
#[utoipa::path(
    post, path = "/v1/jobs/{id}/retry", tag = "jobs",
    params(JobIdParam),
    responses((status = 200, body = JobView), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, description = "The job is running", body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn retry(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    JobPath(id): JobPath,
) -> Result<axum::Json<JobView>, Problem> {
    let job = state.admin().retry(&auth.actor(), id).await?;
    Ok(axum::Json(seen_by(&auth.key, job)))
}

/// Cancel a waiting job, or ask the worker running it to stop. Audited.
#[utoipa::path(
    post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(JobIdParam),
    responses((status = 200, body = CancelResponse), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, description = "The job is finished", body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn cancel(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    JobPath(id): JobPath,
) -> Result<axum::Json<CancelResponse>, Problem> {
    let result = state.admin().cancel(&auth.actor(), id).await?;
    Ok(axum::Json(CancelResponse {
        id: id.to_string(),
        result: cancel_name(result).into(),
    }))
}

/// Delete (discard) a job that is not running. Audited as `job.discard`.
#[utoipa::path(
    delete, path = "/v1/jobs/{id}", tag = "jobs",
    params(JobIdParam),
    responses((status = 200, body = DiscardResponse), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, description = "The job is running", body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn discard(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    JobPath(id): JobPath,
) -> Result<axum::Json<DiscardResponse>, Problem> {
    state.admin().discard(&auth.actor(), id).await?;
    Ok(axum::Json(DiscardResponse {
        id: id.to_string(),
        discarded: true,
    }))
}

/// Which jobs a bulk action selects. Empty fields match everything; at least one field (or
/// `all: true`) is required.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FilterBody {
    /// Any of these states.
    #[serde(default)]
    #[schema(value_type = Vec<JobStateName>)]
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
    /// Some attempt's error contains this text.
    pub error_contains: Option<String>,
    /// Only these job ids (at most 1,000).
    #[serde(default)]
    #[schema(value_type = Vec<uuid::Uuid>, max_items = 1000)]
    pub ids: Vec<JobId>,
}

/// A bulk action.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkRequest {
    /// Which jobs.
    #[serde(default)]
    pub filter: FilterBody,
    /// Required to act on every job when the filter is empty.
    #[serde(default)]
    pub all: bool,
    /// Only count what would be changed.
    #[serde(default)]
    pub dry_run: bool,
}

/// What a bulk action does.
#[derive(Clone, Copy, Debug, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BulkAction {
    /// Retry every matching job that is not running.
    Retry,
    /// Cancel every matching waiting or running job.
    Cancel,
    /// Delete every matching finished job (completed, cancelled, dead).
    Discard,
}

impl From<BulkAction> for conveyor_admin::job::BulkAction {
    fn from(a: BulkAction) -> Self {
        match a {
            BulkAction::Retry => Self::Retry,
            BulkAction::Cancel => Self::Cancel,
            BulkAction::Discard => Self::Discard,
        }
    }
}

/// Retry, cancel or discard every job a filter selects; `dry_run` counts first. Audited.
#[utoipa::path(
    post, path = "/v1/jobs/bulk/{action}", tag = "jobs",
    params(("action" = BulkAction, Path, description = "`retry`, `cancel` or `discard`")),
    request_body = BulkRequest,
    responses((status = 200, body = BulkResponse), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn bulk(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    axum::extract::Path(action): axum::extract::Path<String>,
    Body(req): Body<BulkRequest>,
) -> Result<axum::Json<BulkResponse>, Problem> {
    let action = match action.as_str() {
        "retry" => BulkAction::Retry,
        "cancel" => BulkAction::Cancel,
        "discard" => BulkAction::Discard,
        other => {
            return Err(Problem::not_found(format!(
                "no bulk action `{other}`; use retry, cancel or discard"
            )));
        }
    };
    let f = req.filter;
    let request = conveyor_admin::job::BulkRequest {
        filter: JobFilter {
            states: f.states,
            queue: f.queue,
            kind: f.kind,
            tag: f.tag,
            created_after: f.created_after,
            created_before: f.created_before,
            error_contains: f.error_contains,
            ids: f.ids,
        },
        all: req.all,
        dry_run: req.dry_run,
    };
    let done = state
        .admin()
        .bulk(&auth.actor(), action.into(), request)
        .await?;
    Ok(axum::Json(BulkResponse {
        action: done.action.into(),
        dry_run: done.dry_run,
        matched: done.matched,
        affected: done.affected,
        more: done.more,
    }))
}
