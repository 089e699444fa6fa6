//! Sending events: fan-out to every enabled endpoint subscribed to the type (one delivery job
//! each), deduplicated by the sender's idempotency key; and one-off deliveries to a URL.

use chrono::{DateTime, Utc};
use conveyor_worker::store::meta::{Expect, Put};
use conveyor_worker::{JobId, NewJob};
use serde::{Deserialize, Serialize};

use super::model::{
    DeliverArgs, DeliveryRef, EVENT_KEYS, EVENTS, Endpoint, Event, KIND, SYSTEM_EVENT_PREFIX,
};
use super::{Result, WebhookError, Webhooks, new_id};

/// The longest idempotency key an event may hold, in bytes.
pub const MAX_EVENT_KEY_LEN: usize = 400;

/// What sending an event takes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendEvent {
    /// E.g. `invoice.paid`.
    pub event_type: String,
    /// The data.
    #[serde(default)]
    pub payload: serde_json::Value,
    /// A second send with the same key returns the first event and creates no deliveries.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// The answer of a send.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Sent {
    /// The event (the first one, for a duplicate).
    pub event: Event,
    /// The idempotency key was seen before: nothing new was enqueued.
    pub duplicate: bool,
}

fn check_type(t: &str) -> Result<()> {
    if t.is_empty()
        || t.len() > 200
        || !t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
    {
        return Err(WebhookError::invalid(
            "event_type",
            format!(
                "`{t}` must be 1 to 200 letters, digits, `.`, `_`, `-` or `:` (e.g. invoice.paid)"
            ),
        ));
    }
    Ok(())
}

/// A type a client may send: valid, and not one of the platform's own (`webhook.*`), which
/// receivers must be able to trust.
fn check_client_type(t: &str) -> Result<()> {
    check_type(t)?;
    if t.starts_with(SYSTEM_EVENT_PREFIX) {
        return Err(crate::Reserved {
            field: "event_type",
            message: format!(
                "`{t}` is reserved: `{SYSTEM_EVENT_PREFIX}*` types are sent only by the platform; \
                 pick another name"
            ),
        }
        .into());
    }
    Ok(())
}

impl Webhooks {
    /// Sends an event to every enabled endpoint subscribed to its type. The type must not be
    /// a system type (`webhook.*`).
    pub async fn send_event(&self, send: SendEvent) -> Result<Sent> {
        check_client_type(&send.event_type)?;
        self.send_checked(send).await
    }

    /// Sends one of the platform's own events (e.g. `webhook.endpoint.disabled`).
    pub(crate) async fn send_system_event(&self, send: SendEvent) -> Result<Sent> {
        check_type(&send.event_type)?;
        debug_assert!(send.event_type.starts_with(SYSTEM_EVENT_PREFIX));
        self.send_checked(send).await
    }

