//! The adapter's errors.

use conveyor_worker::JobId;

/// What can go wrong between an apalis worker and a Conveyor store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The store refused or failed an operation.
    #[error(transparent)]
    Store(#[from] conveyor_worker::Error),
    /// The attempt's lease had ended before its outcome arrived (the worker stopped
    /// heartbeating for longer than the lease, the rescuer retried the job and perhaps another
    /// worker claimed it): the outcome was not recorded, so the job is never finished twice.
    #[error(
        "job {id} attempt {attempt}: the outcome was not recorded because the lease had ended (the job was rescued and may run again elsewhere)"
    )]
    LeaseLost {
        /// The job.
        id: JobId,
        /// The attempt whose outcome was refused.
        attempt: i32,
    },
    /// The store would not take the outcome for a whole lease; the rescuer retries the job.
    #[error("job outcome given up after failing for a whole lease: {0}")]
    Unwritten(String),
    /// Args that do not encode as JSON.
    #[error("args do not encode as JSON: {0}")]
    Encode(#[source] serde_json::Error),
    /// The backend was closed or dropped before the outcome was written.
    #[error("the backend stopped before the outcome was written")]
    Stopped,
}
