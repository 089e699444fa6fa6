//! What one apalis worker on a Conveyor store claims, and how.

use std::time::Duration;

use conveyor_worker::JobArgs;
use conveyor_worker::RetryPolicy;
use conveyor_worker::job::check_name;
use conveyor_worker::runtime::{QueueConfig, WorkerConfig, default_worker_id};

/// Settings of one [`ConveyorBackend`](crate::ConveyorBackend). The defaults are the native
/// runtime's ([`WorkerConfig::default`]): a 30 s lease renewed every 10 s, claims of up to
/// 100 jobs, a 1 s poll when no wake-up arrives, 10 jobs at once.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The job kind this worker runs. A claimed job of another kind is handed back as the
    /// native runtime hands back a kind it has no handler for: it waits, without using an
    /// attempt, for a worker that has the kind.
    pub kind: String,
    /// The queues claimed from, in turn.
    pub queues: Vec<String>,
    /// The lease owner written on each claimed job. Default: `<hostname>-<pid>-<random>`,
    /// unique per process.
    pub worker_id: String,
    /// Most jobs claimed and running at once (the native runtime's per-queue concurrency).
    pub concurrency: u32,
    /// Most jobs claimed by one fetch (capped by `concurrency`).
    pub fetch_batch: u32,
    /// How long a claim lasts without a heartbeat.
    pub lease: Duration,
    /// How often the leases of running jobs are renewed (at most half of `lease`).
    pub heartbeat: Duration,
    /// How often an idle worker looks for jobs without a wake-up from the store.
    pub poll_interval: Duration,
    /// Backoff between attempts of a failed job.
    pub retry: RetryPolicy,
    /// Most outcomes written by one `Store::finish`.
    pub completion_batch: usize,
}

impl Config {
    /// Runs `kind` from `queue`, with the native runtime's defaults.
    pub fn new(kind: impl Into<String>, queue: impl Into<String>) -> Self {
        let native = WorkerConfig::default();
        Self {
            kind: kind.into(),
            queues: vec![queue.into()],
            worker_id: default_worker_id(),
            concurrency: 10,
            fetch_batch: native.fetch_batch,
            lease: native.lease,
            heartbeat: native.heartbeat,
            poll_interval: native.poll_interval,
            retry: RetryPolicy::default(),
            completion_batch: native.completion_batch,
        }
    }

    /// Runs the typed kind `A`: its kind name, its queue and its retry policy.
    pub fn for_args<A: JobArgs>() -> Self {
        Self {
            retry: A::retry_policy(),
            ..Self::new(A::KIND, A::QUEUE)
        }
    }

    /// Claims from these queues instead.
    pub fn queues<I, S>(mut self, queues: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.queues = queues.into_iter().map(Into::into).collect();
        self
    }

    /// Runs at most this many jobs at once.
    pub fn concurrency(mut self, concurrency: u32) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Claims at most this many jobs per fetch.
    pub fn fetch_batch(mut self, fetch_batch: u32) -> Self {
        self.fetch_batch = fetch_batch;
        self
    }

    /// Writes this lease owner on claimed jobs.
    pub fn worker_id(mut self, worker_id: impl Into<String>) -> Self {
        self.worker_id = worker_id.into();
        self
    }

    /// Leases claims for `lease`, renewed every `heartbeat`.
    pub fn lease(mut self, lease: Duration, heartbeat: Duration) -> Self {
        self.lease = lease;
        self.heartbeat = heartbeat;
        self
    }

    /// Looks for jobs this often without a wake-up.
    pub fn poll_interval(mut self, poll_interval: Duration) -> Self {
        self.poll_interval = poll_interval;
        self
    }

    /// Waits this long between attempts of a failed job.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Checks the settings with the native runtime's rules, naming the key and the fix.
    pub fn validate(&self) -> conveyor_worker::Result<()> {
        check_name("kind", &self.kind)?;
        WorkerConfig {
            id: self.worker_id.clone(),
            queues: self
                .queues
                .iter()
                .map(|name| QueueConfig {
                    name: name.clone(),
                    concurrency: self.concurrency,
                })
                .collect(),
            lease: self.lease,
            heartbeat: self.heartbeat,
            poll_interval: self.poll_interval,
            fetch_batch: self.fetch_batch,
            completion_batch: self.completion_batch,
            ..WorkerConfig::default()
        }
        .validate()
    }
}
