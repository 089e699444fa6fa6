//! A backup's manifest: what was backed up, when, and the size and SHA-256 of every object,
//! written after every object is stored. A backup is complete exactly when its manifest
//! exists: a backup interrupted at any point (a killed process, a full destination) has no
//! manifest, is never listed, and never counts for retention.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The manifest format this version writes and reads.
pub const FORMAT: u32 = 1;

/// The manifest's object name inside a backup's folder.
pub const MANIFEST: &str = "manifest.json";

/// The sidecar object recording a backup's latest successful verification. The manifest is
/// written once and never rewritten: a half-written rewrite could make a complete backup
/// look incomplete.
pub const VERIFIED: &str = "verified.json";

/// A backup's latest successful verification (`verified.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// When it verified.
    pub verified_at: DateTime<Utc>,
    /// Whether it was also restored into a scratch copy and its tables compared
    /// (`verify --restore`).
    pub restored: bool,
}

/// One backup.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// `<UTC start, YYYYMMDDTHHMMSS.mmmZ>-<8 hex>`: sorts by start time.
    pub id: String,
    /// The source's name (`store` for Conveyor's own).
    pub source: String,
    /// What the source is.
    pub source_kind: SourceKind,
    /// The Conveyor version that wrote it.
    pub conveyor_version: String,
    /// When reading the source started (the snapshot is at or after it).
    pub started_at: DateTime<Utc>,
    /// When the last object was stored.
    pub finished_at: DateTime<Utc>,
    /// The stored objects.
    pub objects: Vec<ObjectEntry>,
    /// What the source held at backup time, for `verify --restore` to compare with.
    pub tables: Vec<TableFigures>,
    /// The Postgres schemas dumped (empty: the whole database, or a SQLite file).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schemas: Vec<String>,
    /// A Postgres store's applied migrations (`_sqlx_migrations`, which lives outside the
    /// `conveyor` schema), read in the dump's snapshot and written back by a restore.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub migrations: Vec<MigrationRecord>,
    /// How the objects are encrypted (none: not encrypted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crate::encryption::Encryption>,
}

/// One applied migration of a Postgres store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRecord {
    /// Its version.
    pub version: i64,
    /// Its description.
    pub description: String,
    /// When it was applied.
    pub installed_on: DateTime<Utc>,
    /// Whether it succeeded.
    pub success: bool,
    /// Its checksum (hex).
    pub checksum: String,
    /// How long it ran (ns).
    pub execution_time: i64,
}

/// How a source was dumped, which decides how it is restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// A SQLite database file (a consistent copy of it).
    Sqlite,
    /// `pg_dump --format=custom` output, restored with `pg_restore`.
    PostgresCustom,
    /// A Redis store's keys (`DUMP` payloads with their TTLs), restored with `RESTORE`.
    Redis,
}

/// One stored object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectEntry {
    /// Its name inside the backup's folder.
    pub name: String,
    /// How it is encoded, outermost last (e.g. `["zstd"]`).
    pub encoding: Vec<String>,
    /// Stored bytes.
    pub stored_bytes: u64,
    /// SHA-256 of the stored bytes (hex).
    pub stored_sha256: String,
    /// Bytes of the content before encoding.
    pub raw_bytes: u64,
    /// SHA-256 of the content before encoding (hex).
    pub raw_sha256: String,
}

/// A table's figures at backup time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableFigures {
    /// `schema.table` (Postgres) or the table's name (SQLite).
    pub table: String,
    /// Its rows.
    pub rows: u64,
    /// An order-independent checksum of its rows' content (hex), where the source computes
    /// one (Postgres: the sum of each row's 64-bit text hash).
    pub checksum: Option<String>,
}

impl Manifest {
    /// Stored bytes of all objects.
    pub fn stored_bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.stored_bytes).sum()
    }

    /// Raw bytes of all objects.
    pub fn raw_bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.raw_bytes).sum()
    }
}

/// A new backup id for a backup starting at `at`.
pub fn new_id(at: DateTime<Utc>) -> String {
    let random = uuid::Uuid::now_v7().simple().to_string();
    format!(
        "{}-{}",
        at.format("%Y%m%dT%H%M%S%.3fZ"),
        &random[random.len() - 8..]
    )
}

/// Whether `id` has the shape of a backup id (what `show`, `verify` and `restore` accept).
pub fn is_id(id: &str) -> bool {
    let Some((time, random)) = id.split_once('-') else {
        return false;
    };
    chrono::NaiveDateTime::parse_from_str(time, "%Y%m%dT%H%M%S%.3fZ").is_ok()
        && time.len() == "20261202T040000.000Z".len()
        && random.len() == 8
        && random.chars().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_time_and_are_recognised() {
        let a = new_id("2026-12-02T04:00:00.998Z".parse().unwrap());
        let b = new_id("2026-12-02T04:00:00.999Z".parse().unwrap());
        assert!(a < b, "{a} {b}");
        assert!(a.starts_with("20261202T040000.998Z-"), "{a}");
        assert!(is_id(&a), "{a}");
        assert!(!is_id("20261202T040000.000Z"));
        assert!(!is_id("20261202T040000Z-0123abcd"));
        assert!(!is_id("20261302T040000.000Z-0123abcd"));
        assert!(!is_id("20261202T040000.000Z-0123abcg"));
        assert!(!is_id("../etc-01234567"));
    }
}
