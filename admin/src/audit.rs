//! The audit log: one record per operator action (every change [`crate::Admin`] makes, from
//! the API or the CLI alike, and the webhook service's automatic endpoint disabling) in the
//! store's `audit` collection, keyed by a UUIDv7 so a descending listing is newest first.
//! Nothing deletes or edits them.

use std::net::SocketAddr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use conveyor_worker::{Result, Store};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use conveyor_worker::store::meta::{Expect, MetaQuery, Put};

/// The collection audit records live in.
pub const COLLECTION: &str = "audit";

/// Who did it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Actor {
    /// The API key's id (absent for the CLI, which acts with the store's credentials).
    pub key_id: Option<String>,
    /// The key's name, or `cli:<user>` for the CLI.
    pub name: String,
    /// Where the request came from (the peer address), if over HTTP.
    pub address: Option<String>,
}

impl Actor {
    /// The command line, as the OS user running it.
    pub fn cli() -> Self {
        let user = std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .unwrap_or_else(|_| "unknown".into());
        Self {
            key_id: None,
            name: format!("cli:{user}"),
            address: None,
        }
    }

    /// A recipient following an email's one-click unsubscribe link (no API key: the link's
    /// signature is the credential).
    pub fn unsubscribe_link(address: Option<SocketAddr>) -> Self {
        Self {
            key_id: None,
            name: "unsubscribe-link".to_string(),
            address: address.map(|a| a.ip().to_string()),
        }
    }

    /// An API key over HTTP.
    pub fn key(id: &str, name: &str, address: Option<SocketAddr>) -> Self {
        Self {
            key_id: Some(id.to_string()),
            name: name.to_string(),
            address: address.map(|a| a.ip().to_string()),
        }
    }
}

/// One audit record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    /// UUIDv7, time-ordered.
    pub id: String,
    /// When.
    pub at: DateTime<Utc>,
    /// Who.
    pub actor: Actor,
    /// What: `job.retry`, `job.cancel`, `job.discard`, `jobs.retry`, `jobs.cancel`,
    /// `jobs.discard`, `queue.pause`, `queue.resume`, `schedule.create`, `.update`, `.delete`,
    /// `.pause`, `.resume`, `.trigger`, `webhook.endpoint.create`, `.update`, `.delete`,
    /// `.enable`, `.disable`, `.rotate_secret`, `.show_secret`, `webhook.replay`,
    /// `key.create`, `key.revoke`, `backup.create`, `backup.verify`, `backup.restore`,
    /// `backup.prune`.
    pub action: String,
    /// The ids, filter, queue or key acted on.
    #[schema(value_type = Object)]
    pub target: Value,
    /// How many rows it changed.
    pub affected: u64,
}

impl AuditEntry {
    /// A record of `action` by `actor`, now.
    pub fn new(actor: Actor, action: &str) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            at: Utc::now(),
            actor,
            action: action.to_string(),
            target: Value::Null,
            affected: 0,
        }
    }

    /// What was acted on.
    pub fn target(mut self, target: Value) -> Self {
        self.target = target;
        self
    }

    /// How many rows changed.
    pub fn affected(mut self, n: u64) -> Self {
        self.affected = n;
        self
    }
}

/// Writes one record.
pub async fn record(store: &dyn Store, entry: AuditEntry) -> Result<()> {
    let value = serde_json::to_value(&entry)?;
    store
        .meta_put(Put::new(COLLECTION, &entry.id, &value).expect(Expect::Absent))
        .await?;
    tracing::info!(
        audit.action = %entry.action,
        audit.actor = %entry.actor.name,
        audit.affected = entry.affected,
        "audit"
    );
    Ok(())
}

/// One page, newest first, strictly older than `before` (an audit id).
pub async fn list(
    store: &Arc<dyn Store>,
    before: Option<String>,
    limit: u32,
) -> Result<Vec<AuditEntry>> {
    let page = store
        .meta_list(
            COLLECTION,
            &MetaQuery {
                prefix: None,
                after: before,
                limit,
                descending: true,
            },
        )
        .await?;
    page.iter().map(|r| r.decode()).collect()
}
