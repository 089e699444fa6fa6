//! `/v1/queues`: counts, age and throughput per queue; pause and resume.

use axum::extract::{Path, State};
use conveyor_worker::runtime::pause::QueueSettings;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{Auth, scope};
use crate::meta::list_all;
use crate::problem::Problem;
use crate::state::AppState;
use crate::view::QueueView;

/// A queue's settings after a pause or resume.
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct QueueSettingsView {
    /// Workers fetch nothing from the queue while true.
    pub paused: bool,
    /// When `paused` last changed.
    pub changed_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Who changed it (an API key's name, or `cli:<user>`).
    pub changed_by: Option<String>,
}

impl From<QueueSettings> for QueueSettingsView {
    fn from(s: QueueSettings) -> Self {
        Self {
            paused: s.paused,
            changed_at: s.changed_at,
            changed_by: s.changed_by,
        }
    }
}

/// The route group.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(pause_queue))
        .routes(routes!(resume_queue))
}

/// Every record of a collection that decodes as `T` (unreadable ones are skipped with a
/// warning).
pub(crate) async fn all_records<T: serde::de::DeserializeOwned>(
    state: &AppState,
    collection: &str,
) -> Result<Vec<(String, T)>, Problem> {
    let mut out = Vec::new();
    for r in list_all(state.store.as_ref(), collection).await? {
        match r.decode::<T>() {
            Ok(v) => out.push((r.key, v)),
            Err(e) => {
                tracing::warn!(collection, key = %r.key, error = %e, "skipping an unreadable record")
            }
        }
    }
    Ok(out)
}

/// Every queue that has jobs or settings, with counts by state, the oldest ready job's age,
/// whether it is paused, throughput over live workers, and whether jobs wait in it that no
/// live worker serves (`unserved`).
#[utoipa::path(
    get, path = "/v1/queues", tag = "queues", operation_id = "list_queues",
    responses((status = 200, body = Vec<QueueView>), (status = 401, body = Problem), (status = 403, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn list(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
) -> Result<axum::Json<Vec<QueueView>>, Problem> {
    let views = state
        .admin()
        .queues()
        .await?
        .into_iter()
        .map(|q| QueueView {
            name: q.stats.queue,
            counts: q.stats.counts,
            oldest_available_age_seconds: q.stats.oldest_available_age.map(|d| d.as_secs_f64()),
            paused: q.paused,
            throughput_per_second: q.throughput_per_second,
            unserved: q.unserved,
        })
        .collect();
    Ok(axum::Json(views))
}

/// Pause a queue: it keeps accepting jobs, workers fetch none (within a second). Audited.
#[utoipa::path(
    post, path = "/v1/queues/{name}/pause", tag = "queues",
    params(("name" = String, Path, description = "Queue name (1-128 ASCII letters, digits, `.`, `_`, `-`, `:`)", pattern = r"^[A-Za-z0-9._:-]{1,128}$")),
    responses((status = 200, description = "The queue's settings", body = QueueSettingsView), (status = 401, body = Problem), (status = 403, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn pause_queue(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(name): Path<String>,
) -> Result<axum::Json<QueueSettingsView>, Problem> {
    Ok(axum::Json(
        state
            .admin()
            .set_queue_paused(&auth.actor(), &name, true)
            .await?
            .into(),
    ))
}

/// Resume a paused queue. Audited.
#[utoipa::path(
    post, path = "/v1/queues/{name}/resume", tag = "queues",
    params(("name" = String, Path, description = "Queue name (1-128 ASCII letters, digits, `.`, `_`, `-`, `:`)", pattern = r"^[A-Za-z0-9._:-]{1,128}$")),
    responses((status = 200, description = "The queue's settings", body = QueueSettingsView), (status = 401, body = Problem), (status = 403, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn resume_queue(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(name): Path<String>,
) -> Result<axum::Json<QueueSettingsView>, Problem> {
    Ok(axum::Json(
        state
            .admin()
            .set_queue_paused(&auth.actor(), &name, false)
            .await?
            .into(),
    ))
}
