//! What is backed up: Conveyor's own store and the application's databases. Each source
//! gives one consistent dump as a byte stream, and the figures (rows per table, checksums)
//! of the same snapshot, for `verify --restore` to compare a restored copy with.

pub(crate) mod postgres;
pub(crate) mod redis;
pub(crate) mod sqlite;

use std::path::{Path, PathBuf};

use tokio::io::AsyncRead;

use crate::config::{STORE_SOURCE, SourceConfig};
use crate::error::{Error, Result};
use crate::manifest::{MigrationRecord, SourceKind, TableFigures};

/// The schema Conveyor's tables live in on Postgres.
pub const STORE_SCHEMA: &str = "conveyor";

/// A configured source.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// A SQLite database file.
    Sqlite {
        /// Its name.
        name: String,
        /// The file.
        path: PathBuf,
    },
    /// A Postgres database (some schemas of it, or all).
    Postgres {
        /// Its name.
        name: String,
        /// Its URL.
        url: String,
        /// Only these schemas; empty: all.
        schemas: Vec<String>,
    },
    /// A Redis store: the keys under its prefix.
    Redis {
        /// Its name.
        name: String,
        /// Its URL (with `?prefix=`).
        url: String,
    },
}

impl Source {
    /// Conveyor's own store at `url`.
    pub fn store(url: &str) -> Result<Self> {
        if let Some(rest) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            let path = rest.split('?').next().unwrap_or_default();
            if path.is_empty() || path.contains(":memory:") || url.contains("mode=memory") {
                return Err(Error::Config(
                    "the store is an in-memory SQLite database: there is nothing on disk to back up".into(),
                ));
            }
            return Ok(Source::Sqlite {
                name: STORE_SOURCE.into(),
                path: PathBuf::from(path),
            });
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Source::Postgres {
                name: STORE_SOURCE.into(),
                url: url.to_string(),
                schemas: vec![STORE_SCHEMA.into()],
            });
        }
        if url.starts_with("redis://") || url.starts_with("rediss://") {
            redis::split(url)?;
            return Ok(Source::Redis {
                name: STORE_SOURCE.into(),
                url: url.to_string(),
            });
        }
        Err(Error::Config(format!(
            "backing up a store at `{}` is not supported yet: SQLite, Postgres and Redis stores are",
            url.split("://").next().unwrap_or(url)
        )))
    }

    /// An application database as configured under `backup.sources.<name>`.
    pub fn configured(name: &str, config: &SourceConfig) -> Self {
        match config {
            SourceConfig::Postgres { url, schemas } => Source::Postgres {
                name: name.into(),
                url: url.clone(),
                schemas: schemas.clone(),
            },
            SourceConfig::Sqlite { path } => Source::Sqlite {
                name: name.into(),
                path: path.clone(),
            },
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        match self {
            Source::Sqlite { name, .. }
            | Source::Postgres { name, .. }
            | Source::Redis { name, .. } => name,
        }
    }

    /// The Postgres schemas it dumps (empty: all, or not Postgres).
    pub fn schemas(&self) -> &[String] {
        match self {
            Source::Sqlite { .. } | Source::Redis { .. } => &[],
            Source::Postgres { schemas, .. } => schemas,
        }
    }

    /// What its dump is.
    pub fn kind(&self) -> SourceKind {
        match self {
            Source::Sqlite { .. } => SourceKind::Sqlite,
            Source::Postgres { .. } => SourceKind::PostgresCustom,
            Source::Redis { .. } => SourceKind::Redis,
        }
    }

    /// Starts one consistent dump: a SQLite copy is made in `scratch`, a Postgres dump is
    /// written by `pg_dump`.
    pub(crate) async fn dump(&self, scratch: &Path, pg_dump: &Path) -> Result<Dump> {
        match self {
            Source::Sqlite { name, path } => sqlite::dump(name, path, scratch).await,
            Source::Postgres { name, url, schemas } => {
                postgres::dump(name, url, schemas, pg_dump).await
            }
            Source::Redis { name, url } => redis::dump(name, url).await,
        }
    }
}

/// A dump in progress: read `reader` to its end, then [`Dump::finish`].
pub(crate) struct Dump {
    pub reader: Box<dyn AsyncRead + Send + Unpin>,
    pub tables: Vec<TableFigures>,
    /// A Postgres store's applied migrations, read in the dump's snapshot.
    pub migrations: Vec<MigrationRecord>,
    pub(crate) finish: Finish,
}

pub(crate) enum Finish {
    /// Delete the scratch copy.
    RemoveFile(PathBuf),
    /// Wait for `pg_dump` and end the snapshot's transaction.
    PgDump(Box<postgres::Running>),
    /// Wait for the key reader: the figures of what it wrote.
    Redis(redis::Running),
}

impl Dump {
    /// Ends the dump: whether the source was read completely, and the figures of a source
    /// that counts while it is read (Redis).
    pub async fn finish(self) -> Result<Option<Vec<TableFigures>>> {
        drop(self.reader);
        match self.finish {
            Finish::RemoveFile(path) => {
                let _ = tokio::fs::remove_file(&path).await;
                Ok(None)
            }
            Finish::PgDump(running) => running.finish().await.map(|()| None),
            Finish::Redis(task) => match task.await {
                Ok(figures) => figures.map(Some),
                Err(e) => Err(Error::Source {
                    source_name: STORE_SOURCE.into(),
                    message: format!("the key reader stopped: {e}"),
                }),
            },
        }
    }

    /// Abandons the dump (the upload failed): stops whatever reads the source.
    pub async fn abandon(self) {
        drop(self.reader);
        match self.finish {
            Finish::RemoveFile(path) => {
                let _ = tokio::fs::remove_file(&path).await;
            }
            Finish::PgDump(running) => running.abandon().await,
            Finish::Redis(task) => task.abort(),
        }
    }
}
