//! `/v1/stats/jobs`: the platform history — throughput, failures, run-time and wait
//! percentiles per period, queue and kind, read from the `stats.rollup` rows (so it covers
//! jobs already pruned). The rules (period, resolution) live in `conveyor_analytics::query`,
//! shared with `conveyor stats`.

use axum::extract::State;
use chrono::{DateTime, Utc};
use conveyor_analytics::query::{self, Resolution, StatsQuery, StatsReport, WebhookReport};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{Auth, scope};
use crate::extract::Query;
use crate::problem::Problem;
use crate::state::AppState;

/// The route group.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(jobs))
        .routes(routes!(webhooks))
}

/// The period and what to count.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StatsParams {
    /// Start (RFC 3339). Default: `to` minus `period`.
    pub from: Option<DateTime<Utc>>,
    /// End, exclusive (RFC 3339). Default: now.
    pub to: Option<DateTime<Utc>>,
    /// Length of the period when `from` is not given, e.g. `15m`, `24h`, `7d` (default `1h`).
    pub period: Option<String>,
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this kind.
    pub kind: Option<String>,
    /// `minute`, `hour` or `day`. Default: the finest kept for the whole period that gives at
    /// most 1,500 points.
    pub resolution: Option<Resolution>,
}

/// Finished jobs over a period: totals, per queue and kind, and a series.
#[utoipa::path(
    get, path = "/v1/stats/jobs", tag = "stats", operation_id = "job_stats",
    params(StatsParams),
    responses((status = 200, body = StatsReport), (status = 400, body = Problem), (status = 401, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn jobs(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
    Query(p): Query<StatsParams>,
) -> Result<axum::Json<StatsReport>, Problem> {
    let now = state.clock.now();
    let from = query::period_start(p.from, p.period.as_deref(), p.to, now)?;
    let q = StatsQuery {
        from,
        to: p.to,
        queue: p.queue,
        kind: p.kind,
        resolution: p.resolution,
    };
    Ok(axum::Json(
        query::read(&state.store, &state.stats, &q, now).await?,
    ))
}

/// The period for webhook deliveries.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WebhookStatsParams {
    /// Start (RFC 3339). Default: `to` minus `period`.
    pub from: Option<DateTime<Utc>>,
    /// End, exclusive (RFC 3339). Default: now.
    pub to: Option<DateTime<Utc>>,
    /// Length of the period when `from` is not given, e.g. `15m`, `24h`, `7d` (default `1h`).
    pub period: Option<String>,
    /// Only this endpoint id (`direct`: deliveries to a URL).
    pub endpoint: Option<String>,
    /// `minute`, `hour` or `day`. Default: the finest kept for the whole period that gives at
    /// most 1,500 points.
    pub resolution: Option<Resolution>,
}

/// Webhook deliveries over a period: per endpoint, delivered, failed, retries and latency.
#[utoipa::path(
    get, path = "/v1/stats/webhooks", tag = "stats", operation_id = "webhook_stats",
    params(WebhookStatsParams),
    responses((status = 200, body = WebhookReport), (status = 400, body = Problem), (status = 401, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn webhooks(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
    Query(p): Query<WebhookStatsParams>,
) -> Result<axum::Json<WebhookReport>, Problem> {
    let now = state.clock.now();
    let from = query::period_start(p.from, p.period.as_deref(), p.to, now)?;
    let q = StatsQuery {
        from,
        to: p.to,
        resolution: p.resolution,
        ..StatsQuery::default()
    };
    Ok(axum::Json(
        query::read_webhooks(&state.store, &state.stats, &q, p.endpoint.as_deref(), now).await?,
    ))
}
