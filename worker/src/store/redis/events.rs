//! Wake-ups: scripts publish on `P:jobs` (a queue has ready jobs) and `P:cancel` (a running
//! job's cancel was requested); one subscriber task per store forwards them to
//! `Store::subscribe`, and the store wakes its own process directly.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::RedisStore;
use super::layout::*;
use crate::job::JobId;
use crate::store::StoreEvent;

impl RedisStore {
    pub(super) fn wake(&self, queues: impl IntoIterator<Item = String>) {
        for queue in queues.into_iter().collect::<BTreeSet<_>>() {
            let _ = self.events.send(StoreEvent::JobsAvailable { queue });
        }
    }
}

/// Forwards published wake-ups to subscribers until `stop`, reconnecting after errors.
pub(super) async fn subscribe_loop(
    client: ::redis::Client,
    keys: Arc<Keys>,
    events: broadcast::Sender<StoreEvent>,
    stop: CancellationToken,
) {
    let jobs = keys.jobs_channel();
    let cancel = keys.cancel_channel();
    let mut delay = Duration::from_millis(100);
    loop {
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            c = client.get_async_pubsub() => c,
        };
        let mut pubsub = match connected {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "Redis subscriber connection failed; polling covers the gap");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        if let Err(e) = pubsub.subscribe(&[&jobs, &cancel]).await {
            tracing::warn!(error = %e, "SUBSCRIBE failed; retrying");
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            continue;
        }
        delay = Duration::from_millis(100);
        let mut stream = pubsub.on_message();
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return,
                m = stream.next() => m,
            };
            let Some(msg) = msg else {
                tracing::warn!("Redis subscriber connection lost; reconnecting");
                break;
            };
            let Ok(payload) = msg.get_payload::<String>() else {
                continue;
            };
            let event = if msg.get_channel_name() == cancel {
                match payload.parse::<Uuid>() {
                    Ok(id) => StoreEvent::CancelRequested { id: JobId(id) },
                    Err(_) => continue,
                }
            } else {
                StoreEvent::JobsAvailable { queue: payload }
            };
            let _ = events.send(event);
        }
    }
}
