//! Conveyor's operator operations, one function each, shared by the HTTP API and the CLI.
//!
//! Every operation an operator (or an application) can ask for — enqueue, retry, cancel,
//! discard, the bulk actions, queue pause and resume, the schedule and webhook endpoint
//! changes, sending an event, API keys — is one method of [`Admin`] that checks its input,
//! performs it and writes the audit record for the [`Actor`] who asked. The API's handlers
//! and the CLI's commands only parse what they were given, call the method, and render the
//! answer, so the two cannot apply different rules to the same operation.
//!
//! Where to start reading:
//! - [`Admin`]: the store, the webhook service and the [`Limits`] every caller shares.
//! - [`enqueue`]: the checks a client's job must pass (including its kind's args check, see
//!   [`Admin::with_validators`]), and the warning when no live worker serves its queue or
//!   kind ([`serving`]).
//! - [`job`]: retry, cancel, discard, one job or in bulk ([`job::BulkAction`]).
//! - [`queue`]: the queue overview and pause/resume.
//! - [`schedule`], [`webhook`]: thin audited wrappers over `conveyor_scheduler::registry`
//!   and `conveyor_jobs::webhook`, which keep their own rules.
//! - [`email`]: sending a message (an `email.send` enqueue) and reading one back.
//! - [`backup`]: backups asked for over the API (queued as `backup.*` jobs) or run by the
//!   CLI, their names checked and each audited.
//! - [`audit`]: the audit log itself; [`key`]: API keys.
//!
//! Which states an action may start from is the store's business: these methods call the
//! store and let it refuse.

pub mod audit;
pub mod backup;
pub mod email;
pub mod email_suppression;
pub mod email_template;
pub mod enqueue;
pub mod job;
pub mod key;
pub mod queue;
pub mod remote;
pub mod schedule;
pub mod serving;
pub mod session;
pub mod webhook;

use std::sync::Arc;

use conveyor_jobs::webhook::{WebhookError, Webhooks};
use conveyor_worker::Store;
use conveyor_worker::validate::ArgsValidators;

pub use audit::{Actor, AuditEntry};

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed or refused (bad input, not found, wrong state, conflict).
    #[error(transparent)]
    Store(#[from] conveyor_worker::Error),
    /// The webhook service refused or failed.
    #[error(transparent)]
    Webhook(#[from] WebhookError),
    /// A value is larger than its configured limit.
    #[error("{field} is too large: {message}")]
    TooLarge {
        /// Where.
        field: String,
        /// How large it is, the limit and the setting that raises it.
        message: String,
    },
    /// The thing asked for does not exist (an API key).
    #[error("{0}")]
    NotFound(String),
    /// A name given as input names nothing (a schedule): not found over HTTP, and bad input
    /// on the command line, like an unknown job state. The message lists the names that exist.
    #[error("{0}")]
    UnknownName(String),
    /// The caller's key does not cover what it asked for (a `worker` key claiming from a
    /// queue outside its list).
    #[error("{0}")]
    Forbidden(String),
    /// A backup operation failed or was refused (see [`backup`]).
    #[error(transparent)]
    Backup(#[from] conveyor_backup::Error),
}

impl Error {
    /// Bad input (HTTP 4xx, CLI exit status 2): the caller should fix the request, not retry.
    pub fn is_bad_input(&self) -> bool {
        use conveyor_worker::Error as S;
        match self {
            Error::Store(e) => matches!(e, S::InvalidInput { .. } | S::BadUrl { .. }),
            Error::Webhook(e) => {
                matches!(e, WebhookError::Invalid { .. } | WebhookError::Reserved(_))
            }
            Error::TooLarge { .. } | Error::UnknownName(_) | Error::Forbidden(_) => true,
            Error::NotFound(_) => false,
            Error::Backup(e) => matches!(e, conveyor_backup::Error::Config(_)),
        }
    }

    /// [`conveyor_worker::Error::InvalidInput`] with `prefix` before its field (a batch's
    /// `jobs[3].`); other errors unchanged.
    pub(crate) fn prefixed(self, prefix: &str) -> Self {
        match self {
            Error::Store(conveyor_worker::Error::InvalidInput { field, message }) => {
                Error::Store(conveyor_worker::Error::InvalidInput {
                    field: format!("{prefix}{field}"),
                    message,
                })
            }
            Error::TooLarge { field, message } => Error::TooLarge {
                field: format!("{prefix}{field}"),
                message,
            },
            other => other,
        }
    }
}

/// The answer of every operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Limits every caller applies alike (the config's `api.*` keys, read by `conveyor serve`
/// and by the CLI commands).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest `args` of one job, as serialized JSON bytes (`api.args_limit`).
    pub args_limit: usize,
    /// Most jobs in one batch enqueue (`api.batch_limit`).
    pub batch_limit: usize,
    /// Most jobs one bulk cancel touches per call (`api.bulk_cancel_limit`).
    pub bulk_cancel_limit: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            args_limit: 256 * 1024,
            batch_limit: 1000,
            bulk_cancel_limit: 10_000,
        }
    }
}

/// The operator operations over one store.
#[derive(Clone)]
pub struct Admin {
    store: Arc<dyn Store>,
    webhooks: Arc<Webhooks>,
    limits: Limits,
    serving: Arc<serving::ServingCache>,
    validators: Arc<ArgsValidators>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Admin {
    /// Operations over `webhooks`' store, with `limits`.
    pub fn new(webhooks: Arc<Webhooks>, limits: Limits) -> Self {
        Self {
            store: webhooks.store().clone(),
            webhooks,
            limits,
            serving: Arc::default(),
            validators: Arc::default(),
        }
    }

    /// With the per-kind checks of args that enqueues (and schedules) must pass
    /// ([`conveyor_worker::validate`]); without them, args are checked by their handler at
    /// run time only.
    pub fn with_validators(mut self, validators: Arc<ArgsValidators>) -> Self {
        self.validators = validators;
        self
    }

    /// The per-kind checks of args.
    pub fn validators(&self) -> &ArgsValidators {
        &self.validators
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The webhook service.
    pub fn webhooks(&self) -> &Webhooks {
        &self.webhooks
    }

    /// The limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Writes one audit record of `action` by `actor`.
    pub(crate) async fn audit(
        &self,
        actor: &Actor,
        action: &str,
        target: serde_json::Value,
        affected: u64,
    ) -> Result<()> {
        audit::record(
            self.store.as_ref(),
            AuditEntry::new(actor.clone(), action)
                .target(target)
                .affected(affected),
        )
        .await?;
        Ok(())
    }
}
