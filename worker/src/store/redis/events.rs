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
use crate::store::{JobChange, StoreEvent};

/// Most entries in one published change message.
const CHANGES_PER_MESSAGE: usize = 1000;

impl RedisStore {
    /// Publishes job state changes on `P:events` for every process's subscribers (this
    /// one's included, through its subscriber). Sent without waiting for the answer, so the
    /// step that made the changes does not wait for it; a change lost with a dropped
    /// connection is lost like any wake-up.
    pub(super) fn publish_changes(&self, changes: Vec<JobChange>) {
        if !changes.is_empty() {
            let _ = self.changes.send(changes);
        }
    }

    pub(super) fn wake(&self, queues: impl IntoIterator<Item = String>) {
        for queue in queues.into_iter().collect::<BTreeSet<_>>() {
            let _ = self.events.send(StoreEvent::JobsAvailable { queue });
        }
    }
}

/// Publishes the changes handed to [`RedisStore::publish_changes`], in the order they were
/// made, each run of pending ones in one pipeline.
pub(super) async fn publish_loop(
    mut conn: ::redis::aio::ConnectionManager,
    channel: String,
    mut changes: tokio::sync::mpsc::UnboundedReceiver<Vec<JobChange>>,
) {
    while let Some(first) = changes.recv().await {
        let mut batch = first;
        while batch.len() < CHANGES_PER_MESSAGE * 10 {
            match changes.try_recv() {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        let mut pipe = ::redis::pipe();
        for part in batch.chunks(CHANGES_PER_MESSAGE) {
            pipe.cmd("PUBLISH")
                .arg(&channel)
                .arg(JobChange::encode(part))
                .ignore();
        }
        if let Err(e) = pipe.query_async::<()>(&mut conn).await {
            tracing::debug!(error = %e, "publishing job changes failed");
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
    let changed = keys.events_channel();
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
        if let Err(e) = pubsub.subscribe(&[&jobs, &cancel, &changed]).await {
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
            } else if msg.get_channel_name() == changed {
                StoreEvent::JobsChanged {
                    changes: JobChange::decode(&payload).into(),
                }
            } else {
                StoreEvent::JobsAvailable { queue: payload }
            };
            let _ = events.send(event);
        }
    }
}
