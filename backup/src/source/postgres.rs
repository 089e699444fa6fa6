//! A Postgres database, dumped by `pg_dump --format=custom` from a snapshot this process
//! exports: the figures recorded with the backup (rows and a content checksum per table) are
//! read in the very snapshot `pg_dump` dumps, so a restore can be checked against them
//! exactly even while the application keeps writing.

use std::path::Path;
use std::process::Stdio;

use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use super::{Dump, Finish};
use crate::config::STORE_SOURCE;
use crate::error::{Error, Result};
use crate::manifest::{MigrationRecord, TableFigures};

/// `pg_dump` running, and the transaction whose snapshot it reads.
pub(crate) struct Running {
    name: String,
    child: Child,
    stderr: tokio::task::JoinHandle<String>,
    conn: PgConnection,
}

pub(super) async fn dump(
    name: &str,
    url: &str,
    schemas: &[String],
    pg_dump: &Path,
) -> Result<Dump> {
    let mut conn = PgConnection::connect(url)
        .await
        .map_err(|e| Error::source(name, format!("connecting: {e}")))?;
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut conn)
        .await
        .map_err(|e| Error::source(name, e))?;
    let snapshot: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
        .fetch_one(&mut conn)
        .await
        .map_err(|e| Error::source(name, format!("exporting a snapshot: {e}")))?;
    let tables = figures(&mut conn, schemas)
        .await
        .map_err(|e| Error::source(name, format!("counting rows: {e}")))?;
    // The store's migration record lives outside its schema; a restore writes it back.
    let migrations = if name == STORE_SOURCE {
        migrations(&mut conn)
            .await
            .map_err(|e| Error::source(name, format!("reading _sqlx_migrations: {e}")))?
    } else {
        Vec::new()
    };

    let mut cmd = Command::new(pg_dump);
    cmd.arg("--format=custom")
        .arg("--compress=0")
        .arg("--no-password")
        .arg(format!("--snapshot={snapshot}"))
        .arg(format!("--dbname={}", libpq_url(url)));
    for s in schemas {
        cmd.arg(format!("--schema={s}"));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| {
        Error::source(
            name,
            format!(
                "`{}` does not run ({e}): install the PostgreSQL client tools (Debian: apt-get install postgresql-client-15) or set backup.pg_dump",
                pg_dump.display()
            ),
        )
    })?;
    let (Some(stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(Error::source(
            name,
            "pg_dump started without its output pipes",
        ));
    };
    let stderr = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    Ok(Dump {
        reader: Box::new(stdout),
        tables,
        migrations,
        finish: Finish::PgDump(Box::new(Running {
            name: name.to_string(),
            child,
            stderr,
            conn,
        })),
    })
}

impl Running {
    pub(crate) async fn finish(mut self) -> Result<()> {
        let status = self
            .child
            .wait()
            .await
            .map_err(|e| Error::source(&self.name, format!("waiting for pg_dump: {e}")))?;
        let stderr = self.stderr.await.unwrap_or_default();
        let _ = sqlx::query("COMMIT").execute(&mut self.conn).await;
        let _ = self.conn.close().await;
        if !status.success() {
            return Err(Error::source(
                &self.name,
                format!("pg_dump failed ({status}): {}", stderr.trim()),
            ));
        }
        Ok(())
    }

    pub(crate) async fn abandon(mut self) {
        let _ = self.child.kill().await;
        let _ = sqlx::query("ROLLBACK").execute(&mut self.conn).await;
        let _ = self.conn.close().await;
    }
}

/// Rows and a content checksum per ordinary table of `schemas` (all schemas but the
/// system's when empty), in the connection's current snapshot. The checksum is the sum of
/// every row's 64-bit text hash: independent of row order, so a restored table compares
/// equal however its rows are laid out.
pub(crate) async fn figures(
    conn: &mut PgConnection,
    schemas: &[String],
) -> Result<Vec<TableFigures>, sqlx::Error> {
    let names = sqlx::query(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
           AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
           AND (cardinality($1::text[]) = 0 OR n.nspname = ANY($1))
         ORDER BY 1, 2",
    )
    .bind(schemas)
    .fetch_all(&mut *conn)
    .await?;
    let mut tables = Vec::with_capacity(names.len());
    for row in names {
        let schema: String = row.try_get(0)?;
        let table: String = row.try_get(1)?;
        let quoted = format!("{}.{}", quote(&schema), quote(&table));
        let figures = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT count(*)::int8, coalesce(sum(hashtextextended(t::text, 0)::numeric), 0)::text FROM {quoted} t"
        )))
        .fetch_one(&mut *conn)
        .await?;
        let rows: i64 = figures.try_get(0)?;
        let checksum: String = figures.try_get(1)?;
        tables.push(TableFigures {
            table: format!("{schema}.{table}"),
            rows: rows as u64,
            checksum: Some(checksum),
        });
    }
    Ok(tables)
}

/// The applied migrations of the store whose `_sqlx_migrations` is on the search path
/// (none if it has none).
async fn migrations(conn: &mut PgConnection) -> Result<Vec<MigrationRecord>, sqlx::Error> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(
        "SELECT version, description, installed_on, success, checksum, execution_time
         FROM _sqlx_migrations ORDER BY version",
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(MigrationRecord {
                version: r.try_get(0)?,
                description: r.try_get(1)?,
                installed_on: r.try_get(2)?,
                success: r.try_get(3)?,
                checksum: hex::encode(r.try_get::<Vec<u8>, _>(4)?),
                execution_time: r.try_get(5)?,
            })
        })
        .collect()
}

/// Writes `records` into the target's `_sqlx_migrations` (created as sqlx creates it), so a
/// restored store is known to be migrated.
pub(crate) async fn write_migrations(
    conn: &mut PgConnection,
    records: &[MigrationRecord],
) -> Result<(), sqlx::Error> {
    use sqlx::migrate::Migrate;
    conn.ensure_migrations_table("_sqlx_migrations")
        .await
        .map_err(|e| sqlx::Error::Protocol(format!("creating _sqlx_migrations: {e}")))?;
    for m in records {
        let checksum = hex::decode(&m.checksum).map_err(|e| {
            sqlx::Error::Protocol(format!("migration {}: checksum: {e}", m.version))
        })?;
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, installed_on, success, checksum, execution_time)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (version) DO NOTHING",
        )
        .bind(m.version)
        .bind(&m.description)
        .bind(m.installed_on)
        .bind(m.success)
        .bind(checksum)
        .bind(m.execution_time)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

pub(crate) fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// The URL as libpq (`pg_dump`) takes it: query parameters only Conveyor's driver knows are
/// dropped.
pub(crate) fn libpq_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return url.to_string();
    };
    const LIBPQ: &[&str] = &[
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "application_name",
        "options",
        "connect_timeout",
        "host",
        "port",
        "user",
        "password",
        "dbname",
    ];
    let kept: Vec<(String, String)> = parsed
        .query_pairs()
        .filter(|(k, _)| LIBPQ.contains(&k.as_ref()))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if kept.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(kept);
    }
    parsed.to_string()
}

#[cfg(test)]
mod tests {
    use super::libpq_url;

    #[test]
    fn driver_only_parameters_are_dropped() {
        assert_eq!(
            libpq_url("postgres://u@h:5432/db?sslmode=require&statement-cache-capacity=0"),
            "postgres://u@h:5432/db?sslmode=require"
        );
        assert_eq!(
            libpq_url("postgres://u@h/db?statement-cache-capacity=0"),
            "postgres://u@h/db"
        );
    }
}
