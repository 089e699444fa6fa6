//! [`ConveyorBackend`]: apalis-core's `Backend` (and, through `Sink`, its `TaskSink`) over a
//! Conveyor store.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use apalis_core::backend::finalize::Ephemeral;
use apalis_core::backend::queue::Queue;
use apalis_core::backend::{Backend, BackendConfig};
use apalis_core::task::Task;
use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::task_id::TaskId;
use apalis_core::worker::context::WorkerContext;
use conveyor_worker::runtime::{Ended, transition};
use conveyor_worker::store::StoreEvent;
use conveyor_worker::{Enqueued, Job, JobArgs, JobError, NewJob, Outcome, Store};
use futures::Sink;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::broadcast;
use tokio_util::sync::DropGuard;

use crate::Config;
use crate::error::Error;
use crate::finish::{Claimed, FinishLayer};
use crate::lease::{Shared, claim};

type ToJob<A> = Arc<dyn Fn(&A) -> Result<NewJob, serde_json::Error> + Send + Sync>;
type Fetching = BoxFuture<'static, (Vec<Job>, broadcast::Receiver<StoreEvent>)>;

/// A Conveyor store as an apalis backend: give it to `WorkerBuilder::backend`.
///
/// Polling claims jobs of [`Config::kind`] from [`Config::queues`] with a lease (as the
/// native runtime does), decodes each job's JSON args into `A`, and yields them as apalis
/// tasks; the backend's layer ([`FinishLayer`]) writes how each ended. A clone shares the
/// store and settings, not the claims: clone it to push while a worker runs.
///
/// Pushing (`TaskSink::push`, `push_bulk`, `push_task`) enqueues through the store with
/// Conveyor's rules: the kind's queue, attempts and uniqueness key, and the task's own
/// idempotency key, queue, attempts and run time when it sets them. [`ConveyorBackend::enqueue`]
/// does the same for one job and says whether it was a duplicate.
pub struct ConveyorBackend<A> {
    store: Arc<dyn Store>,
    config: Arc<Config>,
    to_job: ToJob<A>,
    /// Present once a worker uses this backend.
    shared: Option<Arc<Shared>>,
    _stop: Option<DropGuard>,
    ready: VecDeque<Task<A>>,
    fetching: Option<Fetching>,
    events: Option<broadcast::Receiver<StoreEvent>>,
    backlog: bool,
    rotate: usize,
    checked: bool,
    closing: Option<BoxFuture<'static, ()>>,
    pending: Vec<NewJob>,
    flushing: Option<BoxFuture<'static, Result<Vec<Enqueued>, Error>>>,
}

// Every field that holds an `A` is heap-allocated; nothing is pinned in place.
impl<A> Unpin for ConveyorBackend<A> {}

impl<A> std::fmt::Debug for ConveyorBackend<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConveyorBackend")
            .field("config", &self.config)
            .field("ready", &self.ready.len())
            .finish()
    }
}

impl<A> Clone for ConveyorBackend<A> {
    fn clone(&self) -> Self {
        Self::with_encoder(self.store.clone(), self.config.clone(), self.to_job.clone())
    }
}

impl<A: JobArgs> ConveyorBackend<A> {
    /// Runs the typed kind `A` ([`Config::for_args`]); pushes make jobs with `A::to_job`
    /// (its queue, priority, attempts and uniqueness key).
    pub fn for_args(store: Arc<dyn Store>) -> Self {
        Self::with_encoder(
            store,
            Arc::new(Config::for_args::<A>()),
            Arc::new(|a: &A| a.to_job()),
        )
    }

    /// [`ConveyorBackend::for_args`] with other settings (its kind should stay `A::KIND`).
    pub fn for_args_with(store: Arc<dyn Store>, config: Config) -> Self {
        Self::with_encoder(store, Arc::new(config), Arc::new(|a: &A| a.to_job()))
    }
}

