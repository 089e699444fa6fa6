//! `/v1/schedules`: cron schedules kept in the store (see `conveyor_scheduler::registry`):
//! list and show with last fire, last outcome and next fire; create, update, delete, pause,
//! resume and trigger (audited); the next fire times in the schedule's zone.

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use conveyor_scheduler::registry::{SchedulePatch, ScheduleStatus, Schedules, StoredSchedule};
use conveyor_scheduler::schedule::ScheduleSpec;
use serde::{Deserialize, Serialize};
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
        .routes(routes!(list, create))
        .routes(routes!(show, update, delete))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(trigger))
        .routes(routes!(next))
}

/// A schedule's fields. On create, `name`, `cron` and `kind` are required; on update
/// (`PATCH`), every field is optional and fields left out keep their value.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleInput {
    /// Unique name (1-128 ASCII letters, digits, `.`, `_`, `-`, `:`). Create only.
    #[serde(default)]
    #[schema(pattern = r"^[A-Za-z0-9._:-]{1,128}$")]
    pub name: Option<String>,
    /// Cron expression: 5 fields, or 6-7 with seconds first.
    #[serde(default)]
    pub cron: Option<String>,
    /// IANA time zone (default `UTC`).
    #[serde(default)]
    pub timezone: Option<String>,
    /// Queue of the jobs (default `default`).
    #[serde(default)]
    #[schema(pattern = r"^[A-Za-z0-9._:-]{1,128}$")]
    pub queue: Option<String>,
    /// Kind of the jobs.
    #[serde(default)]
    #[schema(pattern = r"^[A-Za-z0-9._:-]{1,128}$")]
    pub kind: Option<String>,
    /// Arguments of the jobs (default `{}`).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub args: Option<Value>,
    /// Priority of the jobs (smaller runs first).
    #[serde(default)]
    #[schema(minimum = -32768, maximum = 32767)]
    pub priority: Option<i16>,
    /// Attempt budget of each job.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_attempts: Option<i32>,
    /// `false` stores it paused.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Missed ticks: `skip`, `latest` (default) or `all`.
    #[serde(default)]
    pub missed: Option<String>,
    /// Most ticks one backfill enqueues with `missed = all` (default 100).
    #[serde(default)]
    pub backfill_limit: Option<u32>,
    /// Overlap: `allow` (default) or `skip` while the previous tick's job is unfinished.
    #[serde(default)]
    pub overlap: Option<String>,
}

impl ScheduleInput {
    /// The fields to change (the admin layer checks them).
    fn patch(self) -> SchedulePatch {
        SchedulePatch {
            cron: self.cron,
            kind: self.kind,
            timezone: self.timezone,
            queue: self.queue,
            args: self.args,
            priority: self.priority,
            max_attempts: self.max_attempts,
            enabled: self.enabled,
            missed: self.missed,
            backfill_limit: self.backfill_limit,
            overlap: self.overlap,
        }
    }
}

/// A schedule with its status.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ScheduleView {
    /// The schedule's fields.
    pub spec: ScheduleSpec,
    /// `config`, `api` or `builtin`.
    pub origin: String,
    /// Why the system disabled it, if it did.
    pub disabled_reason: Option<String>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// The record's version (send it back as `If-Match` to update safely).
    pub version: i64,
    /// The tick of its newest job.
    pub last_fire: Option<DateTime<Utc>>,
    /// That job's id.
    pub last_job: Option<String>,
    /// That job's state now.
    pub last_state: Option<String>,
    /// The next tick, if enabled.
    pub next_fire: Option<DateTime<Utc>>,
}

impl From<ScheduleStatus> for ScheduleView {
    fn from(s: ScheduleStatus) -> Self {
        Self {
            spec: s.schedule.spec,
            origin: serde_json::to_value(s.schedule.origin)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            disabled_reason: s.schedule.disabled_reason,
            created_at: s.schedule.created_at,
            version: s.schedule.version,
            last_fire: s.last_fire,
            last_job: s.last_job.map(|id| id.to_string()),
            last_state: s.last_state.map(|st| st.to_string()),
            next_fire: s.next_fire,
        }
    }
}

async fn view(state: &AppState, s: StoredSchedule) -> Result<ScheduleView, Problem> {
    Ok(Schedules::new(state.store.clone())
        .status(s, Utc::now())
        .await?
        .into())
}

