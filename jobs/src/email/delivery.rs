//! The `email.send` handler: one attempt of one message.
//!
//! 1. Build the message again from the args (the same bytes and `Message-ID` on every
//!    attempt); a message that no longer passes the rules (the config changed) fails for good.
//!    When a DKIM key applies (see [`super::dkim`]) the message is signed here; a message of
//!    a list, with `email.public_url` set, is copied per recipient with its own one-click
//!    unsubscribe link ([`super::unsubscribe`]) and each copy signed.
//! 2. Read the message's [`DeliveryRecord`] (on a job's first attempt there is none): the
//!    recipients already accepted are never sent to again.
//! 3. One SMTP transaction per remaining recipient, over the transport's pooled
//!    connections, so each recipient's answer is its own: `250` accepted; a 4xx (greylisting
//!    `450`/`451` included) deferred; a 5xx refused; a connection that fails — before the
//!    server said `250` to the end of the data — deferred, the message not counted as sent.
//!    After a failure that is not an SMTP reply the remaining recipients are left for the
//!    next attempt rather than tried on a failing server.
//! 4. Write the record (recipients and this attempt) with the other deliveries finishing at
//!    the same time (one statement), then the verdict: anything deferred retries with the
//!    kind's backoff; else anything refused fails the job (dead) with the server's reply;
//!    else done. Refused recipients are not retried by the automatic retries; an operator's
//!    retry of the dead job sends to them again (and still never to the accepted ones).

use std::time::Instant;

use chrono::{DateTime, Utc};
use conveyor_worker::{JobContext, Outcome};
use lettre::AsyncTransport;
use lettre::address::Envelope;
use serde::{Deserialize, Serialize};

use super::message::{EmailArgs, RecipientKind, same_address};
use super::{DELIVERIES, Emails, throttle};

/// Attempts kept in one record (the oldest are dropped).
const MAX_ATTEMPTS_KEPT: usize = 50;
/// How much of a server's reply is kept.
const MAX_REPLY: usize = 500;

/// Where one recipient stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RecipientStatus {
    /// Not tried yet.
    Pending,
    /// The server said `250` to the end of the data: delivered to it, never sent again.
    Accepted,
    /// A temporary failure (4xx, or the connection failed): tried again on the next attempt.
    Deferred,
    /// A permanent failure (5xx): not retried automatically.
    Refused,
    /// On the suppression list: skipped, never sent (the reply says why).
    Suppressed,
}

/// One recipient's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RecipientResult {
    /// The address.
    pub address: String,
    /// How it was addressed.
    pub kind: RecipientKind,
    /// Where it stands.
    pub status: RecipientStatus,
    /// The SMTP reply code of the last try (none when the connection failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    /// The server's reply (or the connection error) of the last try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// The job attempt of the last try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i32>,
    /// When it was last tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
}

/// One attempt's summary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EmailAttempt {
    /// The job's attempt number.
    pub attempt: i32,
    /// When it started.
    pub at: DateTime<Utc>,
    /// The transport used.
    pub transport: String,
    /// Recipients tried in this attempt.
    pub tried: Vec<String>,
    /// Of those, accepted.
    pub accepted: u32,
    /// Deferred (retried).
    pub deferred: u32,
    /// Refused for good.
    pub refused: u32,
    /// Skipped: on the suppression list.
    #[serde(default)]
    pub suppressed: u32,
    /// Milliseconds the attempt took.
    pub latency_ms: u64,
    /// The first failure, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `done`, `retry`, `throttled` (every recipient left was held back by a throttle: the
    /// job runs again later without using an attempt) or `failed` (the job is dead).
    pub result: String,
}

/// What is known of one message's delivery, kept in the store under its job id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryRecord {
    /// The job.
    pub job_id: String,
    /// The `Message-ID` sent.
    pub message_id: String,
    /// Every recipient, in the order given.
    pub recipients: Vec<RecipientResult>,
    /// The attempts, oldest first (the latest 50).
    pub attempts: Vec<EmailAttempt>,
    /// The last attempt failed the job for good: the next run is an operator's retry, which
    /// tries the refused recipients again.
    #[serde(default)]
    pub dead: bool,
}

