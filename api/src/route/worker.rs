//! `/v1/workers`: the live worker processes (their registrations in the store).

use axum::extract::State;
use conveyor_worker::runtime::registration::{self, WorkerRegistration};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{Auth, scope};
use crate::problem::Problem;
use crate::route::queue::all_records;
use crate::state::AppState;

/// The route group.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}

/// One live worker process.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkerView {
    /// Worker id (its lease owner name).
    pub id: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Start time.
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// Latest heartbeat.
    pub last_heartbeat: chrono::DateTime<chrono::Utc>,
    /// Jobs running now, over all its queues.
    pub running: u32,
    /// Its queues.
    pub queues: Vec<WorkerQueueView>,
}

/// One queue of a worker.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkerQueueView {
    /// Queue.
    pub name: String,
    /// Slots.
    pub concurrency: u32,
    /// Running now.
    pub running: u32,
    /// Finished per second since its previous heartbeat.
    pub finished_per_second: f64,
}

impl From<WorkerRegistration> for WorkerView {
    fn from(w: WorkerRegistration) -> Self {
        Self {
            running: w.queues.iter().map(|q| q.running).sum(),
            id: w.id,
            host: w.host,
            pid: w.pid,
            started_at: w.started_at,
            last_heartbeat: w.last_heartbeat,
            queues: w
                .queues
                .into_iter()
                .map(|q| WorkerQueueView {
                    name: q.name,
                    concurrency: q.concurrency,
                    running: q.running,
                    finished_per_second: q.finished_per_second,
                })
                .collect(),
        }
    }
}

/// Worker processes that heartbeated recently (a stopped process drops out within its TTL).
#[utoipa::path(
    get, path = "/v1/workers", tag = "workers", operation_id = "list_workers",
    responses((status = 200, body = Vec<WorkerView>), (status = 401, body = Problem), (status = 403, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn list(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
) -> Result<axum::Json<Vec<WorkerView>>, Problem> {
    let workers: Vec<(String, WorkerRegistration)> =
        all_records(&state, registration::COLLECTION).await?;
    Ok(axum::Json(
        workers.into_iter().map(|(_, w)| w.into()).collect(),
    ))
}
