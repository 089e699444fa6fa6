//! What can go wrong, each naming where and how to fix it.

/// A backup operation's failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is wrong: which key, and what it must be.
    #[error("invalid backup configuration: {0}")]
    Config(String),
    /// No such source, destination or backup.
    #[error("{0}")]
    NotFound(String),
    /// Reading the source failed (the source is left as it was).
    #[error("reading source `{source_name}` failed: {message}")]
    Source {
        /// The source's name.
        source_name: String,
        /// What happened.
        message: String,
    },
    /// The destination refused or could not be reached.
    #[error("destination `{destination}`: {message}")]
    Destination {
        /// The destination's name.
        destination: String,
        /// What happened, with the storage's own error.
        message: String,
    },
    /// A backup's content does not match its manifest.
    #[error("backup {backup} is damaged: {message}")]
    Damaged {
        /// The backup's id.
        backup: String,
        /// Which object and how.
        message: String,
    },
    /// A restore that would overwrite something, or cannot go where it was asked to.
    #[error("restore refused: {0}")]
    Refused(String),
    /// Writing into the restore's target failed.
    #[error("restoring into {target} failed: {message}")]
    Target {
        /// The target (a file, or a database URL without its password).
        target: String,
        /// What happened.
        message: String,
    },
    /// A restored copy does not hold what the manifest recorded at backup time.
    #[error("backup {backup} did not restore as recorded: {message}")]
    Mismatch {
        /// The backup's id.
        backup: String,
        /// Which tables differ and how.
        message: String,
    },
    /// Reading or writing a local file failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    pub(crate) fn source(name: &str, message: impl std::fmt::Display) -> Error {
        Error::Source {
            source_name: name.to_string(),
            message: message.to_string(),
        }
    }
}

/// This crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
