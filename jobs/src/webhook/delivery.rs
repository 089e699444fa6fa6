//! The `webhook.deliver` handler: one attempt of one delivery.
//!
//! 1. Load the endpoint (cached briefly). Deleted or disabled: the job is cancelled.
//! 2. Circuit: open means snooze to the end of the cool-down — no attempt is used.
//! 3. Rate limit: take a token from the endpoint's bucket in the store (shared by every
//!    worker and process); none left means snooze until one refills — no attempt used.
//! 4. Sign (every live secret) and POST through the guarded client.
//! 5. Classify, write one attempt-log record, update the circuit (failures only, or the first
//!    success after failures), count health, and answer the runtime: done, retry after the
//!    schedule's next wait (or `Retry-After`), or a permanent failure.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_worker::store::meta::{MetaQuery, Put, RateLimit};
use conveyor_worker::{JobContext, Outcome};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::circuit::Admission;
use super::client::Request;
use super::model::{ATTEMPTS, AUDIT, Attempt, DeliverArgs, EVENT_ENDPOINT_DISABLED, Endpoint};
use super::retry_policy::{Verdict, classify, delay_before, parse_retry_after};
use super::{Result, Webhooks, new_id, signature};

/// Which attempt-log entries to list.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AttemptQuery {
    /// Continue after this entry key (the `next` of the previous page).
    pub after: Option<String>,
    /// Page size, 1..=1000.
    pub limit: u32,
}

/// One page of the attempt log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttemptPage {
    /// Entries, newest event first, newest attempt first within an event.
    pub attempts: Vec<Attempt>,
    /// Pass as `after` for the next page; `None` at the end.
    pub next: Option<String>,
}

/// The audit record of an automatic disable, in the API's audit shape
/// (`conveyor_admin::audit::AuditEntry`) so the audit log lists it beside operator actions.
pub fn auto_disable_audit(
    id: &str,
    ep: &Endpoint,
    since: DateTime<Utc>,
    reason: &str,
    at: DateTime<Utc>,
) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "at": at,
        "actor": { "key_id": null, "name": "system", "address": null },
        "action": "webhook.endpoint.auto_disabled",
        "target": {
            "webhook_endpoint": ep.id,
            "url": ep.url,
            "failing_since": since,
            "reason": reason,
        },
        "affected": 1,
    })
}

fn attempt_key(target: &str, event_id: &str, attempt_id: &str) -> String {
    format!("{target}:{event_id}:{attempt_id}")
}

