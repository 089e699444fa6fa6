//! API keys: `cvk_<id>_<secret>`, shown once at creation, kept as the SHA-256 of the secret in
//! the store's `api_keys` collection (keyed by id), compared in constant time.
//!
//! The secret is 32 random bytes, so a plain SHA-256 is enough: there is nothing to
//! brute-force that a slow hash would protect. Revoking keeps the record (with `revoked_at`)
//! so the audit log's key ids still resolve to a name.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use conveyor_worker::{Error, Result, Store};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use crate::audit::{self, Actor, AuditEntry};
use conveyor_worker::store::meta::{Expect, Put, list_all};

/// The collection keys live in.
pub const COLLECTION: &str = "api_keys";

/// What a key may do. `admin` ⊇ `operate` ⊇ `read`; `enqueue` is separate (an application's
/// key that adds jobs and reads nothing), and `admin` includes it too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Enqueue jobs (one or a batch). Nothing else.
    Enqueue,
    /// Read jobs, queues, workers and `/metrics`.
    Read,
    /// `read`, plus retry, cancel, discard (one or in bulk) and pause/resume queues.
    Operate,
    /// Everything: `operate`, `enqueue`, and the audit log.
    Admin,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 4] = [Scope::Enqueue, Scope::Read, Scope::Operate, Scope::Admin];

    /// Whether a key with this scope may do what needs `needed`.
    pub fn grants(self, needed: Scope) -> bool {
        match self {
            Scope::Admin => true,
            Scope::Operate => matches!(needed, Scope::Operate | Scope::Read),
            Scope::Read => needed == Scope::Read,
            Scope::Enqueue => needed == Scope::Enqueue,
        }
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Enqueue => "enqueue",
            Scope::Read => "read",
            Scope::Operate => "operate",
            Scope::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Scope::ALL
            .into_iter()
            .find(|x| x.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                Error::invalid(
                    "scope",
                    format!("unknown scope `{s}`; use enqueue, read, operate or admin"),
                )
            })
    }
}

/// A stored key (never the secret).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ApiKey {
    /// The public part of the key, e.g. `3f9a1c0d5e7b2a64`.
    pub id: String,
    /// Who or what it is for.
    pub name: String,
    /// What it may do.
    pub scope: Scope,
    /// Hex SHA-256 of the secret.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    #[schema(ignore)]
    pub hash: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it was revoked; a revoked key is refused with 401.
    pub revoked_at: Option<DateTime<Utc>>,
}

impl ApiKey {
    /// The key without its hash, for listings.
    pub fn public(mut self) -> Self {
        self.hash.clear();
        self
    }
}

/// A parsed `cvk_<id>_<secret>`.
struct Token<'a> {
    id: &'a str,
    secret: &'a str,
}

fn parse_token(token: &str) -> Option<Token<'_>> {
    let rest = token.strip_prefix("cvk_")?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    (id.len() == 16 && hex(id) && secret.len() == 64 && hex(secret)).then_some(Token { id, secret })
}

fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Why a token was refused (all answered with 401; the reason goes into the detail).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Not of the form `cvk_<16 hex>_<64 hex>`.
    #[error("the key is malformed: keys look like cvk_<16 hex>_<64 hex>")]
    Malformed,
    /// No such id, or the secret does not match.
    #[error("the key is not valid")]
    Unknown,
    /// Revoked.
    #[error("the key was revoked")]
    Revoked,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] Error),
}

/// Checks a bearer token; returns its key.
pub async fn verify(store: &Arc<dyn Store>, token: &str) -> Result<ApiKey, AuthError> {
    let token = parse_token(token).ok_or(AuthError::Malformed)?;
    let record = store
        .meta_get(COLLECTION, token.id)
        .await?
        .ok_or(AuthError::Unknown)?;
    let key: ApiKey = record.decode()?;
    let given = hash(token.secret);
    if !bool::from(given.as_bytes().ct_eq(key.hash.as_bytes())) {
        return Err(AuthError::Unknown);
    }
    if key.revoked_at.is_some() {
        return Err(AuthError::Revoked);
    }
    Ok(key)
}

