//! Authentication and scopes for every route: the [`Auth`] extractor.
//!
//! A handler states the scope it needs in its signature — `Auth<scope::Operate>` — and the
//! extractor answers `401` without a valid key, `429` when the key's token bucket is empty,
//! and `403` when the key's scope does not grant the route's ([`Scope::grants`]).

use std::marker::PhantomData;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use crate::audit::Actor;
use crate::key::{self, ApiKey, AuthError, Scope};
use crate::meta::RateLimit;
use crate::problem::Problem;
use crate::state::AppState;

/// Type-level scopes for [`Auth`].
pub mod scope {
    use super::Scope;

    /// A scope a route needs, as a type.
    pub trait Needed: Send + Sync + 'static {
        /// The scope.
        const SCOPE: Scope;
    }

    /// Needs `enqueue` (or `admin`).
    #[derive(Debug)]
    pub struct Enqueue;
    /// Needs `read` (or `operate`, `admin`).
    #[derive(Debug)]
    pub struct Read;
    /// Needs `operate` (or `admin`).
    #[derive(Debug)]
    pub struct Operate;
    /// Needs `admin`.
    #[derive(Debug)]
    pub struct Admin;
    /// Needs `worker` (or `admin`).
    #[derive(Debug)]
    pub struct Worker;

    impl Needed for Enqueue {
        const SCOPE: Scope = Scope::Enqueue;
    }
    impl Needed for Read {
        const SCOPE: Scope = Scope::Read;
    }
    impl Needed for Operate {
        const SCOPE: Scope = Scope::Operate;
    }
    impl Needed for Admin {
        const SCOPE: Scope = Scope::Admin;
    }
    impl Needed for Worker {
        const SCOPE: Scope = Scope::Worker;
    }
}

/// The authenticated caller of a route that needs scope `S`.
#[derive(Debug)]
pub struct Auth<S> {
    /// The key used.
    pub key: ApiKey,
    /// The peer address.
    pub address: Option<SocketAddr>,
    _scope: PhantomData<S>,
}

impl<S> Auth<S> {
    /// The caller as an audit actor.
    pub fn actor(&self) -> Actor {
        Actor::key(&self.key.id, &self.key.name, self.address)
    }
}

impl<S: scope::Needed> FromRequestParts<AppState> for Auth<S> {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let (key, address) = authorize(parts, state, S::SCOPE).await?;
        Ok(Auth {
            key,
            address,
            _scope: PhantomData,
        })
    }
}

/// The key of `Bearer <key>`; the scheme is case-insensitive (RFC 9110 §11.1), and any run of
/// spaces may separate it from the key.
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Authenticates the request, takes a token from the key's bucket, and checks `needed`.
pub async fn authorize(
    parts: &Parts,
    state: &AppState,
    needed: Scope,
) -> Result<(ApiKey, Option<SocketAddr>), Problem> {
    let address = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let header = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
        Problem::unauthorized(
            "send `Authorization: Bearer cvk_…`; create a key with `conveyor keys create`",
        )
    })?;
    let token =
        header.to_str().ok().and_then(bearer_token).ok_or_else(|| {
            Problem::unauthorized("the Authorization header must be `Bearer <key>`")
        })?;
    let key = match key::verify(&state.store, token).await {
        Ok(key) => key,
        Err(AuthError::Store(e)) => return Err(e.into()),
        Err(e) => return Err(Problem::unauthorized(e.to_string())),
    };
    meter(state, &key.id).await?;
    if !key.scope.grants(needed) {
        return Err(Problem::forbidden(format!(
            "this needs the `{needed}` scope; the key `{}` has `{}`",
            key.name, key.scope
        )));
    }
    Ok((key, address))
}

/// Takes one token from the bucket of key `key_id` (`api.rate_limit`, shared by every API
/// replica): `429` when it is empty. Every request made with a key passes here, whether it
/// came with `Authorization` or from a dashboard session signed in with the key.
pub async fn meter(state: &AppState, key_id: &str) -> Result<(), Problem> {
    let limit = &state.config.rate_limit;
    if limit.enabled {
        let now = state
            .clock
            // Measured again at most every 10 s: one extra round trip, not one per request.
            .now_fresh(state.store.as_ref(), std::time::Duration::from_secs(10))
            .await?;
        let bucket = RateLimit {
            per_second: limit.per_second,
            burst: limit.burst,
        };
        match state
            .store
            .take_tokens(&format!("api_key:{key_id}"), bucket, 1.0, now)
            .await
        {
            Ok(take) if !take.allowed => return Err(Problem::rate_limited(take.retry_after)),
            Ok(_) => {}
            // A full store refuses the bucket's write. Requests go through unmetered then,
            // so an operator can still read and purge (what frees the space); a write the
            // request makes is refused by the store itself with the same message.
            Err(conveyor_worker::Error::StoreFull(msg)) => {
                tracing::warn!(error = %msg, "rate limit not applied: the store is full");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
