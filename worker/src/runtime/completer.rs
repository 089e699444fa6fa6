//! Writes attempt outcomes back in batches.
//!
//! Whatever is waiting in the channel when the previous write returns goes into the next
//! `Store::finish`: under load batches grow by themselves, when idle each outcome is written
//! at once, and no timer adds latency. A failed write is retried (the store may be restarting);
//! outcomes are never dropped while the process lives. If the process dies first, the jobs'
//! leases expire and the rescuer makes them retryable: at-least-once, never lost.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::Shared;
use crate::error::Result;
use crate::store::Finish;

pub(crate) async fn run(shared: Arc<Shared>, mut rx: mpsc::Receiver<Finish>) -> Result<()> {
    let max = shared.config.completion_batch;
    let mut batch = Vec::with_capacity(max);
    while rx.recv_many(&mut batch, max).await > 0 {
        write(&shared, &mut batch).await;
    }
    Ok(())
}

async fn write(shared: &Shared, batch: &mut Vec<Finish>) {
    let mut delay = Duration::from_millis(50);
    loop {
        match shared.store.finish(batch.clone()).await {
            Ok(applied) => {
                if applied < batch.len() as u64 {
                    tracing::debug!(
                        applied,
                        sent = batch.len(),
                        "some outcomes were stale (their lease had been rescued) and were ignored"
                    );
                }
                batch.clear();
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
