//! Extractors whose rejections are problem documents: a JSON body ([`Body`]), a query string
//! ([`Query`]) and a job id in the path ([`JobPath`]). axum's own rejections are plain text;
//! these map each to the status the API documents (400 syntax, 413 size, 415 content type,
//! 422 a field's type, an unknown field, or an object sent as an array).

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use conveyor_worker::JobId;
use serde::de::DeserializeOwned;

use crate::problem::Problem;

mod named_fields;

use named_fields::NamedFields;

/// A JSON request body as `T` (whose serde settings reject unknown fields).
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<S, T> FromRequest<S> for Body<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !json_content_type(req.headers()) {
            return Err(unsupported_media_type());
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| unreadable(e.status(), &e.body_text()))?;
        from_json(&bytes).map(Body)
    }
}

/// `bytes` as `T`: a syntax error is `400`; a field of the wrong type, an unknown field, or
/// an object written as an array (at any depth, see [`named_fields`]) is `422` naming the
/// field's path (`jobs[0].queue`, `body` for the whole document).
pub fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(NamedFields(&mut de)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_data() {
            let field = if path == "." {
                "body".to_string()
            } else {
                path
            };
            let message = without_position(&inner.to_string());
            Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-input",
                "The request has invalid fields",
                format!("{field}: {message}"),
            )
            .field(field, message)
        } else {
            Problem::bad_request(format!("the body is not valid JSON: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| Problem::bad_request(format!("the body is not valid JSON: {e}")))?;
    Ok(value)
}

/// serde_json's "… at line 1 column 12" is noise next to the field's path.
fn without_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) if message[i..].contains(" column ") => message[..i].to_string(),
        _ => message.to_string(),
    }
}

/// `application/json` or `application/*+json`, as axum's `Json` accepts.
fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

fn unsupported_media_type() -> Problem {
    Problem::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
        "The body must be JSON",
        "send the body with `Content-Type: application/json`",
    )
}

/// The body could not be read: too large, or cut off.
fn unreadable(status: StatusCode, text: &str) -> Problem {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        Problem::too_large(
            "the body is larger than the server's limit (api.body_limit); split a batch or shrink the args",
        )
    } else {
        Problem::bad_request(format!("cannot read the body: {text}"))
    }
}

/// `path.to.field: message` (serde_path_to_error style) → (`path.to.field`, `message`).
fn split_path(text: &str) -> (String, String) {
    match text.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') && !path.is_empty() => {
            (path.to_string(), rest.to_string())
        }
        _ => ("body".to_string(), text.to_string()),
    }
}

/// A query string as `T`.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<S, T> FromRequestParts<S> for Query<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => {
                let text = std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_else(|| e.body_text());
                let (field, message) = split_path(&text);
                Err(Problem::bad_request(format!("bad query string: {text}")).field(field, message))
            }
            Err(other) => Err(Problem::bad_request(other.body_text())),
        }
    }
}

/// The `{id}` of a job route in the OpenAPI document: what [`JobPath`] accepts.
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct JobIdParam {
    /// Job id: a UUID (hyphenated or 32 hex digits), bare or `job_`-prefixed.
    #[param(
        pattern = r"^(job_)?([0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}|[0-9A-Fa-f]{32})$"
    )]
    pub id: String,
}

/// The `{delivery}` of a webhook delivery route: a job id, as [`JobIdParam`].
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct DeliveryIdParam {
    /// The delivery's job id: a UUID (hyphenated or 32 hex digits), bare or `job_`-prefixed.
    #[param(
        pattern = r"^(job_)?([0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}|[0-9A-Fa-f]{32})$"
    )]
    pub delivery: String,
}

/// A job id from the path (`{id}`), bare or `job_`-prefixed.
#[derive(Debug)]
pub struct JobPath(pub JobId);

impl<S: Send + Sync> FromRequestParts<S> for JobPath {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|e| Problem::bad_request(e.body_text()))?;
        raw.parse::<JobId>()
            .map(JobPath)
            .map_err(|e| Problem::bad_request(e.to_string()).field("id", "not a job id (a UUID)"))
    }
}

/// The idempotency key of a request that may carry it in its body, as the
/// `Idempotency-Key` header, or both (then they must be equal): checked by the one rule of
/// every key (`conveyor_worker::job::check_idempotency_key`), each naming where it came from.
pub fn idempotency_key(
    body: Option<String>,
    headers: &axum::http::HeaderMap,
    max: usize,
) -> Result<Option<String>, Problem> {
    const HEADER: &str = "Idempotency-Key";
    let header = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let text = v
                .to_str()
                .map_err(|_| Problem::invalid(HEADER, "must be printable ASCII characters"))?;
            conveyor_worker::job::check_idempotency_key(HEADER, text, max)?;
            Some(text.to_string())
        }
    };
    if let Some(key) = &body {
        conveyor_worker::job::check_idempotency_key("idempotency_key", key, max)?;
    }
    match (body, header) {
        (Some(a), Some(b)) if a != b => Err(Problem::invalid(
            "idempotency_key",
            "differs from the Idempotency-Key header; send one of them",
        )),
        (a, b) => Ok(a.or(b)),
    }
}
