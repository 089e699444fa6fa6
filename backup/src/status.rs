//! When each source last had a complete backup and a successful verification, kept in
//! Conveyor's store (collection [`COLLECTION`], one record per source) so every process's
//! `/metrics` reports the same figures: `conveyor_backup_last_success_timestamp_seconds` and
//! `conveyor_backup_last_verified_timestamp_seconds`, by source.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use conveyor_worker::Store;
use conveyor_worker::store::meta::{Expect, Put, list_all};
use serde::{Deserialize, Serialize};

/// The store collection of the records.
pub const COLLECTION: &str = "backup_status";

/// One source's record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// When its newest complete backup finished.
    #[serde(default)]
    pub last_success_at: Option<DateTime<Utc>>,
    /// When one of its backups last verified.
    #[serde(default)]
    pub last_verified_at: Option<DateTime<Utc>>,
}

/// Which figure to move forward.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Event {
    Success(DateTime<Utc>),
    Verified(DateTime<Utc>),
}

/// Moves `source`'s figure forward (never back: a slow backup finishing after a newer one
/// does not lower it), with a compare-and-set so concurrent writers do not lose an update.
pub(crate) async fn record(store: &dyn Store, source: &str, event: Event) {
    for _ in 0..5 {
        let current = match store.meta_get(COLLECTION, source).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(source, error = %e, "cannot read the backup status record");
                return;
            }
        };
        let (mut status, expect) = match &current {
            Some(r) => (
                serde_json::from_value::<Status>(r.value.clone()).unwrap_or_default(),
                Expect::Version(r.version),
            ),
            None => (Status::default(), Expect::Absent),
        };
        let slot = match event {
            Event::Success(at) => (&mut status.last_success_at, at),
            Event::Verified(at) => (&mut status.last_verified_at, at),
        };
        if slot.0.is_some_and(|t| t >= slot.1) {
            return;
        }
        *slot.0 = Some(slot.1);
        let value = match serde_json::to_value(&status) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(source, error = %e, "cannot encode the backup status record");
                return;
            }
        };
        match store
            .meta_put(Put::new(COLLECTION, source, &value).expect(expect))
            .await
        {
            Ok(_) => return,
            Err(conveyor_worker::Error::Conflict(_)) => continue,
            Err(e) => {
                tracing::warn!(source, error = %e, "cannot write the backup status record");
                return;
            }
        }
    }
}

/// Every source's record.
pub async fn read(store: &dyn Store) -> conveyor_worker::Result<BTreeMap<String, Status>> {
    Ok(list_all(store, COLLECTION)
        .await?
        .into_iter()
        .filter_map(|r| Some((r.key, serde_json::from_value(r.value).ok()?)))
        .collect())
}

/// The two metric families, in Prometheus text format, for `/metrics`.
pub fn render(statuses: &BTreeMap<String, Status>, out: &mut String) {
    use std::fmt::Write;
    type Figure = fn(&Status) -> Option<DateTime<Utc>>;
    let families: [(&str, &str, Figure); 2] = [
        (
            "conveyor_backup_last_success_timestamp_seconds",
            "When each source's newest complete backup finished (Unix time).",
            |s| s.last_success_at,
        ),
        (
            "conveyor_backup_last_verified_timestamp_seconds",
            "When a backup of each source last verified (Unix time).",
            |s| s.last_verified_at,
        ),
    ];
    for (name, help, get) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (source, status) in statuses {
            if let Some(at) = get(status) {
                let _ = writeln!(
                    out,
                    "{name}{{source=\"{}\"}} {:.3}",
                    source.replace('\\', "\\\\").replace('"', "\\\""),
                    at.timestamp_millis() as f64 / 1000.0
                );
            }
        }
    }
}
