//! Running behind a connection pooler (PgBouncer).
//!
//! - [`Pooler::Transaction`]: the pooler hands each *transaction* to whichever server
//!   connection is free, so nothing may outlive one: no named prepared statements (sqlx names
//!   and caches every statement per client connection, and the next transaction lands on a
//!   server that has none, or another client's), no LISTEN, no session advisory lock. sqlx
//!   sends a statement in two round trips, each ending in `Sync` (Parse/Describe, then
//!   Bind/Execute): outside a transaction the pooler may give the second to another server,
//!   where the unnamed statement is another client's (decision 0003). So every statement runs
//!   unnamed inside an explicit transaction, which pins one server connection from `BEGIN` to
//!   `COMMIT`.
//! - [`Pooler::Session`]: a client keeps its server connection, so everything works as on a
//!   direct connection except startup parameters PgBouncer does not know (`extra_float_digits`,
//!   which sqlx sends by default and Conveyor therefore leaves out).
//!
//! [`Db`] is the store's executor: `&Db` runs a statement like `&PgPool` does, and
//! [`Db::acquire`] / [`Db::begin`] hand out a [`Conn`] whose statements follow the same rule.
//! Neither derefs to `PgConnection`, so a statement cannot bypass the rule by accident.

use std::fmt;
use std::str::FromStr;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use sqlx::error::BoxDynError;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgPool, PgPoolOptions, PgQueryResult, PgRow, PgStatement};
use sqlx::{Either, Execute, Executor, PgConnection, Postgres, SqlStr, Transaction};

use crate::error::Error;

/// Which connection pooler, if any, sits between Conveyor and Postgres
/// (`database.pooler`, or `?pooler=` in the URL).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooler {
    /// A direct connection (or a pooler in session mode that accepts every startup parameter).
    #[default]
    None,
    /// PgBouncer (or alike) with `pool_mode = session`.
    Session,
    /// PgBouncer (or alike) with `pool_mode = transaction`.
    Transaction,
}

impl Pooler {
    /// The setting's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Pooler::None => "none",
            Pooler::Session => "session",
            Pooler::Transaction => "transaction",
        }
    }
}

impl fmt::Display for Pooler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Pooler {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "none" => Ok(Pooler::None),
            "session" => Ok(Pooler::Session),
            "transaction" => Ok(Pooler::Transaction),
            other => Err(Error::invalid(
                "pooler",
                format!(
                    "`{other}` is not a pooler mode; use none (a direct connection), session or transaction (PgBouncer's pool_mode)"
                ),
            )),
        }
    }
}

/// Takes `pooler=…` out of a Postgres URL (sqlx does not know it). Returns the URL without it
/// and the mode it names, if any.
pub(crate) fn split_url(url: &str) -> Result<(String, Option<Pooler>), Error> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), None));
    };
    let mut found = None;
    let mut kept = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("pooler", value)) => found = Some(value.parse()?),
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, found))
}

/// The store's statement executor: a pool, and whether statements must run unnamed inside a
/// transaction (transaction pooling).
#[derive(Clone, Debug)]
pub(crate) struct Db {
    pool: PgPool,
    pinned: bool,
}

impl Db {
    pub(crate) fn new(pool: PgPool, pooler: Pooler) -> Self {
        Self {
            pool,
            pinned: pooler == Pooler::Transaction,
        }
    }

    /// The pool itself, for applications (and for LISTEN and migrations, which manage their
    /// own connection).
    pub(crate) fn inner(&self) -> &PgPool {
        &self.pool
    }

    pub(crate) fn options(&self) -> &PgPoolOptions {
        self.pool.options()
    }

    /// A connection for several statements in a row: a plain pooled connection, or under
    /// transaction pooling a transaction (the statements then commit together at
    /// [`Conn::commit`]; dropped without it, they roll back).
    pub(crate) async fn acquire(&self) -> Result<Conn<'static>, sqlx::Error> {
        if self.pinned {
            return self.begin().await;
        }
        Ok(Conn {
            inner: Inner::Pooled(self.pool.acquire().await?),
            unnamed: false,
        })
    }

    /// A transaction.
    pub(crate) async fn begin(&self) -> Result<Conn<'static>, sqlx::Error> {
        Ok(Conn {
            inner: Inner::Tx(self.pool.begin().await?),
            unnamed: self.pinned,
        })
    }
}

/// A statement that sqlx sends as the unnamed prepared statement instead of a cached named one.
struct Unnamed<E>(E);

impl<'q, E: Execute<'q, Postgres>> Execute<'q, Postgres> for Unnamed<E> {
    fn sql(self) -> SqlStr {
        self.0.sql()
    }

    fn statement(&self) -> Option<&PgStatement> {
        self.0.statement()
    }

    fn take_arguments(&mut self) -> Result<Option<PgArguments>, BoxDynError> {
        self.0.take_arguments()
    }

    fn persistent(&self) -> bool {
        false
    }
}

