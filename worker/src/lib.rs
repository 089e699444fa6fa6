//! Conveyor's core: the job model, the store and the worker runtime.
//!
//! Where to start reading:
//! - [`job`]: `Job`, `JobState` (the lifecycle), `NewJob` (what an enqueue asks for).
//! - [`store`]: the `Store` trait every backend implements, and `store::connect(url)`.
//!   Backends live below it: `store::sqlite`, `store::postgres`, `store::redis`.
//! - [`handler`]: how a kind is registered and what a handler returns (`Outcome`).
//! - [`runtime`]: the worker — per-queue fetch loops claim batches, each job runs under a
//!   semaphore slot, outcomes become `store::Finish` rows (`runtime::transition`) written back
//!   in batches by the completer; a heartbeat renews leases and delivers cancel requests.
//! - [`retry_policy`]: backoff between attempts.
//! - [`clock`]: the store's clock, which every process times leases and due jobs on.
//! - [`keyring`]: credentials kept in the store, encrypted (sealed) with the configured keys.
//! - [`metrics`]: process-local counters and histograms, rendered by the API's `/metrics`.
//! - [`validate`]: per-kind checks of a job's args, run at enqueue.
//! - [`testing`]: runs one job of a kind inline, for the kind's own tests.

pub mod clock;
pub mod error;
pub mod handler;
pub mod job;
pub mod keyring;
pub mod metrics;
pub mod retry_policy;
pub mod runtime;
pub mod stats;
pub mod store;
pub mod testing;
pub mod validate;

pub use error::{Error, Result};
pub use handler::{Handler, JobArgs, JobContext, JobError, KindOptions, Outcome, Registry};
pub use job::{
    AttemptOutcome, AttemptRecord, Enqueued, Job, JobId, JobState, NewJob, OperatorAction, Progress,
};
pub use retry_policy::RetryPolicy;
pub use store::{Store, StoreOptions};
