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

use crate::job::{DEFAULT_MAX_ATTEMPTS, Job, NewJob};
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
        let progress =
            crate::job::Progress::reported(self.job.attempt, percent, message.into(), self.now());
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

/// A job kind's one definition, shared by the code that enqueues it and the code that runs
/// it: the kind name, the args type (this type) and the defaults of every job that carries
/// these args. The enqueue paths (`conveyor_client`'s `Client`, `StoreClient` and
/// `enqueue_in`) build jobs with [`JobArgs::to_job`], so they serialize from the type and take
/// its defaults; the worker registers the handler with [`Registry::kind`] (for a [`Handler`])
/// or [`Registry::handle`], with the timeout and retry policy the type names. A kind name or
/// an args shape cannot drift between the two.
///
/// Every default but `KIND` has a value, so a type states only what differs:
///
/// ```
/// use std::time::Duration;
/// use conveyor_worker::JobArgs;
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct SendInvoice {
///     invoice: u64,
/// }
///
/// impl JobArgs for SendInvoice {
///     const KIND: &'static str = "invoice.send";
///     const QUEUE: &'static str = "billing";
///     const MAX_ATTEMPTS: i32 = 5;
///     const TIMEOUT: Option<Duration> = Some(Duration::from_secs(30));
///     // Equal args enqueued within the same hour make one job.
///     const UNIQUE_FOR: Option<Duration> = Some(Duration::from_secs(3600));
/// }
///
/// let job = SendInvoice { invoice: 42 }.to_job().unwrap();
/// assert_eq!((job.kind.as_str(), job.queue.as_str(), job.max_attempts), ("invoice.send", "billing", 5));
/// assert!(job.idempotency_key.unwrap().starts_with("unique:invoice.send:"));
/// ```
pub trait JobArgs: Serialize + DeserializeOwned + Send + 'static {
    /// The permanent kind name.
    const KIND: &'static str;
    /// The queue its jobs go to unless the enqueue names another.
    const QUEUE: &'static str = "default";
    /// Their priority (smaller runs first).
    const PRIORITY: i16 = 0;
    /// Attempts before a job goes `dead`.
    const MAX_ATTEMPTS: i32 = DEFAULT_MAX_ATTEMPTS;
    /// An attempt running longer is cancelled and counts as a failure. `None`: no limit.
    const TIMEOUT: Option<Duration> = None;
    /// Uniqueness: with `Some(window)`, a job gets an idempotency key derived from its kind,
    /// its args and the window of that length it is enqueued in (windows are counted from
    /// the Unix epoch on the enqueuing machine's clock), so equal args enqueued within one
    /// window make one job; the later enqueues answer `duplicate` with the first job. The
    /// store keeps a finished job's key for the key window
    /// (`maintenance.pruner.retention.idempotency`, default 1 day): a longer uniqueness
    /// window needs a longer key window.
    /// An idempotency key given at enqueue replaces the derived one.
    const UNIQUE_FOR: Option<Duration> = None;

    /// The backoff between its attempts.
    fn retry_policy() -> RetryPolicy {
        RetryPolicy::default()
    }

    /// The worker-side settings: [`JobArgs::TIMEOUT`] and [`JobArgs::retry_policy`].
    fn kind_options() -> KindOptions {
        KindOptions {
            timeout: Self::TIMEOUT,
            retry: Self::retry_policy(),
        }
    }

    /// A job carrying these args with the type's defaults (queue, priority, attempts, and
    /// the uniqueness key as of now).
    fn to_job(&self) -> Result<NewJob, serde_json::Error> {
        self.to_job_at(chrono::Utc::now())
    }

    /// [`JobArgs::to_job`] with the uniqueness window of `now`.
    fn to_job_at(&self, now: chrono::DateTime<chrono::Utc>) -> Result<NewJob, serde_json::Error> {
        let args = serde_json::to_value(self)?;
        let key = Self::UNIQUE_FOR.map(|window| unique_key(Self::KIND, &args, window, now));
        let mut job = NewJob::new(Self::KIND, args)
            .queue(Self::QUEUE)
            .priority(Self::PRIORITY)
            .max_attempts(Self::MAX_ATTEMPTS);
        if let Some(key) = key {
            job = job.idempotency_key(key);
        }
        Ok(job)
    }
}

