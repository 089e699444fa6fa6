//! The state one running backend shares with its finish layer: the jobs it holds (each with
//! its concurrency slot), the outcome writer and the heartbeat.
//!
//! - Claims: [`claim`] waits for a free slot, claims a batch with `Store::fetch` from the
//!   queues in turn, and sleeps on the store's wake-ups (or the poll interval) when they are
//!   dry — the native fetch loop's rules, including its low-water mark under a backlog.
//! - Outcomes: the finish layer sends each attempt's `Finish` to [`writer`], which writes
//!   whatever has queued up in one `Store::finish`, as the native completer does, and answers
//!   each sender: written, or refused because the lease had ended.
//! - Leases: [`heartbeat`] renews the leases of the jobs held, every `heartbeat`, and keeps
//!   the store's clock offset fresh. A job leaves `held` (and frees its slot) once its outcome
//!   is written; one that is never finished here expires and is rescued.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use conveyor_worker::clock::StoreClock;
use conveyor_worker::store::{FetchRequest, Finish, StoreEvent};
use conveyor_worker::{Job, JobId, Store};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::Config;
use crate::error::Error;

/// One outcome on its way to the store; `reply` hears whether it was recorded.
pub(crate) struct Outcome {
    pub finish: Finish,
    pub reply: Option<oneshot::Sender<Result<(), Error>>>,
}

pub(crate) struct Shared {
    pub store: Arc<dyn Store>,
    pub config: Arc<Config>,
    pub clock: StoreClock,
    /// Claimed jobs not yet written back, each with its slot.
    held: Mutex<HashMap<JobId, Option<OwnedSemaphorePermit>>>,
    slots: Arc<Semaphore>,
    outcomes: mpsc::UnboundedSender<Outcome>,
    /// Taken by the writer when the background tasks start.
    outcomes_rx: Mutex<Option<mpsc::UnboundedReceiver<Outcome>>>,
    /// Cancelled when shutdown begins: no more claims.
    pub closing: CancellationToken,
    /// Cancelled when the backend is closed or dropped: the heartbeat and writer stop.
    pub stop: CancellationToken,
    started: std::sync::Once,
}

impl Shared {
    pub fn new(store: Arc<dyn Store>, config: Arc<Config>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            slots: Arc::new(Semaphore::new(config.concurrency.max(1) as usize)),
            store,
            config,
            clock: StoreClock::new(),
            held: Mutex::new(HashMap::new()),
            outcomes: tx,
            outcomes_rx: Mutex::new(Some(rx)),
            closing: CancellationToken::new(),
            stop: CancellationToken::new(),
            started: std::sync::Once::new(),
        }
    }

    /// Starts the heartbeat and the writer once, on the runtime that polls the worker.
    pub fn start(self: &Arc<Self>) {
        self.started.call_once(|| {
            let rx = self
                .outcomes_rx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(rx) = rx {
                tokio::spawn(writer(self.clone(), rx));
            }
            tokio::spawn(heartbeat(self.clone()));
        });
    }

    fn held(&self) -> MutexGuard<'_, HashMap<JobId, Option<OwnedSemaphorePermit>>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an outcome for the writer.
    pub fn send(&self, finish: Finish, reply: Option<oneshot::Sender<Result<(), Error>>>) {
        if let Err(mpsc::error::SendError(lost)) = self.outcomes.send(Outcome { finish, reply }) {
            // The writer is gone (the backend was dropped): the job leaves `held`, its lease
            // expires and the rescuer retries it.
            self.held().remove(&lost.finish.id);
            if let Some(reply) = lost.reply {
                let _ = reply.send(Err(Error::Stopped));
            }
        }
    }

    /// Sends an outcome and waits until the store has it.
    pub async fn write(&self, finish: Finish) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.send(finish, Some(tx));
        rx.await.unwrap_or(Err(Error::Stopped))
    }
}

