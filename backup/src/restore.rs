//! Restoring a backup: into a SQLite file (decoded into a staging file beside it, checked,
//! then renamed into place) or a Postgres database (`pg_restore` in one transaction), and
//! `verify --restore`, which restores into a scratch file or a temporary database and
//! compares it with the figures the manifest recorded at backup time.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::Instant;

use async_compression::tokio::bufread::ZstdDecoder;
use serde::Serialize;
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_util::io::StreamReader;

use crate::backups::{Backups, DATA_OBJECT};
use crate::config::{STORE_SOURCE, SourceConfig};
use crate::destination::Destination;
use crate::error::{Error, Result};
use crate::hashing::Hashing;
use crate::manifest::{Manifest, ObjectEntry, SourceKind, TableFigures};
use crate::source::{postgres, sqlite};

/// Where a backup is restored to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A SQLite database file (`sqlite://PATH` or a plain path).
    Sqlite(PathBuf),
    /// A Postgres database (`postgres://…`).
    Postgres(String),
    /// A prefix on a Redis server (`redis://host:port/db?prefix=…`).
    Redis(String),
}

impl FromStr for Target {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(Target::Postgres(s.to_string()));
        }
        if s.starts_with("redis://") || s.starts_with("rediss://") {
            crate::source::redis::split(s)?;
            return Ok(Target::Redis(s.to_string()));
        }
        if let Some(rest) = s
            .strip_prefix("sqlite://")
            .or_else(|| s.strip_prefix("sqlite:"))
        {
            let path = rest.split('?').next().unwrap_or_default();
            if path.is_empty() || path.contains(":memory:") {
                return Err(Error::Refused(format!(
                    "`{s}` is not a file: name the SQLite file to restore into"
                )));
            }
            return Ok(Target::Sqlite(PathBuf::from(path)));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(Error::Refused(format!(
                "cannot restore into a `{scheme}://` target: give a postgres:// URL or a SQLite file path"
            )));
        }
        if s.trim().is_empty() {
            return Err(Error::Refused(
                "no target: give --to a postgres:// URL or a SQLite file path".into(),
            ));
        }
        Ok(Target::Sqlite(PathBuf::from(s)))
    }
}

impl Target {
    /// For messages: the file, or the URL without its password.
    pub fn display(&self) -> String {
        match self {
            Target::Sqlite(path) => path.display().to_string(),
            Target::Postgres(url) | Target::Redis(url) => redact(url),
        }
    }

    /// The URL a store on this target is opened with.
    pub fn store_url(&self) -> String {
        match self {
            Target::Sqlite(path) => format!("sqlite://{}", path.display()),
            Target::Postgres(url) | Target::Redis(url) => url.clone(),
        }
    }

    fn kind(&self) -> SourceKind {
        match self {
            Target::Sqlite(_) => SourceKind::Sqlite,
            Target::Postgres(_) => SourceKind::PostgresCustom,
            Target::Redis(_) => SourceKind::Redis,
        }
    }
}

fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// What a restore did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Restored {
    /// The backup.
    pub id: String,
    /// Its source.
    pub source: String,
    /// Where it was restored (a file, or a database URL without its password).
    pub target: String,
    /// Decoded bytes written.
    pub raw_bytes: u64,
    /// The tables checked against the manifest (rows, and content checksums where
    /// recorded): all matched.
    pub tables: Vec<TableFigures>,
    /// For a store: what the lease rescue did with the jobs that were running at backup time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jobs: Option<RescuedJobs>,
    /// How long it took (ms).
    pub duration_ms: u64,
}

/// A restored store's jobs that were `running` at backup time: their leases are ended by the
/// store's ordinary rescue, which makes them retryable with no backoff (then promoted:
/// available at once), `dead` on their last attempt, or `cancelled` when a cancel had been
/// requested.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RescuedJobs {
    /// Available again.
    pub retried: u64,
    /// Their last attempt: dead.
    pub dead: u64,
    /// A cancel had been requested: cancelled.
    pub cancelled: u64,
    /// Still `running` because their lease (taken shortly before the backup) has not expired
    /// yet: the rescuer of a Conveyor started on the store makes them retryable once it has.
    pub still_leased: u64,
}

