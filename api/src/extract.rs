//! Extractors whose rejections are problem documents: a JSON body ([`Body`]), a query string
//! ([`Query`]) and a job id in the path ([`JobPath`]). axum's own rejections are plain text;
//! these map each to the status the API documents (400 syntax, 413 size, 415 content type,
//! 422 a field's type or an unknown field).

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use conveyor_worker::JobId;
use serde::de::DeserializeOwned;

use crate::problem::Problem;

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
        // Every body is an object, but serde also fills a struct from a sequence of its
        // fields in order (`["demo.echo", {}]`), which no client means and the schema forbids.
        if bytes.trim_ascii_start().first() == Some(&b'[') {
            return Err(Problem::invalid(
                "body",
                "must be a JSON object with named fields, not an array",
            ));
        }
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(v)) => Ok(Body(v)),
            Err(rejection) => Err(json_problem(rejection)),
        }
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

fn json_problem(rejection: JsonRejection) -> Problem {
    match rejection {
        JsonRejection::JsonDataError(e) => {
            // "Failed to deserialize the JSON body into the target type: jobs[0].queue: invalid
            // type …": keep the part after the prefix, and name the path as the field.
            let text = std::error::Error::source(&e)
                .map(ToString::to_string)
                .unwrap_or_else(|| e.body_text());
            let (field, message) = split_path(&text);
            Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-input",
                "The request has invalid fields",
                text.clone(),
            )
            .field(field, message)
        }
        JsonRejection::JsonSyntaxError(e) => {
            let text = std::error::Error::source(&e)
                .map(ToString::to_string)
                .unwrap_or_else(|| e.body_text());
            Problem::bad_request(format!("the body is not valid JSON: {text}"))
        }
        JsonRejection::MissingJsonContentType(_) => unsupported_media_type(),
        other => unreadable(other.status(), &other.body_text()),
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
