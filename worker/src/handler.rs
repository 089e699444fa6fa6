//! Handlers: what a job kind runs, the outcome it returns, and the registry of kinds.
//!
//! A handler is an async function of typed args and a [`JobContext`] that returns
//! `anyhow::Result<Outcome>`. `Err` is a retryable failure; [`Outcome`] says everything else
//! (done, retry after a given delay, snooze, cancel, permanent failure). The runtime turns the
//! outcome into the job's next state in one place (`runtime::transition`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::job::{Job, NewJob};
use crate::retry_policy::RetryPolicy;

/// An error as recorded in the attempt history: the message and its cause chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobError {
    /// Top-level message.
    pub message: String,
    /// Causes, outermost first.
    pub causes: Vec<String>,
}

impl JobError {
    /// An error with just a message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            causes: Vec::new(),
        }
    }

    /// Captures an `anyhow` error with its whole chain.
    pub fn from_anyhow(err: &anyhow::Error) -> Self {
        let mut chain = err.chain().map(ToString::to_string);
        Self {
            message: chain.next().unwrap_or_default(),
            causes: chain.collect(),
        }
    }

    /// Captures a standard error with its `source()` chain.
    pub fn from_std(err: &(dyn std::error::Error + 'static)) -> Self {
        let mut causes = Vec::new();
        let mut next = err.source();
        while let Some(cause) = next {
            causes.push(cause.to_string());
            next = cause.source();
        }
        Self {
            message: err.to_string(),
            causes,
        }
    }
}

impl From<anyhow::Error> for JobError {
    fn from(err: anyhow::Error) -> Self {
        Self::from_anyhow(&err)
    }
}

/// What a handler asks the runtime to do with its job.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Success: the job is `completed`.
    Done,
    /// Success with a result value: the job is `completed` and keeps the value (see
    /// [`Outcome::done_with`]). A value over `worker.max_result_bytes` serialized fails the
    /// attempt instead, with an error that says so.
    DoneWith(serde_json::Value),
    /// Try again: after `after` if given (e.g. from a `Retry-After` header), else after the
    /// kind's backoff. Counts as a failed attempt; with attempts exhausted the job is `dead`.
    Retry {
        /// Delay override.
        after: Option<Duration>,
        /// Why, for the history.
        error: JobError,
    },
    /// Run again after this delay without using an attempt.
    Snooze(Duration),
    /// Stop for good as `cancelled` (not a failure).
    Cancel {
        /// Why, for the history.
        reason: String,
    },
    /// A permanent failure: the job is `dead` at once, whatever attempts remain.
    Fail(JobError),
}

impl Outcome {
    /// Success with `result`, kept with the job and returned by `GET /v1/jobs/{id}`.
    pub fn done_with<T: Serialize + ?Sized>(result: &T) -> Result<Self, serde_json::Error> {
        Ok(Outcome::DoneWith(serde_json::to_value(result)?))
    }

    /// Whether this is a success ([`Outcome::Done`] or [`Outcome::DoneWith`]).
    pub fn is_done(&self) -> bool {
        matches!(self, Outcome::Done | Outcome::DoneWith(_))
    }

    /// A retry after the kind's backoff.
    pub fn retry(error: impl Into<String>) -> Self {
        Outcome::Retry {
            after: None,
            error: JobError::new(error),
        }
    }

    /// A retry after a given delay.
    pub fn retry_after(after: Duration, error: impl Into<String>) -> Self {
        Outcome::Retry {
            after: Some(after),
            error: JobError::new(error),
        }
    }

    /// A permanent failure.
    pub fn fail(error: impl Into<String>) -> Self {
        Outcome::Fail(JobError::new(error))
    }

    /// A cancellation.
    pub fn cancel(reason: impl Into<String>) -> Self {
        Outcome::Cancel {
            reason: reason.into(),
        }
    }
}