impl Backups {
    /// Restores backup `id` into `target` (a SQLite file or a Postgres database). Refuses a
    /// backup that does not verify (naming the object), a target of the wrong kind, and a
    /// target that holds data unless `force`. The restored copy is checked against the
    /// manifest's figures. For the store, jobs that were running at backup time are handed to
    /// the store's lease rescue (see [`RescuedJobs`]).
    pub async fn restore(
        &self,
        id: &str,
        target: &str,
        force: bool,
        destination: Option<&str>,
    ) -> Result<Restored> {
        let started = Instant::now();
        let target: Target = target.parse()?;
        let dest = self.destination(destination)?;
        let manifest = dest.find(id).await?;
        check_kind(&manifest, &target)?;
        let keys = self.identities_for(&manifest)?;
        self.check_objects(&dest, &manifest, keys.as_ref()).await?;
        self.record_verification(&dest, &manifest, false).await;
        let (raw_bytes, tables) = match &target {
            Target::Sqlite(path) => {
                restore_sqlite(&dest, &manifest, keys.as_ref(), path, force).await?
            }
            Target::Postgres(url) => {
                restore_postgres(
                    &dest,
                    &manifest,
                    keys.as_ref(),
                    url,
                    force,
                    &self.config().pg_restore,
                )
                .await?
            }
            Target::Redis(url) => {
                restore_redis(&dest, &manifest, keys.as_ref(), url, force).await?
            }
        };
        let jobs = if manifest.source == STORE_SOURCE {
            Some(rescue(&target).await?)
        } else {
            None
        };
        tracing::info!(backup = %manifest.id, target = %target.display(), "backup restored");
        Ok(Restored {
            id: manifest.id.clone(),
            source: manifest.source.clone(),
            target: target.display(),
            raw_bytes,
            tables,
            jobs,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// `verify`, then restores backup `id` into a scratch copy (SQLite: a file in
    /// `backup.scratch_dir`; Postgres: a temporary database on the source's server, dropped
    /// afterwards) and compares rows (and content checksums) per table with the manifest.
    /// The error names every table that differs.
    pub async fn verify_restore(&self, id: &str, destination: Option<&str>) -> Result<Restored> {
        let started = Instant::now();
        let dest = self.destination(destination)?;
        let manifest = dest.find(id).await?;
        let keys = self.identities_for(&manifest)?;
        self.check_objects(&dest, &manifest, keys.as_ref()).await?;
        let keys = keys.as_ref();
        let (target, raw_bytes, tables) = match manifest.source_kind {
            SourceKind::Sqlite => {
                let dir = self.scratch();
                std::fs::create_dir_all(&dir).map_err(Error::io(format!(
                    "creating the scratch directory {}",
                    dir.display()
                )))?;
                let path = dir.join(format!(
                    "conveyor-verify-{}-{}.db",
                    manifest.id,
                    uuid::Uuid::now_v7().simple()
                ));
                let restored = restore_sqlite(&dest, &manifest, keys, &path, false).await;
                let _ = std::fs::remove_file(&path);
                let (raw, tables) = restored?;
                (path.display().to_string(), raw, tables)
            }
            SourceKind::PostgresCustom => {
                let server = self.postgres_server(&manifest)?;
                let scratch = ScratchDatabase::create(&server).await?;
                let restored = restore_postgres(
                    &dest,
                    &manifest,
                    keys,
                    &scratch.url,
                    false,
                    &self.config().pg_restore,
                )
                .await;
                let target = redact(&scratch.url);
                scratch.drop_it().await;
                let (raw, tables) = restored?;
                (target, raw, tables)
            }
            SourceKind::Redis => {
                if !self.store_url().starts_with("redis") {
                    return Err(Error::Refused(format!(
                        "backup {} is of a Redis store, but the store configured now is not on Redis: the scratch copy is made under another prefix on the store's server",
                        manifest.id
                    )));
                }
                let (conn_url, prefix) = crate::source::redis::split(self.store_url())?;
                let scratch = format!(
                    "{prefix}-verify-{}",
                    &uuid::Uuid::now_v7().simple().to_string()[24..]
                );
                let url = format!("{conn_url}?prefix={scratch}");
                let restored = restore_redis(&dest, &manifest, keys, &url, false).await;
                if let Ok(mut con) = crate::source::redis::connect("scratch", &conn_url).await
                    && let Err(e) = crate::source::redis::delete_all(&mut con, &scratch).await
                {
                    tracing::warn!(prefix = %scratch, error = %e, "the scratch keys of verify --restore were not all deleted");
                }
                let (raw, tables) = restored?;
                (redact(&url), raw, tables)
            }
        };
        self.record_verification(&dest, &manifest, true).await;
        Ok(Restored {
            id: manifest.id.clone(),
            source: manifest.source.clone(),
            target,
            raw_bytes,
            tables,
            jobs: None,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// The Postgres server a scratch database for `manifest`'s source is made on: the
    /// source's own.
    fn postgres_server(&self, manifest: &Manifest) -> Result<String> {
        if manifest.source == STORE_SOURCE {
            if self.store_url().starts_with("postgres") {
                return Ok(self.store_url().to_string());
            }
            return Err(Error::Refused(format!(
                "backup {} is of a Postgres store, but the store configured now is not on Postgres: a scratch database is made on the source's server",
                manifest.id
            )));
        }
        match self.config().sources.get(&manifest.source) {
            Some(SourceConfig::Postgres { url, .. }) => Ok(url.clone()),
            _ => Err(Error::Refused(format!(
                "backup {} is of `{}`, which is no longer a Postgres source in [backup.sources]: a scratch database is made on the source's server",
                manifest.id, manifest.source
            ))),
        }
    }
}

fn check_kind(manifest: &Manifest, target: &Target) -> Result<()> {
    if manifest.source_kind == target.kind() {
        return Ok(());
    }
    let wanted = match manifest.source_kind {
        SourceKind::Sqlite => "a SQLite file path",
        SourceKind::PostgresCustom => "a postgres:// URL",
        SourceKind::Redis => "a redis:// URL naming a prefix (`?prefix=`)",
    };
    Err(Error::Refused(format!(
        "backup {} is of `{}` ({:?}); restore it into {wanted}, not {}",
        manifest.id,
        manifest.source,
        manifest.source_kind,
        target.display()
    )))
}

fn data_object(manifest: &Manifest) -> Result<&ObjectEntry> {
    manifest
        .objects
        .iter()
        .find(|o| o.name == DATA_OBJECT)
        .ok_or_else(|| Error::Damaged {
            backup: manifest.id.clone(),
            message: format!("its manifest lists no {DATA_OBJECT}"),
        })
}

/// The decoded content of the data object, hashed as it is read.
async fn decoded(
    dest: &Destination,
    manifest: &Manifest,
    keys: Option<&crate::encryption::Identities>,
) -> Result<Hashing<Box<dyn AsyncRead + Send + Unpin>>> {
    let stream = dest
        .read(&manifest.source, &manifest.id, DATA_OBJECT)
        .await?;
    let stored: Box<dyn AsyncRead + Send + Unpin> = Box::new(StreamReader::new(stream));
    let stored = match (&manifest.encryption, keys) {
        (None, _) => stored,
        (Some(_), Some(keys)) => keys.decrypt(&manifest.id, stored).await?,
        (Some(_), None) => {
            return Err(Error::Config(format!(
                "backup {} is encrypted (age) and no identity is configured: set backup.identity_file or pass --identity FILE",
                manifest.id
            )));
        }
    };
    let decoder: Box<dyn AsyncRead + Send + Unpin> =
        Box::new(ZstdDecoder::new(BufReader::with_capacity(1 << 20, stored)));
    Ok(Hashing::new(decoder))
}

fn check_decoded(manifest: &Manifest, object: &ObjectEntry, bytes: u64, sha: &str) -> Result<()> {
    if bytes != object.raw_bytes || sha != object.raw_sha256 {
        return Err(Error::Damaged {
            backup: manifest.id.clone(),
            message: format!(
                "object {}: decoded content differs from the manifest while restoring ({bytes} bytes, sha256 {sha}; expected {} bytes, sha256 {})",
                object.name, object.raw_bytes, object.raw_sha256
            ),
        });
    }
    Ok(())
}

/// Compares a restored copy's figures with the manifest's, naming every table that differs.
pub(crate) fn compare(manifest: &Manifest, found: &[TableFigures]) -> Result<()> {
    let mut problems = Vec::new();
    for want in &manifest.tables {
        match found.iter().find(|f| f.table == want.table) {
            None => problems.push(format!("table {} is missing", want.table)),
            Some(got) => {
                if got.rows != want.rows {
                    problems.push(format!(
                        "table {} has {} rows, the backup recorded {}",
                        want.table, got.rows, want.rows
                    ));
                } else if want.checksum.is_some() && got.checksum != want.checksum {
                    problems.push(format!(
                        "table {} content checksum is {}, the backup recorded {}",
                        want.table,
                        got.checksum.as_deref().unwrap_or("none"),
                        want.checksum.as_deref().unwrap_or("none")
                    ));
                }
            }
        }
    }
    for got in found {
        if !manifest.tables.iter().any(|w| w.table == got.table) {
            problems.push(format!(
                "table {} is not in the backup's figures",
                got.table
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Mismatch {
            backup: manifest.id.clone(),
            message: problems.join("; "),
        })
    }
}

/// `RESTORE`s the backup's keys under the target URL's prefix, after refusing a prefix that
/// holds keys (unless `force`, which deletes them first), then compares the keys' figures with
/// the manifest. A restore that fails part-way leaves the keys restored so far: run it again
/// with `force`.
async fn restore_redis(
    dest: &Destination,
    manifest: &Manifest,
    keys: Option<&crate::encryption::Identities>,
    url: &str,
    force: bool,
) -> Result<(u64, Vec<TableFigures>)> {
    use crate::source::redis;
    let (conn_url, prefix) = redis::split(url)?;
    let target = redact(url);
    let target_err = |message: String| Error::Target {
        target: target.clone(),
        message,
    };
    let object = data_object(manifest)?;
    let mut con = redis::connect(&target, &conn_url)
        .await
        .map_err(|e| target_err(e.to_string()))?;
    let holds = redis::has_keys(&mut con, &prefix)
        .await
        .map_err(|e| target_err(e.to_string()))?;
    if holds {
        if !force {
            return Err(Error::Refused(format!(
                "{target} is not empty: keys under the prefix `{prefix}` exist; stop every Conveyor using it and pass --force to replace them, or restore under another prefix"
            )));
        }
        redis::delete_all(&mut con, &prefix)
            .await
            .map_err(|e| target_err(format!("deleting the keys under `{prefix}`: {e}")))?;
    }
    let mut reader = decoded(dest, manifest, keys).await?;
    redis::load(&mut reader, &mut con, &prefix)
        .await
        .map_err(target_err)?;
    // Read to the end so the checksum covers every byte.
    let mut rest = Vec::new();
    reader
        .read_to_end(&mut rest)
        .await
        .map_err(|e| target_err(format!("reading the backup: {e}")))?;
    if !rest.is_empty() {
        return Err(Error::Damaged {
            backup: manifest.id.clone(),
            message: format!("object {}: data after the end of the keys", object.name),
        });
    }
    let (bytes, sha) = reader.finish();
    check_decoded(manifest, object, bytes, &sha)?;
    let found = redis::figures(&mut con, &prefix)
        .await
        .map_err(|e| target_err(format!("counting the restored keys: {e}")))?;
    compare(manifest, &found)?;
    Ok((bytes, found))
}

/// Decodes the backup into a staging file beside `path`, checks its checksum and figures,
/// then renames it into place: a failed restore leaves `path` as it was.
async fn restore_sqlite(
    dest: &Destination,
    manifest: &Manifest,
    keys: Option<&crate::encryption::Identities>,
    path: &Path,
    force: bool,
) -> Result<(u64, Vec<TableFigures>)> {
    let object = data_object(manifest)?;
    if path.is_dir() {
        return Err(Error::Refused(format!(
            "{} is a directory: name the SQLite file to restore into",
            path.display()
        )));
    }
    let occupied = std::fs::metadata(path)
        .map(|m| m.len() > 0)
        .unwrap_or(false);
    if occupied && !force {
        return Err(Error::Refused(format!(
            "{} exists and is not empty: restore into a new file, or pass --force to replace it (stop every Conveyor using it first)",
            path.display()
        )));
    }
    let target = || path.display().to_string();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "restore.db".into());
    let staging = dir.join(format!(
        ".{file_name}.restore-{}",
        uuid::Uuid::now_v7().simple()
    ));
    let result = async {
        let mut reader = decoded(dest, manifest, keys).await?;
        let mut file = tokio::fs::File::create(&staging)
            .await
            .map_err(Error::io(format!("creating {}", staging.display())))?;
        tokio::io::copy(&mut reader, &mut file)
            .await
            .map_err(|e| Error::Target {
                target: target(),
                message: format!("writing {}: {e}", staging.display()),
            })?;
        file.sync_all()
            .await
            .map_err(Error::io(format!("syncing {}", staging.display())))?;
        drop(file);
        let (bytes, sha) = reader.finish();
        check_decoded(manifest, object, bytes, &sha)?;
        let tables = sqlite::figures(&staging).await.map_err(|e| Error::Target {
            target: target(),
            message: format!("reading the restored copy: {e}"),
        })?;
        compare(manifest, &tables)?;
        Ok((bytes, tables))
    }
    .await;
    let (bytes, tables) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&staging);
            return Err(e);
        }
    };
    // The replaced database's write-ahead log must not be applied to the restored file.
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(side));
    }
    std::fs::rename(&staging, path).map_err(|e| {
        let _ = std::fs::remove_file(&staging);
        Error::Target {
            target: target(),
            message: format!("moving {} into place: {e}", staging.display()),
        }
    })?;
    Ok((bytes, tables))
}

/// Tables in `schemas` (every non-system schema when empty) of the connected database,
/// plus `_sqlx_migrations` when restoring a store.
async fn occupied(
    conn: &mut PgConnection,
    schemas: &[String],
    store: bool,
) -> Result<Vec<String>, sqlx::Error> {
    let mut names: Vec<String> = sqlx::query_scalar(
        "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
           AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
           AND (cardinality($1::text[]) = 0 OR n.nspname = ANY($1))
         ORDER BY 1",
    )
    .bind(schemas)
    .fetch_all(&mut *conn)
    .await?;
    if store {
        let migrations: Option<String> =
            sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
                .fetch_one(&mut *conn)
                .await?;
        names.extend(migrations);
    }
    Ok(names)
}

/// `pg_restore` of the backup into the database at `url` in one transaction (a failure
/// leaves it as it was), then the store's migration record, then the figures checked.
async fn restore_postgres(
    dest: &Destination,
    manifest: &Manifest,
    keys: Option<&crate::encryption::Identities>,
    url: &str,
    force: bool,
    pg_restore: &Path,
) -> Result<(u64, Vec<TableFigures>)> {
    let object = data_object(manifest)?;
    let store = manifest.source == STORE_SOURCE;
    if store && manifest.migrations.is_empty() {
        return Err(Error::Refused(format!(
            "backup {} of the Postgres store records no applied migrations (it was made by an earlier development build): a store restored from it could not be opened; restore it with pg_restore by hand and mark its migrations applied, or restore a newer backup",
            manifest.id
        )));
    }
    let shown = redact(url);
    let target_err = |message: String| Error::Target {
        target: shown.clone(),
        message,
    };
    let mut conn = PgConnection::connect(url)
        .await
        .map_err(|e| target_err(format!("connecting: {e}")))?;
    let result = async {
        let held = occupied(&mut conn, &manifest.schemas, store)
            .await
            .map_err(|e| target_err(format!("looking for existing tables: {e}")))?;
        if !held.is_empty() {
            if !force {
                let mut shown_tables = held.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
                if held.len() > 5 {
                    shown_tables.push_str(&format!(" and {} more", held.len() - 5));
                }
                return Err(Error::Refused(format!(
                    "the target database {shown} is not empty ({shown_tables}): restore into a fresh database, or pass --force to drop {} first (stop every Conveyor using it)",
                    if manifest.schemas.is_empty() {
                        "every schema".to_string()
                    } else {
                        format!("schema(s) {}", manifest.schemas.join(", "))
                    }
                )));
            }
            clear(&mut conn, &manifest.schemas, store)
                .await
                .map_err(|e| target_err(format!("dropping what it held (--force): {e}")))?;
        }
        let mut cmd = tokio::process::Command::new(pg_restore);
        cmd.arg("--exit-on-error")
            .arg("--single-transaction")
            .arg("--no-owner")
            .arg("--no-privileges")
            .arg("--no-password")
            .arg(format!("--dbname={}", postgres::libpq_url(url)))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            target_err(format!(
                "`{}` does not run ({e}): install the PostgreSQL client tools (Debian: apt-get install postgresql-client-15) or set backup.pg_restore",
                pg_restore.display()
            ))
        })?;
        let (Some(mut stdin), Some(mut stderr)) = (child.stdin.take(), child.stderr.take()) else {
            return Err(target_err("pg_restore started without its input pipes".into()));
        };
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text).await;
            text
        });
        let mut reader = decoded(dest, manifest, keys).await?;
        let fed = feed(&mut reader, &mut stdin).await;
        drop(stdin);
        let status = child
            .wait()
            .await
            .map_err(|e| target_err(format!("waiting for pg_restore: {e}")))?;
        let stderr = stderr.await.unwrap_or_default();
        if !status.success() {
            return Err(target_err(format!(
                "pg_restore failed ({status}); nothing was restored: {}",
                stderr.trim()
            )));
        }
        fed.map_err(|e| target_err(format!("feeding pg_restore: {e}")))?;
        let (bytes, sha) = reader.finish();
        check_decoded(manifest, object, bytes, &sha)?;
        if store {
            postgres::write_migrations(&mut conn, &manifest.migrations)
                .await
                .map_err(|e| target_err(format!("recording the store's migrations: {e}")))?;
        }
        let tables = postgres::figures(&mut conn, &manifest.schemas)
            .await
            .map_err(|e| target_err(format!("reading the restored tables: {e}")))?;
        compare(manifest, &tables)?;
        Ok((bytes, tables))
    }
    .await;
    let _ = conn.close().await;
    result
}

