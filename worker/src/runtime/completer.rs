//! Writes attempt outcomes back in batches.
//!
//! Whatever is waiting in the channel when a writer is free goes into the next
//! `Store::finish`: under load batches grow by themselves, when idle each outcome is written
//! at once, and no timer adds latency. Up to `completion_writers` writes are in flight at
//! once (each on its own connection), so a busy store works on several batches in parallel;
//! the batches never share a job, so they cannot conflict.
//!
//! A failed write is retried (the store may be restarting, its disk may be full). Each
//! outcome carries its job's slot, freed only once the outcome is written, so a worker whose
//! writes fail stops claiming jobs as soon as its slots are taken. While writes have failed
//! for longer than a lease, the heartbeat stops renewing leases ([`Shared::write_failing`]),
//! so a peer can take the jobs. Outcomes are kept and retried until shutdown; then the
//! completer has a bounded time to flush, after which the rest are given up (logged): their
//! leases expire and the rescuer makes them retryable. At-least-once, never lost.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Completion, Shared};
use crate::error::Result;

pub(crate) async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Completion>,
    give_up: CancellationToken,
) -> Result<()> {
    let max = shared.config.completion_batch;
    let writers = shared.config.completion_writers.max(1);
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        let mut batch = Vec::with_capacity(max);
        tokio::select! {
            n = rx.recv_many(&mut batch, max), if open && in_flight.len() < writers => {
                if n == 0 {
                    open = false;
                } else {
                    in_flight.push(write(&shared, batch, &give_up));
                }
            }
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
        }
    }
    Ok(())
}

async fn write(shared: &Shared, batch: Vec<Completion>, give_up: &CancellationToken) {
    let outcomes: Vec<_> = batch.iter().map(|c| c.finish.clone()).collect();
    let mut delay = Duration::from_millis(50);
    loop {
        let result = tokio::select! {
            r = shared.store.finish(outcomes.clone()) => r,
            _ = give_up.cancelled() => return abandon(&outcomes),
        };
        match result {
            Ok(applied) => {
                shared.write_succeeded();
                let mut held = shared.held();
                for f in &outcomes {
                    held.remove(&f.id);
                }
                drop(held);
                if applied < outcomes.len() as u64 {
                    tracing::debug!(
                        applied,
                        sent = outcomes.len(),
                        "some outcomes were stale (their lease had been rescued) and were ignored"
                    );
                }
                // Dropping the batch frees the jobs' slots.
                return;
            }
            Err(e) => {
                shared.write_failed();
                tracing::warn!(error = %e, outcomes = outcomes.len(), retry_in = ?delay, "writing job outcomes failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = give_up.cancelled() => return abandon(&outcomes),
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Shutdown ran out of time with these outcomes unwritten.
fn abandon(outcomes: &[crate::store::Finish]) {
    let ids: Vec<String> = outcomes.iter().map(|f| f.id.to_string()).collect();
    tracing::error!(
        outcomes = outcomes.len(),
        jobs = ?ids,
        "shutting down with job outcomes the store would not take; these jobs stay running \
         until their lease expires, then the rescuer makes them retryable (they run again)"
    );
}