/// The idempotency key of a unique job (see [`JobArgs::UNIQUE_FOR`]):
/// `unique:<kind>:<SHA-256 of the args' JSON, hex>:<window number>`, where the window number
/// is the count of whole `window`s from the Unix epoch to `now`. A zero window counts as one
/// second.
pub fn unique_key(
    kind: &str,
    args: &serde_json::Value,
    window: Duration,
    now: chrono::DateTime<chrono::Utc>,
) -> String {
    use sha2::{Digest, Sha256};
    use std::fmt::Write;
    // `serde_json::Value` keeps object keys sorted, so equal args hash equally whatever
    // order their fields were written in.
    let digest = Sha256::digest(args.to_string().as_bytes());
    let mut hash = String::with_capacity(64);
    for byte in digest {
        let _ = write!(hash, "{byte:02x}");
    }
    let window_ms = window.as_millis().max(1000);
    let bucket = i128::from(now.timestamp_millis()).div_euclid(window_ms as i128);
    format!("unique:{kind}:{hash}:{bucket}")
}

/// The handler of a kind, defined on its args type ([`JobArgs`]): registered with
/// [`Registry::kind`] (or `conveyor::App::kind`) under [`JobArgs::KIND`], with the type's
/// timeout and retry policy.
///
/// `Err` is a retryable failure (with its cause chain in the attempt history); an
/// [`Outcome`] says everything else. A handler that runs long should watch
/// [`JobContext::cancelled`] and return when it fires (a cancel request, the timeout, or a
/// shutdown past its grace period).
///
/// When the args type lives in a crate the handler's crate does not own (a crate shared with
/// the enqueuing service), register a closure with [`Registry::handle`] instead: it takes the
/// same defaults from the type.
pub trait Handler: JobArgs {
    /// Runs one attempt.
    fn run(self, ctx: JobContext) -> impl Future<Output = anyhow::Result<Outcome>> + Send;
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

type CheckFn = dyn Fn(&serde_json::Value) -> Result<(), String> + Send + Sync;

/// A registered kind: its erased handler and options.
#[derive(Clone)]
pub struct Registered {
    handler: Arc<ErasedFn>,
    check: Arc<CheckFn>,
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

    /// Whether `args` deserialize into the kind's args type; the error names where they do
    /// not (`amount: invalid type: string "x", expected u64`).
    pub fn check(&self, args: &serde_json::Value) -> Result<(), String> {
        (self.check)(args)
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
        let check = |args: &serde_json::Value| {
            serde_path_to_error::deserialize::<_, A>(args)
                .map(drop)
                .map_err(|e| match e.path().to_string() {
                    path if path == "." => e.into_inner().to_string(),
                    path => format!("{path}: {}", e.into_inner()),
                })
        };
        self.kinds.insert(
            kind.to_string(),
            Registered {
                handler: Arc::new(handler),
                check: Arc::new(check),
                options,
            },
        );
        self
    }