/// What a handler knows about the job it runs.
#[derive(Clone, Debug)]
pub struct JobContext {
    /// The job as claimed (attempt already counts this run).
    pub job: Arc<Job>,
    /// The worker process running it.
    pub worker_id: Arc<str>,
    cancel: CancellationToken,
    /// The store's clock as the worker measures it; `None`: this machine's clock.
    clock: Option<Arc<crate::clock::StoreClock>>,
    /// Where progress goes; `None` (a context built by hand): progress is only kept here.
    progress: Option<Arc<ProgressReporter>>,
}

impl JobContext {
    /// Builds a context; the runtime does this, tests of handlers may too.
    pub fn new(job: Arc<Job>, worker_id: Arc<str>, cancel: CancellationToken) -> Self {
        Self {
            job,
            worker_id,
            cancel,
            clock: None,
            progress: None,
        }
    }

    /// With progress reports written to `store` (the runtime sets it).
    pub fn with_progress(mut self, store: Arc<dyn crate::store::Store>) -> Self {
        self.progress = Some(Arc::new(ProgressReporter {
            store,
            id: self.job.id,
            sender: std::sync::Mutex::new(None),
        }));
        self
    }

    /// Reports how far the attempt has got: `percent` (clamped to 0–100) and an optional
    /// message (at most [`crate::job::PROGRESS_MESSAGE_LIMIT`] bytes are kept). Returns at
    /// once; the store is written at most every [`PROGRESS_INTERVAL`] per job, always with
    /// the latest report, so calling it in a tight loop is cheap. `GET /v1/jobs/{id}` shows
    /// it while the job runs (and the last one written after it ends).
    pub fn progress(&self, percent: f32, message: impl Into<Option<String>>) {
        let mut message: Option<String> = message.into();
        if let Some(m) = message.as_mut()
            && m.len() > crate::job::PROGRESS_MESSAGE_LIMIT
        {
            let mut cut = crate::job::PROGRESS_MESSAGE_LIMIT;
            while !m.is_char_boundary(cut) {
                cut -= 1;
            }
            m.truncate(cut);
        }
        let percent = if percent.is_nan() {
            0.0
        } else {
            percent.clamp(0.0, 100.0)
        };
        let progress = crate::job::Progress {
            attempt: self.job.attempt,
            percent,
            message,
            updated_at: self.now(),
        };
        if let Some(reporter) = &self.progress {
            reporter.send(progress);
        }
    }

    /// With the worker's measure of the store's clock (the runtime sets it).
    pub fn with_clock(mut self, clock: Arc<crate::clock::StoreClock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Now on the store's clock (as the worker measures it): the time to use for anything
    /// other processes compare, such as a shared rate limit's or circuit breaker's state.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock
            .as_ref()
            .map_or_else(chrono::Utc::now, |c| c.now())
    }

    /// Resolves when the job is cancelled, timed out or its worker is shutting down past its
    /// grace period. Long handlers should `select!` on it and return promptly.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    /// Whether [`JobContext::cancelled`] has fired.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

/// The shortest time between two progress writes of one job.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

/// Writes one job's progress reports, throttled: the first report starts a writer task that
/// writes the latest report, waits [`PROGRESS_INTERVAL`], and repeats while reports come; it
/// ends once the handler's contexts are gone and the last report is written.
pub(crate) struct ProgressReporter {
    store: Arc<dyn crate::store::Store>,
    id: crate::job::JobId,
    sender: std::sync::Mutex<Option<tokio::sync::watch::Sender<Option<crate::job::Progress>>>>,
}

impl std::fmt::Debug for ProgressReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgressReporter")
            .field("id", &self.id)
            .finish()
    }
}

