//! The route groups. Each module has a `routes()` returning its `OpenApiRouter`; the crate's
//! `routes()` merges them.

pub mod audit;
pub mod backup;
pub mod email;
pub mod email_suppression;
pub mod email_template;
pub mod http_target;
pub mod job;
pub mod job_events;
pub mod queue;
pub mod remote;
pub mod schedule;
pub mod stats;
pub mod system;
pub mod unsubscribe;
pub mod webhook;
pub mod worker;

/// The answer to a POST that created one thing, or found the one an idempotency key already
/// holds: `created` (201 or 202) when new, `200` with `Idempotent-Replayed: true` when a
/// duplicate, and `Location` naming it either way.
pub(crate) fn created_answer(
    created: axum::http::StatusCode,
    duplicate: bool,
    location: &str,
    body: impl serde::Serialize,
) -> axum::response::Response {
    use axum::http::{HeaderValue, StatusCode, header};
    use axum::response::IntoResponse;
    let status = if duplicate { StatusCode::OK } else { created };
    let mut response = (status, axum::Json(body)).into_response();
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(location) {
        h.insert(header::LOCATION, v);
    }
    if duplicate {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}
