//! The refusals every operation shares, added to the OpenAPI document in one place.
//!
//! A route's `#[utoipa::path]` lists what its handler answers. What the shared extractors
//! and layers answer is added here, from what the operation declares, so the document
//! cannot forget one:
//! - a key (`security`: the [`crate::auth::Auth`] extractor): `401` without a valid key,
//!   `403` without the scope, `429` when its rate limit is used up (with `Retry-After`),
//!   `503` when the store cannot check it;
//! - a JSON body ([`crate::extract::Body`]): `400` not JSON, `413` too large, `415` not
//!   `application/json`, `422` a field refused;
//! - a query string ([`crate::extract::Query`]) or a path id: `400`; a path id: `404`.
//!
//! Every problem answer is declared as `application/problem+json` (what
//! [`crate::problem::Problem`] sends), whoever listed it.

use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::{
    ContentBuilder, HeaderBuilder, ObjectBuilder, OpenApi, Ref, RefOr, Response, ResponseBuilder,
    Type,
};

/// The media type of [`crate::problem::Problem`].
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Adds the shared refusals to every operation of `doc` (see the module docs).
pub fn add_shared_refusals(doc: &mut OpenApi) {
    for item in doc.paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            add_to(op);
        }
    }
}

fn add_to(op: &mut Operation) {
    let params = op.parameters.as_deref().unwrap_or_default();
    let has_path = params
        .iter()
        .any(|p| matches!(p.parameter_in, ParameterIn::Path));
    let has_query = params
        .iter()
        .any(|p| matches!(p.parameter_in, ParameterIn::Query));
    let has_key = op.security.as_ref().is_some_and(|s| !s.is_empty());
    let has_body = op.request_body.is_some();

    let mut add = |status: u16, why: &str| {
        op.responses
            .responses
            .entry(status.to_string())
            .or_insert_with(|| RefOr::T(problem_response(status, why)));
    };
    if has_key {
        add(401, "No valid API key (`WWW-Authenticate: Bearer`)");
        add(403, "The key lacks the scope");
        add(
            429,
            "The key's rate limit is used up; retry after `Retry-After` seconds",
        );
        add(503, "The store did not answer");
    }
    if has_body {
        add(400, "The body is not valid JSON");
        add(413, "The body is larger than `api.body_limit`");
        add(415, "The body is not `application/json`");
        add(422, "A field is refused; `errors` names it");
    }
    if has_query || has_path {
        add(400, "A malformed query string or path");
    }
    if has_query {
        add(422, "A query parameter out of range; `errors` names it");
    }
    if has_path {
        add(404, "Not found");
    }

    for (status, response) in op.responses.responses.iter_mut() {
        let RefOr::T(response) = response else {
            continue;
        };
        as_problem_json(response);
        if status == "429" {
            response
                .headers
                .entry("Retry-After".into())
                .or_insert_with(|| {
                    HeaderBuilder::new()
                        .schema(
                            ObjectBuilder::new()
                                .schema_type(Type::Integer)
                                .minimum(Some(1)),
                        )
                        .description(Some("Seconds until a retry may succeed"))
                        .build()
                });
        }
    }
}

fn problem_response(status: u16, why: &str) -> Response {
    let reason = axum::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    ResponseBuilder::new()
        .description(format!("{reason}: {why}"))
        .content(
            PROBLEM_JSON,
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .build()
}

/// A response whose body is a `Problem` is `application/problem+json`, not `application/json`.
fn as_problem_json(response: &mut Response) {
    let is_problem = |c: &utoipa::openapi::Content| matches!(&c.schema, Some(RefOr::Ref(r)) if r.ref_location.ends_with("/Problem"));
    if let Some(content) = response.content.shift_remove("application/json") {
        let key = if is_problem(&content) {
            PROBLEM_JSON
        } else {
            "application/json"
        };
        response.content.insert(key.to_string(), content);
    }
}
