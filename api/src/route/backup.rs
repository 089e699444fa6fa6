//! `/v1/backups`: ask for a backup, a verification or a retention pass (each a `backup.*`
//! job, answered `202` with the job's id: `GET /v1/jobs/{id}` follows it and holds its
//! result), and read the complete backups of a destination. Admin scope throughout. The rules
//! (names checked before anything is queued, the audit records) are
//! `conveyor_admin::backup`'s, shared with `conveyor backup`. See docs/backups.md.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use chrono::{DateTime, Utc};
use conveyor_admin::backup::{self, BackupJob, JobOptions};
use conveyor_admin::enqueue::EnqueueOutcome;
use conveyor_backup::{Backups, Manifest};
use conveyor_worker::job::MAX_JOB_KEY_LEN;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{Auth, scope};
use crate::extract::{Body, Query, idempotency_key};
use crate::problem::Problem;
use crate::state::AppState;

/// The route group.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(prune))
        .routes(routes!(show))
        .routes(routes!(verify))
}

/// A backup to take.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// `store` (Conveyor's own, the default) or a `[backup.sources.<name>]` of the server's
    /// config.
    #[serde(default)]
    #[schema(pattern = r"^[A-Za-z0-9._:-]{1,128}$")]
    pub source: Option<String>,
    /// A `[backup.destinations.<name>]` (default: `backup.destination`).
    #[serde(default)]
    #[schema(pattern = r"^[A-Za-z0-9._:-]{1,128}$")]
    pub destination: Option<String>,
    /// The queue the `backup.run` job runs on (default `default`): a worker with the
    /// `[backup]` configuration must serve it.
    #[serde(default)]
    #[schema(pattern = r"^(?!webhooks$)[A-Za-z0-9._:-]{1,128}$")]
    pub queue: Option<String>,
}

/// A verification to run.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// Also restore into a scratch copy (dropped afterwards) and compare rows and checksums
    /// per table with the figures recorded at backup time.
    #[serde(default)]
    pub restore: bool,
    /// The destination holding the backup (default: `backup.destination`).
    #[serde(default)]
    #[schema(pattern = r"^[A-Za-z0-9._:-]{1,128}$")]
    pub destination: Option<String>,
    /// The queue the `backup.verify` job runs on (default `default`).
    #[serde(default)]
    #[schema(pattern = r"^(?!webhooks$)[A-Za-z0-9._:-]{1,128}$")]
    pub queue: Option<String>,
}

/// A retention pass to run.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PruneRequest {
    /// Only report (in the job's result) what would be deleted.
    #[serde(default)]
    pub dry_run: bool,
    /// The destination (default: `backup.destination`).
    #[serde(default)]
    #[schema(pattern = r"^[A-Za-z0-9._:-]{1,128}$")]
    pub destination: Option<String>,
    /// The queue the `backup.prune` job runs on (default `default`).
    #[serde(default)]
    #[schema(pattern = r"^(?!webhooks$)[A-Za-z0-9._:-]{1,128}$")]
    pub queue: Option<String>,
}

/// A queued backup job.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct JobAccepted {
    /// The job's id: `GET /v1/jobs/{id}` shows its state and, once done, its result.
    pub job_id: String,
    /// Its kind: `backup.run`, `backup.verify` or `backup.prune`.
    pub kind: String,
    /// An earlier request holds the idempotency key: this is its job, nothing new was queued.
    pub duplicate: bool,
    /// Why it may wait longer than expected (no live worker serves its queue or kind).
    pub warnings: Vec<String>,
}

/// Which destination, and whose backups.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// A `[backup.destinations.<name>]` (default: `backup.destination`).
    #[param(pattern = r"^[A-Za-z0-9._:-]{1,128}$")]
    pub destination: Option<String>,
    /// Only this source's backups.
    #[param(pattern = r"^[A-Za-z0-9._:-]{1,128}$")]
    pub source: Option<String>,
}

/// Which destination.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DestinationParam {
    /// A `[backup.destinations.<name>]` (default: `backup.destination`).
    #[param(pattern = r"^[A-Za-z0-9._:-]{1,128}$")]
    pub destination: Option<String>,
}

