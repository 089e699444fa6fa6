//! A SQLite database, copied with `VACUUM INTO` (one read transaction: a consistent
//! snapshot while writers carry on) into a scratch file, counted, then streamed.

use std::path::Path;
use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{Connection, Row};

use super::{Dump, Finish};
use crate::error::{Error, Result};
use crate::manifest::TableFigures;

pub(super) async fn dump(name: &str, path: &Path, scratch: &Path) -> Result<Dump> {
    if !path.is_file() {
        return Err(Error::source(
            name,
            format!("{} is not a file", path.display()),
        ));
    }
    std::fs::create_dir_all(scratch).map_err(Error::io(format!(
        "creating the scratch directory {}",
        scratch.display()
    )))?;
    let copy = scratch.join(format!(
        "conveyor-backup-{}-{}.db",
        name,
        uuid::Uuid::now_v7().simple()
    ));
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
        .map_err(|e| Error::source(name, e))?
        .read_only(true)
        .busy_timeout(std::time::Duration::from_secs(30));
    let mut conn = SqliteConnection::connect_with(&options)
        .await
        .map_err(|e| Error::source(name, format!("opening {}: {e}", path.display())))?;
    let copied = sqlx::query("VACUUM INTO ?")
        .bind(copy.display().to_string())
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&copy);
        return Err(Error::source(
            name,
            format!("copying {} into {}: {e}", path.display(), copy.display()),
        ));
    }
    let tables = match figures(&copy).await {
        Ok(t) => t,
        Err(e) => {
            let _ = std::fs::remove_file(&copy);
            return Err(Error::source(name, e));
        }
    };
    let file = tokio::fs::File::open(&copy)
        .await
        .map_err(Error::io(format!("opening the copy {}", copy.display())))?;
    Ok(Dump {
        reader: Box::new(file),
        tables,
        migrations: Vec::new(),
        finish: Finish::RemoveFile(copy),
    })
}

/// Rows per table of the SQLite file at `path` (what a restore must find again).
pub(crate) async fn figures(path: &Path) -> Result<Vec<TableFigures>, sqlx::Error> {
    let options =
        SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?.read_only(true);
    let mut conn = SqliteConnection::connect_with(&options).await?;
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
    )
    .fetch_all(&mut conn)
    .await?;
    let mut tables = Vec::with_capacity(names.len());
    for table in names {
        let quoted = format!("\"{}\"", table.replace('"', "\"\""));
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {quoted}"
        )))
        .fetch_one(&mut conn)
        .await?;
        let rows: i64 = row.try_get(0)?;
        tables.push(TableFigures {
            table,
            rows: rows as u64,
            checksum: None,
        });
    }
    let _ = conn.close().await;
    Ok(tables)
}
