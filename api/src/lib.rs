//! Conveyor's HTTP API, served by `conveyor serve` (role `api`).
//!
//! Where to start reading:
//! - [`router`] composes the route groups in [`route`] (`job`, `queue`, `worker`, `schedule`,
//!   `audit`, `system`, `webhook`) into one axum `Router` and one OpenAPI document, then wraps them in the
//!   shared layers (body limit, security headers, CORS, HTTP metrics, panic catcher, and
//!   `keep_alive`, which reads what a refused request left unread so the connection lives).
//! - [`serve`] runs it on a bound listener until a shutdown future resolves.
//! - [`auth`]: the `Auth<scope::…>` extractor every route takes — key check, rate limit,
//!   scope check. [`key`] makes, verifies and revokes keys; [`audit`] records operator actions
//!   (both from `conveyor_admin`).
//! - Every handler parses its input, calls one `conveyor_admin::Admin` operation
//!   ([`AppState::admin`]), which checks, performs and audits it, and renders the answer.
//! - [`dashboard`]: the browser dashboard under `/dashboard` (server-rendered pages calling
//!   the same `Admin` operations).
//! - [`problem`]: the one error type, rendered as `application/problem+json`;
//!   [`extract`] has the body/query/path extractors whose rejections are problems too.
//!
//! Adding a route group: write `route/<name>.rs` with handlers annotated by
//! `#[utoipa::path]` taking `State<AppState>` and `Auth<scope::…>`, returning
//! `Result<_, Problem>`, and a `pub fn routes() -> OpenApiRouter<AppState>`; then add one
//! `.merge(route::<name>::routes())` in [`routes`]. The OpenAPI document picks it up.

// A `Problem` is built only on the error path of a request, where its size costs nothing.
#![allow(clippy::result_large_err)]

pub mod auth;
pub mod config;
pub mod dashboard;
pub mod document;
pub mod extract;
mod keep_alive;
pub mod meta;
pub mod problem;
pub mod route;
pub mod state;
pub mod view;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

pub use config::ApiConfig;
/// The audit log and API keys live in the admin layer, below the API and the CLI.
pub use conveyor_admin::{audit, key};
pub use problem::Problem;
pub use state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Conveyor API",
        description = "Enqueue, inspect and operate on background jobs. Send `Authorization: Bearer cvk_…` (create a key with `conveyor keys create`). Errors are `application/problem+json` documents.",
        version = "1"
    ),
    modifiers(&BearerAuth),
    components(schemas(route::job::BulkAction)),
    tags(
        (name = "jobs", description = "Enqueue, inspect, retry, cancel, discard"),
        (name = "queues", description = "Counts, pause, resume"),
        (name = "workers", description = "Live worker processes"),
        (name = "remote-workers", description = "Workers in any language: claim jobs, heartbeat, report outcomes"),
        (name = "schedules", description = "Cron schedules: status, create, update, pause, resume, trigger"),
        (name = "audit", description = "Operator actions"),
        (name = "backups", description = "Backups of the store and the application's databases: take, verify and prune (as jobs), list, show"),
        (name = "stats", description = "The platform history: throughput, failures, run-time and wait percentiles, kept after jobs are pruned"),
        (name = "webhooks", description = "Webhook endpoints, events, the attempt log, replay, health"),
        (name = "emails", description = "Send transactional email through the configured SMTP transports; per-recipient results"),
        (name = "system", description = "Health, metrics, docs"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("cvk_<id>_<secret>")
                    .build(),
            ),
        );
    }
}

/// The route groups and the OpenAPI document they describe.
pub fn routes() -> (axum::Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(route::job::routes())
        .merge(route::job_events::routes())
        .merge(route::queue::routes())
        .merge(route::worker::routes())
        .merge(route::remote::routes())
        .merge(route::schedule::routes())
        .merge(route::audit::routes())
        .merge(route::backup::routes())
        .merge(route::stats::routes())
        .merge(route::system::routes())
        .merge(route::webhook::routes())
        .merge(route::http_target::routes())
        .merge(route::email::routes())
        .merge(route::email_template::routes())
        .merge(route::email_suppression::routes())
        .merge(route::unsubscribe::routes())
        .split_for_parts();
    let mut doc = doc;
    document::add_shared_refusals(&mut doc);
    (router, doc)
}

/// The OpenAPI document (as served at `/v1/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().1
}

/// The whole API: routes, `/v1/openapi.json`, and the shared layers.
pub fn router(state: AppState) -> axum::Router {
    let (routes, doc) = routes();
    let doc = std::sync::Arc::new(doc);
    let routes = routes.route(
        "/v1/openapi.json",
        axum::routing::get(move || {
            let doc = doc.clone();
            async move { axum::Json(doc.as_ref().clone()) }
        }),
    );
    let config = state.config.clone();
    let mut app = routes
        .merge(dashboard::routes(config.dashboard.enabled))
        .fallback(|| async { Problem::not_found("no such route; see /v1/docs") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "this route does not answer that method; see /v1/docs",
            )
        })
        .with_state(state)
        .layer(DefaultBodyLimit::max(config.body_limit))
        .layer(middleware::from_fn(keep_alive::drain_unread_body))
        .layer(middleware::from_fn(record_http));
    if !config.cors_origins.is_empty() {
        let origins: Vec<HeaderValue> = config
            .cors_origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        let allow = if config.cors_origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(origins)
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(allow)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CONTENT_TYPE,
                    HeaderName::from_static("idempotency-key"),
                ]),
        );
    }
    security_headers(app).layer(CatchPanicLayer::custom(|_| {
        tracing::error!("a request handler panicked");
        Problem::internal().into_response()
    }))
}

fn security_headers(app: axum::Router) -> axum::Router {
    let headers = [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; frame-ancestors 'none'",
        ),
        (header::CACHE_CONTROL, "no-store"),
        (
            HeaderName::from_static("cross-origin-resource-policy"),
            "same-origin",
        ),
    ];
    headers.into_iter().fold(app, |app, (name, value)| {
        app.layer(SetResponseHeaderLayer::if_not_present(
            name,
            HeaderValue::from_static(value),
        ))
    })
}

/// Counts every request by method, matched route and status, and times it.
async fn record_http(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let response = next.run(request).await;
    let m = conveyor_worker::metrics::global();
    m.http_requests
        .get(&[&method, &route, response.status().as_str()])
        .inc();
    m.http_duration
        .get(&[&method, &route])
        .observe(started.elapsed());
    response
}

/// `/metrics` without a key, `/livez` and `/readyz`: for `api.metrics.listen`, which every
/// role serves (the probes and the scrape of a worker or scheduler process).
pub fn metrics_router(state: AppState) -> axum::Router {
    security_headers(
        axum::Router::new()
            .route("/metrics", axum::routing::get(route::system::open_metrics))
            .route("/livez", axum::routing::get(route::system::livez))
            .route("/readyz", axum::routing::get(route::system::readyz))
            .with_state(state),
    )
}

/// Serves `app` on `listener` (with peer addresses for the audit log) until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
