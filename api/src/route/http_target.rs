//! `/v1/jobs/{id}/http-attempts`: the attempt log of an `http.request` job (see
//! `docs/http-targets.md`), read from the store by `conveyor_jobs::http_target::attempts`.
//!
//! Scope: `read`. Credential-looking request headers are stored redacted, so nothing secret
//! is returned.

use axum::extract::State;
use conveyor_jobs::http_target::HttpAttempt;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{Auth, scope};
use crate::extract::{JobIdParam, JobPath};
use crate::problem::Problem;
use crate::state::AppState;

/// The routes of this group.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(http_attempts))
}

/// An `http.request` job's attempts, oldest first: method, URL, request headers (credentials
/// as `***`), status, latency, the first 4 KiB of the answer, the transport error, the result.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/http-attempts", tag = "jobs",
    params(JobIdParam),
    responses((status = 200, body = [HttpAttempt]), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn http_attempts(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
    JobPath(id): JobPath,
) -> Result<axum::Json<Vec<HttpAttempt>>, Problem> {
    if state.store.get(id).await?.is_none() {
        return Err(Problem::not_found(format!("job {id} not found")));
    }
    let log = conveyor_jobs::http_target::request::attempts(state.store.as_ref(), &id.to_string())
        .await?;
    Ok(axum::Json(log))
}