    /// Registers a typed kind ([`JobArgs`]) with `options`; `A::kind_options()` are the
    /// type's own.
    pub fn handle<A, F, Fut>(&mut self, options: KindOptions, f: F) -> &mut Self
    where
        A: JobArgs,
        F: Fn(A, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<Outcome>> + Send + 'static,
    {
        self.register_with(A::KIND, options, f)
    }

    /// Registers a kind whose args type is its [`Handler`], with the type's timeout and
    /// retry policy.
    pub fn kind<T: Handler>(&mut self) -> &mut Self {
        self.register_with(T::KIND, T::kind_options(), |args: T, ctx: JobContext| {
            args.run(ctx)
        })
    }

    /// Refuses `args` that do not deserialize into the args type of `kind`, when `kind` is
    /// registered here (any args pass for a kind that is not: another process may run it).
    /// The error names the field `args` and says where the args differ from the type.
    pub fn check_args(&self, kind: &str, args: &serde_json::Value) -> Result<(), crate::Error> {
        match self.kinds.get(kind) {
            Some(registered) => registered.check(args).map_err(|e| {
                crate::Error::invalid(
                    "args",
                    format!("do not match kind `{kind}`: {e}; send args of the kind's type"),
                )
            }),
            None => Ok(()),
        }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::{TimeZone, Utc};
    use serde::{Deserialize, Serialize};
    use serde_json::json;

    use super::*;

    #[derive(Serialize, Deserialize)]
    struct Charge {
        order: u64,
        note: String,
    }

    impl JobArgs for Charge {
        const KIND: &'static str = "card.charge";
        const QUEUE: &'static str = "billing";
        const PRIORITY: i16 = -2;
        const MAX_ATTEMPTS: i32 = 4;
        const TIMEOUT: Option<Duration> = Some(Duration::from_secs(9));
        const UNIQUE_FOR: Option<Duration> = Some(Duration::from_secs(3600));

        fn retry_policy() -> RetryPolicy {
            RetryPolicy {
                base: Duration::from_secs(7),
                ..RetryPolicy::default()
            }
        }
    }

    impl Handler for Charge {
        async fn run(self, _ctx: JobContext) -> anyhow::Result<Outcome> {
            Ok(Outcome::Done)
        }
    }

    fn at(h: u32, m: u32) -> chrono::DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, h, m, 0).unwrap()
    }

    #[test]
    fn a_job_takes_its_types_defaults() {
        let charge = Charge {
            order: 7,
            note: "x".into(),
        };
        let job = charge.to_job_at(at(10, 5)).unwrap();
        assert_eq!(job.kind, "card.charge");
        assert_eq!(job.queue, "billing");
        assert_eq!(job.priority, -2);
        assert_eq!(job.max_attempts, 4);
        assert_eq!(job.args, json!({"order": 7, "note": "x"}));
        let key = job.idempotency_key.unwrap();
        assert!(key.starts_with("unique:card.charge:"), "{key}");
        // Same args, same hour: the same key. The next hour, or other args: another.
        assert_eq!(
            charge.to_job_at(at(10, 59)).unwrap().idempotency_key,
            Some(key.clone())
        );
        assert_ne!(
            charge.to_job_at(at(11, 0)).unwrap().idempotency_key,
            Some(key.clone())
        );
        let other = Charge {
            order: 8,
            note: "x".into(),
        };
        assert_ne!(
            other.to_job_at(at(10, 5)).unwrap().idempotency_key,
            Some(key)
        );
        let options = Charge::kind_options();
        assert_eq!(options.timeout, Some(Duration::from_secs(9)));
        assert_eq!(options.retry.base, Duration::from_secs(7));
    }

    #[test]
    fn a_unique_key_ignores_field_order_and_fits_the_key_rules() {
        let now = at(0, 0);
        let window = Duration::from_secs(60);
        let a = unique_key("k", &json!({"a": 1, "b": [1, 2]}), window, now);
        let b = unique_key(
            "k",
            &serde_json::from_str(r#"{"b":[1,2],"a":1}"#).unwrap(),
            window,
            now,
        );
        assert_eq!(a, b);
        let long_kind = "k".repeat(120);
        let job = NewJob::new(long_kind.as_str(), json!({})).idempotency_key(unique_key(
            &long_kind,
            &json!({}),
            window,
            now,
        ));
        job.validate().expect("a derived key is a valid key");
    }

    #[test]
    fn registered_kinds_check_args_and_name_where_they_differ() {
        let mut registry = Registry::new();
        registry.kind::<Charge>();
        let registered = registry.get("card.charge").unwrap();
        assert_eq!(registered.options.timeout, Some(Duration::from_secs(9)));
        registry
            .check_args("card.charge", &json!({"order": 1, "note": ""}))
            .unwrap();
        let err = registry
            .check_args("card.charge", &json!({"order": "1", "note": ""}))
            .unwrap_err();
        match err {
            crate::Error::InvalidInput { field, message } => {
                assert_eq!(field, "args");
                assert!(
                    message.starts_with(
                        "do not match kind `card.charge`: order: invalid type: string \"1\""
                    ),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        let err = registry
            .check_args("card.charge", &json!({"order": 1}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `note`"), "{err}");
        // A kind this registry does not have is another process's business.
        registry
            .check_args("email.send", &json!("anything"))
            .unwrap();
    }
}
