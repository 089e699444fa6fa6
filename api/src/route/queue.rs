//! `/v1/queues`: counts, age and throughput per queue; pause and resume.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Path, State};
use chrono::Utc;
use conveyor_worker::job::check_name;
use conveyor_worker::runtime::pause::{self, QueueSettings};
use conveyor_worker::runtime::registration::{self, WorkerRegistration};
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::audit::{self, AuditEntry};
use crate::auth::{Auth, scope};
use crate::meta::{Put, list_all};
use crate::problem::Problem;
use crate::state::AppState;
use crate::view::QueueView;

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
/// whether it is paused, and throughput over live workers.
#[utoipa::path(
    get, path = "/v1/queues", tag = "queues", operation_id = "list_queues",
    responses((status = 200, body = Vec<QueueView>), (status = 401, body = Problem), (status = 403, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn list(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
) -> Result<axum::Json<Vec<QueueView>>, Problem> {
    let stats = state.store.queue_stats().await?;
    let settings: HashMap<String, QueueSettings> = all_records(&state, pause::COLLECTION)
        .await?
        .into_iter()
        .collect();
    let workers: Vec<(String, WorkerRegistration)> =
        all_records(&state, registration::COLLECTION).await?;
    let mut throughput: HashMap<&str, f64> = HashMap::new();
    for (_, w) in &workers {
        for q in &w.queues {
            *throughput.entry(q.name.as_str()).or_default() += q.finished_per_second;
        }
    }
    let mut views: BTreeMap<String, QueueView> = BTreeMap::new();
    for s in stats {
        views.insert(
            s.queue.clone(),
            QueueView {
                paused: settings.get(&s.queue).is_some_and(|q| q.paused),
                throughput_per_second: throughput.get(s.queue.as_str()).copied().unwrap_or(0.0),
                name: s.queue,
                counts: s.counts,
                oldest_available_age_seconds: s.oldest_available_age.map(|d| d.as_secs_f64()),
            },
        );
    }
    for (name, s) in &settings {
        views.entry(name.clone()).or_insert_with(|| QueueView {
            name: name.clone(),
            counts: BTreeMap::new(),
            oldest_available_age_seconds: None,
            paused: s.paused,
            throughput_per_second: throughput.get(name.as_str()).copied().unwrap_or(0.0),
        });
    }
    Ok(axum::Json(views.into_values().collect()))
}

async fn set_paused(
    state: &AppState,
    actor: crate::audit::Actor,
    name: &str,
    paused: bool,
) -> Result<axum::Json<QueueSettings>, Problem> {
    check_name("queue", name)?;
    let settings = QueueSettings {
        paused,
        changed_at: Some(Utc::now()),
        changed_by: Some(actor.name.clone()),
    };
    let value = serde_json::to_value(&settings).map_err(conveyor_worker::Error::from)?;
    state
        .store
        .meta_put(Put::new(pause::COLLECTION, name, &value))
        .await?;
    let action = if paused {
        "queue.pause"
    } else {
        "queue.resume"
    };
    audit::record(
        state.store.as_ref(),
        AuditEntry::new(actor, action)
            .target(json!({ "queue": name }))
            .affected(1),
    )
    .await?;
    Ok(axum::Json(settings))
}

/// Pause a queue: it keeps accepting jobs, workers fetch none (within a second). Audited.
#[utoipa::path(
    post, path = "/v1/queues/{name}/pause", tag = "queues",
    params(("name" = String, Path, description = "Queue name (1-128 ASCII letters, digits, `.`, `_`, `-`, `:`)", pattern = r"^[A-Za-z0-9._:-]{1,128}$")),
    responses((status = 200, description = "The queue's settings"), (status = 401, body = Problem), (status = 403, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn pause_queue(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(name): Path<String>,
) -> Result<axum::Json<QueueSettings>, Problem> {
    set_paused(&state, auth.actor(), &name, true).await
}

/// Resume a paused queue. Audited.
#[utoipa::path(
    post, path = "/v1/queues/{name}/resume", tag = "queues",
    params(("name" = String, Path, description = "Queue name (1-128 ASCII letters, digits, `.`, `_`, `-`, `:`)", pattern = r"^[A-Za-z0-9._:-]{1,128}$")),
    responses((status = 200, description = "The queue's settings"), (status = 401, body = Problem), (status = 403, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn resume_queue(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(name): Path<String>,
) -> Result<axum::Json<QueueSettings>, Problem> {
    set_paused(&state, auth.actor(), &name, false).await
}