impl Webhooks {
    /// Runs one delivery attempt (the job handler).
    pub async fn deliver(&self, args: DeliverArgs, ctx: JobContext) -> anyhow::Result<Outcome> {
        // The store's clock: the circuit breaker and the rate limit are shared with workers
        // on other machines, whose clocks may disagree with this one.
        let now = ctx.now();
        let job = &ctx.job;
        let endpoint: Option<Arc<Endpoint>> = match &args.endpoint_id {
            Some(id) => match self.endpoint_cached(id).await? {
                None => return Ok(Outcome::cancel(format!("endpoint {id} was deleted"))),
                Some(ep) if !ep.enabled => {
                    return Ok(Outcome::cancel(format!(
                        "endpoint {id} is disabled ({})",
                        ep.disabled_reason.as_deref().unwrap_or("by an admin")
                    )));
                }
                Some(ep) => Some(ep),
            },
            None => None,
        };
        let url = match (&endpoint, &args.url) {
            (Some(ep), _) => ep.url.clone(),
            (None, Some(url)) => url.clone(),
            (None, None) => return Ok(Outcome::fail("delivery has neither endpoint_id nor url")),
        };

        let mut probe = false;
        if let Some(ep) = &endpoint {
            match self.admit(&ep.id, now).await? {
                Admission::Send => {}
                Admission::Probe => probe = true,
                Admission::Wait(d) => return Ok(Outcome::Snooze(d)),
            }
            if let Some(rate) = ep.rate_limit {
                let take = self
                    .store
                    .take_tokens(
                        &format!("webhook:{}", ep.id),
                        RateLimit {
                            per_second: rate,
                            burst: rate.max(1.0),
                        },
                        1.0,
                        now,
                    )
                    .await?;
                if !take.allowed {
                    // Spread the waiters so they do not all come back in the same tick.
                    let wait = take.retry_after.max(Duration::from_millis(5));
                    let spread = wait.mul_f64(rand::rng().random_range(0.0..2.0));
                    return Ok(Outcome::Snooze(wait + spread));
                }
            }
        }

        let body = serde_json::to_vec(&serde_json::json!({
            "type": args.event_type,
            "timestamp": args.created_at,
            "data": args.payload,
        }))?;
        let sent_at = Utc::now();
        let ts = sent_at.timestamp();
        let keys: Vec<Vec<u8>> = match &endpoint {
            Some(ep) => ep
                .live_secrets(sent_at)
                .filter_map(|s| signature::secret_key(s).ok())
                .collect(),
            None => self
                .config
                .direct_secret
                .iter()
                .filter_map(|s| signature::secret_key(s).ok())
                .collect(),
        };
        let mut headers: Vec<(String, String)> = Vec::with_capacity(8);
        if let Some(ep) = &endpoint {
            headers.extend(ep.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        headers.push((signature::HEADER_ID.into(), args.event_id.clone()));
        headers.push((signature::HEADER_TIMESTAMP.into(), ts.to_string()));
        if !keys.is_empty() {
            headers.push((
                signature::HEADER_SIGNATURE.into(),
                signature::signature_header(&keys, &args.event_id, ts, &body),
            ));
        }
        let timeout = endpoint
            .as_ref()
            .and_then(|e| e.timeout_ms)
            .map_or(self.config.timeout, Duration::from_millis);
        let follow = endpoint
            .as_ref()
            .and_then(|e| e.follow_redirects)
            .unwrap_or(self.config.follow_redirects);
        let response = tokio::select! {
            r = self.client.send(Request {
                method: reqwest::Method::POST,
                url: &url,
                headers: &headers,
                body,
                content_type: Some("application/json"),
                timeout,
                follow_redirects: follow,
                read_json: 0,
            }) => r,
            _ = ctx.cancelled() => return Ok(Outcome::retry("delivery interrupted (cancelled, timed out or shutting down)")),
        };

        let attempt = job.attempt;
        let verdict = match (response.status, response.blocked) {
            (_, true) => Verdict::Permanent,
            (Some(status), _) => classify(
                status,
                attempt,
                response
                    .retry_after
                    .as_deref()
                    .and_then(|v| parse_retry_after(v, Utc::now())),
                self.config.permanent_4xx_after,
                self.config.max_retry_after,
            ),
            (None, _) => Verdict::Retry { after: None },
        };
        let schedule: Vec<Duration> =
            match endpoint.as_ref().and_then(|e| e.retry_schedule_ms.as_ref()) {
                Some(ms) => ms.iter().copied().map(Duration::from_millis).collect(),
                None => self.config.retry_schedule.clone(),
            };
        let last = attempt >= job.max_attempts;
        let error_text = match (&response.error, response.status) {
            (Some(e), _) => e.clone(),
            (None, Some(s)) => format!("HTTP {s} from {url}"),
            (None, None) => "no response".to_string(),
        };
        let outcome = match &verdict {
            Verdict::Delivered => Outcome::Done,
            Verdict::Permanent => Outcome::fail(error_text.clone()),
            Verdict::Retry { after } => {
                let wait = after
                    .or_else(|| delay_before(&schedule, attempt + 1))
                    .unwrap_or(Duration::ZERO);
                Outcome::retry_after(wait, error_text.clone())
            }
        };

        let result = match (&verdict, last) {
            (Verdict::Delivered, _) => "delivered",
            (Verdict::Permanent, _) | (_, true) => "failed",
            _ => "retry",
        };
        conveyor_worker::metrics::global()
            .webhook_deliveries
            .get(&[result])
            .inc();
        let target = args.endpoint_id.as_deref().unwrap_or("direct");
        if self.config.attempt_log {
            let mut logged: BTreeMap<String, String> = headers.into_iter().collect();
            redact_logged_headers(&mut logged);
            logged.insert("content-type".into(), "application/json".into());
            let entry = Attempt {
                id: new_id("att_"),
                endpoint_id: args.endpoint_id.clone(),
                event_id: args.event_id.clone(),
                job_id: job.id.to_string(),
                attempt,
                at: sent_at,
                url: url.clone(),
                request_headers: logged,
                status: response.status,
                latency_ms: u64::try_from(response.latency.as_millis()).unwrap_or(u64::MAX),
                response_body: response.body,
                error: response.error.clone(),
                result: result.to_string(),
            };
            let value = serde_json::to_value(&entry)?;
            let key = attempt_key(target, &args.event_id, &entry.id);
            self.attempt_log
                .write(
                    &self.store,
                    ATTEMPTS,
                    key,
                    value,
                    self.config.attempt_log_ttl,
                )
                .await?;
        }

        if let Some(ep) = &endpoint {
            let ok = verdict == Verdict::Delivered;
            self.health.record(&ep.id, sent_at, ok, response.latency);
            if ok {
                self.record_success(&ep.id, sent_at).await?;
            } else {
                let effect = self.record_failure(&ep.id, sent_at, probe).await?;
                if let Some(since) = effect.failing_since
                    && let Ok(period) = chrono::Duration::from_std(self.config.auto_disable_after)
                    && sent_at - since >= period
                {
                    self.auto_disable(ep, since, sent_at).await?;
                }
            }
            if self.health.flush_due(self.config.health_flush)
                && let Err(e) = self.flush_health().await
            {
                tracing::warn!(error = %e, "cannot write webhook health counters");
            }
        }
        Ok(outcome)
    }

    /// Disables an endpoint that has failed since `since`, writes an audit record and emits
    /// a `webhook.endpoint.disabled` event (to the other endpoints subscribed to it).
    async fn auto_disable(
        &self,
        ep: &Endpoint,
        since: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let reason = format!(
            "failing since {} (longer than webhooks.auto_disable_after = {})",
            since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            humantime::format_duration(self.config.auto_disable_after)
        );
        // Only the writer that flipped it records and announces it.
        let flipped = std::sync::atomic::AtomicBool::new(false);
        self.modify_endpoint(&ep.id, |e| {
            flipped.store(e.enabled, std::sync::atomic::Ordering::Relaxed);
            if e.enabled {
                e.enabled = false;
                e.disabled_reason = Some(reason.clone());
            }
            Ok(())
        })
        .await?;
        if !flipped.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        tracing::warn!(endpoint = %ep.id, url = %ep.url, %reason, "webhook endpoint disabled");
        let key = uuid::Uuid::now_v7().to_string();
        let audit = auto_disable_audit(&key, ep, since, &reason, now);
        self.store
            .meta_put(
                Put::new(AUDIT, &key, &audit).expect(conveyor_worker::store::meta::Expect::Absent),
            )
            .await?;
        self.send_system_event(super::event::SendEvent {
            event_type: EVENT_ENDPOINT_DISABLED.into(),
            payload: serde_json::json!({
                "endpoint_id": ep.id,
                "url": ep.url,
                "failing_since": since,
                "reason": reason,
            }),
            idempotency_key: Some(format!("{}:disabled:{}", ep.id, since.timestamp_micros())),
        })
        .await?;
        Ok(())
    }

    /// The attempt log of an endpoint (`"direct"` for one-off deliveries), newest event first.
    pub async fn attempts_for_endpoint(
        &self,
        endpoint_id: &str,
        query: &AttemptQuery,
    ) -> Result<AttemptPage> {
        // A deleted (or never created) endpoint is not found, not an empty log.
        self.endpoint(endpoint_id).await?;
        self.attempt_page(format!("{endpoint_id}:"), query).await
    }

    /// The attempt log of an event, across its endpoints, newest first.
    pub async fn attempts_for_event(&self, event_id: &str) -> Result<Vec<Attempt>> {
        let event = self.event(event_id).await?;
        let mut targets: Vec<String> = event
            .deliveries
            .iter()
            .map(|d| d.endpoint_id.clone().unwrap_or_else(|| "direct".into()))
            .collect();
        targets.sort();
        targets.dedup();
        let mut out = Vec::new();
        for target in targets {
            let mut after = None;
            loop {
                let page = self
                    .attempt_page(
                        format!("{target}:{event_id}:"),
                        &AttemptQuery {
                            after: after.clone(),
                            limit: 1000,
                        },
                    )
                    .await?;
                out.extend(page.attempts);
                match page.next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
        }
        out.sort_by_key(|a| std::cmp::Reverse(a.at));
        Ok(out)
    }

    async fn attempt_page(&self, prefix: String, query: &AttemptQuery) -> Result<AttemptPage> {
        let limit = if query.limit == 0 { 50 } else { query.limit };
        let records = self
            .store
            .meta_list(
                ATTEMPTS,
                &MetaQuery {
                    prefix: Some(prefix),
                    after: query.after.clone(),
                    limit,
                    descending: true,
                },
            )
            .await?;
        let next = (records.len() == limit as usize)
            .then(|| records.last().map(|r| r.key.clone()))
            .flatten();
        let mut attempts = records
            .iter()
            .map(|r| r.decode())
            .collect::<std::result::Result<Vec<Attempt>, _>>()?;
        // Entries written before values were redacted at write time.
        for a in &mut attempts {
            redact_logged_headers(&mut a.request_headers);
        }
        Ok(AttemptPage { attempts, next })
    }
}

/// Hides credential-looking header values (an endpoint's `Authorization`, `X-Api-Key`, …) in
/// an attempt-log entry, for every reader. The signature is not secret and stays: it is what
/// a receiver's developer compares against.
fn redact_logged_headers(headers: &mut BTreeMap<String, String>) {
    for (name, value) in headers.iter_mut() {
        if !name.eq_ignore_ascii_case(signature::HEADER_SIGNATURE)
            && super::model::is_secret_header(name)
        {
            *value = super::model::REDACTED.to_string();
        }
    }
}
