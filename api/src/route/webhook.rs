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
use conveyor_jobs::webhook::delivery::AttemptQuery;
use conveyor_jobs::webhook::endpoint::{EndpointPatch, NewEndpoint};
use conveyor_jobs::webhook::event::SendEvent;
use serde::Deserialize;
use serde_json::{Value, json};
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

/// A webhook document: an endpoint, event, attempt page, health or replay report (the
/// fields are described in `docs/webhooks.md`).
#[derive(ToSchema)]
#[schema(value_type = Object)]
#[allow(dead_code)]
struct WebhookDoc(Value);

fn json_of<T: serde::Serialize>(v: &T) -> Result<axum::Json<Value>, Problem> {
    serde_json::to_value(v)
        .map(axum::Json)
        .map_err(|_| Problem::internal())
}

/// Custom header values (often the receiver's credentials) are shown to `admin` keys only.
fn shows_headers<S>(auth: &Auth<S>) -> bool {
    auth.key.scope == crate::key::Scope::Admin
}

fn idempotency_header(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str()
                .map(str::to_string)
                .map_err(|_| Problem::bad_request("Idempotency-Key must be visible ASCII"))
        })
        .transpose()
}

/// Every endpoint (secrets redacted).
#[utoipa::path(
    get, path = "/v1/webhooks/endpoints", tag = "webhooks",
    responses((status = 200, body = WebhookDoc), (status = 401, body = Problem), (status = 403, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn list_endpoints(
    State(state): State<AppState>,
    auth: Auth<scope::Read>,
) -> Result<axum::Json<Value>, Problem> {
    let all: Vec<_> = state
        .webhooks
        .endpoints()
        .await?
        .iter()
        .map(|e| e.redacted_for(shows_headers(&auth)))
        .collect();
    json_of(&all)
}

/// Create an endpoint: `url` required; `description`, `event_types`, `headers`,
/// `rate_limit`, `timeout_ms`, `retry_schedule_ms`, `follow_redirects`, `secret`,
/// `disabled` optional. The answer shows the signing secret once. Audited.
#[utoipa::path(
    post, path = "/v1/webhooks/endpoints", tag = "webhooks",
    request_body = WebhookDoc,
    responses(
        (status = 201, description = "Created; `Location` names it; the secret is in clear", body = WebhookDoc),
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
        json_of(&ep)?,
    )
        .into_response())
}

/// One endpoint (secrets redacted).
#[utoipa::path(
    get, path = "/v1/webhooks/endpoints/{endpoint}", tag = "webhooks",
    params(("endpoint" = String, Path, description = "Endpoint id (ep_…)")),
    responses((status = 200, body = WebhookDoc), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn show_endpoint(
    State(state): State<AppState>,
    auth: Auth<scope::Read>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, Problem> {
    json_of(
        &state
            .webhooks
            .endpoint(&id)
            .await?
            .redacted_for(shows_headers(&auth)),
    )
}

/// Change fields of an endpoint; fields left out keep their value, `null` clears an
/// optional one. Audited.
#[utoipa::path(
    patch, path = "/v1/webhooks/endpoints/{endpoint}", tag = "webhooks",
    request_body = WebhookDoc,
    params(("endpoint" = String, Path, description = "Endpoint id")),
    responses(
        (status = 200, body = WebhookDoc), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 415, body = Problem), (status = 422, body = Problem),
    ),
    security(("bearer" = ["operate"]))
)]
async fn update_endpoint(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(id): Path<String>,
    Body(patch): Body<EndpointPatch>,
) -> Result<axum::Json<Value>, Problem> {
    let ep = state
        .admin()
        .update_endpoint(&auth.actor(), &id, patch)
        .await?;
    json_of(&ep.redacted_for(shows_headers(&auth)))
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
    responses((status = 200, body = WebhookDoc), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["admin"]))
)]
async fn endpoint_secret(
    State(state): State<AppState>,
    _auth: Auth<scope::Admin>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, Problem> {
    json_of(&state.admin().endpoint_secrets(&_auth.actor(), &id).await?)
}

/// Rotation request.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RotateRequest {
    /// A secret to use (`whsec_…`) instead of a generated one.
    secret: Option<String>,
    /// How long the old secret keeps signing, e.g. `24h`.
    overlap: Option<String>,
}

/// Sign with a new secret; the old one keeps signing beside it for `overlap`. The answer
/// shows the secrets in clear. Audited.
#[utoipa::path(
    post, path = "/v1/webhooks/endpoints/{endpoint}/rotate-secret", tag = "webhooks",
    request_body = WebhookDoc,
    params(("endpoint" = String, Path, description = "Endpoint id")),
    responses((status = 200, body = WebhookDoc), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem), (status = 415, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = ["admin"]))
)]
async fn rotate_secret(
    State(state): State<AppState>,
    auth: Auth<scope::Admin>,
    Path(id): Path<String>,
    Body(req): Body<RotateRequest>,
) -> Result<axum::Json<Value>, Problem> {
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
    json_of(&ep)
}

