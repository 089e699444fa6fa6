//! The crate's one error type.

use crate::job::{JobId, JobState};

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
    #[error("job {id} is {state}: cannot {action}")]
    WrongState {
        /// The job.
        id: JobId,
        /// Its current state.
        state: JobState,
        /// What was attempted.
        action: &'static str,
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
    /// The database said no or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Redis said no or could not be reached.
    #[error("redis error: {0}")]
    Redis(#[source] redis::RedisError),
    /// Applying migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored JSON column could not be read back.
    #[error("stored data is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
}

/// Redis refusing a write because it is out of memory is [`Error::StoreFull`]; every other
/// Redis error is [`Error::Redis`].
impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        crate::store::redis::store_error(e)
    }
}

impl Error {
    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidInput {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
