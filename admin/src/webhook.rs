//! Webhook operations: endpoint changes, reading a secret, replays and sending events. The
//! webhook rules (URLs, the SSRF guard, event types, idempotency) are
//! `conveyor_jobs::webhook::Webhooks`'; this adds the audit record, so a change made from
//! the CLI is recorded like one made over HTTP.
//!
//! Audit actions: `webhook.endpoint.create`, `.update`, `.delete`, `.enable`, `.disable`,
//! `.rotate_secret`, `.show_secret` (target `{"webhook_endpoint": id}`), and `webhook.replay`.
//! Sending an event is the application's traffic, like an enqueue, and is not audited.

use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_jobs::webhook::endpoint::{EndpointPatch, NewEndpoint};
use conveyor_jobs::webhook::event::{SendEvent, Sent};
use conveyor_jobs::webhook::replay::Replayed;
use conveyor_jobs::webhook::{Endpoint, Event, Secret};
use conveyor_worker::Job;
use serde_json::{Value, json};

use crate::{Actor, Admin, Result};

fn endpoint_target(id: &str) -> Value {
    json!({ "webhook_endpoint": id })
}

impl Admin {
    /// Creates an endpoint; the answer shows its signing secret. Audited.
    pub async fn create_endpoint(&self, actor: &Actor, new: NewEndpoint) -> Result<Endpoint> {
        let ep = self.webhooks.create_endpoint(new).await?;
        self.audit(
            actor,
            "webhook.endpoint.create",
            json!({ "webhook_endpoint": ep.id, "url": ep.url }),
            1,
        )
        .await?;
        Ok(ep)
    }

    /// Changes the fields `patch` gives. Audited.
    pub async fn update_endpoint(
        &self,
        actor: &Actor,
        id: &str,
        patch: EndpointPatch,
    ) -> Result<Endpoint> {
        let ep = self.webhooks.update_endpoint(id, patch).await?;
        self.audit(actor, "webhook.endpoint.update", endpoint_target(id), 1)
            .await?;
        Ok(ep)
    }

    /// Deletes an endpoint; its queued deliveries end `cancelled`. Audited.
    pub async fn delete_endpoint(&self, actor: &Actor, id: &str) -> Result<()> {
        self.webhooks.delete_endpoint(id).await?;
        self.audit(actor, "webhook.endpoint.delete", endpoint_target(id), 1)
            .await
    }

    /// Enables or disables an endpoint. Audited as `webhook.endpoint.enable` / `.disable`.
    pub async fn set_endpoint_enabled(
        &self,
        actor: &Actor,
        id: &str,
        enabled: bool,
    ) -> Result<Endpoint> {
        let ep = self.webhooks.set_enabled(id, enabled).await?;
        let action = if enabled {
            "webhook.endpoint.enable"
        } else {
            "webhook.endpoint.disable"
        };
        self.audit(actor, action, endpoint_target(id), 1).await?;
        Ok(ep)
    }

    /// Signs with a new secret, the old ones for at most `overlap` beside it; the answer
    /// shows the secrets. Audited.
    pub async fn rotate_endpoint_secret(
        &self,
        actor: &Actor,
        id: &str,
        secret: Option<String>,
        overlap: Option<Duration>,
    ) -> Result<Endpoint> {
        let ep = self.webhooks.rotate_secret(id, secret, overlap).await?;
        self.audit(
            actor,
            "webhook.endpoint.rotate_secret",
            endpoint_target(id),
            1,
        )
        .await?;
        Ok(ep)
    }

    /// The endpoint with its signing secrets in clear. Reading a secret is audited (as
    /// `webhook.endpoint.show_secret`), so a leak can be traced to who read it.
    pub async fn endpoint_with_secret(&self, actor: &Actor, id: &str) -> Result<Endpoint> {
        let ep = self.webhooks.endpoint(id).await?;
        self.audit(
            actor,
            "webhook.endpoint.show_secret",
            endpoint_target(id),
            0,
        )
        .await?;
        Ok(ep)
    }

    /// The endpoint's signing secrets in clear; audited like [`Admin::endpoint_with_secret`].
    pub async fn endpoint_secrets(&self, actor: &Actor, id: &str) -> Result<Vec<Secret>> {
        Ok(self.endpoint_with_secret(actor, id).await?.secrets)
    }

    /// Queues one finished delivery again. Audited as `webhook.replay`.
    pub async fn replay_delivery(&self, actor: &Actor, delivery: &str) -> Result<Job> {
        let job = self.webhooks.replay_delivery(delivery).await?;
        self.audit(actor, "webhook.replay", json!({ "delivery": delivery }), 1)
            .await?;
        Ok(job)
    }

    /// Queues again every dead or cancelled delivery of an endpoint created since `since`.
    /// Audited as `webhook.replay`.
    pub async fn replay_endpoint(
        &self,
        actor: &Actor,
        id: &str,
        since: DateTime<Utc>,
    ) -> Result<Replayed> {
        let out = self.webhooks.replay_failed(id, since).await?;
        self.audit(
            actor,
            "webhook.replay",
            json!({ "webhook_endpoint": id, "since": since }),
            out.queued,
        )
        .await?;
        Ok(out)
    }

    /// Sends an event again to every endpoint it went to. Audited as `webhook.replay`.
    pub async fn replay_event(&self, actor: &Actor, event: &str) -> Result<Replayed> {
        let out = self.webhooks.replay_event(event).await?;
        self.audit(
            actor,
            "webhook.replay",
            json!({ "event": event }),
            out.queued,
        )
        .await?;
        Ok(out)
    }

    /// Sends an event to every enabled endpoint subscribed to its type.
    pub async fn send_event(&self, _actor: &Actor, send: SendEvent) -> Result<Sent> {
        Ok(self.webhooks.send_event(send).await?)
    }

    /// Delivers one event straight to a URL.
    pub async fn send_to_url(
        &self,
        _actor: &Actor,
        url: &str,
        event_type: &str,
        payload: Value,
    ) -> Result<Event> {
        Ok(self.webhooks.send_to_url(url, event_type, payload).await?)
    }
}
