//! `/v1/email-templates`: create (a name that exists gets its next version), list, read
//! (a version, or every version), preview with sample data, delete. Each handler is one call
//! into `conveyor_admin::Admin`, as `conveyor email templates …` is. See docs/email.md.

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use conveyor_jobs::email::{NewTemplate, Rendered, Template, TemplateSummary};
use serde::Deserialize;
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{Auth, scope};
use crate::extract::{Body, Query};
use crate::problem::Problem;
use crate::state::AppState;

/// The route group.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_templates, create_template))
        .routes(routes!(show_template, delete_template))
        .routes(routes!(template_versions))
        .routes(routes!(preview_template))
}

/// Which version.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(default, deny_unknown_fields)]
struct VersionParam {
    /// A version (default: the latest; for a delete: every version).
    #[param(minimum = 1)]
    version: Option<u32>,
}

/// What to render a preview with.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct PreviewRequest {
    /// A version (default: the latest).
    #[schema(minimum = 1)]
    pub version: Option<u32>,
    /// The variables (a JSON object); absent: the template's `sample_data`.
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
}

/// Every template with its latest version.
#[utoipa::path(
    get, path = "/v1/email-templates", tag = "emails",
    responses((status = 200, body = [TemplateSummary]), (status = 401, body = Problem), (status = 403, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn list_templates(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
) -> Result<axum::Json<Vec<TemplateSummary>>, Problem> {
    Ok(axum::Json(state.admin().email_templates().await?))
}

/// Create a template; a name that exists gets its next version (the earlier ones stay).
/// Every part is parsed now: a syntax error is a 422 naming the part (`subject`, `text`,
/// `html`) with its line and column. Audited.
#[utoipa::path(
    post, path = "/v1/email-templates", tag = "emails",
    request_body = NewTemplate,
    responses(
        (status = 201, description = "Created; `Location` names the version", body = Template),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 409, body = Problem), (status = 415, body = Problem), (status = 422, body = Problem),
    ),
    security(("bearer" = ["operate"]))
)]
async fn create_template(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Body(new): Body<NewTemplate>,
) -> Result<Response, Problem> {
    let t = state
        .admin()
        .create_email_template(&auth.actor(), new)
        .await?;
    Ok((
        StatusCode::CREATED,
        [(
            header::LOCATION,
            format!("/v1/email-templates/{}?version={}", t.name, t.version),
        )],
        axum::Json(t),
    )
        .into_response())
}

/// One version of a template (default: the latest).
#[utoipa::path(
    get, path = "/v1/email-templates/{name}", tag = "emails",
    params(("name" = String, Path, description = "Template name"), VersionParam),
    responses((status = 200, body = Template), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn show_template(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
    Path(name): Path<String>,
    Query(p): Query<VersionParam>,
) -> Result<axum::Json<Template>, Problem> {
    Ok(axum::Json(
        state.admin().email_template(&name, p.version).await?,
    ))
}

/// Every version of a template, oldest first.
#[utoipa::path(
    get, path = "/v1/email-templates/{name}/versions", tag = "emails",
    params(("name" = String, Path, description = "Template name")),
    responses((status = 200, body = [Template]), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn template_versions(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
    Path(name): Path<String>,
) -> Result<axum::Json<Vec<Template>>, Problem> {
    Ok(axum::Json(
        state.admin().email_template_versions(&name).await?,
    ))
}

/// Render a template with `data` (or its sample data): the subject and bodies as a message
/// would carry them. A variable the data lacks is a 422 naming `data`.
#[utoipa::path(
    post, path = "/v1/email-templates/{name}/preview", tag = "emails",
    params(("name" = String, Path, description = "Template name")),
    request_body = PreviewRequest,
    responses(
        (status = 200, body = Rendered), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem), (status = 415, body = Problem), (status = 422, body = Problem),
    ),
    security(("bearer" = ["read"]))
)]
async fn preview_template(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
    Path(name): Path<String>,
    Body(req): Body<PreviewRequest>,
) -> Result<axum::Json<Rendered>, Problem> {
    Ok(axum::Json(
        state
            .admin()
            .preview_email_template(&name, req.version, req.data)
            .await?,
    ))
}

/// Delete one version (`?version=`) or every version of a template; emails queued with it
/// and not yet sent fail at delivery. Audited.
#[utoipa::path(
    delete, path = "/v1/email-templates/{name}", tag = "emails",
    params(("name" = String, Path, description = "Template name"), VersionParam),
    responses((status = 204, description = "Deleted"), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn delete_template(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(name): Path<String>,
    Query(p): Query<VersionParam>,
) -> Result<StatusCode, Problem> {
    state
        .admin()
        .delete_email_template(&auth.actor(), &name, p.version)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
