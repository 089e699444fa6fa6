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
/// key that adds jobs and reads nothing), and so is `worker` (a remote worker's key: it claims
/// jobs and reports their outcomes, nothing else, optionally only on some queues); `admin`
/// includes both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Enqueue jobs (one or a batch). Nothing else.
    Enqueue,
    /// Read jobs, queues, workers and `/metrics`.
    Read,
    /// `read`, plus retry, cancel, discard (one or in bulk) and pause/resume queues.
    Operate,
    /// Everything: `operate`, `enqueue`, `worker`, and the audit log.
    Admin,
    /// The remote-worker routes (`/v1/workers/claim`, heartbeat, complete, fail, snooze,
    /// finish). Nothing else.
    Worker,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 5] = [
        Scope::Enqueue,
        Scope::Read,
        Scope::Operate,
        Scope::Admin,
        Scope::Worker,
    ];

    /// Whether a key with this scope may do what needs `needed`.
    pub fn grants(self, needed: Scope) -> bool {
        match self {
            Scope::Admin => true,
            Scope::Operate => matches!(needed, Scope::Operate | Scope::Read),
            Scope::Read => needed == Scope::Read,
            Scope::Enqueue => needed == Scope::Enqueue,
            Scope::Worker => needed == Scope::Worker,
        }
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Enqueue => "enqueue",
            Scope::Read => "read",
            Scope::Operate => "operate",
            Scope::Admin => "admin",
            Scope::Worker => "worker",
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
                    format!("unknown scope `{s}`; use enqueue, read, operate, admin or worker"),
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
    /// A `worker` key's queues: it may claim from these only (absent: from any queue).
    /// Records written before keys had it read as absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<Vec<String>>,
}

impl ApiKey {
    /// Whether this key may claim jobs from `queue` (a `worker` key restricted to queues);
    /// other keys' scope decides alone.
    pub fn may_claim(&self, queue: &str) -> bool {
        self.queues
            .as_ref()
            .is_none_or(|qs| qs.iter().any(|q| q == queue))
    }

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
    create_for_queues(store, name, scope, &[], actor).await
}

/// Most queues one `worker` key may be restricted to.
pub const MAX_KEY_QUEUES: usize = 32;

/// Checks a key's queue restriction: only a `worker` key has one, each name a valid queue
/// name, at most [`MAX_KEY_QUEUES`]. Returns the sorted, deduplicated list (`None`: none given).
pub fn check_queues(scope: Scope, queues: &[String]) -> Result<Option<Vec<String>>> {
    if queues.is_empty() {
        return Ok(None);
    }
    if scope != Scope::Worker {
        return Err(Error::invalid(
            "queues",
            format!("only a `worker` key is restricted to queues; this key's scope is `{scope}`"),
        ));
    }
    for (i, q) in queues.iter().enumerate() {
        conveyor_worker::job::check_name(&format!("queues[{i}]"), q)?;
    }
    let mut list = queues.to_vec();
    list.sort();
    list.dedup();
    if list.len() > MAX_KEY_QUEUES {
        return Err(Error::invalid(
            "queues",
            format!("at most {MAX_KEY_QUEUES} queues, got {}", list.len()),
        ));
    }
    Ok(Some(list))
}

/// [`create`] with a `worker` key's queues (empty: any queue). Audited as `key.create` with
/// the queues.
pub async fn create_for_queues(
    store: &Arc<dyn Store>,
    name: &str,
    scope: Scope,
    queues: &[String],
    actor: Actor,
) -> Result<(ApiKey, String)> {
    let queues = check_queues(scope, queues)?;
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
        queues,
    };
    let value = serde_json::to_value(&key)?;
    store
        .meta_put(Put::new(COLLECTION, &id, &value).expect(Expect::Absent))
        .await?;
    let mut target = serde_json::json!({ "key_id": id, "name": name, "scope": scope });
    if let Some(queues) = &key.queues {
        target["queues"] = serde_json::json!(queues);
    }
    audit::record(
        store.as_ref(),
        AuditEntry::new(actor, "key.create")
            .target(target)
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

    /// [`Admin::create_key`] for a `worker` key that may claim from `queues` only (empty:
    /// any queue); queues on another scope are refused. Audited as `key.create`.
    pub async fn create_key_for_queues(
        &self,
        actor: &Actor,
        name: &str,
        scope: Scope,
        queues: &[String],
    ) -> crate::Result<(ApiKey, String)> {
        Ok(create_for_queues(&self.store, name, scope, queues, actor.clone()).await?)
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
            (Enqueue, [true, false, false, false, false]),
            (Read, [false, true, false, false, false]),
            (Operate, [false, true, true, false, false]),
            (Admin, [true, true, true, true, true]),
            (Worker, [false, false, false, false, true]),
        ];
        for (have, row) in expect {
            for (needed, ok) in Scope::ALL.into_iter().zip(row) {
                assert_eq!(have.grants(needed), ok, "{have} for {needed}");
            }
        }
    }

    #[test]
    fn only_worker_keys_take_queues() {
        assert_eq!(check_queues(Scope::Read, &[]).unwrap(), None);
        let e = check_queues(Scope::Read, &["a".into()]).unwrap_err();
        assert!(e.to_string().contains("only a `worker` key"), "{e}");
        let e = check_queues(Scope::Worker, &["ok".into(), "bad name".into()]).unwrap_err();
        assert!(e.to_string().contains("queues[1]"), "{e}");
        assert_eq!(
            check_queues(Scope::Worker, &["b".into(), "a".into(), "b".into()]).unwrap(),
            Some(vec!["a".to_string(), "b".to_string()])
        );
        let key: ApiKey = serde_json::from_value(serde_json::json!({
            "id": "0123456789abcdef", "name": "old", "scope": "read",
            "hash": "", "created_at": "2026-01-01T00:00:00Z", "revoked_at": null
        }))
        .unwrap();
        assert_eq!(
            key.queues, None,
            "records from before queues read as unrestricted"
        );
        assert!(key.may_claim("anything"));
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
