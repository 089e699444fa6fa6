//! Renews the leases of the jobs this process holds, picks up cancel requests the wake-up channel missed, and
//! refreshes this worker's registration.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{Shared, registration};
use crate::job::JobId;

pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(shared.config.heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous = registration::Previous::new();
    let lease = shared.config.lease;
    let mut withheld = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        // A worker that has not been able to write an outcome for a whole lease is not
        // finishing its jobs: it lets their leases lapse so the rescuer gives them to a
        // worker that can. Renewing would keep them here, unfinished, for as long as the
        // store refuses writes. A late outcome of a rescued attempt is ignored as stale.
        if let Some(failing) = shared.write_failing_for().filter(|f| *f >= lease) {
            if !withheld {
                tracing::error!(
                    failing_for = ?failing,
                    lease = ?lease,
                    "job outcomes could not be written for longer than a lease: no longer renewing this worker's leases, so they expire and other workers can take the jobs"
                );
                withheld = true;
            }
            registration::write(&shared, &mut previous).await;
            continue;
        }
        if withheld {
            tracing::info!("job outcomes are written again: renewing leases");
            withheld = false;
        }
        // Only the jobs this process holds: one it has let go of (its task ended without
        // handing over an outcome) expires and is rescued rather than renewed for as long as
        // this worker lives.
        let held: Vec<JobId> = shared.held().iter().copied().collect();
        match shared
            .store
            .heartbeat(&shared.worker_id, &held, shared.config.lease)
            .await
        {
            Ok(cancel) => {
                for id in cancel {
                    shared.cancel_running(id);
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed; leases renew on the next tick"),
        }
        super::sync_clock(&shared).await;
        registration::write(&shared, &mut previous).await;
    }
}