impl<A: Serialize + Send + Sync + 'static> ConveyorBackend<A> {
    /// Runs `config.kind` from `config.queues`; pushes make jobs of that kind on the first
    /// queue with the default attempts.
    pub fn new(store: Arc<dyn Store>, config: Config) -> Self {
        let kind = config.kind.clone();
        let queue = config.queues.first().cloned().unwrap_or_default();
        let to_job = move |a: &A| {
            Ok(NewJob::new(kind.clone(), serde_json::to_value(a)?).queue(queue.clone()))
        };
        Self::with_encoder(store, Arc::new(config), Arc::new(to_job))
    }
}

impl<A> ConveyorBackend<A> {
    fn with_encoder(store: Arc<dyn Store>, config: Arc<Config>, to_job: ToJob<A>) -> Self {
        Self {
            store,
            config,
            to_job,
            shared: None,
            _stop: None,
            ready: VecDeque::new(),
            fetching: None,
            events: None,
            backlog: false,
            rotate: 0,
            checked: false,
            closing: None,
            pending: Vec::new(),
            flushing: None,
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The settings.
    pub fn settings(&self) -> &Config {
        &self.config
    }

    /// Enqueues one job with the same rules as a push and returns the store's answer
    /// (`duplicate` when a job already holds its idempotency key).
    pub async fn enqueue(&self, args: &A) -> Result<Enqueued, Error> {
        let job = (self.to_job)(args).map_err(Error::Encode)?;
        Ok(self.store.enqueue(job).await?)
    }

    /// The job a task describes: the args through the kind's encoder, then what the task
    /// sets itself.
    fn new_job(&self, task: Task<A>) -> Result<NewJob, Error> {
        let (args, ctx) = task.take();
        let mut job = (self.to_job)(&args).map_err(Error::Encode)?;
        if let Some(key) = ctx.idempotency_key() {
            job.idempotency_key = Some(key.to_string());
        }
        if let Some(queue) = ctx.queue() {
            job.queue = queue.to_string();
        }
        if let Some(max) = ctx.max_attempts() {
            job.max_attempts = i32::try_from(max).unwrap_or(i32::MAX);
        }
        if let Some(at) = ctx.run_at() {
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(at);
            job.run_at = Some(at.into());
        }
        Ok(job)
    }

    fn shared(&mut self) -> Arc<Shared> {
        if let Some(s) = &self.shared {
            return s.clone();
        }
        let shared = Arc::new(Shared::new(self.store.clone(), self.config.clone()));
        self._stop = Some(shared.stop.clone().drop_guard());
        self.shared = Some(shared.clone());
        shared
    }
}

impl<A: DeserializeOwned + Send + 'static> ConveyorBackend<A> {
    /// The task for a claimed job, or `None` when the job was handed back instead (another
    /// kind, or args that are not an `A`).
    fn task(&self, shared: &Shared, job: Job) -> Option<Task<A>> {
        let handed_back = |ended: Ended| {
            let now = shared.clock.now();
            let started_at = job.attempted_at.unwrap_or(now);
            let finish = transition(
                &job,
                ended,
                &self.config.retry,
                &self.config.worker_id,
                started_at,
                now,
            );
            shared.send(finish, None);
        };
        if job.kind != self.config.kind {
            handed_back(Ended::NoHandler);
            return None;
        }
        let args = match serde_json::from_value::<A>(job.args.clone()) {
            Ok(args) => args,
            Err(e) => {
                // The native runtime's rule: args that do not decode are a permanent failure.
                let msg = format!("args do not match kind `{}`: {e}", job.kind);
                handed_back(Ended::Returned(Outcome::Fail(JobError::new(msg))));
                return None;
            }
        };
        let mut builder = TaskBuilder::new(args)
            .task_id(TaskId::from_string(job.id.to_string()))
            .attempt(usize::try_from(job.attempt).unwrap_or(0))
            .max_attempts(usize::try_from(job.max_attempts).unwrap_or(0))
            .queue(Queue::from(job.queue.as_str()))
            .lock_by(Some(self.config.worker_id.clone()));
        if let Some(key) = &job.idempotency_key {
            builder = builder.idempotency_key(key);
        }
        Some(builder.data(Claimed(Arc::new(job))).build())
    }
}

impl<A: DeserializeOwned + Send + 'static> Backend for ConveyorBackend<A> {
    type Task = Task<A>;
    type Error = Error;