/// Enable an endpoint (nothing is replayed by itself). Audited.
#[utoipa::path(
    post, path = "/v1/webhooks/endpoints/{endpoint}/enable", tag = "webhooks",
    params(("endpoint" = String, Path, description = "Endpoint id")),
    responses((status = 200, body = WebhookDoc), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn enable_endpoint(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, Problem> {
    let ep = state
        .admin()
        .set_endpoint_enabled(&auth.actor(), &id, true)
        .await?;
    json_of(&ep.redacted_for(shows_headers(&auth)))
}

/// Disable an endpoint. Audited.
#[utoipa::path(
    post, path = "/v1/webhooks/endpoints/{endpoint}/disable", tag = "webhooks",
    params(("endpoint" = String, Path, description = "Endpoint id")),
    responses((status = 200, body = WebhookDoc), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn disable_endpoint(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, Problem> {
    let ep = state
        .admin()
        .set_endpoint_enabled(&auth.actor(), &id, false)
        .await?;
    json_of(&ep.redacted_for(shows_headers(&auth)))
}

/// Paging of the attempt log.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(default, deny_unknown_fields)]
struct AttemptParams {
    /// Page size, 1-1000 (default 50).
    limit: Option<u32>,
    /// The `next` of the previous page.
    after: Option<String>,
}

/// The endpoint's attempt log, newest event first: `{attempts, next}`.
#[utoipa::path(
    get, path = "/v1/webhooks/endpoints/{endpoint}/attempts", tag = "webhooks",
    params(("endpoint" = String, Path, description = "Endpoint id, or `direct` for one-off deliveries"), AttemptParams),
    responses((status = 200, body = WebhookDoc), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn endpoint_attempts(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
    Path(id): Path<String>,
    Query(p): Query<AttemptParams>,
) -> Result<axum::Json<Value>, Problem> {
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
    json_of(&page)
}

/// Success rate and latency over the last hour and day, and the circuit state.
#[utoipa::path(
    get, path = "/v1/webhooks/endpoints/{endpoint}/health", tag = "webhooks",
    params(("endpoint" = String, Path, description = "Endpoint id")),
    responses((status = 200, body = WebhookDoc), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn endpoint_health(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, Problem> {
    json_of(&state.webhooks.health(&id).await?)
}

/// What to replay for an endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplaySince {
    /// Deliveries created at or after this instant (RFC 3339).
    since: DateTime<Utc>,
}

/// Queue again every dead or cancelled delivery of the endpoint created since `since`:
/// `{queued, skipped}`. Audited.
#[utoipa::path(
    post, path = "/v1/webhooks/endpoints/{endpoint}/replay", tag = "webhooks",
    request_body = WebhookDoc,
    params(("endpoint" = String, Path, description = "Endpoint id")),
    responses((status = 200, body = WebhookDoc), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem), (status = 415, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn replay_endpoint(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(id): Path<String>,
    Body(req): Body<ReplaySince>,
) -> Result<axum::Json<Value>, Problem> {
    let out = state
        .admin()
        .replay_endpoint(&auth.actor(), &id, req.since)
        .await?;
    json_of(&out)
}

/// Queue one finished delivery again with a fresh attempt budget. Audited.
#[utoipa::path(
    post, path = "/v1/webhooks/deliveries/{delivery}/replay", tag = "webhooks",
    params(("delivery" = String, Path, description = "The delivery's job id")),
    responses((status = 200, body = WebhookDoc), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn replay_delivery(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, Problem> {
    let job = state.admin().replay_delivery(&auth.actor(), &id).await?;
    Ok(axum::Json(
        json!({"queued": 1, "delivery": job.id.to_string(), "state": job.state}),
    ))
}

/// A one-off delivery.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageRequest {
    url: String,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    payload: Value,
}

/// Deliver one event straight to a URL (no endpoint): `{url, type, payload}`.
#[utoipa::path(
    post, path = "/v1/webhooks/messages", tag = "webhooks",
    request_body = WebhookDoc,
    responses((status = 201, body = WebhookDoc), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem), (status = 415, body = Problem), (status = 422, body = Problem)),
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
    Ok((StatusCode::CREATED, json_of(&event)?).into_response())
}

/// An event to send.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventRequest {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    payload: Value,
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// Send an event (`{type, payload, idempotency_key?}`; the key may also come as the
/// `Idempotency-Key` header) to every enabled endpoint subscribed to its type: 201 with
/// `{event, duplicate: false}`, or 200 with `duplicate: true` and the first event.
#[utoipa::path(
    post, path = "/v1/events", tag = "webhooks",
    request_body = WebhookDoc,
    params(("Idempotency-Key" = Option<String>, Header, description = "Deduplication key")),
    responses(
        (status = 201, description = "Sent; one delivery per subscribed endpoint", body = WebhookDoc),
        (status = 200, description = "Duplicate key: the first event, nothing new queued (`Idempotent-Replayed: true`)", body = WebhookDoc),
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
    let key = req.idempotency_key.or(idempotency_header(&headers)?);
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
    let mut response = (status, [(header::LOCATION, location)], json_of(&sent)?).into_response();
    if sent.duplicate {
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
    responses((status = 200, body = WebhookDoc), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn show_event(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, Problem> {
    json_of(&state.webhooks.event(&id).await?)
}

/// The event's attempt log across its endpoints, newest first.
#[utoipa::path(
    get, path = "/v1/events/{event}/attempts", tag = "webhooks",
    params(("event" = String, Path, description = "Event id")),
    responses((status = 200, body = WebhookDoc), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn event_attempts(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, Problem> {
    json_of(&state.webhooks.attempts_for_event(&id).await?)
}

/// Send the event again to every endpoint it went to: `{queued, skipped}`. Audited.
#[utoipa::path(
    post, path = "/v1/events/{event}/replay", tag = "webhooks",
    params(("event" = String, Path, description = "Event id")),
    responses((status = 200, body = WebhookDoc), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = ["operate"]))
)]
async fn replay_event(
    State(state): State<AppState>,
    auth: Auth<scope::Operate>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, Problem> {
    let out = state.admin().replay_event(&auth.actor(), &id).await?;
    json_of(&out)
}
