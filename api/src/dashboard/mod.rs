//! The admin dashboard: server-rendered HTML under `/dashboard` on the API listener (see
//! docs/decisions/0009-dashboard.md and docs/dashboard.md).
//!
//! Where to start reading:
//! - [`routes`]: every page and action. Pages are `GET`s rendered from the templates in
//!   `templates/` (minijinja, autoescaped); actions are form `POST`s that redirect back
//!   (`303`) to the page with a notice.
//! - [`session`]: the sign-in cookie, the CSRF and `Origin` checks every `POST` passes, and
//!   the scope check (a `read` key sees no action and is refused one with `403`). Sessions
//!   themselves live in the admin layer (`conveyor_admin::session`), in the store.
//! - [`page`]: the pages; every action calls the same `conveyor_admin::Admin` operation the
//!   API and the CLI call, so the dashboard keeps no rules of its own.
//! - [`chart`]: the overview's charts as inline SVG, drawn here from the stats history.
//! - `/dashboard/events`: Server-Sent Events telling open pages that jobs changed, so they
//!   refresh their live regions (`assets/dashboard.js`; it falls back to polling).
//!
//! Templates, the script and the style sheet are compiled into the binary: nothing to
//! install or build besides `conveyor`.

mod chart;
mod page;
mod session;

use std::sync::OnceLock;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use minijinja::Environment;

use crate::state::AppState;

/// The dashboard's own Content-Security-Policy: its script, style sheet and forms, nothing
/// from elsewhere, no inline script.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The dashboard's routes (empty when `api.dashboard.enabled` is false), and `/` redirecting
/// to it.
pub fn routes(enabled: bool) -> Router<AppState> {
    if !enabled {
        return Router::new();
    }
    Router::new()
        .route("/", get(|| async { Redirect::to("/dashboard") }))
        .route("/dashboard", get(page::overview))
        .route("/dashboard/", get(|| async { Redirect::to("/dashboard") }))
        .route(
            "/dashboard/login",
            get(session::login_form).post(session::login),
        )
        .route("/dashboard/logout", post(session::logout))
        .route("/dashboard/events", get(page::events))
        .route("/dashboard/queues", get(page::queues))
        .route(
            "/dashboard/queues/{name}/{action}",
            post(page::queue_action),
        )
        .route("/dashboard/jobs", get(page::jobs))
        .route("/dashboard/jobs/bulk", post(page::jobs_bulk))
        .route("/dashboard/jobs/{id}", get(page::job))
        .route("/dashboard/jobs/{id}/{action}", post(page::job_action))
        .route("/dashboard/dead", get(page::dead))
        .route("/dashboard/dead/bulk", post(page::dead_bulk))
        .route("/dashboard/schedules", get(page::schedules))
        .route(
            "/dashboard/schedules/{name}/{action}",
            post(page::schedule_action),
        )
        .route("/dashboard/workers", get(page::workers))
        .route("/dashboard/webhooks", get(page::webhooks))
        .route(
            "/dashboard/webhooks/{id}/{action}",
            post(page::webhook_action),
        )
        .route("/dashboard/audit", get(page::audit))
        .route("/dashboard/assets/dashboard.css", get(css))
        .route("/dashboard/assets/dashboard.js", get(js))
}

async fn css() -> Response {
    asset(
        "text/css; charset=utf-8",
        include_str!("assets/dashboard.css"),
    )
}

async fn js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/dashboard.js"),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Served from the binary: a new binary may change them, so revalidate after an hour.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=3600"),
    );
    r
}

fn templates() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        for (name, source) in [
            ("base.html", include_str!("templates/base.html")),
            ("login.html", include_str!("templates/login.html")),
            ("overview.html", include_str!("templates/overview.html")),
            ("queues.html", include_str!("templates/queues.html")),
            ("jobs.html", include_str!("templates/jobs.html")),
            ("job.html", include_str!("templates/job.html")),
            ("dead.html", include_str!("templates/dead.html")),
            ("confirm.html", include_str!("templates/confirm.html")),
            ("error.html", include_str!("templates/error.html")),
            ("rows.html", include_str!("templates/rows.html")),
            ("schedules.html", include_str!("templates/schedules.html")),
            ("workers.html", include_str!("templates/workers.html")),
            ("webhooks.html", include_str!("templates/webhooks.html")),
            ("audit.html", include_str!("templates/audit.html")),
        ] {
            env.add_template(name, source)
                .expect("the dashboard's templates are valid (checked by the tests)");
        }
        env
    })
}

/// Renders `name` with `context` as a page (the dashboard's CSP, never cached).
fn render(status: StatusCode, name: &str, context: minijinja::Value) -> Response {
    match templates()
        .get_template(name)
        .and_then(|t| t.render(context))
    {
        Ok(html) => html_response(status, html),
        Err(e) => {
            tracing::error!(template = name, error = %e, "a dashboard page failed to render");
            html_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "<!doctype html><title>Error</title><p>This page failed to render; the server log says why.</p>".into(),
            )
        }
    }
}

fn html_response(status: StatusCode, html: String) -> Response {
    let mut r = (status, Html(html)).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The API's `no-referrer` would make the browser send `Origin: null` with the forms,
    // which the `Origin` check refuses; `same-origin` sends no URL to other sites either.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_template_parses() {
        let env = super::templates();
        for name in [
            "base.html",
            "login.html",
            "overview.html",
            "jobs.html",
            "schedules.html",
        ] {
            env.get_template(name).unwrap();
        }
    }
}
