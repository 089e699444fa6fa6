//! Writes attempt outcomes back in batches.
//!
//! Whatever is waiting in the channel when a writer is free goes into the next
//! `Store::finish`: under load batches grow by themselves, when idle each outcome is written
//! at once, and no timer adds latency. Up to `completion_writers` writes are in flight at
//! once (each on its own connection), so a busy store works on several batches in parallel;
//! the batches never share a job, so they cannot conflict. A failed write is retried (the store may be restarting);
//! outcomes are never dropped while the process lives. If the process dies first, the jobs'
//! leases expire and the rescuer makes them retryable: at-least-once, never lost.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;

use super::Shared;
use crate::error::Result;
use crate::store::Finish;

pub(crate) async fn run(shared: Arc<Shared>, mut rx: mpsc::Receiver<Finish>) -> Result<()> {
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
                    in_flight.push(write(&shared, batch));
                }
            }
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
        }
    }
    Ok(())
}

async fn write(shared: &Shared, batch: Vec<Finish>) {
    let mut delay = Duration::from_millis(50);
    loop {
        match shared.store.finish(batch.clone()).await {
            Ok(applied) => {
                let mut held = shared.held();
                for f in &batch {
                    held.remove(&f.id);
                }
                drop(held);
                if applied < batch.len() as u64 {
                    tracing::debug!(
                        applied,
                        sent = batch.len(),
                        "some outcomes were stale (their lease had been rescued) and were ignored"
                    );
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, outcomes = batch.len(), retry_in = ?delay, "writing job outcomes failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