/// Every schedule, by name, with last fire, last outcome and next fire.
#[utoipa::path(
    get, path = "/v1/schedules", tag = "schedules",
    responses((status = 200, body = Vec<ScheduleView>), (status = 401, body = Problem), (status = 403, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn list(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
) -> Result<axum::Json<Vec<ScheduleView>>, Problem> {
    let registry = Schedules::new(state.store.clone());
    let now = Utc::now();
    let mut out = Vec::new();
    for s in registry.list().await? {
        out.push(registry.status(s, now).await?.into());
    }
    Ok(axum::Json(out))
}

/// One schedule with its status.
#[utoipa::path(
    get, path = "/v1/schedules/{name}", tag = "schedules",
    params(("name" = String, Path, description = "Schedule name", pattern = r"^[A-Za-z0-9._:-]{1,128}$")),
    responses((status = 200, body = ScheduleView), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn show(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
    Path(name): Path<String>,
) -> Result<axum::Json<ScheduleView>, Problem> {
    let s = state.admin().schedule(&name).await?;
    Ok(axum::Json(view(&state, s).await?))
}

/// Store a new schedule; every scheduler replica fires it from its next tick. Audited.
#[utoipa::path(
    post, path = "/v1/schedules", tag = "schedules",
    request_body = ScheduleInput,
    responses(
        (status = 201, description = "Created; `Location` names it", body = ScheduleView),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 409, description = "The name is taken", body = Problem), (status = 415, body = Problem), (status = 422, body = Problem),
    ),
    security(("bearer" = ["operate"]))
)]
async fn create(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Body(input): Body<ScheduleInput>,
) -> Result<Response, Problem> {
    let (Some(name), Some(cron), Some(kind)) =
        (input.name.clone(), input.cron.clone(), input.kind.clone())
    else {
        let missing: Vec<&str> = [
            ("name", input.name.is_none()),
            ("cron", input.cron.is_none()),
            ("kind", input.kind.is_none()),
        ]
        .into_iter()
        .filter_map(|(f, m)| m.then_some(f))
        .collect();
        let mut p = Problem::invalid(
            missing[0],
            format!("required to create a schedule: {}", missing.join(", ")),
        );
        for f in &missing[1..] {
            p = p.field(*f, "required");
        }
        return Err(p);
    };
    let stored = state
        .admin()
        .create_schedule(&auth.actor(), name, cron, kind, input.patch())
        .await?;
    let name = stored.spec.name.clone();
    let body = view(&state, stored).await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/v1/schedules/{name}"))],
        axum::Json(body),
    )
        .into_response())
}

/// Change fields of a schedule; fields left out keep their value. The name cannot change.
/// With `If-Match: <version>` the update applies only to that version (409 otherwise).
/// A config-file schedule is put back to the file's version at the next scheduler start.
/// Audited.
#[utoipa::path(
    patch, path = "/v1/schedules/{name}", tag = "schedules",
    request_body = ScheduleInput,
    params(("name" = String, Path, description = "Schedule name", pattern = r"^[A-Za-z0-9._:-]{1,128}$"), ("If-Match" = Option<i64>, Header, nullable = false, minimum = 0, description = "The version read")),
    responses(
        (status = 200, body = ScheduleView), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 415, body = Problem), (status = 422, body = Problem),
    ),
    security(("bearer" = ["operate"]))
)]
async fn update(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    Body(input): Body<ScheduleInput>,
) -> Result<axum::Json<ScheduleView>, Problem> {
    if input.name.as_deref().is_some_and(|n| n != name) {
        return Err(Problem::invalid(
            "name",
            "a schedule cannot be renamed; create a new one and delete the old",
        ));
    }
    let expect = match headers.get(header::IF_MATCH) {
        None => None,
        Some(v) => v
            .to_str()
            .ok()
            .map(|s| s.trim().trim_matches('"'))
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| {
                Problem::bad_request("If-Match must be a schedule version number, e.g. `3`")
            })
            .map(Some)?,
    };
    let (stored, _) = state
        .admin()
        .update_schedule(&auth.actor(), &name, input.patch(), expect)
        .await?;
    Ok(axum::Json(view(&state, stored).await?))
}

