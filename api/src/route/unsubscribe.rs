//! `/v1/unsubscribe/{token}`: the one-click unsubscribe link (RFC 8058) in the messages of a
//! list (see `conveyor_jobs::email::unsubscribe` and docs/email.md).
//!
//! No API key: the recipient's mail client (or the recipient) calls it, and the token's
//! signature is the credential. `POST` unsubscribes (`conveyor_admin::Admin::unsubscribe`);
//! `GET` never does — link scanners and prefetchers open links on their own — it answers a
//! small page whose button sends the `POST`.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, State};
use axum::response::Html;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::audit::Actor;
use crate::problem::Problem;
use crate::state::AppState;

/// The route group.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(unsubscribe_page, unsubscribe))
}

/// `&`, `<`, `>`, `"` and `'` escaped for HTML text and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"robots\" content=\"noindex\"><title>{title}</title></head>\
         <body style=\"font-family: sans-serif; max-width: 32em; margin: 3em auto\">\
         <h1>{title}</h1>\n{body}\n</body></html>\n"
    ))
}

/// The page of an unsubscribe link: what it would do, and a button that does it. Changes
/// nothing (mail scanners open links by themselves).
#[utoipa::path(
    get, path = "/v1/unsubscribe/{token}", tag = "emails",
    params(("token" = String, Path, description = "The token of the link in the message")),
    responses(
        (status = 200, description = "A page whose button unsubscribes (POSTs to the same URL)", content_type = "text/html", body = String),
        (status = 422, description = "The token is malformed, altered, or signed with a key no longer configured", body = Problem),
    )
)]
async fn unsubscribe_page(
    State(state): State<AppState>,
    Path(token): Path<String>,
) -> Result<Html<String>, Problem> {
    let request = state.admin().unsubscribe_request(&token)?;
    Ok(page(
        "Unsubscribe",
        &format!(
            "<p>Stop the messages of the list <b>{list}</b> to <b>{address}</b>?</p>\n\
             <form method=\"post\"><input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">\
             <button type=\"submit\">Unsubscribe</button></form>",
            list = escape(&request.list),
            address = escape(&request.address),
        ),
    ))
}

/// One-click unsubscribe (RFC 8058): the link's address gets no more messages of its list
/// (suppressed for that list, reason `unsubscribe`). No API key. Idempotent: a second POST
/// answers the same. Audited. The body (`List-Unsubscribe=One-Click`) is not needed.
#[utoipa::path(
    post, path = "/v1/unsubscribe/{token}", tag = "emails",
    params(("token" = String, Path, description = "The token of the link in the message")),
    responses(
        (status = 200, description = "Unsubscribed (now or before)", content_type = "text/html", body = String),
        (status = 422, description = "The token is malformed, altered, or signed with a key no longer configured", body = Problem),
    )
)]
async fn unsubscribe(
    State(state): State<AppState>,
    Path(token): Path<String>,
    parts: axum::http::request::Parts,
) -> Result<Html<String>, Problem> {
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let actor = Actor::unsubscribe_link(peer);
    let done = state.admin().unsubscribe(&actor, &token).await?;
    let s = &done.suppression;
    Ok(page(
        "Unsubscribed",
        &format!(
            "<p><b>{address}</b> will get no more messages of the list <b>{list}</b>.</p>",
            address = escape(&s.address),
            list = escape(s.list.as_deref().unwrap_or_default()),
        ),
    ))
}
