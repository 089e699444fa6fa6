//! `/v1/webhooks` and `/v1/events`: webhook endpoints (CRUD, secret rotation, enable,
//! disable), events (send with fan-out and idempotency, one-off delivery to a URL), the
//! attempt log, replay and health. Each handler is one call into
//! `conveyor_jobs::webhook::Webhooks` (see `docs/webhooks.md`); changes are audited.
//!
//! Scopes: reading needs `read` (secrets are shown redacted), changing endpoints and
//! replaying need `operate`, sending events needs `enqueue`, reading a secret needs `admin`.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use conveyor_jobs::webhook::delivery::AttemptPage;
use conveyor_jobs::webhook::delivery::AttemptQuery;
use conveyor_jobs::webhook::endpoint::{EndpointPatch, NewEndpoint};
use conveyor_jobs::webhook::event::{SendEvent, Sent};
use conveyor_jobs::webhook::health::Health;
use conveyor_jobs::webhook::model::{Attempt, Endpoint, Event, Secret, WebhookUrl};
use conveyor_jobs::webhook::replay::Replayed;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{Auth, scope};
use crate::extract::{Body, DeliveryIdParam, Query, idempotency_key};
use crate::problem::Problem;
use crate::state::AppState;

/// The route group.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_endpoints, create_endpoint))
        .routes(routes!(show_endpoint, update_endpoint, delete_endpoint))
        .routes(routes!(endpoint_secret))
        .routes(routes!(rotate_secret))
        .routes(routes!(enable_endpoint))
        .routes(routes!(disable_endpoint))
        .routes(routes!(endpoint_attempts))
        .routes(routes!(endpoint_health))
        .routes(routes!(replay_endpoint))
        .routes(routes!(replay_delivery))
        .routes(routes!(send_message))
        .routes(routes!(send_event))
        .routes(routes!(show_event))
        .routes(routes!(event_attempts))
        .routes(routes!(replay_event))
}

/// Custom header values (often the receiver's credentials) are shown to `admin` keys only.
fn shows_headers<S>(auth: &Auth<S>) -> bool {
    auth.key.scope == crate::key::Scope::Admin
}

/// Every endpoint (secrets redacted).
#[utoipa::path(
    get, path = "/v1/webhooks/endpoints", tag = "webhooks",
    responses((status = 200, body = [Endpoint]), (status = 401, body = Problem), (status = 403, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn list_endpoints(
    State(state): State<AppState>,
    auth: Auth<scope::Read>,
) -> Result<axum::Json<Vec<Endpoint>>, Problem> {
    let all: Vec<_> = state
        .webhooks
        .endpoints()
        .await?
        .iter()
        .map(|e| e.redacted_for(shows_headers(&auth)))
        .collect();
    Ok(axum::Json(all))
}

/// Create an endpoint: `url` required; `description`, `event_types`, `headers`,
/// `rate_limit`, `timeout_ms`, `retry_schedule_ms`, `follow_redirects`, `secret`,
/// `disabled` optional. The answer shows the signing secret once. Audited.
#[utoipa::path(
    post, path = "/v1/webhooks/endpoints", tag = "webhooks",
    request_body = NewEndpoint,
    responses(
        (status = 201, description = "Created; `Location` names it; the secret is in clear", body = Endpoint),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 415, body = Problem), (status = 422, body = Problem),
    ),
    security(("bearer" = ["operate"]))
)]
async fn create_endpoint(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Body(new): Body<NewEndpoint>,
) -> Result<Response, Problem> {
    let ep = state.admin().create_endpoint(&auth.actor(), new).await?;
    Ok((
        StatusCode::CREATED,
        [(
            header::LOCATION,
            format!("/v1/webhooks/endpoints/{}", ep.id),
        )],
        axum::Json(ep),
    )
        .into_response())
}

