//! The backend's tower layer: turns how an apalis service call ended into the job's next
//! state with the native runtime's [`transition`], and waits until the store has it.
//!
//! It sits outside the worker's own layers (apalis puts the backend's middleware outermost),
//! so it sees what the whole stack returned: an in-process retry layer's last error, a
//! timeout layer's error.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};

use apalis_core::error::{AbortError, BoxDynError, RetryAfterError};
use apalis_core::task::Task;
use conveyor_worker::runtime::{Ended, transition};
use conveyor_worker::{Job, JobError, Outcome};
use futures::FutureExt;
use futures::future::BoxFuture;
use tower::{Layer, Service};

use crate::lease::Shared;

/// The claimed job behind a task, kept in the task's data for the finish layer.
#[derive(Clone, Debug)]
pub(crate) struct Claimed(pub Arc<Job>);

/// Writes each task's outcome back to the Conveyor store (see the module docs).
#[derive(Clone)]
pub struct FinishLayer {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for FinishLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FinishLayer")
            .field("worker", &self.shared.config.worker_id)
            .finish()
    }
}

impl<S> Layer<S> for FinishLayer {
    type Service = FinishService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FinishService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`FinishLayer`] makes.
#[derive(Clone)]
pub struct FinishService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for FinishService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FinishService")
            .field("worker", &self.shared.config.worker_id)
            .finish()
    }
}

impl<S, A> Service<Task<A>> for FinishService<S>
where
    S: Service<Task<A>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxDynError>,
    S::Response: Send + 'static,
    A: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxDynError;
    type Future = BoxFuture<'static, Result<S::Response, BoxDynError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, task: Task<A>) -> Self::Future {
        let claimed = task.ctx().data().get::<Claimed>().cloned();
        let fut = self.inner.call(task);
        let shared = self.shared.clone();
        Box::pin(async move {
            // A panicking handler is a failed attempt, as in the native runtime, not a
            // crashed worker.
            let result = match AssertUnwindSafe(fut).catch_unwind().await {
                Ok(r) => r.map_err(Into::into),
                Err(panic) => Err(format!("handler panicked: {}", panic_message(&*panic)).into()),
            };
            let Some(Claimed(job)) = claimed else {
                // Not a task of this backend (a layer made one up): nothing to write.
                return result;
            };
            let ended = match &result {
                Ok(_) => Ended::Returned(Outcome::Done),
                Err(e) => ended_by(e.as_ref()),
            };
            let now = shared.clock.now();
            let started_at = job.attempted_at.unwrap_or(now);
            let finish = transition(
                &job,
                ended,
                &shared.config.retry,
                &shared.config.worker_id,
                started_at,
                now,
            );
            shared.write(finish).await?;
            result
        })
    }
}

/// What a handler's error means for the job: apalis's [`AbortError`] is a permanent failure
/// (`dead` now), its [`RetryAfterError`] a retry after the given delay, anything else a
/// failure retried with the backoff until the attempts run out.
/// The wrappers record the error they carry.
fn ended_by(e: &(dyn std::error::Error + Send + Sync + 'static)) -> Ended {
    let inner = |e: &(dyn std::error::Error + 'static)| match e.source() {
        Some(source) => JobError::from_std(source),
        None => JobError::from_std(e),
    };
    if e.is::<AbortError>() {
        Ended::Returned(Outcome::Fail(inner(e)))
    } else if let Some(r) = e.downcast_ref::<RetryAfterError>() {
        Ended::Returned(Outcome::Retry {
            after: Some(r.get_duration()),
            error: inner(e),
        })
    } else {
        Ended::Failed(JobError::from_std(e))
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}