impl ProgressReporter {
    fn send(&self, progress: crate::job::Progress) {
        let mut sender = self.sender.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = sender.as_ref() {
            tx.send_replace(Some(progress));
            return;
        }
        // Outside a Tokio runtime (a handler called from a plain test) there is nothing to
        // write with.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (tx, mut rx) = tokio::sync::watch::channel(Some(progress));
        rx.mark_changed();
        let store = self.store.clone();
        let id = self.id;
        runtime.spawn(async move {
            while rx.changed().await.is_ok() {
                let latest = rx.borrow_and_update().clone();
                if let Some(p) = latest
                    && let Err(e) = store.report_progress(id, &p).await
                {
                    tracing::debug!(job.id = %id, error = %e, "writing progress failed; the next report tries again");
                }
                tokio::time::sleep(PROGRESS_INTERVAL).await;
            }
        });
        *sender = Some(tx);
    }
}

/// Typed job args that know their kind, for `NewJob::from_args` and `Registry::handle`.
pub trait JobArgs: Serialize + DeserializeOwned + Send + 'static {
    /// The permanent kind name.
    const KIND: &'static str;

    /// A job carrying these args on the default queue.
    fn to_job(&self) -> Result<NewJob, serde_json::Error> {
        Ok(NewJob::new(Self::KIND, serde_json::to_value(self)?))
    }
}

/// Per-kind settings.
#[derive(Clone, Debug, Default)]
pub struct KindOptions {
    /// An attempt running longer is cancelled and counts as a failure. `None`: no limit.
    pub timeout: Option<Duration>,
    /// Backoff between attempts.
    pub retry: RetryPolicy,
}

type ErasedFn = dyn Fn(serde_json::Value, JobContext) -> BoxFuture<'static, anyhow::Result<Outcome>>
    + Send
    + Sync;

/// A registered kind: its erased handler and options.
#[derive(Clone)]
pub struct Registered {
    handler: Arc<ErasedFn>,
    /// The kind's settings.
    pub options: KindOptions,
}

impl Registered {
    /// Runs the handler on raw JSON args. Args that do not deserialize are a permanent failure.
    pub fn call(
        &self,
        args: serde_json::Value,
        ctx: JobContext,
    ) -> BoxFuture<'static, anyhow::Result<Outcome>> {
        (self.handler)(args, ctx)
    }
}

/// The kinds a worker can run.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: HashMap<String, Registered>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("kinds", &self.kinds.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `kind` with default options.
    pub fn register<A, F, Fut>(&mut self, kind: &str, f: F) -> &mut Self
    where
        A: DeserializeOwned + Send + 'static,
        F: Fn(A, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<Outcome>> + Send + 'static,
    {
        self.register_with(kind, KindOptions::default(), f)
    }

    /// Registers `kind` with its own timeout and retry policy.
    pub fn register_with<A, F, Fut>(&mut self, kind: &str, options: KindOptions, f: F) -> &mut Self
    where
        A: DeserializeOwned + Send + 'static,
        F: Fn(A, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<Outcome>> + Send + 'static,
    {
        let kind_name: Arc<str> = kind.into();
        let handler =
            move |args: serde_json::Value, ctx: JobContext| match serde_json::from_value::<A>(args)
            {
                Ok(args) => Box::pin(f(args, ctx)) as BoxFuture<'static, _>,
                Err(e) => {
                    let msg = format!("args do not match kind `{kind_name}`: {e}");
                    Box::pin(async move { Ok(Outcome::fail(msg)) })
                }
            };
        self.kinds.insert(
            kind.to_string(),
            Registered {
                handler: Arc::new(handler),
                options,
            },
        );
        self
    }

    /// Registers a typed kind ([`JobArgs`]).
    pub fn handle<A, F, Fut>(&mut self, options: KindOptions, f: F) -> &mut Self
    where
        A: JobArgs,
        F: Fn(A, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<Outcome>> + Send + 'static,
    {
        self.register_with(A::KIND, options, f)
    }

    /// The handler for `kind`.
    pub fn get(&self, kind: &str) -> Option<&Registered> {
        self.kinds.get(kind)
    }

    /// Registered kind names, sorted.
    pub fn kinds(&self) -> Vec<&str> {
        let mut k: Vec<&str> = self.kinds.keys().map(String::as_str).collect();
        k.sort_unstable();
        k
    }
}
