//! The worker runtime: runs the jobs of one or more queues from a [`Store`].
//!
//! How the parts call each other (`Worker::run` starts them all):
//! - [`fetch`]: one loop per queue. It waits for free slots (a semaphore of the queue's
//!   concurrency), claims up to that many jobs in one `Store::fetch`, and spawns each job with
//!   its slot. It sleeps on a wake-up (store event) or the poll interval when the queue is dry.
//!   After a failed fetch it asks the store for jobs leased to this worker that it does not
//!   hold (a claim applied whose answer was lost) and runs them.
//! - [`execute`]: runs one handler under its timeout, catches panics, honours cancellation and
//!   turns the result into a `store::Finish` via [`transition`] — the one place that decides
//!   a job's next state.
//! - [`completer`]: drains finished outcomes from a channel and writes them with one
//!   `Store::finish` per batch, so completion never costs a round trip per job. A job's slot
//!   is freed when its outcome is written, not when its handler returns: a worker whose
//!   writes fail (a full disk) claims no more jobs than its concurrency.
//! - [`heartbeat`]: renews every lease this process holds with one statement (none while
//!   outcome writes have failed for longer than a lease, so peers can take the jobs), fires the
//!   cancel token of jobs whose cancellation was requested, and refreshes this worker's
//!   [`registration`] (a record with a TTL that the API lists).
//! - [`pause`]: a watcher reads the queues' settings every second; a fetch loop whose queue
//!   is paused fetches nothing until it is resumed.
//!
//! Shutdown: stop fetching, let running jobs finish within the grace period, then interrupt
//! the rest (they go back to `available` without using an attempt), flush the completer, exit.
//! The flush has what is left of the grace period plus [`FLUSH_BOUND`]; outcomes the store
//! still refuses then are given up and logged (their leases expire and the rescuer retries
//! them), so a store that cannot be written never keeps a worker from stopping.

mod completer;
pub(crate) mod execute;
mod fetch;
mod heartbeat;
pub mod pause;
pub mod registration;
pub(crate) mod transition;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::{SKEW_WARNING, StoreClock};
use crate::error::{Error, Result};
use crate::handler::Registry;
use crate::job::{JobId, check_name};
use crate::store::{Finish, Store, StoreEvent};

pub use transition::{Ended, transition, within_result_limit};

/// How long shutdown waits for outcomes to be written beyond `shutdown_grace`.
pub const FLUSH_BOUND: Duration = Duration::from_secs(5);

/// An attempt's outcome on its way to the store, with the queue slot its job took: the slot
/// is freed once the outcome is written (or given up at shutdown).
pub(crate) struct Completion {
    pub finish: Finish,
    pub _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// One queue this worker runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueConfig {
    /// Queue name.
    pub name: String,
    /// How many of its jobs run at once in this process.
    pub concurrency: u32,
}

/// Worker settings. Defaults are in [`WorkerConfig::default`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// This process's id, stored as the lease owner. Default: `<hostname>-<pid>-<random>`.
    pub id: String,
    /// Queues to run (default: `default` with concurrency 10).
    pub queues: Vec<QueueConfig>,
    /// How long a claim lasts without a heartbeat (default 30 s).
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often leases are renewed (default 10 s; must be well under `lease`).
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Fallback poll when no wake-up arrives (default 1 s).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Most jobs claimed by one fetch (default 100; capped by the queue's concurrency).
    pub fetch_batch: u32,
    /// How long running jobs may finish after shutdown begins (default 30 s). Writing their
    /// outcomes may take [`FLUSH_BOUND`] more; outcomes the store refuses then are given up.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long a cancelled job's handler may take to stop on its own before it is dropped
    /// (default 5 s).
    #[serde(with = "humantime_serde")]
    pub cancel_grace: Duration,
    /// Most outcomes written by one `finish` statement (default 1,000).
    pub completion_batch: usize,
    /// Outcome batches written at once, each on its own store connection.
    pub completion_writers: usize,
    /// The most a job's result may take, serialized (default 64 KiB). A handler returning
    /// more fails its attempt with an error that says so; nothing is cut short.
    pub max_result_bytes: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            id: default_worker_id(),
            queues: vec![QueueConfig {
                name: "default".into(),
                concurrency: 10,
            }],
            lease: Duration::from_secs(30),
            heartbeat: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
            fetch_batch: 100,
            shutdown_grace: Duration::from_secs(30),
            cancel_grace: Duration::from_secs(5),
            completion_batch: 1000,
            completion_writers: 3,
            max_result_bytes: crate::job::DEFAULT_MAX_RESULT_BYTES,
        }
    }
}