    fn poll_ready(&mut self, _: &mut Context<'_>, _: &WorkerContext) -> Poll<Result<(), Error>> {
        if !self.checked {
            // Bad settings stop the worker at start with the key and the fix named.
            self.config.validate()?;
            self.checked = true;
        }
        // The slots are taken when jobs are claimed, in `poll_next`.
        self.shared().start();
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Option<Result<Task<A>, Error>>> {
        let shared = self.shared();
        loop {
            if let Some(task) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(task)));
            }
            if shared.closing.is_cancelled() {
                return Poll::Ready(None);
            }
            if self.fetching.is_none() {
                let events = self.events.take().unwrap_or_else(|| self.store.subscribe());
                self.rotate = self.rotate.wrapping_add(1);
                self.fetching = Some(Box::pin(claim(
                    shared.clone(),
                    events,
                    self.backlog,
                    self.rotate,
                )));
            }
            let fetching = self.fetching.as_mut().expect("set above");
            let (jobs, events) = ready!(fetching.as_mut().poll(cx));
            self.fetching = None;
            self.events = Some(events);
            let batch = self.config.fetch_batch.min(self.config.concurrency).max(1);
            self.backlog = jobs.len() >= batch as usize;
            for job in jobs {
                if let Some(task) = self.task(&shared, job) {
                    self.ready.push_back(task);
                }
            }
        }
    }

    fn poll_close(&mut self, cx: &mut Context<'_>, _: &WorkerContext) -> Poll<Result<(), Error>> {
        let Some(shared) = self.shared.clone() else {
            return Poll::Ready(Ok(()));
        };
        if self.closing.is_none() {
            shared.closing.cancel();
            // Claimed but never started: back to `available` without using an attempt
            // (the native runtime's shutdown rule), including a claim still in flight.
            let fetching = self.fetching.take();
            let unstarted: Vec<Arc<Job>> = self
                .ready
                .drain(..)
                .filter_map(|t| t.ctx().data().get::<Claimed>().map(|c| c.0.clone()))
                .collect();
            let config = self.config.clone();
            self.closing = Some(Box::pin(async move {
                let mut jobs = unstarted;
                if let Some(f) = fetching {
                    jobs.extend(f.await.0.into_iter().map(Arc::new));
                }
                for job in jobs {
                    let now = shared.clock.now();
                    let started_at = job.attempted_at.unwrap_or(now);
                    let finish = transition(
                        &job,
                        Ended::Interrupted,
                        &config.retry,
                        &config.worker_id,
                        started_at,
                        now,
                    );
                    if let Err(e) = shared.write(finish).await {
                        tracing::warn!(job.id = %job.id, error = %e, "releasing an unstarted job at shutdown failed; its lease expires instead");
                    }
                }
                shared.stop.cancel();
            }));
        }
        let closing = self.closing.as_mut().expect("set above");
        ready!(closing.as_mut().poll(cx));
        Poll::Ready(Ok(()))
    }
}

impl<A: DeserializeOwned + Send + 'static> BackendConfig for ConveyorBackend<A> {
    type Args = A;
    type Id = conveyor_worker::JobId;
    type Kind = Ephemeral;
    type Config = Config;
    type Layer = FinishLayer;

    fn config(&self) -> &Config {
        &self.config
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> FinishLayer {
        FinishLayer {
            shared: self.shared(),
        }
    }
}

impl<A> Sink<Task<A>> for ConveyorBackend<A> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, task: Task<A>) -> Result<(), Error> {
        let this = self.get_mut();
        let job = this.new_job(task)?;
        this.pending.push(job);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        loop {
            if let Some(flushing) = this.flushing.as_mut() {
                let result = ready!(flushing.as_mut().poll(cx));
                this.flushing = None;
                result?;
            }
            if this.pending.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let jobs = std::mem::take(&mut this.pending);
            let store = this.store.clone();
            this.flushing = Some(Box::pin(async move { Ok(store.enqueue_many(jobs).await?) }));
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.poll_flush(cx)
    }
}
