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
//!
//! Email, analytics and backup kinds land here as their own modules.

pub mod webhook;

use std::time::Duration;

use conveyor_worker::{JobContext, Outcome, Registry};
use serde::Deserialize;

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
