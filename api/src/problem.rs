//! The one HTTP error type: every refusal is a JSON problem document (RFC 9457,
//! `application/problem+json`) with a stable `type`, a `title`, the `status`, a `detail` that
//! says what to fix, and per-field errors. Internals (SQL, Redis replies) are logged, never sent.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A problem document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem: `urn:conveyor:problem:<code>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary, the same for every problem of this type.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong this time and how to fix it.
    pub detail: String,
    /// The stable machine-readable code (the last part of `type`).
    pub code: String,
    /// Field-level errors, when the input was at fault.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// For `429`: seconds until a retry may succeed (also in `Retry-After`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

/// One field's error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FieldError {
    /// The field, as a JSON pointer-ish path (`jobs[3].queue`, `limit`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl Problem {
    /// A problem with a status, code, title and detail.
    pub fn new(
        status: StatusCode,
        code: &str,
        title: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            kind: format!("urn:conveyor:problem:{code}"),
            title: title.into(),
            status: status.as_u16(),
            detail: detail.into(),
            code: code.to_string(),
            errors: Vec::new(),
            retry_after: None,
        }
    }

    /// With one field error.
    pub fn field(mut self, field: impl Into<String>, message: impl Into<String>) -> Self {
        self.errors.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
        self
    }

    /// 400: the request could not be read (bad JSON syntax, a malformed query or path).
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "The request is malformed",
            detail,
        )
    }

    /// 422: well-formed, but a field is not acceptable.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        let field = field.into();
        let message = message.into();
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-input",
            "The request has invalid fields",
            format!("{field}: {message}"),
        )
        .field(field, message)
    }

    /// 401: no key, or a key that is unknown, malformed or revoked.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "An API key is required",
            detail,
        )
    }

    /// 403: the key is valid but lacks the scope.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "The API key lacks the scope for this",
            detail,
        )
    }

    /// 404.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    /// 409: the thing is in a state that does not allow this.
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "conflict",
            "The request conflicts with the current state",
            detail,
        )
    }

    /// 413.
    pub fn too_large(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            "The request is too large",
            detail,
        )
    }

    /// 429 with the wait.
    pub fn rate_limited(retry_after: Duration) -> Self {
        let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
        let mut p = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many requests for this API key",
            format!("the key's rate limit is used up; retry in {secs} s"),
        );
        p.retry_after = Some(secs);
        p
    }

    /// 503: the store is unreachable.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "The store is unavailable",
            detail,
        )
    }

    /// 500 without internals.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "the server failed to handle the request; the details are in its log",
        )
    }

    /// The status as a `StatusCode`.
    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let retry_after = self.retry_after;
        let body = serde_json::to_vec(&self).unwrap_or_else(|_| b"{}".to_vec());
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"conveyor\""),
            );
        }
        response
    }
}

impl From<conveyor_worker::Error> for Problem {
    fn from(e: conveyor_worker::Error) -> Self {
        use conveyor_worker::Error as E;
        match e {
            E::InvalidInput { field, message } => Problem::invalid(field, message),
            E::NotFound(id) => Problem::not_found(format!("job {id} not found")),
            e @ E::WrongState { .. } => Problem::conflict(e.to_string()),
            E::Conflict(msg) => Problem::conflict(msg),
            E::Database(_) | E::Redis(_) | E::Migrate(_) => {
                tracing::error!(error = %e, "store error while serving a request");
                Problem::unavailable("the store did not answer; try again shortly")
            }
            E::StoreFull(msg) => {
                tracing::error!(error = %msg, "the store is full");
                Problem::unavailable(msg)
            }
            E::Unsupported(msg) if msg.starts_with("migrations pending") => {
                Problem::unavailable(msg)
            }
            other => {
                tracing::error!(error = %other, "error while serving a request");
                Problem::internal()
            }
        }
    }
}

impl From<conveyor_backup::Error> for Problem {
    fn from(e: conveyor_backup::Error) -> Self {
        use conveyor_backup::Error as E;
        match e {
            E::NotFound(message) => Problem::not_found(message),
            // The server's `[backup]` settings, not the request, are at fault.
            e @ E::Config(_) => Problem::conflict(e.to_string()),
            e @ E::Destination { .. } => {
                tracing::warn!(error = %e, "backup destination error while serving a request");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "The backup destination is unavailable",
                    e.to_string(),
                )
            }
            other => {
                tracing::error!(error = %other, "backup error while serving a request");
                Problem::internal()
            }
        }
    }
}

impl From<conveyor_admin::Error> for Problem {
    fn from(e: conveyor_admin::Error) -> Self {
        use conveyor_admin::Error as E;
        match e {
            E::Store(e) => e.into(),
            E::Webhook(e) => e.into(),
            E::TooLarge { field, message } => {
                Problem::too_large(format!("{field} is {message}")).field(field, message)
            }
            E::NotFound(message) | E::UnknownName(message) => Problem::not_found(message),
            E::Forbidden(message) => Problem::forbidden(message),
            E::Backup(e) => e.into(),
        }
    }
}

/// The documented `type`s and their statuses, in order (listed in `docs/api.md`).
pub const CODES: [(&str, u16); 11] = [
    ("bad-request", 400),
    ("unauthorized", 401),
    ("forbidden", 403),
    ("not-found", 404),
    ("method-not-allowed", 405),
    ("conflict", 409),
    ("too-large", 413),
    ("unsupported-media-type", 415),
    ("invalid-input", 422),
    ("rate-limited", 429),
    ("unavailable", 503),
];

impl From<conveyor_jobs::webhook::WebhookError> for Problem {
    fn from(e: conveyor_jobs::webhook::WebhookError) -> Self {
        use conveyor_jobs::webhook::WebhookError as E;
        match e {
            E::Store(e) => e.into(),
            E::NotFound { what, id } => Problem::not_found(format!("{what} {id} not found")),
            E::Invalid { field, message } => Problem::invalid(field, message),
            E::Reserved(r) => Problem::invalid(r.field, r.message),
            E::Conflict(msg) => Problem::conflict(msg),
            E::Client(e) => {
                tracing::error!(error = %e, "webhook client error while serving a request");
                Problem::internal()
            }
            // The server's keys are wrong or missing: the operator fixes it, not the caller.
            E::Secrets(e) => {
                tracing::error!(error = %e, "cannot seal or open a webhook signing secret");
                Problem::internal()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_documented() {
        let doc = include_str!("../../docs/api.md");
        for (code, status) in CODES {
            assert!(
                doc.contains(&format!("| {status} | `{code}` |")),
                "docs/api.md lacks {status} {code}"
            );
        }
    }

    #[test]
    fn problems_render_as_problem_json() {
        let response = Problem::rate_limited(Duration::from_millis(1500)).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
    }
}
