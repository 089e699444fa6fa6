//! Conveyor's built-in job kinds.
//!
//! - `demo.echo`: logs its `msg` and completes. The README's first job.
//! - `demo.sleep`: waits `ms` milliseconds (cancellable), then completes. For trying timeouts,
//!   cancellation and shutdown.
//! - `demo.fail`: fails with `message`; `permanent: true` sends the job straight to `dead`.
//! - `noop`: completes at once. Used by `conveyor bench`.
//! - `webhook.deliver`: one signed webhook delivery; see [`webhook`] (the service behind
//!   the CLI's and the API's webhook commands) and `webhook::register`. It needs the store
//!   and settings, so it is registered apart from [`register_builtin`].
//! - `http.request`: calls the application's own endpoint, by a named target configured
//!   server-side or (when allowed) a raw URL; see [`http_target`] and `http_target::register`.
//!   It needs the store and settings too, and its args are checked at enqueue
//!   ([`http_target::HttpTargets::validators`]).
//!
//! - `email.send`: one message through a configured SMTP transport; see [`email`] and
//!   `email::register`. Its args are checked at enqueue ([`email::Emails::validators`]).
//!
//! - `backup.run` and `backup.prune`: a backup (or a retention pass) as configured under
//!   `[backup]`, for cron schedules; see [`backup`] and `backup::register`.
//!
//! Analytics kinds land here as their own module.

pub mod backup;
pub mod email;
pub mod http_target;
pub mod webhook;

use std::time::Duration;

use conveyor_worker::{JobContext, NewJob, Outcome, Registry};
use serde::Deserialize;

/// Kinds only the platform enqueues. A client that could enqueue `webhook.deliver` would send
/// validly signed deliveries with an event id, type and time it chose, past every endpoint's
/// filter and with no event record.
/// The backup kinds run what an admin key or the operator asks for (`POST /v1/backups`,
/// `conveyor backup`, the config's `[[schedules]]`): a key that may only enqueue must not
/// start backups, verifications or deletions of them.
/// The history and rollup kinds (`stats.rollup`, `analytics.rollup`, defined by
/// conveyor-analytics, which this crate does not depend on: `cli`'s tests check the names
/// agree) are run by the platform's own schedules and `conveyor analytics backfill`; an
/// application kind of the same name would silently replace the built-in handler.
pub const RESERVED_KINDS: &[&str] = &[
    webhook::KIND,
    backup::RUN_KIND,
    backup::VERIFY_KIND,
    backup::PRUNE_KIND,
    ANALYTICS_KINDS[0],
    ANALYTICS_KINDS[1],
];

/// The platform history's and the application rollups' kinds (see [`RESERVED_KINDS`]).
pub const ANALYTICS_KINDS: [&str; 2] = ["stats.rollup", "analytics.rollup"];

/// Queues only the platform fills (the webhook queue's default name; a renamed
/// `webhooks.queue` is reserved too, see [`check_client_job`]).
pub const RESERVED_QUEUES: &[&str] = &[webhook::model::QUEUE];

/// A client asked for something only the platform may create: a reserved kind or queue, or a
/// system event type. Bad input (HTTP 422, CLI exit 2), never a failure.
#[derive(Debug, thiserror::Error)]
#[error("invalid {field}: {message}")]
pub struct Reserved {
    /// `kind`, `queue`, `event_type`.
    pub field: &'static str,
    /// What is reserved and what to do instead.
    pub message: String,
}

/// Refuses a job of a reserved kind or on a reserved queue. `webhook_queue` is the configured
/// `webhooks.queue`. Every client path (the HTTP API, `conveyor enqueue`) checks this; the
/// platform's own enqueues do not come through here.
pub fn check_reserved(job: &NewJob, webhook_queue: &str) -> Result<(), Reserved> {
    check_reserved_names(&job.kind, &job.queue, webhook_queue)
}

/// [`check_reserved`] for a job's kind and queue alone, e.g. those of a schedule a client
/// creates (a schedule of `webhook.deliver` would forge deliveries on every tick).
pub fn check_reserved_names(kind: &str, queue: &str, webhook_queue: &str) -> Result<(), Reserved> {
    if backup::KINDS.contains(&kind) {
        return Err(Reserved {
            field: "kind",
            message: format!(
                "`{kind}` is reserved: backups are started with an admin key through \
                 POST /v1/backups (…/verify, /v1/backups/prune) or `conveyor backup`, and \
                 scheduled with a `[[schedules]]` entry in the config file"
            ),
        });
    }
    if ANALYTICS_KINDS.contains(&kind) {
        return Err(Reserved {
            field: "kind",
            message: format!(
                "`{kind}` is reserved: the platform runs it on its own schedules \
                 (`[stats]`, `[analytics.rollups.NAME]` in the config file); backfill an \
                 application rollup with `conveyor analytics backfill NAME`"
            ),
        });
    }
    if RESERVED_KINDS.contains(&kind) {
        return Err(Reserved {
            field: "kind",
            message: format!(
                "`{kind}` is reserved: only the platform enqueues it (send an event with \
                 POST /v1/events or `conveyor webhooks send` instead)"
            ),
        });
    }
    if RESERVED_QUEUES.contains(&queue) || queue == webhook_queue {
        return Err(Reserved {
            field: "queue",
            message: format!(
                "`{queue}` is reserved for the platform's webhook deliveries; pick another queue"
            ),
        });
    }
    Ok(())
}

/// Checks a job a client asks to enqueue: valid as any job ([`NewJob::validate`]) and not
/// reserved ([`check_reserved`]).
pub fn check_client_job(job: &NewJob, webhook_queue: &str) -> Result<(), conveyor_worker::Error> {
    job.validate()?;
    check_reserved(job, webhook_queue)
        .map_err(|e| conveyor_worker::Error::invalid(e.field, e.message))
}

/// Args of `demo.echo`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EchoArgs {
    /// Logged at info level.
    pub msg: String,
}

/// Args of `demo.sleep`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SleepArgs {
    /// How long to wait.
    pub ms: u64,
}

/// Args of `demo.fail`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailArgs {
    /// The error to record.
    #[serde(default = "default_fail_message")]
    pub message: String,
    /// Fail permanently (straight to `dead`) instead of retrying.
    #[serde(default)]
    pub permanent: bool,
}

fn default_fail_message() -> String {
    "demo.fail always fails".into()
}

/// Registers every built-in kind.
pub fn register_builtin(registry: &mut Registry) {
    registry
        .register("demo.echo", |args: EchoArgs, ctx: JobContext| async move {
            tracing::info!(job.id = %ctx.job.id, msg = %args.msg, "demo.echo");
            Ok(Outcome::Done)
        })
        .register(
            "demo.sleep",
            |args: SleepArgs, ctx: JobContext| async move {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(args.ms)) => Ok(Outcome::Done),
                    _ = ctx.cancelled() => Ok(Outcome::cancel("stopped while sleeping")),
                }
            },
        )
        .register("demo.fail", |args: FailArgs, _ctx: JobContext| async move {
            if args.permanent {
                Ok(Outcome::fail(args.message))
            } else {
                Err(anyhow::anyhow!(args.message).context("demo.fail attempt failed"))
            }
        })
        .register("noop", |_: serde_json::Value, _ctx: JobContext| async {
            Ok(Outcome::Done)
        });
}