async fn feed(
    reader: &mut (impl AsyncRead + Unpin),
    stdin: &mut tokio::process::ChildStdin,
) -> std::io::Result<()> {
    tokio::io::copy(reader, stdin).await?;
    stdin.flush().await
}

/// `--force`: drops the schemas the backup holds (every non-system schema for a whole
/// database; `public` is made again, empty) and a store's migration record.
async fn clear(
    conn: &mut PgConnection,
    schemas: &[String],
    store: bool,
) -> Result<(), sqlx::Error> {
    let schemas: Vec<String> = if schemas.is_empty() {
        sqlx::query_scalar(
            "SELECT nspname FROM pg_namespace WHERE nspname NOT IN ('pg_catalog', 'information_schema')
             AND nspname NOT LIKE 'pg\\_%' ORDER BY 1",
        )
        .fetch_all(&mut *conn)
        .await?
    } else {
        schemas.to_vec()
    };
    let mut tx = conn.begin().await?;
    for s in &schemas {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            postgres::quote(s)
        )))
        .execute(&mut *tx)
        .await?;
        if s == "public" {
            sqlx::query("CREATE SCHEMA public")
                .execute(&mut *tx)
                .await?;
        }
    }
    if store {
        sqlx::query("DROP TABLE IF EXISTS _sqlx_migrations")
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

/// A temporary database for `verify --restore`, made on the server of `server_url`.
struct ScratchDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl ScratchDatabase {
    async fn create(server_url: &str) -> Result<Self> {
        let name = format!("conveyor_verify_{}", uuid::Uuid::now_v7().simple());
        let mut conn = PgConnection::connect(server_url)
            .await
            .map_err(|e| Error::Target {
                target: redact(server_url),
                message: format!("connecting to make a scratch database: {e}"),
            })?;
        let made = sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await;
        let _ = conn.close().await;
        made.map_err(|e| Error::Target {
            target: redact(server_url),
            message: format!(
                "creating the scratch database {name}: {e} (verify --restore needs a role that may CREATE DATABASE)"
            ),
        })?;
        Ok(Self {
            admin_url: server_url.to_string(),
            url: replace_db(server_url, &name),
            name,
        })
    }

    async fn drop_it(self) {
        let dropped = async {
            let mut conn = PgConnection::connect(&self.admin_url).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut conn)
            .await?;
            let _ = conn.close().await;
            Ok::<_, sqlx::Error>(())
        }
        .await;
        if let Err(e) = dropped {
            tracing::warn!(database = %self.name, error = %e, "could not drop the scratch database; drop it by hand");
        }
    }
}

