//! `[backup]`: where backups go, what besides the store is backed up, and how they are
//! written. Every name is checked when the config is loaded, so a typo is an error at start,
//! not at 3 a.m. when the schedule fires.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The name of the source that is Conveyor's own store (always defined).
pub const STORE_SOURCE: &str = "store";

/// `[backup]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    /// The destination used when none is named.
    pub destination: String,
    /// Named destinations (`[backup.destinations.<name>]`). Without any, `local` is the
    /// directory `./backups`.
    pub destinations: BTreeMap<String, DestinationConfig>,
    /// The application's databases (`[backup.sources.<name>]`); `store` is always Conveyor's
    /// own store.
    pub sources: BTreeMap<String, SourceConfig>,
    /// zstd level, 1 (fastest) to 19.
    pub compression_level: i32,
    /// Size of each uploaded part in MiB (5 to 512): with `upload_concurrency`, what a backup
    /// holds in memory whatever the source's size.
    pub part_size_mib: usize,
    /// Parts uploaded at once.
    pub upload_concurrency: usize,
    /// Where a SQLite source's consistent copy is made before it is streamed (default: the
    /// system's temporary directory).
    pub scratch_dir: Option<PathBuf>,
    /// The `pg_dump` binary for Postgres sources (default: `pg_dump` on the `PATH`); it must
    /// be as new as the server.
    pub pg_dump: PathBuf,
    /// The `pg_restore` binary for restoring Postgres backups (default: `pg_restore` on the
    /// `PATH`).
    pub pg_restore: PathBuf,
    /// `[backup.retention]`: what `prune` keeps.
    pub retention: crate::retention::Retention,
    /// age X25519 recipients (`age1…`) every backup is encrypted to (empty, with no
    /// `recipients_file`: backups are not encrypted).
    pub recipients: Vec<String>,
    /// A file of more recipients, one a line (`#` comments).
    pub recipients_file: Option<PathBuf>,
    /// The age identity file (`AGE-SECRET-KEY-1…`) that decrypts backups for `verify` and
    /// `restore` (`--identity FILE` overrides it).
    pub identity_file: Option<PathBuf>,
}

impl Default for BackupConfig {
    fn default() -> Self {
        Self {
            destination: "local".into(),
            destinations: BTreeMap::new(),
            sources: BTreeMap::new(),
            compression_level: 3,
            part_size_mib: 8,
            upload_concurrency: 4,
            scratch_dir: None,
            pg_dump: PathBuf::from("pg_dump"),
            pg_restore: PathBuf::from("pg_restore"),
            retention: crate::retention::Retention::default(),
            recipients: Vec::new(),
            recipients_file: None,
            identity_file: None,
        }
    }
}

/// Where backups are written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum DestinationConfig {
    /// A local (or mounted) directory.
    Dir {
        /// The directory; created if missing.
        path: PathBuf,
    },
    /// S3 or an S3-compatible service.
    S3 {
        /// The bucket.
        bucket: String,
        /// A key prefix inside the bucket (e.g. `conveyor/prod`).
        #[serde(default)]
        prefix: String,
        /// The region (default `us-east-1`).
        #[serde(default)]
        region: Option<String>,
        /// The service's URL, for S3-compatible services (MinIO, Ceph, R2 ...).
        #[serde(default)]
        endpoint: Option<String>,
        /// The access key id (else from the environment, `AWS_ACCESS_KEY_ID`).
        #[serde(default)]
        access_key_id: Option<String>,
        /// The secret access key (else from the environment, `AWS_SECRET_ACCESS_KEY`).
        #[serde(default)]
        secret_access_key: Option<Secret>,
        /// Allow `http://` endpoints (a local test server); off by default.
        #[serde(default)]
        allow_http: bool,
    },
}

/// An application database to back up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    /// A Postgres database, dumped with `pg_dump` (custom format) from one snapshot.
    Postgres {
        /// `postgres://…` of the database.
        url: String,
        /// Only these schemas (default: the whole database).
        #[serde(default)]
        schemas: Vec<String>,
    },
    /// A SQLite database file, copied consistently while in use.
    Sqlite {
        /// The database file.
        path: PathBuf,
    },
}

/// A credential: kept out of `Debug` output and logs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A name of a source, destination or backup part: what it may contain.
pub(crate) fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{what} `{name}`: a name is 1-64 letters, digits, `-` or `_`, starting with a letter or digit"
        )))
    }
}

impl BackupConfig {
    /// The destinations, `local` (`./backups`) added when none is configured.
    pub fn destinations(&self) -> BTreeMap<String, DestinationConfig> {
        let mut all = self.destinations.clone();
        if all.is_empty() {
            all.insert(
                "local".into(),
                DestinationConfig::Dir {
                    path: PathBuf::from("backups"),
                },
            );
        }
        all
    }

    /// The recipients backups are encrypted to (empty: not encrypted).
    pub fn recipients(&self) -> Result<Vec<age::x25519::Recipient>> {
        crate::encryption::recipients(&self.recipients, self.recipients_file.as_deref())
    }

    /// Checks every name and value; the error names the key.
    pub fn validate(&self) -> Result<()> {
        let destinations = self.destinations();
        for (name, d) in &destinations {
            check_name("backup.destinations", name)?;
            if let DestinationConfig::S3 { bucket, .. } = d
                && bucket.trim().is_empty()
            {
                return Err(Error::Config(format!(
                    "backup.destinations.{name}.bucket is empty: name the bucket"
                )));
            }
        }
        if !destinations.contains_key(&self.destination) {
            return Err(Error::Config(format!(
                "backup.destination = `{}` names no destination; configured: {}",
                self.destination,
                destinations.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        for (name, s) in &self.sources {
            check_name("backup.sources", name)?;
            if name == STORE_SOURCE {
                return Err(Error::Config(format!(
                    "backup.sources.{STORE_SOURCE}: the name `{STORE_SOURCE}` is Conveyor's own store; give the application's database another name"
                )));
            }
            if let SourceConfig::Postgres { url, .. } = s
                && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
            {
                return Err(Error::Config(format!(
                    "backup.sources.{name}.url must be a postgres:// URL"
                )));
            }
        }
        if !(1..=19).contains(&self.compression_level) {
            return Err(Error::Config(format!(
                "backup.compression_level = {} must be between 1 and 19",
                self.compression_level
            )));
        }
        if !(5..=512).contains(&self.part_size_mib) {
            return Err(Error::Config(format!(
                "backup.part_size_mib = {} must be between 5 and 512 (S3 parts are at least 5 MiB)",
                self.part_size_mib
            )));
        }
        self.recipients()?;
        if !(1..=64).contains(&self.upload_concurrency) {
            return Err(Error::Config(format!(
                "backup.upload_concurrency = {} must be between 1 and 64",
                self.upload_concurrency
            )));
        }
        Ok(())
    }
}
