//! `/v1/emails`: send a message (an `email.send` job, its message checked at enqueue by the
//! kind's own rule) and read one back with its attempts and per-recipient results. Both go
//! through `conveyor_admin::Admin` (`send_email`, `email`), as `conveyor email` does. See
//! docs/email.md.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use chrono::{DateTime, Utc};
use conveyor_admin::email::{EmailView, SendEmail};
use conveyor_jobs::email::EmailArgs;
use conveyor_worker::job::MAX_JOB_KEY_LEN;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{Auth, scope};
use crate::extract::{Body, JobIdParam, JobPath, idempotency_key};
use crate::problem::Problem;
use crate::state::AppState;

/// The route group.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(send_email))
        .routes(routes!(get_email))
}

/// A message to send. (Unknown fields are refused by the message's own rule: serde cannot
/// refuse them here beside a flattened field.)
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct SendRequest {
    /// The message.
    #[serde(flatten)]
    pub message: EmailArgs,
    /// The queue its job runs on. Default `default`.
    #[serde(default)]
    #[schema(pattern = r"^(?!webhooks$)[A-Za-z0-9._:-]{1,128}$")]
    pub queue: Option<String>,
    /// Attempts before the message is given up (the job goes dead). Default 20.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1000)]
    pub max_attempts: Option<i32>,
    /// Send no earlier than this (RFC 3339; from a day ago to five years ahead).
    #[serde(default)]
    pub send_at: Option<DateTime<Utc>>,
}

/// The answer to a send.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct SendResponse {
    /// The email's id (its job's id): `GET /v1/emails/{id}`.
    pub id: String,
    /// An earlier send holds the idempotency key: this is that email, nothing new was queued.
    pub duplicate: bool,
    /// Why it may wait longer than expected (no live worker serves its queue).
    pub warnings: Vec<String>,
}

/// Send one email.
#[utoipa::path(
    post, path = "/v1/emails", tag = "emails",
    request_body = SendRequest,
    params(("Idempotency-Key" = Option<String>, Header, nullable = false, description = "A second send with the same key returns the first email and sends nothing", pattern = r"^[!-~]([ -~]{0,253}[!-~])?$")),
    responses(
        (status = 202, description = "Queued; `Location` names the email", body = SendResponse),
        (status = 200, description = "Duplicate: an earlier send holds the idempotency key (`Idempotent-Replayed: true`)", body = SendResponse),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 413, body = Problem), (status = 415, body = Problem), (status = 422, body = Problem), (status = 429, body = Problem),
    ),
    security(("bearer" = ["enqueue"]))
)]
async fn send_email(
    State(state): State<AppState>,
    auth: Auth<scope::Enqueue>,
    headers: HeaderMap,
    Body(req): Body<SendRequest>,
) -> Result<Response, Problem> {
    let key = idempotency_key(None, &headers, MAX_JOB_KEY_LEN)?;
    let outcome = state
        .admin()
        .send_email(
            &auth.actor(),
            SendEmail {
                message: req.message,
                idempotency_key: key,
                queue: req.queue,
                max_attempts: req.max_attempts,
                run_at: req.send_at,
            },
        )
        .await
        .map_err(|e| match e {
            conveyor_admin::Error::Store(conveyor_worker::Error::InvalidInput {
                field,
                message,
            }) if field == "run_at" => Problem::invalid("send_at", message),
            other => other.into(),
        })?;
    let id = outcome.enqueued.id;
    let duplicate = outcome.enqueued.duplicate;
    let body = SendResponse {
        id: id.to_string(),
        duplicate,
        warnings: outcome.warnings,
    };
    Ok(super::created_answer(
        StatusCode::ACCEPTED,
        duplicate,
        &format!("/v1/emails/{id}"),
        body,
    ))
}

/// One email: its state, the message (without bodies or attachment content), its attempts
/// and every recipient's result.
#[utoipa::path(
    get, path = "/v1/emails/{id}", tag = "emails",
    params(JobIdParam),
    responses((status = 200, body = EmailView), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn get_email(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
    JobPath(id): JobPath,
) -> Result<axum::Json<EmailView>, Problem> {
    Ok(axum::Json(state.admin().email(id).await?))
}