/// `<hostname>-<pid>-<4 random hex>`: unique per process even when a pid is reused after a
/// restart, so a restarted worker never mistakes an old lease for its own.
pub fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

impl WorkerConfig {
    /// Checks the settings, naming the key and the fix.
    pub fn validate(&self) -> Result<()> {
        if self.id.is_empty() {
            return Err(Error::invalid("worker.id", "must not be empty"));
        }
        if self.queues.is_empty() {
            return Err(Error::invalid(
                "worker.queues",
                "name at least one queue, e.g. [[worker.queues]] name = \"default\" concurrency = 10",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for q in &self.queues {
            check_name("worker.queues.name", &q.name)?;
            if q.concurrency == 0 {
                return Err(Error::invalid(
                    "worker.queues.concurrency",
                    format!("queue `{}` needs a concurrency of at least 1", q.name),
                ));
            }
            if !seen.insert(q.name.as_str()) {
                return Err(Error::invalid(
                    "worker.queues",
                    format!("queue `{}` is listed twice", q.name),
                ));
            }
        }
        if self.heartbeat.is_zero() || self.heartbeat * 2 > self.lease {
            return Err(Error::invalid(
                "worker.heartbeat",
                format!(
                    "must be non-zero and at most half of worker.lease ({:?}), got {:?}",
                    self.lease, self.heartbeat
                ),
            ));
        }
        if self.poll_interval.is_zero() {
            return Err(Error::invalid("worker.poll_interval", "must be non-zero"));
        }
        if self.fetch_batch == 0 || self.completion_batch == 0 {
            return Err(Error::invalid(
                "worker.fetch_batch",
                "fetch_batch and completion_batch must be at least 1",
            ));
        }
        Ok(())
    }
}

/// State shared by the parts of one running worker.
pub(crate) struct Shared {
    pub store: Arc<dyn Store>,
    pub registry: Arc<Registry>,
    pub config: WorkerConfig,
    pub worker_id: Arc<str>,
    /// Cancel tokens of the jobs running here, so a cancel request can reach them.
    pub running: Mutex<HashMap<JobId, CancellationToken>>,
    /// Jobs this process claimed whose outcome is not written yet: from the fetch that
    /// returned them until the completer's write succeeds. A job the store leases to this
    /// worker that is not here was claimed by a fetch whose answer was lost.
    pub held: Mutex<HashSet<JobId>>,
    /// Fired when the shutdown grace period runs out: running handlers are dropped.
    pub interrupt: CancellationToken,
    /// Per-queue state shared by its fetch loop, its jobs, the pause watcher and the heartbeat.
    pub queues: HashMap<String, Arc<QueueState>>,
    /// When this worker started.
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// Since when every outcome write has failed (`None`: the last one succeeded).
    pub write_failing: Mutex<Option<Instant>>,
    /// The store's clock, which every time this worker writes is taken on (an attempt's end,
    /// a retry's due time): measured at start and at every heartbeat.
    pub clock: Arc<StoreClock>,
}

/// One queue of this worker.
pub(crate) struct QueueState {
    pub config: QueueConfig,
    /// One permit per job slot; `concurrency - available` jobs run now.
    pub slots: Arc<tokio::sync::Semaphore>,
    /// Attempts finished (any outcome), for the registration's throughput.
    pub finished: std::sync::atomic::AtomicU64,
    /// The queue is paused (from the store's `queues` records).
    pub paused: std::sync::atomic::AtomicBool,
    /// Wakes the fetch loop (new jobs, or the queue was resumed).
    pub wake: Arc<Notify>,
}

impl QueueState {
    /// Jobs running now.
    pub fn running(&self) -> u32 {
        let free = self.slots.available_permits() as u32;
        self.config.concurrency.saturating_sub(free)
    }
}

impl Shared {
    /// Locks [`Shared::held`].
    pub fn held(&self) -> std::sync::MutexGuard<'_, HashSet<JobId>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a failed outcome write (the start of a failing streak is kept).
    pub fn write_failed(&self) {
        let mut since = self.write_failing.lock().unwrap_or_else(|e| e.into_inner());
        since.get_or_insert_with(Instant::now);
    }

    /// Records a successful outcome write: the store takes writes again.
    pub fn write_succeeded(&self) {
        *self.write_failing.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// How long outcome writes have been failing, if they are.
    pub fn write_failing_for(&self) -> Option<Duration> {
        self.write_failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed())
    }

    /// Fires the cancel token of a job if it runs here.
    pub fn cancel_running(&self, id: JobId) -> bool {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        match running.get(&id) {
            Some(token) => {
                token.cancel();
                true
            }
            None => false,
        }
    }
}

/// A worker process's job runner. Build it, then `run` it with a shutdown token.
pub struct Worker {
    shared: Arc<Shared>,
}

impl Worker {
    /// A worker running `registry`'s kinds from `store`.
    pub fn new(store: Arc<dyn Store>, registry: Registry, config: WorkerConfig) -> Result<Self> {
        config.validate()?;
        let worker_id: Arc<str> = config.id.as_str().into();
        let queues = config
            .queues
            .iter()
            .map(|q| {
                let state = QueueState {
                    config: q.clone(),
                    slots: Arc::new(tokio::sync::Semaphore::new(q.concurrency as usize)),
                    finished: Default::default(),
                    paused: Default::default(),
                    wake: Arc::new(Notify::new()),
                };
                (q.name.clone(), Arc::new(state))
            })
            .collect();
        Ok(Self {
            shared: Arc::new(Shared {
                store,
                registry: Arc::new(registry),
                config,
                worker_id,
                running: Mutex::new(HashMap::new()),
                held: Mutex::new(HashSet::new()),
                interrupt: CancellationToken::new(),
                queues,
                started_at: chrono::Utc::now(),
                write_failing: Mutex::new(None),
                clock: Arc::new(StoreClock::new()),
            }),
        })
    }

    /// This worker's id (its lease owner name).
    pub fn id(&self) -> &str {
        &self.shared.worker_id
    }

    /// Runs until `shutdown` fires, then shuts down gracefully (see the module docs).
    /// Returns once every outcome has been written back.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let shared = self.shared;
        let config = &shared.config;
        tracing::info!(
            worker.id = %shared.worker_id,
            queues = ?config.queues.iter().map(|q| format!("{}={}", q.name, q.concurrency)).collect::<Vec<_>>(),
            kinds = ?shared.registry.kinds(),
            "worker started"
        );

        sync_clock(&shared).await;
        let (done_tx, done_rx) = mpsc::channel(config.completion_batch.max(1024));
        let give_up = CancellationToken::new();
        let mut completer = tokio::spawn(completer::run(shared.clone(), done_rx, give_up.clone()));

        // Background parts that live until the jobs are done, not just until shutdown.
        let background = CancellationToken::new();
        let wakers: HashMap<String, Arc<Notify>> = shared
            .queues
            .iter()
            .map(|(name, q)| (name.clone(), q.wake.clone()))
            .collect();
        // Paused queues are known before the first fetch.
        pause::refresh(&shared).await;
        let watcher = tokio::spawn(pause::watch(shared.clone(), background.clone()));
        let events = tokio::spawn(dispatch_events(
            shared.clone(),
            wakers.clone(),
            background.clone(),
        ));
        let heartbeat = tokio::spawn(heartbeat::run(shared.clone(), background.clone()));

        let jobs = TaskTracker::new();
        let fetchers = TaskTracker::new();
        for q in &config.queues {
            fetchers.spawn(fetch::run(
                shared.clone(),
                shared.queues[&q.name].clone(),
                jobs.clone(),
                done_tx.clone(),
                shutdown.clone(),
            ));
        }
        drop(done_tx);
        fetchers.close();
        fetchers.wait().await;
        tracing::info!(worker.id = %shared.worker_id, "shutting down: fetching stopped, waiting for running jobs");

        let grace_ends = tokio::time::Instant::now() + config.shutdown_grace;
        jobs.close();
        if tokio::time::timeout_at(grace_ends, jobs.wait())
            .await
            .is_err()
        {
            let n = jobs.len();
            tracing::warn!(
                running = n,
                grace = ?config.shutdown_grace,
                "grace period over: interrupting running jobs; they go back to the queue"
            );
            shared.interrupt.cancel();
            jobs.wait().await;
        }

        // Every job task has sent its outcome and dropped its sender: the completer drains
        // the channel and returns, unless the store refuses the writes; then what is left is
        // given up once the grace period and the flush bound are over.
        let flush_ends = grace_ends.max(tokio::time::Instant::now()) + FLUSH_BOUND;
        let flushed = match tokio::time::timeout_at(flush_ends, &mut completer).await {
            Ok(r) => r,
            Err(_) => {
                give_up.cancel();
                completer.await
            }
        };
        background.cancel();
        let _ = heartbeat.await;
        let _ = events.await;
        let _ = watcher.await;
        if tokio::time::timeout(FLUSH_BOUND, registration::remove(&shared))
            .await
            .is_err()
        {
            tracing::warn!("removing this worker's registration timed out; it expires by itself");
        }
        match flushed {
            Ok(result) => result,
            Err(e) => Err(Error::Unsupported(format!("completer task failed: {e}"))),
        }
    }
}

/// Measures the offset between this machine's clock and the store's. A failed measurement
/// keeps the last offset (the local clock before the first); the next heartbeat measures again.
pub(crate) async fn sync_clock(shared: &Shared) {
    let before = shared.clock.age().map(|_| shared.clock.offset());
    match shared.clock.sync(shared.store.as_ref()).await {
        Ok(offset) => {
            let large = offset.abs().to_std().is_ok_and(|d| d >= SKEW_WARNING);
            // Warn when the skew is first seen or changes by more than the warning threshold,
            // not at every heartbeat.
            let changed =
                before.is_none_or(|b| (offset - b).abs().to_std().is_ok_and(|d| d >= SKEW_WARNING));
            if large && changed {
                tracing::warn!(
                    worker.id = %shared.worker_id,
                    offset_ms = offset.num_milliseconds(),
                    "this machine's clock differs from the store's; leases and due times use the store's clock, but check this machine's time sync (NTP)"
                );
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "reading the store's clock failed; keeping the last known offset")
        }
    }
}

/// Routes store events: wake-ups to the queue's fetch loop, cancel requests to the job.
async fn dispatch_events(
    shared: Arc<Shared>,
    wakers: HashMap<String, Arc<Notify>>,
    stop: CancellationToken,
) {
    let mut rx = shared.store.subscribe();
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            e = rx.recv() => e,
        };
        match event {
            Ok(StoreEvent::JobsAvailable { queue }) => {
                if let Some(n) = wakers.get(&queue) {
                    n.notify_one();
                }
            }
            Ok(StoreEvent::CancelRequested { id }) => {
                shared.cancel_running(id);
            }
            Ok(StoreEvent::JobsChanged { .. }) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                // Missed events: wake every queue; the heartbeat catches missed cancels.
                for n in wakers.values() {
                    n.notify_one();
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}
