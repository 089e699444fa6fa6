//! Testing a kind's handler: run one job inline, through the runtime's own rules.
//!
//! [`run_inline`] runs a [`Handler`] on its args as a worker would — under the kind's
//! timeout, with panics caught, honouring a cancel request with the worker's grace period —
//! and decides the job's next state with the same function the worker uses
//! ([`crate::runtime::transition`]). No store, no worker loop: what is tested is the handler
//! and what its outcome does to the job.
//!
//! ```
//! use conveyor_worker::testing::run_inline;
//! use conveyor_worker::{Handler, JobArgs, JobContext, JobState, Outcome};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Resize {
//!     width: u32,
//! }
//!
//! impl JobArgs for Resize {
//!     const KIND: &'static str = "image.resize";
//!     const MAX_ATTEMPTS: i32 = 3;
//! }
//!
//! impl Handler for Resize {
//!     async fn run(self, _ctx: JobContext) -> anyhow::Result<Outcome> {
//!         anyhow::ensure!(self.width > 0, "width must be positive");
//!         Ok(Outcome::Done)
//!     }
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! assert_eq!(run_inline(Resize { width: 640 }).await.state(), JobState::Completed);
//! // A failure is retried while attempts remain, and dead on the last one.
//! let first = run_inline(Resize { width: 0 }).await;
//! assert_eq!(first.state(), JobState::Retryable);
//! assert_eq!(first.error(), Some("width must be positive"));
//! let last = conveyor_worker::testing::Inline::new(Resize { width: 0 }).attempt(3).run().await;
//! assert_eq!(last.state(), JobState::Dead);
//! # });
//! ```

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::FutureExt;
use tokio_util::sync::CancellationToken;

use crate::handler::{Handler, JobContext, Outcome, Registry};
use crate::job::{Job, JobState, NewJob};
use crate::retry_policy::RetryPolicy;
use crate::runtime::WorkerConfig;
use crate::runtime::execute::supervise;
use crate::runtime::transition::{Ended, transition};
use crate::store::Finish;

/// The worker id recorded on inline attempts.
pub const INLINE_WORKER: &str = "inline";

/// What one inline run did.
#[derive(Clone, Debug)]
pub struct InlineRun {
    /// The job as the handler saw it (running, on its attempt).
    pub job: Job,
    /// What the handler returned, if it returned (not on an error, a panic, the timeout or
    /// a cancellation).
    pub outcome: Option<Outcome>,
    /// The write-back the worker would make: the next state, its `run_at`, the attempt record.
    pub finish: Finish,
}

impl InlineRun {
    /// The job's next state.
    pub fn state(&self) -> JobState {
        self.finish.state
    }

    /// The error recorded for the attempt (a failure's message, a cancel reason).
    pub fn error(&self) -> Option<&str> {
        self.finish.record.error.as_deref()
    }

    /// The error's causes, outermost first.
    pub fn causes(&self) -> &[String] {
        &self.finish.record.causes
    }

    /// When the job would run again (retryable, snoozed).
    pub fn run_at(&self) -> Option<DateTime<Utc>> {
        self.finish.run_at
    }
}

/// One inline run of a [`Handler`], with its attempt number and a cancel request to set.
#[derive(Debug)]
pub struct Inline<T> {
    args: T,
    attempt: i32,
    cancel_after: Option<Duration>,
}

impl<T: Handler> Inline<T> {
    /// A first attempt of a job carrying `args`, with the type's defaults.
    pub fn new(args: T) -> Self {
        Self {
            args,
            attempt: 1,
            cancel_after: None,
        }
    }

    /// Run it as attempt `attempt` (1-based): when that is the job's last
    /// ([`crate::JobArgs::MAX_ATTEMPTS`]), a failure makes it `dead`.
    pub fn attempt(mut self, attempt: i32) -> Self {
        self.attempt = attempt;
        self
    }