/// Creates a key; returns it and the token to show once. Writes an audit entry.
pub async fn create(
    store: &Arc<dyn Store>,
    name: &str,
    scope: Scope,
    actor: Actor,
) -> Result<(ApiKey, String)> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(Error::invalid(
            "name",
            "must be 1 to 100 characters without control characters",
        ));
    }
    let id = hex::encode(rand::random::<[u8; 8]>());
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let key = ApiKey {
        id: id.clone(),
        name: name.to_string(),
        scope,
        hash: hash(&secret),
        created_at: Utc::now(),
        revoked_at: None,
    };
    let value = serde_json::to_value(&key)?;
    store
        .meta_put(Put::new(COLLECTION, &id, &value).expect(Expect::Absent))
        .await?;
    audit::record(
        store.as_ref(),
        AuditEntry::new(actor, "key.create")
            .target(serde_json::json!({ "key_id": id, "name": name, "scope": scope }))
            .affected(1),
    )
    .await?;
    Ok((key.public(), format!("cvk_{id}_{secret}")))
}

/// Revokes a key (idempotent); writes an audit entry. `Ok(None)`: no such key.
pub async fn revoke(store: &Arc<dyn Store>, id: &str, actor: Actor) -> Result<Option<ApiKey>> {
    let id = id.strip_prefix("cvk_").unwrap_or(id);
    let id = id.split('_').next().unwrap_or(id);
    loop {
        let Some(record) = store.meta_get(COLLECTION, id).await? else {
            return Ok(None);
        };
        let mut key: ApiKey = record.decode()?;
        if key.revoked_at.is_some() {
            return Ok(Some(key.public()));
        }
        key.revoked_at = Some(Utc::now());
        let value = serde_json::to_value(&key)?;
        match store
            .meta_put(Put::new(COLLECTION, id, &value).expect(Expect::Version(record.version)))
            .await
        {
            Ok(_) => {}
            // Someone wrote the key since it was read: read it again.
            Err(Error::Conflict(_)) => continue,
            Err(e) => return Err(e),
        }
        audit::record(
            store.as_ref(),
            AuditEntry::new(actor, "key.revoke")
                .target(serde_json::json!({ "key_id": id, "name": key.name }))
                .affected(1),
        )
        .await?;
        return Ok(Some(key.public()));
    }
}

impl crate::Admin {
    /// Creates a key; returns it and the token to show once. Audited as `key.create`.
    pub async fn create_key(
        &self,
        actor: &Actor,
        name: &str,
        scope: Scope,
    ) -> crate::Result<(ApiKey, String)> {
        Ok(create(&self.store, name, scope, actor.clone()).await?)
    }

    /// Revokes a key (idempotent). Audited as `key.revoke`; [`crate::Error::NotFound`] if
    /// there is no such key.
    pub async fn revoke_key(&self, actor: &Actor, id: &str) -> crate::Result<ApiKey> {
        revoke(&self.store, id, actor.clone())
            .await?
            .ok_or_else(|| {
                crate::Error::NotFound(format!("no key with id `{id}`; see `conveyor keys list`"))
            })
    }
}

/// Every key, oldest id first (without hashes).
pub async fn list(store: &Arc<dyn Store>) -> Result<Vec<ApiKey>> {
    list_all(store.as_ref(), COLLECTION)
        .await?
        .iter()
        .map(|r| Ok(r.decode::<ApiKey>()?.public()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_hierarchy() {
        use Scope::*;
        let expect = [
            (Enqueue, [true, false, false, false]),
            (Read, [false, true, false, false]),
            (Operate, [false, true, true, false]),
            (Admin, [true, true, true, true]),
        ];
        for (have, row) in expect {
            for (needed, ok) in Scope::ALL.into_iter().zip(row) {
                assert_eq!(have.grants(needed), ok, "{have} for {needed}");
            }
        }
    }

    #[test]
    fn tokens_parse_strictly() {
        let id = "0123456789abcdef";
        let secret = "a".repeat(64);
        assert!(parse_token(&format!("cvk_{id}_{secret}")).is_some());
        assert!(parse_token(&format!("cvk_{id}_{}", "a".repeat(63))).is_none());
        assert!(parse_token(&format!("xyz_{id}_{secret}")).is_none());
        assert!(parse_token("cvk_ü_ü").is_none());
        assert!(parse_token("").is_none());
    }
}
