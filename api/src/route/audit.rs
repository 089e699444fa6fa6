//! `/v1/audit`: the audit log, newest first. Read-only: nothing in the API deletes it.

use axum::extract::State;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::audit;
use crate::auth::{Auth, scope};
use crate::extract::Query;
use crate::problem::Problem;
use crate::state::AppState;
use crate::view::AuditPage;

/// The route group.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}

/// Paging.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Page size, 1-1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Audit records, newest first.
#[utoipa::path(
    get, path = "/v1/audit", tag = "audit", operation_id = "list_audit",
    params(AuditParams),
    responses((status = 200, body = AuditPage), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = ["admin"]))
)]
async fn list(
    State(state): State<AppState>,
    _auth: Auth<scope::Admin>,
    Query(p): Query<AuditParams>,
) -> Result<axum::Json<AuditPage>, Problem> {
    let limit = p.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Problem::invalid(
            "limit",
            format!("must be between 1 and 1000, got {limit}"),
        ));
    }
    let entries = audit::list(&state.store, p.cursor, limit).await?;
    let next_cursor = (entries.len() == limit as usize)
        .then(|| entries.last().map(|e| e.id.clone()))
        .flatten();
    Ok(axum::Json(AuditPage {
        entries,
        next_cursor,
    }))
}