impl<'c> Executor<'c> for &'c Db {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if !self.pinned {
            return self.pool.fetch_many(query);
        }
        // The whole answer is read inside the transaction, then handed out.
        let pool = self.pool.clone();
        futures::stream::once(async move {
            let mut tx = pool.begin().await?;
            let items: Vec<_> = tx.fetch_many(Unnamed(query)).try_collect().await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(futures::stream::iter(items.into_iter().map(Ok)))
        })
        .try_flatten()
        .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if !self.pinned {
            return self.pool.fetch_optional(query);
        }
        let pool = self.pool.clone();
        Box::pin(async move {
            let mut tx = pool.begin().await?;
            let row = tx.fetch_optional(Unnamed(query)).await?;
            tx.commit().await?;
            Ok(row)
        })
    }

    fn prepare_with<'e>(
        self,
        sql: SqlStr,
        parameters: &'e [sqlx::postgres::PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement, sqlx::Error>>
    where
        'c: 'e,
    {
        self.pool.prepare_with(sql, parameters)
    }

    fn describe<'e>(
        self,
        sql: SqlStr,
    ) -> BoxFuture<'e, Result<sqlx::Describe<Postgres>, sqlx::Error>>
    where
        'c: 'e,
    {
        self.pool.describe(sql)
    }
}

/// A connection of the store (see [`Db::acquire`]), or the application's own
/// ([`Conn::borrowed`]).
pub(crate) struct Conn<'a> {
    inner: Inner<'a>,
    unnamed: bool,
}

enum Inner<'a> {
    Borrowed(&'a mut PgConnection),
    Pooled(PoolConnection<Postgres>),
    Tx(Transaction<'static, Postgres>),
}

impl fmt::Debug for Conn<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("unnamed", &self.unnamed)
            .finish_non_exhaustive()
    }
}

impl<'a> Conn<'a> {
    /// The caller's connection or transaction, used as it is.
    pub(crate) fn borrowed(conn: &'a mut PgConnection) -> Self {
        Self {
            inner: Inner::Borrowed(conn),
            unnamed: false,
        }
    }

    fn raw(&mut self) -> &mut PgConnection {
        match &mut self.inner {
            Inner::Borrowed(c) => c,
            Inner::Pooled(c) => c,
            Inner::Tx(t) => t,
        }
    }

    /// Commits if this is a transaction; a plain connection has nothing to commit.
    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        match self.inner {
            Inner::Tx(t) => t.commit().await,
            _ => Ok(()),
        }
    }
}

impl<'c> Executor<'c> for &'c mut Conn<'_> {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if self.unnamed {
            self.raw().fetch_many(Unnamed(query))
        } else {
            self.raw().fetch_many(query)
        }
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if self.unnamed {
            self.raw().fetch_optional(Unnamed(query))
        } else {
            self.raw().fetch_optional(query)
        }
    }

    fn prepare_with<'e>(
        self,
        sql: SqlStr,
        parameters: &'e [sqlx::postgres::PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement, sqlx::Error>>
    where
        'c: 'e,
    {
        self.raw().prepare_with(sql, parameters)
    }

    fn describe<'e>(
        self,
        sql: SqlStr,
    ) -> BoxFuture<'e, Result<sqlx::Describe<Postgres>, sqlx::Error>>
    where
        'c: 'e,
    {
        self.raw().describe(sql)
    }
}

/// The key of sqlx's migration lock for `database` (sqlx-postgres `generate_lock_id`), so a
/// Conveyor that takes it per transaction still excludes one that takes it per session.
pub(crate) fn migration_lock_id(database: &str) -> i64 {
    const CRC_IEEE: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
    0x3d32ad9e * i64::from(CRC_IEEE.checksum(database.as_bytes()))
}

/// An error a pooler causes, told as such: what happened and which setting fixes it. Other
/// errors come back unchanged.
pub(crate) fn classify(e: Error, pooler: Pooler) -> Error {
    let db = match &e {
        Error::Database(sqlx::Error::Database(db)) => db,
        Error::Migrate(sqlx::migrate::MigrateError::Execute(sqlx::Error::Database(db)))
        | Error::Migrate(sqlx::migrate::MigrateError::ExecuteMigration(
            sqlx::Error::Database(db),
            _,
        )) => db,
        _ => return e,
    };
    let message = db.message();
    if let Some(param) = message.strip_prefix("unsupported startup parameter: ") {
        return Error::Pooler(format!(
            "the connection pooler (PgBouncer) refused the startup parameter `{param}`: \
             add it to ignore_startup_parameters in pgbouncer.ini, or remove it from the \
             database URL (it is not one Conveyor sends by itself)"
        ));
    }
    // 42P05 duplicate_prepared_statement, 26000 invalid_sql_statement_name: a named
    // statement met a server connection that has someone else's, or none.
    let code = db.code();
    if matches!(code.as_deref(), Some("42P05") | Some("26000")) && message.contains("sqlx_s_") {
        return Error::Pooler(match pooler {
            Pooler::Transaction => format!(
                "named prepared statements failed even though database.pooler = \"transaction\" ({message}); report this as a bug"
            ),
            _ => format!(
                "a prepared statement went to another server connection ({message}): the database \
                 is behind a pooler in transaction mode; set database.pooler = \"transaction\" \
                 (or ?pooler=transaction in the URL)"
            ),
        });
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooler_is_taken_out_of_the_url() {
        let (url, p) = split_url("postgres://u@h/db?pooler=transaction&sslmode=disable").unwrap();
        assert_eq!(url, "postgres://u@h/db?sslmode=disable");
        assert_eq!(p, Some(Pooler::Transaction));
        let (url, p) = split_url("postgres://u@h/db?pooler=session").unwrap();
        assert_eq!(url, "postgres://u@h/db");
        assert_eq!(p, Some(Pooler::Session));
        let (url, p) = split_url("postgres://u@h/db").unwrap();
        assert_eq!(url, "postgres://u@h/db");
        assert_eq!(p, None);
        let err = split_url("postgres://u@h/db?pooler=yes").unwrap_err();
        assert!(err.to_string().contains("session or transaction"), "{err}");
    }
}