/// Delete a schedule (its jobs stay). Audited.
#[utoipa::path(
    delete, path = "/v1/schedules/{name}", tag = "schedules",
    params(("name" = String, Path, description = "Schedule name", pattern = r"^[A-Za-z0-9._:-]{1,128}$")),
    responses((status = 204, description = "Deleted"), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn delete(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(name): Path<String>,
) -> Result<StatusCode, Problem> {
    state.admin().delete_schedule(&auth.actor(), &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_enabled(
    state: &AppState,
    actor: crate::audit::Actor,
    name: &str,
    enabled: bool,
) -> Result<axum::Json<ScheduleView>, Problem> {
    let stored = state
        .admin()
        .set_schedule_enabled(&actor, name, enabled)
        .await?;
    Ok(axum::Json(view(state, stored).await?))
}

/// Stop firing (ticks while paused are not fired later). Audited.
#[utoipa::path(
    post, path = "/v1/schedules/{name}/pause", tag = "schedules",
    params(("name" = String, Path, description = "Schedule name", pattern = r"^[A-Za-z0-9._:-]{1,128}$")),
    responses((status = 200, body = ScheduleView), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn pause(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(name): Path<String>,
) -> Result<axum::Json<ScheduleView>, Problem> {
    set_enabled(&state, auth.actor(), &name, false).await
}

/// Fire again from the next tick. Audited.
#[utoipa::path(
    post, path = "/v1/schedules/{name}/resume", tag = "schedules",
    params(("name" = String, Path, description = "Schedule name", pattern = r"^[A-Za-z0-9._:-]{1,128}$")),
    responses((status = 200, body = ScheduleView), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn resume(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(name): Path<String>,
) -> Result<axum::Json<ScheduleView>, Problem> {
    set_enabled(&state, auth.actor(), &name, true).await
}

/// The job a trigger enqueued.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct TriggerResponse {
    /// The job's id.
    pub id: String,
}

/// Enqueue one job of the schedule now, outside its ticks (also when paused). Audited.
#[utoipa::path(
    post, path = "/v1/schedules/{name}/trigger", tag = "schedules",
    params(("name" = String, Path, description = "Schedule name", pattern = r"^[A-Za-z0-9._:-]{1,128}$")),
    responses((status = 201, body = TriggerResponse), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn trigger(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(name): Path<String>,
) -> Result<Response, Problem> {
    let enqueued = state.admin().trigger_schedule(&auth.actor(), &name).await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/v1/jobs/{}", enqueued.id))],
        axum::Json(TriggerResponse {
            id: enqueued.id.to_string(),
        }),
    )
        .into_response())
}

/// Query of `next`.
#[derive(Clone, Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct NextParams {
    /// How many fire times (1-1000, default 5).
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    pub count: Option<u32>,
    /// Start after this instant (RFC 3339; default now).
    #[serde(default)]
    pub after: Option<DateTime<Utc>>,
}

/// The answer of `next`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct NextFires {
    /// The fire times, soonest first, in the schedule's zone (RFC 3339 with its offset).
    pub times: Vec<String>,
    /// True when the schedule fires fewer times than `count` asked (a year field, or the
    /// end of the supported range, the year 2100): no fire follows the last time listed.
    pub exhausted: bool,
    /// When `exhausted`: what the schedule does instead, in words.
    pub note: Option<String>,
}

/// The next fire times, in the schedule's zone, and whether the schedule stops firing
/// before `count` of them.
#[utoipa::path(
    get, path = "/v1/schedules/{name}/next", tag = "schedules",
    params(("name" = String, Path, description = "Schedule name", pattern = r"^[A-Za-z0-9._:-]{1,128}$"), NextParams),
    responses((status = 200, body = NextFires), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn next(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
    Path(name): Path<String>,
    Query(p): Query<NextParams>,
) -> Result<axum::Json<NextFires>, Problem> {
    let count = p.count.unwrap_or(5);
    if !(1..=1000).contains(&count) {
        return Err(Problem::invalid(
            "count",
            format!("must be between 1 and 1000, got {count}"),
        ));
    }
    let s = state.admin().schedule(&name).await?;
    let schedule = s
        .spec
        .compile()
        .map_err(|e| Problem::invalid(e.field, e.to_string()))?;
    let upcoming = schedule.upcoming(p.after.unwrap_or_else(Utc::now), count as usize);
    Ok(axum::Json(NextFires {
        times: upcoming.times.iter().map(|t| t.to_rfc3339()).collect(),
        exhausted: upcoming.note.is_some(),
        note: upcoming.note,
    }))
}