/// One complete backup.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct BackupSummary {
    /// Its id: the UTC start time and 8 random hex digits.
    pub id: String,
    /// The source's name (`store` for Conveyor's own).
    pub source: String,
    /// How it was dumped: `sqlite` or `postgres_custom`.
    pub source_kind: String,
    /// When reading the source started.
    pub started_at: DateTime<Utc>,
    /// When its last object was stored.
    pub finished_at: DateTime<Utc>,
    /// Bytes read from the source.
    pub raw_bytes: u64,
    /// Bytes stored.
    pub stored_bytes: u64,
    /// The Conveyor version that wrote it.
    pub conveyor_version: String,
}

impl From<&Manifest> for BackupSummary {
    fn from(m: &Manifest) -> Self {
        Self {
            id: m.id.clone(),
            source: m.source.clone(),
            source_kind: serde_json::to_value(m.source_kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            started_at: m.started_at,
            finished_at: m.finished_at,
            raw_bytes: m.raw_bytes(),
            stored_bytes: m.stored_bytes(),
            conveyor_version: m.conveyor_version.clone(),
        }
    }
}

fn backups(state: &AppState) -> Result<&Backups, Problem> {
    state.backups.as_deref().ok_or_else(|| {
        Problem::new(
            StatusCode::CONFLICT,
            "conflict",
            "Backups are not set up on this server",
            "this API server was started without the backup settings; `conveyor serve` has them",
        )
    })
}

fn accepted(kind: &str, outcome: EnqueueOutcome) -> Response {
    let id = outcome.enqueued.id;
    let duplicate = outcome.enqueued.duplicate;
    let body = JobAccepted {
        job_id: id.to_string(),
        kind: kind.to_string(),
        duplicate,
        warnings: outcome.warnings,
    };
    super::created_answer(
        StatusCode::ACCEPTED,
        duplicate,
        &format!("/v1/jobs/{id}"),
        body,
    )
}

/// Take a backup: queues a `backup.run` job. The source and destination are checked now.
/// Audited as `backup.create`.
#[utoipa::path(
    post, path = "/v1/backups", tag = "backups", operation_id = "create_backup",
    request_body = CreateRequest,
    params(("Idempotency-Key" = Option<String>, Header, nullable = false, description = "A second request with the same key returns the first one's job and queues nothing", pattern = r"^[!-~]([ -~]{0,253}[!-~])?$")),
    responses(
        (status = 202, description = "Queued; `Location` names the job", body = JobAccepted),
        (status = 200, description = "Duplicate: an earlier request holds the idempotency key (`Idempotent-Replayed: true`)", body = JobAccepted),
        (status = 409, description = "The server has no backup settings", body = Problem),
    ),
    security(("bearer" = ["admin"]))
)]
async fn create(
    State(state): State<AppState>,
    auth: Auth<scope::Admin>,
    headers: HeaderMap,
    Body(req): Body<CreateRequest>,
) -> Result<Response, Problem> {
    let key = idempotency_key(None, &headers, MAX_JOB_KEY_LEN)?;
    let outcome = state
        .admin()
        .enqueue_backup_job(
            &auth.actor(),
            backups(&state)?,
            BackupJob::Run {
                source: req.source,
                destination: req.destination,
            },
            JobOptions {
                queue: req.queue,
                idempotency_key: key,
            },
        )
        .await?;
    Ok(accepted(conveyor_jobs::backup::RUN_KIND, outcome))
}

/// The complete backups in a destination, oldest first.
#[utoipa::path(
    get, path = "/v1/backups", tag = "backups", operation_id = "list_backups",
    params(ListParams),
    responses(
        (status = 200, body = Vec<BackupSummary>),
        (status = 409, description = "The server has no backup settings", body = Problem),
        (status = 503, description = "The destination did not answer", body = Problem),
    ),
    security(("bearer" = ["admin"]))
)]
async fn list(
    State(state): State<AppState>,
    _auth: Auth<scope::Admin>,
    Query(p): Query<ListParams>,
) -> Result<axum::Json<Vec<BackupSummary>>, Problem> {
    let all = backup::list(
        backups(&state)?,
        p.destination.as_deref(),
        p.source.as_deref(),
    )
    .await?;
    Ok(axum::Json(all.iter().map(BackupSummary::from).collect()))
}

