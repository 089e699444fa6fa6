//! `/v1/workers/claim`, `/heartbeat`, `/finish` and
//! `/v1/workers/jobs/{id}/complete|fail|snooze|progress`:
//! workers in any language pull jobs over HTTP. The rules (leases, the attempt check, the
//! outcome → state transitions, the key's queues) are `conveyor_admin::remote`'s; these
//! handlers parse, call and answer.

use axum::extract::State;
use conveyor_admin::remote::{
    ClaimRequest, ClaimedJob, CompleteRequest, FailRequest, FinishRequest, FinishResult,
    HeartbeatRequest, HeartbeatResponse, ProgressRequest, ReportRequest, SnoozeRequest,
};
use conveyor_worker::JobId;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{Auth, scope};
use crate::extract::{Body, JobIdParam, JobPath};
use crate::problem::Problem;
use crate::state::AppState;
use crate::view::JobStateName;

/// The route group.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(claim))
        .routes(routes!(heartbeat))
        .routes(routes!(complete))
        .routes(routes!(fail))
        .routes(routes!(snooze))
        .routes(routes!(progress))
        .routes(routes!(finish))
}

/// The jobs a claim leased.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClaimResponse {
    /// The claimed jobs (empty when none was due within `wait_seconds`).
    pub jobs: Vec<ClaimedJob>,
}

/// The job's state after an outcome.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReportResponse {
    /// Job id.
    pub id: String,
    /// Its new state: `completed`, `retryable`, `dead` or `scheduled` (snoozed).
    #[schema(value_type = JobStateName)]
    pub state: conveyor_worker::JobState,
}

/// The answer to a batch of outcomes.
#[derive(Debug, Serialize, ToSchema)]
pub struct FinishResponse {
    /// One per item, in order.
    pub items: Vec<FinishResult>,
}

/// Claims up to `limit` due jobs from `queues`, leased to `worker_id` (long-polls up to
/// `wait_seconds` when none is due). A `worker` key restricted to queues gets `403` for a
/// queue outside them.
#[utoipa::path(
    post, path = "/v1/workers/claim", tag = "remote-workers", operation_id = "claim_jobs",
    request_body = ClaimRequest,
    responses((status = 200, body = ClaimResponse), (status = 403, body = Problem)),
    security(("bearer" = ["worker"]))
)]
async fn claim(
    State(state): State<AppState>,
    auth: Auth<scope::Worker>,
    Body(request): Body<ClaimRequest>,
) -> Result<axum::Json<ClaimResponse>, Problem> {
    let host = auth
        .address
        .map_or_else(|| "remote".to_string(), |a| a.ip().to_string());
    let jobs = state
        .remote
        .claim(&request, auth.key.queues.as_deref(), &host)
        .await?;
    Ok(axum::Json(ClaimResponse { jobs }))
}

/// Renews the leases of the jobs the worker still runs; says which it lost (rescued or
/// finished: stop them, their outcome would be refused) and which were asked to cancel.
#[utoipa::path(
    post, path = "/v1/workers/heartbeat", tag = "remote-workers", operation_id = "heartbeat_jobs",
    request_body = HeartbeatRequest,
    responses((status = 200, body = HeartbeatResponse)),
    security(("bearer" = ["worker"]))
)]
async fn heartbeat(
    State(state): State<AppState>,
    auth: Auth<scope::Worker>,
    Body(request): Body<HeartbeatRequest>,
) -> Result<axum::Json<HeartbeatResponse>, Problem> {
    Ok(axum::Json(
        state
            .remote
            .heartbeat(&request, auth.key.queues.as_deref())
            .await?,
    ))
}

async fn report(
    state: &AppState,
    auth: &Auth<scope::Worker>,
    id: JobId,
    request: &impl ReportRequest,
) -> Result<axum::Json<ReportResponse>, Problem> {
    let report = request.check()?;
    let state = state
        .remote
        .report(
            request.worker_id(),
            id,
            request.attempt(),
            report,
            auth.key.queues.as_deref(),
        )
        .await?;
    Ok(axum::Json(ReportResponse {
        id: id.to_string(),
        state,
    }))
}

