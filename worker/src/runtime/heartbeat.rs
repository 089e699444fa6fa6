//! Renews this process's leases, picks up cancel requests the wake-up channel missed, and
//! refreshes this worker's registration.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{Shared, registration};

pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(shared.config.heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous = registration::Previous::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match shared
            .store
            .heartbeat(&shared.worker_id, shared.config.lease)
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