/// Claims the next batch: waits for a free slot, fetches from the queues in turn, and sleeps
/// on a wake-up or the poll interval while they are dry. Returns nothing once shutdown begins.
pub(crate) async fn claim(
    shared: Arc<Shared>,
    mut events: broadcast::Receiver<StoreEvent>,
    backlog: bool,
    start: usize,
) -> (Vec<Job>, broadcast::Receiver<StoreEvent>) {
    let config = &shared.config;
    let batch = config.fetch_batch.min(config.concurrency).max(1);
    // As the native fetch loop: under a backlog wait for a quarter of a batch of free slots,
    // so each fetch claims a worthwhile batch; when dry, one slot is enough.
    let need = if backlog { (batch / 4).max(1) } else { 1 };
    loop {
        let mut permit = tokio::select! {
            _ = shared.closing.cancelled() => return (Vec::new(), events),
            p = shared.slots.clone().acquire_many_owned(need) => match p {
                Ok(p) => p,
                Err(_) => return (Vec::new(), events),
            },
        };
        let extra = (shared.slots.available_permits() as u32).min(batch - need);
        if extra > 0
            && let Ok(more) = shared.slots.clone().try_acquire_many_owned(extra)
        {
            permit.merge(more);
        }
        let mut jobs = Vec::new();
        let n = config.queues.len();
        for i in 0..n {
            let want = permit.num_permits() - jobs.len();
            if want == 0 {
                break;
            }
            let queue = &config.queues[(start + i) % n];
            let request = FetchRequest {
                queue,
                limit: want as u32,
                worker: &config.worker_id,
                lease: config.lease,
            };
            match shared.store.fetch(request).await {
                Ok(claimed) => jobs.extend(claimed),
                Err(e) => {
                    tracing::warn!(queue = %queue, error = %e, "fetch failed; retrying after the poll interval");
                    break;
                }
            }
        }
        if !jobs.is_empty() {
            let mut held = shared.held();
            for job in &jobs {
                held.insert(job.id, permit.split(1));
            }
            return (jobs, events);
        }
        drop(permit);
        let poll = tokio::time::sleep(config.poll_interval);
        tokio::pin!(poll);
        loop {
            tokio::select! {
                _ = shared.closing.cancelled() => return (Vec::new(), events),
                _ = &mut poll => break,
                event = events.recv() => match event {
                    Ok(StoreEvent::JobsAvailable { queue }) if config.queues.contains(&queue) => break,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => {
                        (&mut poll).await;
                        break;
                    }
                },
            }
        }
    }
}

/// Writes outcomes in batches and answers each sender. A failed write is retried; an outcome
/// that cannot be written for a whole lease is given up (its lease has lapsed by then, and
/// the rescuer retries the job).
async fn writer(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Outcome>) {
    let max = shared.config.completion_batch.max(1);
    loop {
        let mut batch = Vec::with_capacity(max);
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, max) => n,
            _ = shared.stop.cancelled() => {
                // Whatever was sent before the stop is still written.
                while batch.len() < max {
                    match rx.try_recv() {
                        Ok(o) => batch.push(o),
                        Err(_) => break,
                    }
                }
                if batch.is_empty() {
                    return;
                }
                batch.len()
            }
        };
        if n == 0 {
            return;
        }
        write(&shared, batch).await;
    }
}

async fn write(shared: &Shared, batch: Vec<Outcome>) {
    let finishes: Vec<Finish> = batch.iter().map(|o| o.finish.clone()).collect();
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(50);
    let result = loop {
        match shared.store.finish(finishes.clone()).await {
            Ok(applied) => break Ok(applied),
            Err(e) if started.elapsed() >= shared.config.lease => break Err(e),
            Err(e) => {
                tracing::warn!(error = %e, outcomes = finishes.len(), retry_in = ?delay, "writing job outcomes failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    };
    let answers: Vec<Result<(), Error>> = match result {
        Ok(applied) if applied == finishes.len() as u64 => {
            finishes.iter().map(|_| Ok(())).collect()
        }
        Ok(_) => {
            // Some lease ended before its outcome arrived; read the jobs back to say which.
            let mut answers = Vec::with_capacity(finishes.len());
            for f in &finishes {
                answers.push(match shared.store.get(f.id).await {
                    Ok(Some(job)) if f.landed(&job) => Ok(()),
                    Ok(_) => Err(Error::LeaseLost {
                        id: f.id,
                        attempt: f.attempt,
                    }),
                    Err(e) => Err(Error::Store(e)),
                });
            }
            answers
        }
        Err(e) => {
            let message = e.to_string();
            tracing::error!(error = %message, outcomes = finishes.len(), "giving up job outcomes the store would not take for a whole lease; the rescuer retries these jobs");
            finishes
                .iter()
                .map(|_| Err(Error::Unwritten(message.clone())))
                .collect()
        }
    };
    {
        let mut held = shared.held();
        for f in &finishes {
            // Dropping the slot lets the next claim take its place.
            held.remove(&f.id);
        }
    }
    for (outcome, answer) in batch.into_iter().zip(answers) {
        if let Err(e) = &answer {
            tracing::warn!(job.id = %outcome.finish.id, job.attempt = outcome.finish.attempt, error = %e, "job outcome not recorded");
        }
        if let Some(reply) = outcome.reply {
            let _ = reply.send(answer);
        }
    }
}

/// Renews the leases of the jobs held, and keeps the store's clock offset fresh.
async fn heartbeat(shared: Arc<Shared>) {
    let mut ticker = tokio::time::interval(shared.config.heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if let Err(e) = shared.clock.sync(shared.store.as_ref()).await {
            tracing::warn!(error = %e, "reading the store's clock failed");
        }
        let held: Vec<JobId> = shared.held().keys().copied().collect();
        if held.is_empty() {
            continue;
        }
        match shared
            .store
            .heartbeat(&shared.config.worker_id, &held, shared.config.lease)
            .await
        {
            Ok(cancel) if !cancel.is_empty() => {
                tracing::info!(jobs = ?cancel, "cancel requested for running jobs; an apalis handler cannot be interrupted, so they run to the end");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "heartbeat failed; leases renew on the next tick"),
        }
    }
}
