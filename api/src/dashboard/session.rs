//! Signing in and out, and the checks every page and action passes.

use std::net::SocketAddr;

use axum::Extension;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use conveyor_admin::audit::Actor;
use conveyor_admin::key::{AuthError, Scope};
use conveyor_admin::session::{self as sessions, Session};
use minijinja::context;

use super::render;
use crate::state::AppState;

/// The session cookie's name.
pub const COOKIE: &str = "conveyor_session";

/// A signed-in request: the session and what its key may do.
pub struct Signed {
    /// The session.
    pub session: Session,
    /// The peer address, for the audit log.
    pub address: Option<SocketAddr>,
}

impl Signed {
    /// The caller as an audit actor (the key signed in with).
    pub fn actor(&self) -> Actor {
        Actor::key(&self.session.key.id, &self.session.key.name, self.address)
    }

    /// Whether the key may retry, cancel, discard, purge and pause.
    pub fn can_act(&self) -> bool {
        self.session.key.scope.grants(Scope::Operate)
    }

    /// What every template shows of the signed-in user.
    pub fn context(&self) -> minijinja::Value {
        context! {
            key_name => self.session.key.name,
            scope => self.session.key.scope.as_str(),
            can_act => self.can_act(),
            is_admin => self.session.key.scope.grants(Scope::Admin),
            csrf => self.session.csrf,
        }
    }
}

fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
}

/// The signed-in session of a page request; otherwise the answer to send (a redirect to the
/// sign-in form).
pub async fn page(
    state: &AppState,
    headers: &HeaderMap,
    connect: Option<SocketAddr>,
) -> Result<Signed, Response> {
    match find(state, headers).await? {
        Some(session) => Ok(Signed {
            session,
            address: connect,
        }),
        None => Err(Redirect::to("/dashboard/login").into_response()),
    }
}

async fn find(state: &AppState, headers: &HeaderMap) -> Result<Option<Session>, Response> {
    let Some(id) = cookie_value(headers) else {
        return Ok(None);
    };
    let session = sessions::find(&state.store, &id)
        .await
        .map_err(|e| super::page::failure(None, crate::Problem::from(e)))?;
    if let Some(s) = &session {
        // The key's rate limit, as on `/v1`: a session spends the key's tokens.
        crate::auth::meter(state, &s.key.id)
            .await
            .map_err(|p| super::page::failure(None, p))?;
    }
    Ok(session)
}

/// The checks of every action (`POST`): a session, the request from the dashboard's own
/// origin, the session's CSRF token, and — when `needs_operate` — the key's scope.
/// Refusals are `403` pages (`401`-like redirects would hide a forged request).
pub async fn action(
    state: &AppState,
    headers: &HeaderMap,
    connect: Option<SocketAddr>,
    form: &[(String, String)],
    needs_operate: bool,
) -> Result<Signed, Response> {
    let refuse = |why: &str| {
        render(
            StatusCode::FORBIDDEN,
            "error.html",
            context! { title => "Refused", status => 403, detail => why },
        )
    };
    if !same_origin(headers) {
        return Err(refuse(
            "this request came from another site (its Origin is not this dashboard's)",
        ));
    }
    let Some(session) = find(state, headers).await? else {
        return Err(refuse(
            "you are not signed in (or the session expired); sign in again",
        ));
    };
    let token = form
        .iter()
        .find(|(k, _)| k == "csrf")
        .map(|(_, v)| v.as_str())
        .or_else(|| headers.get("x-csrf-token").and_then(|v| v.to_str().ok()));
    if !token.is_some_and(|t| session.csrf_matches(t)) {
        return Err(refuse(
            "the form's security token is missing or stale; reload the page and try again",
        ));
    }
    let signed = Signed {
        session,
        address: connect,
    };
    if needs_operate && !signed.can_act() {
        return Err(refuse(&format!(
            "this needs a key with the `operate` scope; `{}` has `{}`",
            signed.session.key.name,
            signed.session.key.scope.as_str()
        )));
    }
    Ok(signed)
}

/// `Origin` (or, without it, `Referer`) names this host. Browsers send `Origin` on every
/// form `POST`; a request with neither is refused.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let source = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .and_then(|v| v.to_str().ok());
    let Some(source) = source else {
        return false;
    };
    let rest = source
        .strip_prefix("http://")
        .or_else(|| source.strip_prefix("https://"));
    rest.is_some_and(|r| r.split('/').next() == Some(host))
}

/// `GET /dashboard/login`.
pub async fn login_form(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Ok(Some(_)) = find(&state, &headers).await {
        return Redirect::to("/dashboard").into_response();
    }
    render(StatusCode::OK, "login.html", context! {})
}

/// `POST /dashboard/login`: the key's form field `key`.
pub async fn login(
    State(state): State<AppState>,
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<Vec<(String, String)>>,
) -> Response {
    let again = |status: StatusCode, message: &str| {
        render(status, "login.html", context! { error => message })
    };
    if !same_origin(&headers) {
        return again(
            StatusCode::FORBIDDEN,
            "this sign-in came from another site; open the dashboard's own page",
        );
    }
    let token = form
        .iter()
        .find(|(k, _)| k == "key")
        .map(|(_, v)| v.trim())
        .unwrap_or("");
    if token.is_empty() {
        return again(
            StatusCode::UNPROCESSABLE_ENTITY,
            "enter an API key (cvk_…); create one with `conveyor keys create --scope read --name you`",
        );
    }
    let ttl = state.config.dashboard.session_ttl;
    let address = connect.as_ref().map(|c| c.0.0);
    let (id, session) = match sessions::sign_in(&state.store, token, ttl, address).await {
        Ok(done) => done,
        Err(AuthError::Store(e)) => {
            return super::page::failure(None, crate::Problem::from(e));
        }
        Err(e) => return again(StatusCode::UNAUTHORIZED, &format!("{e}; check the key")),
    };
    if !session.key.scope.grants(Scope::Read) {
        let _ = sessions::sign_out(&state.store, &id).await;
        return again(
            StatusCode::FORBIDDEN,
            &format!(
                "the key `{}` has the `{}` scope; the dashboard needs `read`, `operate` or `admin`",
                session.key.name,
                session.key.scope.as_str()
            ),
        );
    }
    let secure = if state.config.dashboard.secure_cookie {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE}={id}; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        ttl.as_secs()
    );
    let mut r = Redirect::to("/dashboard").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// `POST /dashboard/logout`: ends the session and clears the cookie.
pub async fn logout(
    State(state): State<AppState>,
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<Vec<(String, String)>>,
) -> Response {
    if let Err(refused) = action(
        &state,
        &headers,
        connect.as_ref().map(|c| c.0.0),
        &form,
        false,
    )
    .await
    {
        return refused;
    }
    if let Some(id) = cookie_value(&headers)
        && let Err(e) = sessions::sign_out(&state.store, &id).await
    {
        return super::page::failure(None, crate::Problem::from(e));
    }
    let mut r = Redirect::to("/dashboard/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "conveyor_session=; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    r
}
