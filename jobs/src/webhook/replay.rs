//! Replay: send again what was already sent. The `webhook-id` stays the event id, so a
//! receiver that already processed a message can recognise the replay.

use chrono::{DateTime, Utc};
use conveyor_worker::store::JobFilter;
use conveyor_worker::{JobId, JobState};
use serde::{Deserialize, Serialize};

use super::model::{DeliverArgs, KIND};
use super::{Result, WebhookError, Webhooks};

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Replayed {
    /// Deliveries queued again.
    pub queued: u64,
    /// Deliveries still waiting or running, left alone.
    pub skipped: u64,
}

impl Webhooks {
    /// Queues one finished delivery again, with a fresh attempt budget (its history kept).
    pub async fn replay_delivery(&self, job_id: &str) -> Result<conveyor_worker::Job> {
        let job = self.delivery(job_id).await?;
        if !job.state.is_terminal() {
            return Err(WebhookError::Conflict(format!(
                "delivery {job_id} is {} — it will be tried anyway",
                job.state
            )));
        }
        Ok(self.store.retry(job.id).await?)
    }

    /// Queues again every delivery to `endpoint_id` created at or after `since` that ended
    /// `dead` (attempts exhausted or refused) or `cancelled` (endpoint disabled).
    pub async fn replay_failed(&self, endpoint_id: &str, since: DateTime<Utc>) -> Result<Replayed> {
        self.endpoint(endpoint_id).await?;
        let filter = JobFilter {
            states: vec![JobState::Dead, JobState::Cancelled],
            kind: Some(KIND.into()),
            tag: Some(format!("endpoint:{endpoint_id}")),
            created_after: Some(since),
            ..JobFilter::default()
        };
        let queued = self.store.retry_matching(&filter).await?;
        Ok(Replayed { queued, skipped: 0 })
    }

    /// Sends an event again to every endpoint it went to: finished deliveries are queued
    /// again; deliveries whose job was already pruned are enqueued anew.
    pub async fn replay_event(&self, event_id: &str) -> Result<Replayed> {
        let event = self.event(event_id).await?;
        let mut out = Replayed::default();
        for d in &event.deliveries {
            let id: Option<JobId> = d.job_id.parse().ok();
            let job = match id {
                Some(id) => self.store.get(id).await?,
                None => None,
            };
            match job {
                Some(job) if job.state.is_terminal() => {
                    self.store.retry(job.id).await?;
                    out.queued += 1;
                }
                Some(_) => out.skipped += 1,
                None => {
                    let schedule_len = match &d.endpoint_id {
                        Some(ep) => match self.endpoint(ep).await {
                            Ok(ep) => ep.retry_schedule_ms.map(|s| s.len()),
                            Err(WebhookError::NotFound { .. }) => {
                                out.skipped += 1;
                                continue;
                            }
                            Err(e) => return Err(e),
                        },
                        None => None,
                    };
                    let args = DeliverArgs {
                        event_id: event.id.clone(),
                        event_type: event.event_type.clone(),
                        created_at: event.created_at,
                        payload: event.payload.clone(),
                        endpoint_id: d.endpoint_id.clone(),
                        url: None,
                    };
                    if args.endpoint_id.is_none() {
                        // One-off jobs carry their URL only in the job; without it there is
                        // nowhere to send.
                        out.skipped += 1;
                        continue;
                    }
                    self.store
                        .enqueue(self.delivery_job(&args, schedule_len)?)
                        .await?;
                    out.queued += 1;
                }
            }
        }
        Ok(out)
    }
}
