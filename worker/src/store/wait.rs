//! Waiting for a job to finish without polling: the store's change events
//! ([`StoreEvent::JobsChanged`]) wake the waiter, which then reads the job once.

use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;

use super::{Store, StoreEvent};
use crate::error::{Error, Result};
use crate::job::{Job, JobId};

/// The longest one wait may last. Longer waits are refused rather than cut short, so a
/// caller never mistakes a shortened wait for the one it asked for; it waits again instead.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// Checks a requested wait against [`MAX_WAIT`]; `field` names it in the error.
pub fn check_wait(field: &str, wait: Duration) -> Result<()> {
    if wait > MAX_WAIT {
        return Err(Error::invalid(
            field,
            format!(
                "{} is longer than the longest wait, {max}s; wait at most {max}s and ask again if the job has not finished",
                humantime_serde::re::humantime::format_duration(wait),
                max = MAX_WAIT.as_secs()
            ),
        ));
    }
    Ok(())
}

/// The job once it is finished (completed, cancelled or dead), or as it is when `wait` runs
/// out; `None` if there is no such job (or it was deleted meanwhile).
///
/// It subscribes to the store's events before it first reads the job, so a change between
/// the read and the wait is not missed; then it sleeps until an event names the job in a
/// terminal state (or says jobs changed without saying which, or the events lagged), reads
/// the job again, and returns it if it has finished. Nothing is read on a timer: a store
/// whose events do not arrive (Postgres behind a transaction-mode pooler without
/// `database.listen_url`) answers at the deadline with the job as it is then.
pub async fn wait_for_end(store: &dyn Store, id: JobId, wait: Duration) -> Result<Option<Job>> {
    check_wait("wait", wait)?;
    let deadline = tokio::time::Instant::now() + wait;
    let mut events = store.subscribe();
    loop {
        let job = store.get(id).await?;
        match &job {
            Some(j) if !j.state.is_terminal() => {}
            _ => return Ok(job),
        }
        loop {
            let event = match tokio::time::timeout_at(deadline, events.recv()).await {
                Err(_) => return store.get(id).await,
                Ok(e) => e,
            };
            match event {
                Ok(StoreEvent::JobsChanged { changes }) => {
                    if changes.is_empty()
                        || changes.iter().any(|c| c.id == id && c.state.is_terminal())
                    {
                        break;
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => break,
                Err(RecvError::Closed) => {
                    tokio::time::sleep_until(deadline).await;
                    return store.get(id).await;
                }
            }
        }
    }
}
