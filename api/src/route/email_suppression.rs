//! `/v1/email-suppressions`: the addresses no email is sent to (for every list, or one
//! list/topic). Each handler is one call into `conveyor_admin::Admin`, as `conveyor email
//! suppressions …` is. See docs/email.md.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use conveyor_jobs::email::suppression::{NewSuppression, Suppression};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{Auth, scope};
use crate::extract::{Body, Query};
use crate::problem::Problem;
use crate::state::AppState;

/// The route group.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_suppressions, add_suppression))
        .routes(routes!(remove_suppression))
}

/// A page of the list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(default, deny_unknown_fields)]
struct ListParams {
    /// Only addresses starting with this.
    prefix: Option<String>,
    /// Continue after this entry (`address/list` of the last one seen).
    after: Option<String>,
    /// Page size, 1-1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// Which entry.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(default, deny_unknown_fields)]
struct ListParam {
    /// The list/topic (default: the entry for every list).
    list: Option<String>,
}

/// The suppressed addresses, in address order.
#[utoipa::path(
    get, path = "/v1/email-suppressions", tag = "emails",
    params(ListParams),
    responses((status = 200, body = [Suppression]), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn list_suppressions(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
    Query(p): Query<ListParams>,
) -> Result<axum::Json<Vec<Suppression>>, Problem> {
    Ok(axum::Json(
        state
            .admin()
            .email_suppressions(p.prefix.as_deref(), p.after, p.limit.unwrap_or(100))
            .await?,
    ))
}

/// Suppress an address, for every list or for one (`list`). Audited.
#[utoipa::path(
    post, path = "/v1/email-suppressions", tag = "emails",
    request_body = NewSuppression,
    responses(
        (status = 201, body = Suppression), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 415, body = Problem), (status = 422, body = Problem),
    ),
    security(("bearer" = ["operate"]))
)]
async fn add_suppression(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Body(new): Body<NewSuppression>,
) -> Result<(StatusCode, axum::Json<Suppression>), Problem> {
    let s = state
        .admin()
        .add_email_suppression(&auth.actor(), new)
        .await?;
    Ok((StatusCode::CREATED, axum::Json(s)))
}

/// Remove an address's entry for every list, or for `?list=`. Audited.
#[utoipa::path(
    delete, path = "/v1/email-suppressions/{address}", tag = "emails",
    params(("address" = String, Path, description = "The address"), ListParam),
    responses((status = 204, description = "Removed"), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn remove_suppression(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(address): Path<String>,
    Query(p): Query<ListParam>,
) -> Result<StatusCode, Problem> {
    state
        .admin()
        .remove_email_suppression(&auth.actor(), &address, p.list.as_deref())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