/// `url` with its database name replaced.
fn replace_db(url: &str, db: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            u.set_path(&format!("/{db}"));
            u.to_string()
        }
        Err(_) => url.to_string(),
    }
}

/// Runs the store's lease rescue on a restored store: jobs whose lease has expired become
/// available at once (or dead/cancelled by the same rule as always).
async fn rescue(target: &Target) -> Result<RescuedJobs> {
    use conveyor_worker::store::{self, StoreOptions};
    let url = target.store_url();
    let target_err = |message: String| Error::Target {
        target: target.display(),
        message,
    };
    let store = store::connect(&url, StoreOptions::default())
        .await
        .map_err(|e| target_err(format!("opening the restored store: {e}")))?;
    let now_policy = conveyor_worker::RetryPolicy {
        base: std::time::Duration::ZERO,
        jitter: 0.0,
        ..conveyor_worker::RetryPolicy::default()
    };
    let mut jobs = RescuedJobs::default();
    loop {
        let now = store
            .now()
            .await
            .map_err(|e| target_err(format!("reading the clock: {e}")))?;
        let report = store
            .rescue_expired(now, &now_policy, 1000)
            .await
            .map_err(|e| target_err(format!("ending the leases of running jobs: {e}")))?;
        jobs.retried += report.retried;
        jobs.dead += report.dead;
        jobs.cancelled += report.cancelled;
        if report.retried + report.dead + report.cancelled < 1000 {
            break;
        }
    }
    let now = store
        .now()
        .await
        .map_err(|e| target_err(format!("reading the clock: {e}")))?;
    loop {
        let promoted = store
            .promote_due(now, 1000)
            .await
            .map_err(|e| target_err(format!("promoting due jobs: {e}")))?;
        if promoted < 1000 {
            break;
        }
    }
    let stats = store
        .queue_stats()
        .await
        .map_err(|e| target_err(format!("counting jobs: {e}")))?;
    jobs.still_leased = stats
        .iter()
        .filter_map(|q| q.counts.get(&conveyor_worker::JobState::Running))
        .map(|n| *n as u64)
        .sum();
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            "sqlite:///var/lib/conveyor/jobs.db"
                .parse::<Target>()
                .unwrap(),
            Target::Sqlite("/var/lib/conveyor/jobs.db".into())
        );
        assert_eq!(
            "restored.db".parse::<Target>().unwrap(),
            Target::Sqlite("restored.db".into())
        );
        assert_eq!(
            "postgres://u:p@h/db".parse::<Target>().unwrap(),
            Target::Postgres("postgres://u:p@h/db".into())
        );
        assert_eq!(
            "redis://h:6379/0?prefix=restored"
                .parse::<Target>()
                .unwrap(),
            Target::Redis("redis://h:6379/0?prefix=restored".into())
        );
        assert!("rediss://h/0".parse::<Target>().is_err());
        assert!("redis://h/0?tls_ca_file=x".parse::<Target>().is_err());
        assert!("mysql://h/db".parse::<Target>().is_err());
        assert!("sqlite::memory:".parse::<Target>().is_err());
        assert_eq!(
            Target::Postgres("postgres://u:secret@h/db".into()).display(),
            "postgres://u:***@h/db"
        );
        assert_eq!(
            replace_db("postgres://u@h:5432/app?sslmode=require", "x"),
            "postgres://u@h:5432/x?sslmode=require"
        );
    }
}