    /// Ask to cancel the job `after` it starts, as `conveyor jobs cancel` does while it runs.
    pub fn cancel_after(mut self, after: Duration) -> Self {
        self.cancel_after = Some(after);
        self
    }

    /// Runs the handler and decides the next state. Panics (failing the test) if the args
    /// do not serialize, as an enqueue of them would fail.
    pub async fn run(self) -> InlineRun {
        let job = match self.args.to_job() {
            Ok(job) => job,
            Err(e) => panic!("the args of `{}` do not serialize: {e}", T::KIND),
        };
        let mut registry = Registry::new();
        registry.kind::<T>();
        run_job(&registry, job, self.attempt, self.cancel_after).await
    }
}

/// Runs one job of a [`Handler`] inline: `Inline::new(args).run()`.
pub async fn run_inline<T: Handler>(args: T) -> InlineRun {
    Inline::new(args).run().await
}

/// Runs `job` (its first attempt) with the handler `registry` has for its kind, as
/// [`run_inline`] does: for kinds registered with a closure (`Registry::handle`,
/// `Registry::register_with`). A kind `registry` lacks ends as a worker without it would:
/// scheduled again, waiting for a worker that has it.
pub async fn run_in(registry: &Registry, job: NewJob) -> InlineRun {
    run_job(registry, job, 1, None).await
}