/// One backup's manifest: its objects (sizes and SHA-256, stored and decoded) and the
/// source's figures per table at backup time.
#[utoipa::path(
    get, path = "/v1/backups/{id}", tag = "backups", operation_id = "show_backup",
    params(("id" = String, Path, description = "The backup's id", pattern = r"^[0-9]{8}T[0-9]{6}\.[0-9]{3}Z-[0-9a-f]{8}$"), DestinationParam),
    responses(
        (status = 200, description = "The manifest (`manifest.json`, see docs/backups.md)", body = Object),
        (status = 404, body = Problem),
        (status = 409, description = "The server has no backup settings", body = Problem),
        (status = 503, description = "The destination did not answer", body = Problem),
    ),
    security(("bearer" = ["admin"]))
)]
async fn show(
    State(state): State<AppState>,
    _auth: Auth<scope::Admin>,
    Path(id): Path<String>,
    Query(p): Query<DestinationParam>,
) -> Result<axum::Json<Manifest>, Problem> {
    Ok(axum::Json(
        backup::show(backups(&state)?, &id, p.destination.as_deref()).await?,
    ))
}

/// Verify a backup: queues a `backup.verify` job that re-reads every object and checks its
/// checksums (with `restore`, also restores a scratch copy and compares its tables). The
/// backup must exist. Audited as `backup.verify`.
#[utoipa::path(
    post, path = "/v1/backups/{id}/verify", tag = "backups", operation_id = "verify_backup",
    request_body = VerifyRequest,
    params(("id" = String, Path, description = "The backup's id", pattern = r"^[0-9]{8}T[0-9]{6}\.[0-9]{3}Z-[0-9a-f]{8}$"), ("Idempotency-Key" = Option<String>, Header, nullable = false, description = "A second request with the same key returns the first one's job and queues nothing", pattern = r"^[!-~]([ -~]{0,253}[!-~])?$")),
    responses(
        (status = 202, description = "Queued; `Location` names the job", body = JobAccepted),
        (status = 200, description = "Duplicate: an earlier request holds the idempotency key (`Idempotent-Replayed: true`)", body = JobAccepted),
        (status = 404, body = Problem),
        (status = 409, description = "The server has no backup settings", body = Problem),
    ),
    security(("bearer" = ["admin"]))
)]
async fn verify(
    State(state): State<AppState>,
    auth: Auth<scope::Admin>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Body(req): Body<VerifyRequest>,
) -> Result<Response, Problem> {
    let key = idempotency_key(None, &headers, MAX_JOB_KEY_LEN)?;
    let outcome = state
        .admin()
        .enqueue_backup_job(
            &auth.actor(),
            backups(&state)?,
            BackupJob::Verify {
                id,
                destination: req.destination,
                restore: req.restore,
            },
            JobOptions {
                queue: req.queue,
                idempotency_key: key,
            },
        )
        .await?;
    Ok(accepted(conveyor_jobs::backup::VERIFY_KIND, outcome))
}

/// Apply `[backup.retention]`: queues a `backup.prune` job (its result lists what was kept and
/// deleted). Audited as `backup.prune`.
#[utoipa::path(
    post, path = "/v1/backups/prune", tag = "backups", operation_id = "prune_backups",
    request_body = PruneRequest,
    params(("Idempotency-Key" = Option<String>, Header, nullable = false, description = "A second request with the same key returns the first one's job and queues nothing", pattern = r"^[!-~]([ -~]{0,253}[!-~])?$")),
    responses(
        (status = 202, description = "Queued; `Location` names the job", body = JobAccepted),
        (status = 200, description = "Duplicate: an earlier request holds the idempotency key (`Idempotent-Replayed: true`)", body = JobAccepted),
        (status = 409, description = "The server has no backup settings, or `[backup.retention]` keeps nothing", body = Problem),
    ),
    security(("bearer" = ["admin"]))
)]
async fn prune(
    State(state): State<AppState>,
    auth: Auth<scope::Admin>,
    headers: HeaderMap,
    Body(req): Body<PruneRequest>,
) -> Result<Response, Problem> {
    let key = idempotency_key(None, &headers, MAX_JOB_KEY_LEN)?;
    let outcome = state
        .admin()
        .enqueue_backup_job(
            &auth.actor(),
            backups(&state)?,
            BackupJob::Prune {
                destination: req.destination,
                dry_run: req.dry_run,
            },
            JobOptions {
                queue: req.queue,
                idempotency_key: key,
            },
        )
        .await?;
    Ok(accepted(conveyor_jobs::backup::PRUNE_KIND, outcome))
}