/// One endpoint (secrets redacted).
#[utoipa::path(
    get, path = "/v1/webhooks/endpoints/{endpoint}", tag = "webhooks",
    params(("endpoint" = String, Path, description = "Endpoint id (ep_…)")),
    responses((status = 200, body = Endpoint), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn show_endpoint(
    State(state): State<AppState>,
    auth: Auth<scope::Read>,
    Path(id): Path<String>,
) -> Result<axum::Json<Endpoint>, Problem> {
    Ok(axum::Json(
        state
            .webhooks
            .endpoint(&id)
            .await?
            .redacted_for(shows_headers(&auth)),
    ))
}

/// Change fields of an endpoint; fields left out keep their value, `null` clears an
/// optional one. Audited.
#[utoipa::path(
    patch, path = "/v1/webhooks/endpoints/{endpoint}", tag = "webhooks",
    request_body = EndpointPatch,
    params(("endpoint" = String, Path, description = "Endpoint id")),
    responses(
        (status = 200, body = Endpoint), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 415, body = Problem), (status = 422, body = Problem),
    ),
    security(("bearer" = ["operate"]))
)]
async fn update_endpoint(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(id): Path<String>,
    Body(patch): Body<EndpointPatch>,
) -> Result<axum::Json<Endpoint>, Problem> {
    let ep = state
        .admin()
        .update_endpoint(&auth.actor(), &id, patch)
        .await?;
    Ok(axum::Json(ep.redacted_for(shows_headers(&auth))))
}

/// Delete an endpoint; its queued deliveries end `cancelled`. Audited.
#[utoipa::path(
    delete, path = "/v1/webhooks/endpoints/{endpoint}", tag = "webhooks",
    params(("endpoint" = String, Path, description = "Endpoint id")),
    responses((status = 204, description = "Deleted"), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn delete_endpoint(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    state.admin().delete_endpoint(&auth.actor(), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The endpoint's signing secrets in clear. Audited (`webhook.endpoint.show_secret`).
#[utoipa::path(
    get, path = "/v1/webhooks/endpoints/{endpoint}/secret", tag = "webhooks",
    params(("endpoint" = String, Path, description = "Endpoint id")),
    responses((status = 200, body = [Secret]), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["admin"]))
)]
async fn endpoint_secret(
    State(state): State<AppState>,
    _auth: Auth<scope::Admin>,
    Path(id): Path<String>,
) -> Result<axum::Json<Vec<Secret>>, Problem> {
    Ok(axum::Json(
        state.admin().endpoint_secrets(&_auth.actor(), &id).await?,
    ))
}

/// Rotation request.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
struct RotateRequest {
    /// A secret to use instead of a generated one (`whsec_` and padded base64).
    #[schema(value_type = Option<conveyor_jobs::webhook::signature::SecretSchema>)]
    secret: Option<String>,
    /// How long the old secret keeps signing: terms of 1-4 digits and a unit, e.g. `24h` or
    /// `1h 30m`.
    #[schema(
        pattern = r"^[0-9]{1,4}(ns|us|ms|s|sec|secs|m|min|mins|h|hr|hrs|d|days|w|weeks)( [0-9]{1,4}(ns|us|ms|s|sec|secs|m|min|mins|h|hr|hrs|d|days|w|weeks))*$"
    )]
    overlap: Option<String>,
}

/// Sign with a new secret; the old one keeps signing beside it for `overlap`. The answer
/// shows the secrets in clear. Audited.
#[utoipa::path(
    post, path = "/v1/webhooks/endpoints/{endpoint}/rotate-secret", tag = "webhooks",
    request_body = RotateRequest,
    params(("endpoint" = String, Path, description = "Endpoint id")),
    responses((status = 200, body = Endpoint), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem), (status = 415, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = ["admin"]))
)]
async fn rotate_secret(
    State(state): State<AppState>,
    auth: Auth<scope::Admin>,
    Path(id): Path<String>,
    Body(req): Body<RotateRequest>,
) -> Result<axum::Json<Endpoint>, Problem> {
    let overlap = req
        .overlap
        .as_deref()
        .map(|o| {
            humantime::parse_duration(o).map_err(|_| {
                Problem::invalid("overlap", format!("`{o}` is not a duration such as 24h"))
            })
        })
        .transpose()?;
    let ep = state
        .admin()
        .rotate_endpoint_secret(&auth.actor(), &id, req.secret, overlap)
        .await?;
    Ok(axum::Json(ep))
}