/// A failed try's class.
enum Failure {
    /// 4xx: try again later.
    Transient,
    /// 5xx: not again.
    Permanent,
    /// No SMTP reply (connection, TLS, timeout, protocol): try again later, and stop trying
    /// more recipients in this attempt.
    Connection,
}

fn excerpt(s: &str) -> String {
    let mut out: String = s.chars().take(MAX_REPLY).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// The text of an SMTP error: the server's reply with its code, or the failure with its
/// causes.
fn error_text(e: &lettre::transport::smtp::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    excerpt(&text)
}

/// Whether a refusal's reply carries the enhanced status of a hard bounce (RFC 3463 5.1.x:
/// bad mailbox, bad domain, ...).
fn is_hard_bounce(reply: &str) -> bool {
    reply
        .split(|c: char| c.is_whitespace() || c == ':' || c == '(' || c == ')')
        .any(|w| {
            let mut parts = w.split('.');
            parts.next() == Some("5")
                && parts.next() == Some("1")
                && parts
                    .next()
                    .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                && parts.next().is_none()
        })
}

impl Emails {
    /// Runs one attempt (the job handler).
    pub async fn run(&self, args: EmailArgs, ctx: JobContext) -> anyhow::Result<Outcome> {
        let job = &ctx.job;
        let job_id = job.id.to_string();
        // A template is rendered on every attempt (the version is pinned at enqueue by
        // `POST /v1/emails`); a template deleted since, or data it cannot render with, fails
        // the message for good.
        let args = match super::template::render_message(self.store.as_ref(), &args).await {
            Ok(Some((rendered, _))) => rendered,
            Ok(None) => args,
            Err(e @ conveyor_worker::Error::InvalidInput { .. }) => {
                return Ok(Outcome::fail(format!("the message is refused: {e}")));
            }
            Err(e) => return Err(e.into()),
        };
        let built = match args.build(&self.config, &job_id) {
            Ok(b) => b,
            Err(e) => return Ok(Outcome::fail(format!("the message is refused: {e}"))),
        };
        let transport_name = match self.config.transport_name(args.transport.as_deref()) {
            Ok(n) => n.to_string(),
            Err(e) => return Ok(Outcome::fail(e)),
        };
        let Some(smtp) = self.transports.get(&transport_name) else {
            return Ok(Outcome::fail(format!(
                "no email transport `{transport_name}`"
            )));
        };
        // Signed now, after the Message-ID is fixed: every attempt signs the same headers and
        // body; only the signature's timestamp differs.
        let mut built = built;
        let transport_key = self
            .config
            .transports
            .get(&transport_name)
            .and_then(|t| t.dkim.as_deref());
        // A message of a list, with `email.public_url` set: each recipient gets a copy of its
        // own, with its own unsubscribe link, signed per copy (below).
        let listed = match (&args.list, &self.config.public_url) {
            (Some(list), Some(base)) => Some((list.as_str(), base.as_str())),
            _ => None,
        };
        if listed.is_none()
            && let Some(signer) = self
                .dkim
                .for_message(transport_key, built.from.domain(), false)
        {
            lettre::message::dkim::dkim_sign(&mut built.message, signer);
            built.raw = built.message.formatted();
        }

        let previous = if job.attempts.is_empty() {
            None
        } else {
            self.record(&job_id).await?
        };
        let mut record = previous.unwrap_or_else(|| DeliveryRecord {
            job_id: job_id.clone(),
            message_id: built.message_id.clone(),
            recipients: Vec::new(),
            attempts: Vec::new(),
            dead: false,
        });
        let operator_retry = record.dead;
        record.dead = false;
        record.message_id = built.message_id.clone();
        // The recipients as the args give them now, with what is known of each.
        let recipients: Vec<RecipientResult> = built
            .recipients
            .iter()
            .map(|(address, kind)| {
                let known = record.recipients.iter().find(|r| {
                    r.address
                        .parse::<lettre::Address>()
                        .is_ok_and(|a| same_address(&a, address))
                });
                match known {
                    Some(r) => {
                        let mut r = r.clone();
                        if operator_retry && r.status == RecipientStatus::Refused {
                            r.status = RecipientStatus::Pending;
                        }
                        r
                    }
                    None => RecipientResult {
                        address: address.to_string(),
                        kind: *kind,
                        status: RecipientStatus::Pending,
                        code: None,
                        reply: None,
                        attempt: None,
                        at: None,
                    },
                }
            })
            .collect();
        record.recipients = recipients;

        let started = Instant::now();
        let at = Utc::now();
        let mut tried = Vec::new();
        let (mut accepted, mut deferred, mut refused, mut suppressed) = (0u32, 0u32, 0u32, 0u32);
        let mut first_error: Option<String> = None;
        let mut connection_failed = false;
        // Recipients held back by a throttle in this attempt, and the shortest wait.
        let mut throttled: Vec<usize> = Vec::new();
        let mut throttle_wait: Option<std::time::Duration> = None;
        let transport_throttle = self
            .config
            .transports
            .get(&transport_name)
            .map(|t| t.throttle())
            .unwrap_or_default();
        let lease = self
            .config
            .transports
            .get(&transport_name)
            .and_then(|t| t.timeout)
            .unwrap_or(self.config.timeout)
            * 10;
        let metrics = |transport: &str, domain: &str| {
            conveyor_worker::metrics::global()
                .emails
                .get(&[transport, self.config.metrics_domain(domain)])
        };
        for (i, (address, _)) in built.recipients.iter().enumerate() {
            let r = &mut record.recipients[i];
            if matches!(
                r.status,
                RecipientStatus::Accepted | RecipientStatus::Refused | RecipientStatus::Suppressed
            ) {
                continue;
            }
            // Checked on every attempt: an address suppressed since the last one is skipped.
            if let Some(s) = super::suppression::find(
                self.store.as_ref(),
                address.as_ref(),
                args.list.as_deref(),
            )
            .await?
            {
                r.status = RecipientStatus::Suppressed;
                r.code = None;
                r.reply = Some(s.describe());
                r.attempt = Some(job.attempt);
                r.at = Some(Utc::now());
                suppressed += 1;
                metrics(&transport_name, &address.domain().to_ascii_lowercase())
                    .suppressed
                    .inc();
                continue;
            }
            if connection_failed || ctx.is_cancelled() {
                // Left for the next attempt; its last result stands.
                if r.status == RecipientStatus::Pending {
                    r.status = RecipientStatus::Deferred;
                    r.reply = Some("not tried: the attempt stopped before it".into());
                }
                deferred += 1;
                continue;
            }
            let domain = address.domain().to_ascii_lowercase();
            let mut scopes = Vec::new();
            if let Some(t) = self.config.throttles.get(&domain) {
                scopes.push(throttle::Scope {
                    name: format!("domain:{domain}"),
                    throttle: t,
                });
            }
            if transport_throttle != throttle::Throttle::default() {
                scopes.push(throttle::Scope {
                    name: format!("transport:{transport_name}"),
                    throttle: &transport_throttle,
                });
            }
            let mut held = if scopes.is_empty() {
                throttle::Held::default()
            } else {
                match throttle::acquire(self.store.as_ref(), &scopes, lease, &job_id).await? {
                    Ok(held) => held,
                    Err(wait) => {
                        // Not tried: left for the snoozed run, without using an attempt.
                        if r.status != RecipientStatus::Pending {
                            r.status = RecipientStatus::Deferred;
                        }
                        r.reply = Some(wait.reason);
                        throttled.push(i);
                        deferred += 1;
                        metrics(&transport_name, &domain).throttled.inc();
                        throttle_wait =
                            Some(throttle_wait.map_or(wait.after, |w| w.min(wait.after)));
                        continue;
                    }
                }
            };
            tried.push(address.to_string());
            let envelope = Envelope::new(Some(built.from.clone()), vec![address.clone()])?;
            let copy;
            let raw = match listed {
                Some((list, base)) => {
                    copy = self.listed_copy(&built, address, list, base, transport_key)?;
                    &copy
                }
                None => &built.raw,
            };
            let sent = tokio::select! {
                s = smtp.client.send_raw(&envelope, raw) => Some(s),
                _ = ctx.cancelled() => None,
            };
            held.release(self.store.as_ref()).await;
            r.attempt = Some(job.attempt);
            r.at = Some(Utc::now());
            let (status, code, reply, failure) = match sent {
                None => (
                    RecipientStatus::Deferred,
                    None,
                    "interrupted (cancelled, timed out or shutting down) before the server accepted it".to_string(),
                    Some(Failure::Connection),
                ),
                Some(Ok(response)) => {
                    let text: Vec<&str> = response.message().collect();
                    (
                        RecipientStatus::Accepted,
                        Some(u16::from(response.code())),
                        excerpt(&text.join(" ")),
                        None,
                    )
                }
                Some(Err(e)) => {
                    let code = e.status().map(u16::from);
                    let failure = if e.is_permanent() {
                        Failure::Permanent
                    } else if e.is_transient() {
                        Failure::Transient
                    } else {
                        Failure::Connection
                    };
                    let status = match failure {
                        Failure::Permanent => RecipientStatus::Refused,
                        _ => RecipientStatus::Deferred,
                    };
                    (status, code, error_text(&e), Some(failure))
                }
            };
            let series = metrics(&transport_name, &domain);
            match failure {
                None => {
                    accepted += 1;
                    series.sent.inc();
                }
                Some(Failure::Permanent) => {
                    refused += 1;
                    series.failed.inc();
                    if is_hard_bounce(&reply) {
                        series.bounced.inc();
                    }
                }
                Some(Failure::Transient) => {
                    deferred += 1;
                    series.deferred.inc();
                }
                Some(Failure::Connection) => {
                    deferred += 1;
                    series.deferred.inc();
                    connection_failed = true;
                }
            }
            if failure.is_some() && first_error.is_none() {
                first_error = Some(format!("{address}: {reply}"));
            }
            // A hard bounce (`5.1.x`: no such mailbox) suppresses the address for every
            // list: the next message to it is skipped, not sent.
            if matches!(failure, Some(Failure::Permanent))
                && super::suppression::is_hard_bounce(&reply)
            {
                super::suppression::add(
                    self.store.as_ref(),
                    super::suppression::NewSuppression {
                        address: address.to_string(),
                        list: None,
                        reason: super::suppression::Reason::HardBounce,
                        detail: Some(reply.clone()),
                    },
                )
                .await?;
            }
            r.status = status;
            r.code = code;
            r.reply = Some(reply);
        }

        let failures: Vec<String> = record
            .recipients
            .iter()
            .filter(|r| {
                matches!(
                    r.status,
                    RecipientStatus::Refused | RecipientStatus::Deferred
                )
            })
            .map(|r| {
                format!(
                    "{} {}: {}",
                    r.address,
                    match r.status {
                        RecipientStatus::Refused => "refused",
                        _ => "deferred",
                    },
                    r.reply.as_deref().unwrap_or("")
                )
            })
            .collect();
        let total = record.recipients.len();
        let done = record
            .recipients
            .iter()
            .filter(|r| r.status == RecipientStatus::Accepted)
            .count();
        let any_deferred = record.recipients.iter().any(|r| {
            matches!(
                r.status,
                RecipientStatus::Deferred | RecipientStatus::Pending
            )
        });
        let any_refused = record
            .recipients
            .iter()
            .any(|r| r.status == RecipientStatus::Refused);
        let summary = format!(
            "accepted by {done} of {total} recipients; {}",
            failures.join("; ")
        );
        let last = job.attempt >= job.max_attempts;
        // Everything still to do was held back by a throttle: run again later without using
        // an attempt.
        let only_throttled = !throttled.is_empty()
            && record.recipients.iter().enumerate().all(|(i, r)| {
                !matches!(
                    r.status,
                    RecipientStatus::Deferred | RecipientStatus::Pending
                ) || throttled.contains(&i)
            });
        if only_throttled && tried.is_empty() {
            // Nothing happened that the record does not already say.
            return Ok(Outcome::Snooze(
                throttle_wait.unwrap_or(throttle::BUSY_WAIT),
            ));
        }
        let (outcome, result) = if only_throttled {
            (
                Outcome::Snooze(throttle_wait.unwrap_or(throttle::BUSY_WAIT)),
                "throttled",
            )
        } else if any_deferred {
            (
                Outcome::retry(summary),
                if last { "failed" } else { "retry" },
            )
        } else if any_refused {
            record.dead = true;
            (Outcome::fail(summary), "failed")
        } else {
            (Outcome::Done, "done")
        };
        record.attempts.push(EmailAttempt {
            attempt: job.attempt,
            at,
            transport: transport_name,
            tried,
            accepted,
            deferred,
            refused,
            suppressed,
            latency_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            error: first_error,
            result: result.to_string(),
        });
        if record.attempts.len() > MAX_ATTEMPTS_KEPT {
            let extra = record.attempts.len() - MAX_ATTEMPTS_KEPT;
            record.attempts.drain(..extra);
        }
        let value = serde_json::to_value(&record)?;
        self.log
            .write(
                &self.store,
                DELIVERIES,
                job_id,
                value,
                self.config.records_ttl,
            )
            .await?;
        Ok(outcome)
    }

    /// The copy of a list's message for `address`: its own one-click unsubscribe link
    /// (RFC 8058) to `base`, added before the DKIM signature, which covers both headers.
    fn listed_copy(
        &self,
        built: &super::message::Built,
        address: &lettre::Address,
        list: &str,
        base: &str,
        transport_key: Option<&str>,
    ) -> anyhow::Result<Vec<u8>> {
        use lettre::message::header::{HeaderName, HeaderValue};
        let token = super::unsubscribe::token(&self.keys, address.as_ref(), list)?;
        let mut message = built.message.clone();
        let headers = message.headers_mut();
        headers.insert_raw(HeaderValue::new(
            HeaderName::new_from_ascii_str("List-Unsubscribe"),
            format!("<{}>", super::unsubscribe::url(base, &token)),
        ));
        headers.insert_raw(HeaderValue::new(
            HeaderName::new_from_ascii_str("List-Unsubscribe-Post"),
            super::unsubscribe::ONE_CLICK.to_string(),
        ));
        if let Some(signer) = self
            .dkim
            .for_message(transport_key, built.from.domain(), true)
        {
            lettre::message::dkim::dkim_sign(&mut message, signer);
        }
        Ok(message.formatted())
    }

    /// The delivery record of a message (see [`record`]).
    pub async fn record(&self, job_id: &str) -> conveyor_worker::Result<Option<DeliveryRecord>> {
        record(self.store.as_ref(), job_id).await
    }
}

/// The delivery record of the message sent by job `job_id` in `store` (`None` before its
/// first attempt, or once expired).
pub async fn record(
    store: &dyn conveyor_worker::Store,
    job_id: &str,
) -> conveyor_worker::Result<Option<DeliveryRecord>> {
    match store.meta_get(DELIVERIES, job_id).await? {
        Some(r) => Ok(Some(r.decode()?)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hard_bounces_are_5_1_x() {
        assert!(super::is_hard_bounce(
            "permanent error (550): 5.1.1 <x@example.org>: user unknown"
        ));
        assert!(!super::is_hard_bounce(
            "permanent error (552): 5.2.2 mailbox full"
        ));
        assert!(!super::is_hard_bounce("permanent error (550): 5.1 x"));
        assert!(!super::is_hard_bounce("15.1.1"));
    }
}