async fn run_job(
    registry: &Registry,
    new: NewJob,
    attempt: i32,
    cancel_after: Option<Duration>,
) -> InlineRun {
    let now = Utc::now();
    let job = Arc::new(Job {
        id: new.id.unwrap_or_default(),
        queue: new.queue,
        kind: new.kind,
        args: new.args,
        priority: new.priority,
        state: JobState::Running,
        attempt,
        max_attempts: new.max_attempts,
        run_at: now,
        created_at: now,
        attempted_at: Some(now),
        finalized_at: None,
        lease_owner: Some(INLINE_WORKER.into()),
        lease_expires_at: None,
        cancel_requested_at: None,
        idempotency_key: new.idempotency_key,
        tags: new.tags,
        metadata: new.metadata,
        attempts: Vec::new(),
        result: None,
        progress: None,
    });
    let registered = registry.get(&job.kind).cloned();
    let token = CancellationToken::new();
    if let Some(after) = cancel_after {
        let token = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            token.cancel();
        });
    }
    let ended = match &registered {
        None => Ended::NoHandler,
        Some(reg) => {
            let ctx = JobContext::new(job.clone(), INLINE_WORKER.into(), token.clone());
            let fut = AssertUnwindSafe(reg.call(job.args.clone(), ctx)).catch_unwind();
            // Never interrupted: no shutdown happens inline.
            let interrupt = CancellationToken::new();
            let defaults = WorkerConfig::default();
            let ended = supervise(
                fut,
                reg.options.timeout,
                &token,
                &interrupt,
                defaults.cancel_grace,
            )
            .await;
            crate::runtime::within_result_limit(ended, defaults.max_result_bytes)
        }
    };
    let outcome = match &ended {
        Ended::Returned(outcome) => Some(outcome.clone()),
        _ => None,
    };
    let default_policy = RetryPolicy::default();
    let policy = registered
        .as_ref()
        .map_or(&default_policy, |r| &r.options.retry);
    let finish = transition(&job, ended, policy, INLINE_WORKER, now, Utc::now());
    let job = Arc::unwrap_or_clone(job);
    InlineRun {
        job,
        outcome,
        finish,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde::{Deserialize, Serialize};
    use serde_json::json;

    use super::*;
    use crate::handler::JobArgs;
    use crate::job::AttemptOutcome;

    /// What the handler does, chosen by the test.
    #[derive(Serialize, Deserialize)]
    enum Act {
        Done,
        Err,
        Panic,
        Sleep(u64),
        SleepIgnoringCancel(u64),
        Snooze,
    }

    impl JobArgs for Act {
        const KIND: &'static str = "act";
        const MAX_ATTEMPTS: i32 = 2;
        const TIMEOUT: Option<Duration> = Some(Duration::from_millis(200));
    }

    impl Handler for Act {
        async fn run(self, ctx: JobContext) -> anyhow::Result<Outcome> {
            match self {
                Act::Done => Ok(Outcome::Done),
                Act::Err => Err(anyhow::anyhow!("disk on fire").context("cannot write")),
                Act::Panic => panic!("boom"),
                Act::Sleep(ms) => {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(Outcome::Done),
                        _ = ctx.cancelled() => Ok(Outcome::cancel("stopped")),
                    }
                }
                Act::SleepIgnoringCancel(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(Outcome::Done)
                }
                Act::Snooze => Ok(Outcome::Snooze(Duration::from_secs(60))),
            }
        }
    }

    #[tokio::test]
    async fn inline_runs_follow_the_runtimes_rules() {
        let done = run_inline(Act::Done).await;
        assert_eq!(done.state(), JobState::Completed);
        assert_eq!(done.outcome, Some(Outcome::Done));
        assert_eq!(done.finish.record.worker.as_deref(), Some(INLINE_WORKER));

        let failed = run_inline(Act::Err).await;
        assert_eq!(failed.state(), JobState::Retryable);
        assert_eq!(failed.error(), Some("cannot write"));
        assert_eq!(failed.causes(), ["disk on fire"]);
        assert!(failed.run_at().is_some());
        let last = Inline::new(Act::Err).attempt(2).run().await;
        assert_eq!(last.state(), JobState::Dead, "the type's MAX_ATTEMPTS is 2");

        let panicked = run_inline(Act::Panic).await;
        assert_eq!(panicked.state(), JobState::Retryable);
        assert_eq!(panicked.error(), Some("handler panicked: boom"));

        // The type's timeout (200 ms) applies.
        let slow = run_inline(Act::SleepIgnoringCancel(5_000)).await;
        assert_eq!(slow.state(), JobState::Retryable);
        assert!(
            slow.error().unwrap().starts_with("timed out after"),
            "{slow:?}"
        );

        let cancelled = Inline::new(Act::Sleep(150))
            .cancel_after(Duration::from_millis(10))
            .run()
            .await;
        assert_eq!(cancelled.state(), JobState::Cancelled);
        // The handler saw the cancel and returned its own: its reason is kept.
        assert_eq!(cancelled.error(), Some("stopped"));

        let snoozed = run_inline(Act::Snooze).await;
        assert_eq!(snoozed.state(), JobState::Scheduled);
        assert_eq!(snoozed.finish.attempt_delta, -1);
        assert_eq!(snoozed.finish.record.outcome, AttemptOutcome::Snoozed);
    }

    #[tokio::test]
    async fn closures_and_unknown_kinds_run_in_a_registry() {
        let mut registry = Registry::new();
        registry.register("typed", |args: u32, _ctx: JobContext| async move {
            Ok(if args > 1 {
                Outcome::Done
            } else {
                Outcome::fail("too small")
            })
        });
        let ok = run_in(&registry, NewJob::new("typed", json!(2))).await;
        assert_eq!(ok.state(), JobState::Completed);
        let small = run_in(&registry, NewJob::new("typed", json!(1))).await;
        assert_eq!(small.state(), JobState::Dead);
        let mismatched = run_in(&registry, NewJob::new("typed", json!("x"))).await;
        assert_eq!(mismatched.state(), JobState::Dead);
        assert!(
            mismatched
                .error()
                .unwrap()
                .contains("args do not match kind `typed`")
        );
        let unknown = run_in(&registry, NewJob::new("other", json!({}))).await;
        assert_eq!(unknown.state(), JobState::Scheduled);
        assert!(
            unknown
                .error()
                .unwrap()
                .starts_with("no handler for kind `other`")
        );
    }
}
