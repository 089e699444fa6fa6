//! Dashboard sessions: an API key exchanged once for an opaque session id, so the browser
//! holds a cookie and never the key.
//!
//! Sessions live in the store's shared records (collection [`COLLECTION`]), so every API
//! replica on the store knows them, and expire by themselves ([`Put::ttl`]). The record's
//! key is the SHA-256 of the session id: the store never holds a usable cookie. Each
//! session carries its own CSRF token; every dashboard form and action sends it back.
//! The key is read again on every request, so revoking it ends its sessions at once.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_worker::Store;
use conveyor_worker::store::meta::{Expect, Put};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::audit::{self, Actor, AuditEntry};
use crate::key::{self, ApiKey, AuthError};

/// The collection sessions live in.
pub const COLLECTION: &str = "dashboard_sessions";

/// What the store keeps of a session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Stored {
    key_id: String,
    csrf: String,
    created_at: DateTime<Utc>,
}

/// A signed-in dashboard user.
#[derive(Clone, Debug)]
pub struct Session {
    /// The key signed in with (read again on every request: scope, revocation).
    pub key: ApiKey,
    /// The token every form and action of this session must send back.
    pub csrf: String,
    /// When the session started.
    pub created_at: DateTime<Utc>,
}

impl Session {
    /// Whether `token` is this session's CSRF token (compared in constant time).
    pub fn csrf_matches(&self, token: &str) -> bool {
        bool::from(self.csrf.as_bytes().ct_eq(token.as_bytes()))
    }
}

fn random_hex() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

fn record_key(session_id: &str) -> String {
    hex::encode(Sha256::digest(session_id.as_bytes()))
}

/// Checks `token` with the key store and opens a session lasting `ttl`. Returns the session
/// id to put in the cookie. Audited as `dashboard.sign_in`.
pub async fn sign_in(
    store: &Arc<dyn Store>,
    token: &str,
    ttl: Duration,
    address: Option<std::net::SocketAddr>,
) -> Result<(String, Session), AuthError> {
    let key = key::verify(store, token.trim()).await?;
    let id = random_hex();
    let stored = Stored {
        key_id: key.id.clone(),
        csrf: random_hex(),
        created_at: Utc::now(),
    };
    let value = serde_json::to_value(&stored).map_err(conveyor_worker::Error::from)?;
    let rkey = record_key(&id);
    store
        .meta_put(
            Put::new(COLLECTION, &rkey, &value)
                .expect(Expect::Absent)
                .ttl(ttl),
        )
        .await?;
    audit::record(
        store.as_ref(),
        AuditEntry::new(Actor::key(&key.id, &key.name, address), "dashboard.sign_in")
            .target(serde_json::json!({ "key_id": key.id })),
    )
    .await?;
    Ok((
        id,
        Session {
            key: key.public(),
            csrf: stored.csrf,
            created_at: stored.created_at,
        },
    ))
}

/// The live session `session_id` names, with its key; `None` when it expired, was signed
/// out, or its key was revoked or deleted.
pub async fn find(
    store: &Arc<dyn Store>,
    session_id: &str,
) -> conveyor_worker::Result<Option<Session>> {
    if session_id.len() != 64 || !session_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let Some(record) = store.meta_get(COLLECTION, &record_key(session_id)).await? else {
        return Ok(None);
    };
    let stored: Stored = record.decode()?;
    let Some(key_record) = store.meta_get(key::COLLECTION, &stored.key_id).await? else {
        return Ok(None);
    };
    let key: ApiKey = key_record.decode()?;
    if key.revoked_at.is_some() {
        return Ok(None);
    }
    Ok(Some(Session {
        key: key.public(),
        csrf: stored.csrf,
        created_at: stored.created_at,
    }))
}

/// Ends a session (a no-op when it is already gone).
pub async fn sign_out(store: &Arc<dyn Store>, session_id: &str) -> conveyor_worker::Result<()> {
    if session_id.len() == 64 {
        store
            .meta_delete(COLLECTION, &record_key(session_id), Expect::Any)
            .await?;
    }
    Ok(())
}
