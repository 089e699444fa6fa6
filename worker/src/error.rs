//! The crate's one error type.

use crate::job::{JobId, JobState, OperatorAction};

/// Everything that can go wrong in the store or the runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Input that cannot be accepted; `field` names where, `message` says what and how to fix it.
    #[error("invalid {field}: {message}")]
    InvalidInput {
        /// The offending field or argument.
        field: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// No job has this id (it never existed or was pruned).
    #[error("job {0} not found")]
    NotFound(JobId),
    /// The job is in a state that does not allow the operation.
    #[error("job {id} is {state}: {}", action.refusal(*state))]
    WrongState {
        /// The job.
        id: JobId,
        /// Its current state.
        state: JobState,
        /// What was attempted.
        action: OperatorAction,
    },
    /// A write's precondition failed: the record exists already, is missing, or someone
    /// else changed it since it was read.
    #[error("{0}")]
    Conflict(String),
    /// The store cannot do this now: migrations are pending, the data is newer than this
    /// binary, an idempotency key is still claimed by an unfinished enqueue, a stored job is
    /// corrupt. (Transactional enqueue is not among them: it is `store::postgres::enqueue_in`,
    /// which takes a Postgres connection, so on another backend it does not compile.)
    #[error("{0}")]
    Unsupported(String),
    /// The store URL could not be understood.
    #[error(
        "cannot use store URL `{url}`: {reason}. Use sqlite://path/to/file.db, postgres://user@host:5432/db or redis://host:6379/0"
    )]
    BadUrl {
        /// The URL as given (credentials stripped by the caller where needed).
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// The store has no room left: the disk under SQLite or Postgres is full, or Redis
    /// reached `maxmemory` under `noeviction`. The message says which and what to do.
    /// Reads still work; writes fail until space is freed.
    #[error("{0}")]
    StoreFull(String),
    /// A connection pooler in front of the database (PgBouncer) refused what Conveyor sent or
    /// broke something it relies on; the message says which setting to change.
    #[error("{0}")]
    Pooler(String),
    /// The store's database does not exist (the server answered, the database is not there).
    /// The message names it and the command that creates it.
    #[error("{0}")]
    NoDatabase(String),
    /// The database said no or could not be reached.
    ///
    /// These variants carry the driver's error and say all of it in their own text, so they
    /// return no `source()`: a report that walks the chain shows the root cause once.
    #[error("database error: {}", database_text(.0))]
    Database(sqlx::Error),
    /// Redis said no or could not be reached.
    #[error("redis error: {0}")]
    Redis(redis::RedisError),
    /// Applying migrations failed.
    #[error("migration failed: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    /// A stored JSON column could not be read back.
    #[error("stored data is corrupt: {0}")]
    Corrupt(serde_json::Error),
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Corrupt(e)
    }
}

/// A database error said once: the server's own message for what it refused (without the
/// line number in the server's source code that Postgres attaches), the I/O error for what
/// could not be reached.
fn database_text(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("{} (code {code})", db.message()),
            None => db.message().to_string(),
        },
        sqlx::Error::Io(io) => format!("cannot connect: {io}"),
        sqlx::Error::PoolTimedOut => {
            "no database connection became free in time (every connection busy, or the \
             database stopped answering)"
                .to_string()
        }
        other => other.to_string(),
    }
}

/// Redis refusing a write because it is out of memory is [`Error::StoreFull`]; every other
/// Redis error is [`Error::Redis`].
impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        crate::store::redis::store_error(e)
    }
}

impl Error {
    /// Whether the store could not be reached at all (down, wrong address, refused, timed
    /// out, or a SQLite file that cannot be opened), as opposed to a store that answered with
    /// an error of its own (a full disk, a failed migration).
    pub fn is_unreachable(&self) -> bool {
        match self {
            Error::Database(e) => {
                matches!(
                    e,
                    sqlx::Error::Io(_)
                        | sqlx::Error::Tls(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::Configuration(_)
                ) || e
                    .as_database_error()
                    .filter(|d| d.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some())
                    .and_then(|d| d.code())
                    // SQLITE_CANTOPEN (and its extended codes): no such folder, no permission.
                    .is_some_and(|c| c.parse::<i32>().is_ok_and(|c| c & 0xff == 14))
            }
            Error::Redis(e) => e.is_io_error() || e.is_connection_refusal() || e.is_timeout(),
            _ => false,
        }
    }

    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidInput {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A full disk is [`Error::StoreFull`], whatever statement met it; every other database error
/// is [`Error::Database`].
impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        match disk_full(&e) {
            Some(message) => Error::StoreFull(message),
            None => Error::Database(e),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        use sqlx::migrate::MigrateError;
        match &e {
            MigrateError::Execute(inner) | MigrateError::ExecuteMigration(inner, _) => {
                match disk_full(inner) {
                    Some(message) => Error::StoreFull(format!("applying migrations: {message}")),
                    None => Error::Migrate(e),
                }
            }
            _ => Error::Migrate(e),
        }
    }
}

/// What to tell the operator when `e` says the disk under the database is full: SQLite's
/// `SQLITE_FULL` (13, also raised at `PRAGMA max_page_count`) or Postgres's `53100 disk_full`.
fn disk_full(e: &sqlx::Error) -> Option<String> {
    let sqlx::Error::Database(db) = e else {
        return None;
    };
    let code = db.code()?;
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // Extended result codes keep the primary code in the low byte.
        let full = code.parse::<i32>().is_ok_and(|c| c & 0xff == 13);
        return full.then(|| {
            format!(
                "the SQLite database is full ({}): free space on the volume that holds the database file \
                 (or raise its max_page_count); reads still work, writes fail until then",
                db.message()
            )
        });
    }
    (code == "53100").then(|| {
        format!(
            "the Postgres server's disk is full ({}): free space on its data volume; \
             reads still work, writes fail until then",
            db.message()
        )
    })
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