/// Enable an endpoint (nothing is replayed by itself). Audited.
#[utoipa::path(
    post, path = "/v1/webhooks/endpoints/{endpoint}/enable", tag = "webhooks",
    params(("endpoint" = String, Path, description = "Endpoint id")),
    responses((status = 200, body = Endpoint), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn enable_endpoint(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(id): Path<String>,
) -> Result<axum::Json<Endpoint>, Problem> {
    let ep = state
        .admin()
        .set_endpoint_enabled(&auth.actor(), &id, true)
        .await?;
    Ok(axum::Json(ep.redacted_for(shows_headers(&auth))))
}

/// Disable an endpoint. Audited.
#[utoipa::path(
    post, path = "/v1/webhooks/endpoints/{endpoint}/disable", tag = "webhooks",
    params(("endpoint" = String, Path, description = "Endpoint id")),
    responses((status = 200, body = Endpoint), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn disable_endpoint(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(id): Path<String>,
) -> Result<axum::Json<Endpoint>, Problem> {
    let ep = state
        .admin()
        .set_endpoint_enabled(&auth.actor(), &id, false)
        .await?;
    Ok(axum::Json(ep.redacted_for(shows_headers(&auth))))
}

/// Paging of the attempt log.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(default, deny_unknown_fields)]
struct AttemptParams {
    /// Page size, 1-1000 (default 50).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// The `next` of the previous page.
    after: Option<String>,
}

/// The endpoint's attempt log, newest event first: `{attempts, next}`.
#[utoipa::path(
    get, path = "/v1/webhooks/endpoints/{endpoint}/attempts", tag = "webhooks",
    params(("endpoint" = String, Path, description = "Endpoint id, or `direct` for one-off deliveries"), AttemptParams),
    responses((status = 200, body = AttemptPage), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn endpoint_attempts(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
    Path(id): Path<String>,
    Query(p): Query<AttemptParams>,
) -> Result<axum::Json<AttemptPage>, Problem> {
    let limit = p.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(Problem::invalid("limit", "must be between 1 and 1000"));
    }
    let page = state
        .webhooks
        .attempts_for_endpoint(
            &id,
            &AttemptQuery {
                after: p.after,
                limit,
            },
        )
        .await?;
    Ok(axum::Json(page))
}

/// Success rate and latency over the last hour and day, and the circuit state.
#[utoipa::path(
    get, path = "/v1/webhooks/endpoints/{endpoint}/health", tag = "webhooks",
    params(("endpoint" = String, Path, description = "Endpoint id")),
    responses((status = 200, body = Health), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn endpoint_health(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
    Path(id): Path<String>,
) -> Result<axum::Json<Health>, Problem> {
    Ok(axum::Json(state.webhooks.health(&id).await?))
}

/// What to replay for an endpoint.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ReplaySince {
    /// Deliveries created at or after this instant (RFC 3339).
    since: DateTime<Utc>,
}

/// Queue again every dead or cancelled delivery of the endpoint created since `since`:
/// `{queued, skipped}`. Audited.
#[utoipa::path(
    post, path = "/v1/webhooks/endpoints/{endpoint}/replay", tag = "webhooks",
    request_body = ReplaySince,
    params(("endpoint" = String, Path, description = "Endpoint id")),
    responses((status = 200, body = Replayed), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem), (status = 415, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn replay_endpoint(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(id): Path<String>,
    Body(req): Body<ReplaySince>,
) -> Result<axum::Json<Replayed>, Problem> {
    let out = state
        .admin()
        .replay_endpoint(&auth.actor(), &id, req.since)
        .await?;
    Ok(axum::Json(out))
}

/// Queue one finished delivery again with a fresh attempt budget. Audited.
#[utoipa::path(
    post, path = "/v1/webhooks/deliveries/{delivery}/replay", tag = "webhooks",
    params(DeliveryIdParam),
    responses((status = 200, body = DeliveryReplayed), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn replay_delivery(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(id): Path<String>,
) -> Result<axum::Json<DeliveryReplayed>, Problem> {
    let job = state.admin().replay_delivery(&auth.actor(), &id).await?;
    Ok(axum::Json(DeliveryReplayed {
        queued: 1,
        delivery: job.id.to_string(),
        state: job.state,
    }))
}

/// A one-off delivery.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct MessageRequest {
    /// Where to POST (http or https).
    #[schema(value_type = WebhookUrl)]
    url: String,
    /// The event type: 1 to 200 letters, digits, `.`, `_`, `-` or `:`; `webhook.*` is reserved.
    #[serde(rename = "type")]
    #[schema(pattern = r"^(?!webhook\.)[A-Za-z0-9._:-]{1,200}$")]
    event_type: String,
    /// The application's data (the body's `data`). Default `null`.
    #[serde(default)]
    payload: Value,
}

/// Deliver one event straight to a URL (no endpoint): `{url, type, payload}`.
#[utoipa::path(
    post, path = "/v1/webhooks/messages", tag = "webhooks",
    request_body = MessageRequest,
    responses((status = 201, body = Event), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem), (status = 415, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = ["enqueue"]))
)]
async fn send_message(
    State(state): State<AppState>,
    _auth: Auth<scope::Enqueue>,
    Body(req): Body<MessageRequest>,
) -> Result<Response, Problem> {
    let event = state
        .admin()
        .send_to_url(&_auth.actor(), &req.url, &req.event_type, req.payload)
        .await?;
    Ok((StatusCode::CREATED, axum::Json(event)).into_response())
}