/// The attempt succeeded: the job is `completed`, with `result` (if given) as its result. A
/// result over the size limit (64 KiB serialized) fails the attempt instead (`retryable` or
/// `dead`, the error saying so). `409` (and nothing changes) when the attempt is not this
/// worker's lease any more (rescued, re-claimed or finished).
#[utoipa::path(
    post, path = "/v1/workers/jobs/{id}/complete", tag = "remote-workers", operation_id = "complete_job",
    params(JobIdParam),
    request_body = CompleteRequest,
    responses((status = 200, body = ReportResponse), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = ["worker"]))
)]
async fn complete(
    State(state): State<AppState>,
    auth: Auth<scope::Worker>,
    JobPath(id): JobPath,
    Body(request): Body<CompleteRequest>,
) -> Result<axum::Json<ReportResponse>, Problem> {
    report(&state, &auth, id, &request).await
}

/// The attempt failed: `retryable` after the backoff (or `retry_after_seconds`), or `dead`
/// when attempts are used up or `retryable` is false. The error, its causes and traceback go
/// into the attempt history. `409` as for complete.
#[utoipa::path(
    post, path = "/v1/workers/jobs/{id}/fail", tag = "remote-workers", operation_id = "fail_job",
    params(JobIdParam),
    request_body = FailRequest,
    responses((status = 200, body = ReportResponse), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = ["worker"]))
)]
async fn fail(
    State(state): State<AppState>,
    auth: Auth<scope::Worker>,
    JobPath(id): JobPath,
    Body(request): Body<FailRequest>,
) -> Result<axum::Json<ReportResponse>, Problem> {
    report(&state, &auth, id, &request).await
}

/// Run the job again after `seconds` without using an attempt (`scheduled`). `409` as for
/// complete.
#[utoipa::path(
    post, path = "/v1/workers/jobs/{id}/snooze", tag = "remote-workers", operation_id = "snooze_job",
    params(JobIdParam),
    request_body = SnoozeRequest,
    responses((status = 200, body = ReportResponse), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = ["worker"]))
)]
async fn snooze(
    State(state): State<AppState>,
    auth: Auth<scope::Worker>,
    JobPath(id): JobPath,
    Body(request): Body<SnoozeRequest>,
) -> Result<axum::Json<ReportResponse>, Problem> {
    report(&state, &auth, id, &request).await
}

/// How far the running attempt has got: `percent` (0-100) and an optional `message`, shown
/// as the job's `progress` by `GET /v1/jobs/{id}`. Accepted only from the worker holding the
/// attempt's lease: `409` (nothing recorded) otherwise, `403`/`404` as for complete. Send it
/// as often as is useful; each report replaces the last (a second apart is plenty).
#[utoipa::path(
    post, path = "/v1/workers/jobs/{id}/progress", tag = "remote-workers", operation_id = "report_progress",
    params(JobIdParam),
    request_body = ProgressRequest,
    responses((status = 204, description = "Recorded."), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = ["worker"]))
)]
async fn progress(
    State(state): State<AppState>,
    auth: Auth<scope::Worker>,
    JobPath(id): JobPath,
    Body(request): Body<ProgressRequest>,
) -> Result<axum::http::StatusCode, Problem> {
    state
        .remote
        .progress(id, &request, auth.key.queues.as_deref())
        .await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// Many outcomes in one write. Each item gets its own status: 200 applied, 403 a job on a
/// queue outside the key's queues, 404 no such job, 409 not this worker's lease any more
/// (nothing changed for it).
#[utoipa::path(
    post, path = "/v1/workers/finish", tag = "remote-workers", operation_id = "finish_jobs",
    request_body = FinishRequest,
    responses((status = 200, body = FinishResponse)),
    security(("bearer" = ["worker"]))
)]
async fn finish(
    State(state): State<AppState>,
    auth: Auth<scope::Worker>,
    Body(request): Body<FinishRequest>,
) -> Result<axum::Json<FinishResponse>, Problem> {
    let items = request.check()?;
    let items = state
        .remote
        .finish(&request.worker_id, items, auth.key.queues.as_deref())
        .await?;
    Ok(axum::Json(FinishResponse { items }))
}