    async fn send_checked(&self, send: SendEvent) -> Result<Sent> {
        let now = Utc::now();
        let id = new_id("evt_");
        if let Some(key) = &send.idempotency_key {
            if let Err(conveyor_worker::Error::InvalidInput { message, .. }) =
                conveyor_worker::job::check_idempotency_key(
                    "idempotency_key",
                    key,
                    MAX_EVENT_KEY_LEN,
                )
            {
                return Err(WebhookError::invalid("idempotency_key", message));
            }
            let value = serde_json::Value::String(id.clone());
            let reserved = self
                .store
                .meta_put(
                    Put::new(EVENT_KEYS, key, &value)
                        .expect(Expect::Absent)
                        .ttl(self.config.event_ttl),
                )
                .await;
            match reserved {
                Ok(_) => {}
                Err(conveyor_worker::Error::Conflict(_)) => {
                    let first = self.store.meta_get(EVENT_KEYS, key).await?;
                    let first_id: String = match first {
                        Some(r) => r.decode()?,
                        None => {
                            return Err(WebhookError::Conflict(
                                "the idempotency key expired while this send ran; send again"
                                    .into(),
                            ));
                        }
                    };
                    // The first send may still be fanning out; wait for its record briefly.
                    for _ in 0..50 {
                        if let Ok(event) = self.event(&first_id).await {
                            return Ok(Sent {
                                event,
                                duplicate: true,
                            });
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                    return Err(WebhookError::Conflict(format!(
                        "an event with this idempotency key ({first_id}) is still being sent; try again"
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
        let endpoints: Vec<Endpoint> = self
            .endpoints()
            .await?
            .into_iter()
            .filter(|e| e.enabled && e.subscribes_to(&send.event_type))
            .collect();
        let event = self
            .fan_out(
                id,
                send.event_type,
                send.payload,
                send.idempotency_key,
                now,
                &endpoints,
            )
            .await?;
        Ok(Sent {
            event,
            duplicate: false,
        })
    }

    /// Enqueues one delivery per endpoint and records the event.
    pub(crate) async fn fan_out(
        &self,
        id: String,
        event_type: String,
        payload: serde_json::Value,
        idempotency_key: Option<String>,
        created_at: DateTime<Utc>,
        endpoints: &[Endpoint],
    ) -> Result<Event> {
        let mut jobs = Vec::with_capacity(endpoints.len());
        for ep in endpoints {
            let args = DeliverArgs {
                event_id: id.clone(),
                event_type: event_type.clone(),
                created_at,
                payload: payload.clone(),
                endpoint_id: Some(ep.id.clone()),
                url: None,
            };
            jobs.push(self.delivery_job(&args, ep.retry_schedule_ms.as_ref().map(Vec::len))?);
        }
        let enqueued = if jobs.is_empty() {
            Vec::new()
        } else {
            self.store.enqueue_many(jobs).await?
        };
        let event = Event {
            id: id.clone(),
            event_type,
            payload,
            idempotency_key,
            created_at,
            deliveries: endpoints
                .iter()
                .zip(&enqueued)
                .map(|(ep, e)| DeliveryRef {
                    endpoint_id: Some(ep.id.clone()),
                    job_id: e.id.to_string(),
                })
                .collect(),
        };
        let value = serde_json::to_value(&event)?;
        self.store
            .meta_put(Put::new(EVENTS, &id, &value).ttl(self.config.event_ttl))
            .await?;
        Ok(event)
    }

    /// The delivery job for `args`: on the webhook queue, as many attempts as the schedule
    /// has waits, tagged with its endpoint and event so replays can find it.
    pub fn delivery_job(&self, args: &DeliverArgs, schedule_len: Option<usize>) -> Result<NewJob> {
        let attempts = schedule_len.unwrap_or(self.config.retry_schedule.len());
        let target = args.endpoint_id.as_deref().unwrap_or("direct");
        Ok(NewJob::new(KIND, serde_json::to_value(args)?)
            .queue(self.config.queue.clone())
            .max_attempts(i32::try_from(attempts).unwrap_or(i32::MAX))
            .tags([
                "webhook".to_string(),
                format!("endpoint:{target}"),
                format!("event:{}", args.event_id),
            ]))
    }

    /// Delivers one event straight to a URL (no endpoint): one job, retried on the default
    /// schedule, guarded like any delivery, signed with `webhooks.direct_secret` if set.
    pub async fn send_to_url(
        &self,
        url: &str,
        event_type: &str,
        payload: serde_json::Value,
    ) -> Result<Event> {
        check_client_type(event_type)?;
        super::model::check_url("url", url)?;
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| WebhookError::invalid("url", format!("`{url}` is not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(WebhookError::invalid("url", "must be http:// or https://"));
        }
        let now = Utc::now();
        let id = new_id("evt_");
        let args = DeliverArgs {
            event_id: id.clone(),
            event_type: event_type.to_string(),
            created_at: now,
            payload: payload.clone(),
            endpoint_id: None,
            url: Some(url.to_string()),
        };
        let job = self.store.enqueue(self.delivery_job(&args, None)?).await?;
        let event = Event {
            id: id.clone(),
            event_type: event_type.to_string(),
            payload,
            idempotency_key: None,
            created_at: now,
            deliveries: vec![DeliveryRef {
                endpoint_id: None,
                job_id: job.id.to_string(),
            }],
        };
        let value = serde_json::to_value(&event)?;
        self.store
            .meta_put(Put::new(EVENTS, &id, &value).ttl(self.config.event_ttl))
            .await?;
        Ok(event)
    }

    /// One event with its deliveries.
    pub async fn event(&self, id: &str) -> Result<Event> {
        let record = self
            .store
            .meta_get(EVENTS, id)
            .await?
            .ok_or_else(|| WebhookError::not_found("event", id))?;
        Ok(record.decode()?)
    }

    /// A delivery job by id.
    pub async fn delivery(&self, job_id: &str) -> Result<conveyor_worker::Job> {
        let id: JobId = job_id.parse().map_err(|_| {
            WebhookError::invalid("delivery", format!("`{job_id}` is not a job id"))
        })?;
        match self.store.get(id).await? {
            Some(job) if job.kind == KIND => Ok(job),
            _ => Err(WebhookError::not_found("delivery", job_id)),
        }
    }
}