/// An event to send.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct EventRequest {
    /// The event type: 1 to 200 letters, digits, `.`, `_`, `-` or `:`; `webhook.*` is reserved.
    #[serde(rename = "type")]
    #[schema(pattern = r"^(?!webhook\.)[A-Za-z0-9._:-]{1,200}$")]
    event_type: String,
    /// The application's data (the body's `data`). Default `null`.
    #[serde(default)]
    payload: Value,
    /// Deduplication key, 1 to 400 printable ASCII characters (also accepted as the
    /// `Idempotency-Key` header).
    #[serde(default)]
    #[schema(pattern = r"^[ -~]{1,400}$")]
    idempotency_key: Option<String>,
}

/// The answer to a delivery replay.
#[derive(Debug, Serialize, ToSchema)]
struct DeliveryReplayed {
    /// Always 1.
    queued: u64,
    /// The delivery's job id.
    delivery: String,
    /// Its state now.
    #[schema(value_type = crate::view::JobStateName)]
    state: conveyor_worker::JobState,
}

/// Send an event (`{type, payload, idempotency_key?}`; the key may also come as the
/// `Idempotency-Key` header) to every enabled endpoint subscribed to its type: 201 with
/// `{event, duplicate: false}`, or 200 with `duplicate: true` and the first event.
#[utoipa::path(
    post, path = "/v1/events", tag = "webhooks",
    request_body = EventRequest,
    params(("Idempotency-Key" = Option<String>, Header, nullable = false, description = "Deduplication key (1-400 printable ASCII characters)", pattern = r"^[!-~]([ -~]{0,398}[!-~])?$")),
    responses(
        (status = 201, description = "Sent; one delivery per subscribed endpoint", body = Sent),
        (status = 200, description = "Duplicate key: the first event, nothing new queued (`Idempotent-Replayed: true`)", body = Sent),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 409, body = Problem), (status = 415, body = Problem), (status = 422, body = Problem),
    ),
    security(("bearer" = ["enqueue"]))
)]
async fn send_event(
    State(state): State<AppState>,
    _auth: Auth<scope::Enqueue>,
    headers: HeaderMap,
    Body(req): Body<EventRequest>,
) -> Result<Response, Problem> {
    let key = idempotency_key(
        req.idempotency_key,
        &headers,
        conveyor_jobs::webhook::event::MAX_EVENT_KEY_LEN,
    )?;
    let sent = state
        .admin()
        .send_event(
            &_auth.actor(),
            SendEvent {
                event_type: req.event_type,
                payload: req.payload,
                idempotency_key: key,
            },
        )
        .await?;
    let location = format!("/v1/events/{}", sent.event.id);
    let status = if sent.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let duplicate = sent.duplicate;
    let mut response = (status, [(header::LOCATION, location)], axum::Json(sent)).into_response();
    if duplicate {
        response.headers_mut().insert(
            "idempotent-replayed",
            axum::http::HeaderValue::from_static("true"),
        );
    }
    Ok(response)
}

/// One event with its deliveries.
#[utoipa::path(
    get, path = "/v1/events/{event}", tag = "webhooks",
    params(("event" = String, Path, description = "Event id (evt_…)")),
    responses((status = 200, body = Event), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn show_event(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
    Path(id): Path<String>,
) -> Result<axum::Json<Event>, Problem> {
    Ok(axum::Json(state.webhooks.event(&id).await?))
}

/// The event's attempt log across its endpoints, newest first.
#[utoipa::path(
    get, path = "/v1/events/{event}/attempts", tag = "webhooks",
    params(("event" = String, Path, description = "Event id")),
    responses((status = 200, body = [Attempt]), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn event_attempts(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
    Path(id): Path<String>,
) -> Result<axum::Json<Vec<Attempt>>, Problem> {
    Ok(axum::Json(state.webhooks.attempts_for_event(&id).await?))
}

/// Send the event again to every endpoint it went to: `{queued, skipped}`. Audited.
#[utoipa::path(
    post, path = "/v1/events/{event}/replay", tag = "webhooks",
    params(("event" = String, Path, description = "Event id")),
    responses((status = 200, body = Replayed), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn replay_event(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(id): Path<String>,
) -> Result<axum::Json<Replayed>, Problem> {
    let out = state.admin().replay_event(&auth.actor(), &id).await?;
    Ok(axum::Json(out))
}
