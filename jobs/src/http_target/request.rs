//! The `http.request` handler: one attempt of one job.
//!
//! 1. Resolve the destination again (the config may have changed since the enqueue; a job
//!    that is no longer allowed fails permanently).
//! 2. Rate limit: take a token from the target's bucket in the store (shared by every worker
//!    and process); none left means snooze until one refills — no attempt used.
//! 3. Sign (Standard Webhooks: `webhook-id` is the job id, the same on every attempt) and
//!    send through the guarded client, redirects not followed.
//! 4. Verdict: 2xx completes, and a JSON answer (`Content-Type` `application/json` or
//!    `…+json`) within the result limit becomes the job's result ([`answer_result`]); a status in `permanent_statuses` or not in `retry_statuses`
//!    fails permanently (the job is dead at once); a retried status waits its `Retry-After`
//!    (seconds or an HTTP date, clamped to `http_requests.max_retry_after`) or else the
//!    kind's backoff; timeouts and connection errors retry; the SSRF guard's refusal is final.
//! 5. One attempt-log record (headers with credentials redacted, status, latency, the start
//!    of the answer).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_worker::job::{DEFAULT_MAX_RESULT_BYTES, check_result};
use conveyor_worker::store::meta::{MetaQuery, RateLimit};
use conveyor_worker::{JobContext, Outcome};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{
    ATTEMPTS, HEADER_ATTEMPT, HEADER_JOB_ID, HEADER_KIND, HEADER_TARGET, HttpTargets, RequestArgs,
    check_method,
};
use crate::webhook::client::Request;
use crate::webhook::model::{REDACTED, is_secret_header};
use crate::webhook::retry_policy::parse_retry_after;
use crate::webhook::signature;

/// How much of an answer an error message quotes.
const ERROR_EXCERPT: usize = 200;

/// One line of the `http.request` attempt log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HttpAttempt {
    /// `att_` and a UUIDv7.
    pub id: String,
    /// The job.
    pub job_id: String,
    /// The job's attempt number.
    pub attempt: i32,
    /// When it was sent.
    pub at: DateTime<Utc>,
    /// The target (`None`: a raw URL).
    pub target: Option<String>,
    /// The method.
    pub method: String,
    /// Where.
    pub url: String,
    /// What was sent, credential-looking values redacted (the signature stays).
    pub request_headers: BTreeMap<String, String>,
    /// The status, if a response came.
    pub status: Option<u16>,
    /// Milliseconds until the answer (or the failure).
    pub latency_ms: u64,
    /// The first 4 KiB of the answer.
    pub response_body: String,
    /// The transport error, if any.
    pub error: Option<String>,
    /// `done`, `retry`, `failed` (final).
    pub result: String,
}

/// The result a 2xx JSON answer gives the job: the parsed body, if it fits the result limit
/// ([`check_result`], the rule every result passes). An answer over the limit, or not
/// valid JSON, completes the job without a result (a warning says why) rather than failing
/// the attempt: the request has taken effect, and a retry would send it again.
pub fn answer_result(json: Option<&[u8]>, job_id: &str) -> Option<serde_json::Value> {
    let bytes = json?;
    if bytes.is_empty() {
        return None;
    }
    let kept = if bytes.len() > DEFAULT_MAX_RESULT_BYTES {
        Err(format!(
            "the answer is over {DEFAULT_MAX_RESULT_BYTES} bytes, the result limit"
        ))
    } else {
        serde_json::from_slice::<serde_json::Value>(bytes)
            .map_err(|e| format!("the answer is not valid JSON: {e}"))
            .and_then(|v| {
                check_result(&v, DEFAULT_MAX_RESULT_BYTES)
                    .map(|()| v)
                    .map_err(|e| e.to_string())
            })
    };
    match kept {
        Ok(v) => Some(v),
        Err(why) => {
            tracing::warn!(job.id = %job_id, "the job completes without a result: {why}");
            None
        }
    }
}

/// What an answer means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx.
    Done,
    /// Try again, after this long if the answer said (`Retry-After`).
    Retry(Option<Duration>),
    /// Stop: the job is dead.
    Permanent,
}

impl HttpTargets {
    /// Runs one attempt (the job handler).
    pub async fn run(&self, args: RequestArgs, ctx: JobContext) -> anyhow::Result<Outcome> {
        let job = &ctx.job;
        let method = match check_method(args.method.as_deref()) {
            Ok(m) => m,
            Err(e) => return Ok(Outcome::fail(e.to_string())),
        };
        let (target, url) = match self.destination(&args) {
            Ok(d) => d,
            Err(e) => return Ok(Outcome::fail(format!("refused: {e}"))),
        };

        if let Some(t) = target
            && let Some(rate) = t.config.rate_limit
        {
            let take = self
                .store
                .take_tokens(
                    &format!("http_target:{}", t.name),
                    RateLimit {
                        per_second: rate,
                        burst: rate.max(1.0),
                    },
                    1.0,
                    ctx.now(),
                )
                .await?;
            if !take.allowed {
                // Spread the waiters so they do not all come back in the same tick.
                let wait = take.retry_after.max(Duration::from_millis(5));
                let spread = wait.mul_f64(rand::rng().random_range(0.0..2.0));
                return Ok(Outcome::Snooze(wait + spread));
            }
        }

        let (body, content_type): (Vec<u8>, Option<&'static str>) = match &args.body {
            None | Some(serde_json::Value::Null) => (Vec::new(), None),
            Some(serde_json::Value::String(s)) => {
                (s.clone().into_bytes(), Some("text/plain; charset=utf-8"))
            }
            Some(v) => (serde_json::to_vec(v)?, Some("application/json")),
        };

        // The job's headers, then the target's (which win), then Conveyor's own.
        let mut headers: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in &args.headers {
            headers.insert(k.to_ascii_lowercase(), v.clone());
        }
        if let Some(t) = target {
            for (k, v) in &t.config.headers {
                headers.insert(k.to_ascii_lowercase(), v.clone());
            }
        }
        headers
            .entry("user-agent".into())
            .or_insert_with(|| concat!("Conveyor/", env!("CARGO_PKG_VERSION")).into());
        let job_id = job.id.to_string();
        headers.insert(HEADER_JOB_ID.into(), job_id.clone());
        headers.insert(HEADER_ATTEMPT.into(), job.attempt.to_string());
        headers.insert(HEADER_KIND.into(), job.kind.clone());
        if let Some(t) = target {
            headers.insert(HEADER_TARGET.into(), t.name.clone());
        }
        let sent_at = Utc::now();
        let ts = sent_at.timestamp();
        headers.insert(signature::HEADER_ID.into(), job_id.clone());
        headers.insert(signature::HEADER_TIMESTAMP.into(), ts.to_string());
        let keys = target.map_or(&self.raw_keys, |t| &t.keys);
        if !keys.is_empty() {
            headers.insert(
                signature::HEADER_SIGNATURE.into(),
                signature::signature_header(keys, &job_id, ts, &body),
            );
        }
        let list: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let timeout = target
            .and_then(|t| t.config.timeout)
            .unwrap_or(self.config.timeout);
        let client = target.map_or(&self.raw_client, |t| &t.client);
        let response = tokio::select! {
            r = client.send(Request {
                method: method.clone(),
                url: url.as_str(),
                headers: &list,
                body,
                content_type,
                timeout,
                follow_redirects: false,
                read_json: DEFAULT_MAX_RESULT_BYTES,
            }) => r,
            _ = ctx.cancelled() => return Ok(Outcome::retry("request interrupted (cancelled, timed out or shutting down)")),
        };

        let verdict = match (response.status, response.blocked) {
            (_, true) => Verdict::Permanent,
            (Some(status), _) => self.classify(
                target.map(|t| &t.config),
                status,
                response
                    .retry_after
                    .as_deref()
                    .and_then(|v| parse_retry_after(v, Utc::now())),
            ),
            (None, _) => Verdict::Retry(None),
        };
        let error_text = match (&response.error, response.status) {
            (Some(e), _) if response.timed_out => {
                format!(
                    "{e} (no answer within {})",
                    humantime::format_duration(timeout)
                )
            }
            (Some(e), _) => e.clone(),
            (None, Some(s)) => {
                let excerpt: String = response.body.chars().take(ERROR_EXCERPT).collect();
                if excerpt.is_empty() {
                    format!("HTTP {s} from {method} {url}")
                } else {
                    format!("HTTP {s} from {method} {url}: {excerpt}")
                }
            }
            (None, None) => "no response".to_string(),
        };
        let last = job.attempt >= job.max_attempts;
        let (outcome, result) = match verdict {
            Verdict::Done => (
                answer_result(response.json.as_deref(), &job_id)
                    .map_or(Outcome::Done, Outcome::DoneWith),
                "done",
            ),
            Verdict::Permanent => (Outcome::fail(error_text), "failed"),
            Verdict::Retry(Some(after)) => (
                Outcome::retry_after(after, error_text),
                if last { "failed" } else { "retry" },
            ),
            Verdict::Retry(None) => (
                Outcome::retry(error_text),
                if last { "failed" } else { "retry" },
            ),
        };

        if self.config.attempt_log {
            let mut logged = headers;
            for (name, value) in logged.iter_mut() {
                if !name.eq_ignore_ascii_case(signature::HEADER_SIGNATURE) && is_secret_header(name)
                {
                    *value = REDACTED.to_string();
                }
            }
            if let Some(ct) = content_type {
                logged
                    .entry("content-type".into())
                    .or_insert_with(|| ct.to_string());
            }
            let entry = HttpAttempt {
                id: crate::webhook::new_id("att_"),
                job_id: job_id.clone(),
                attempt: job.attempt,
                at: sent_at,
                target: target.map(|t| t.name.clone()),
                method: method.to_string(),
                url: url.to_string(),
                request_headers: logged,
                status: response.status,
                latency_ms: u64::try_from(response.latency.as_millis()).unwrap_or(u64::MAX),
                response_body: response.body,
                error: response.error,
                result: result.to_string(),
            };
            let key = format!("{job_id}:{}", entry.id);
            let value = serde_json::to_value(&entry)?;
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
        Ok(outcome)
    }

    /// What `status` means for a request to `target` (`None`: a raw URL); `retry_after` is
    /// the parsed `Retry-After`.
    pub fn classify(
        &self,
        target: Option<&super::HttpTarget>,
        status: u16,
        retry_after: Option<Duration>,
    ) -> Verdict {
        if (200..300).contains(&status) {
            return Verdict::Done;
        }
        let retry = target
            .and_then(|t| t.retry_statuses.as_ref())
            .unwrap_or(&self.config.retry_statuses);
        let permanent = target
            .and_then(|t| t.permanent_statuses.as_ref())
            .unwrap_or(&self.config.permanent_statuses);
        if permanent.contains(status) || !retry.contains(status) {
            return Verdict::Permanent;
        }
        Verdict::Retry(retry_after.map(|d| d.min(self.config.max_retry_after)))
    }

    /// The attempt log of a job, oldest first (see [`attempts`]).
    pub async fn attempts(&self, job_id: &str) -> conveyor_worker::Result<Vec<HttpAttempt>> {
        attempts(self.store.as_ref(), job_id).await
    }
}

/// The `http.request` attempt log of a job in `store`, oldest first (empty for a job that made
/// no request, or whose records have expired).
pub async fn attempts(
    store: &dyn conveyor_worker::Store,
    job_id: &str,
) -> conveyor_worker::Result<Vec<HttpAttempt>> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let records = store
            .meta_list(
                ATTEMPTS,
                &MetaQuery {
                    prefix: Some(format!("{job_id}:")),
                    after: after.clone(),
                    limit: 1000,
                    descending: false,
                },
            )
            .await?;
        let full = records.len() == 1000;
        after = records.last().map(|r| r.key.clone());
        for r in &records {
            out.push(r.decode()?);
        }
        if !full {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::{HttpConfig, HttpTarget, StatusRule, StatusSet};
    use super::*;

    #[test]
    fn a_json_answer_within_the_limit_is_the_result() {
        assert_eq!(
            answer_result(Some(br#"{"order": 7}"#), "j"),
            Some(serde_json::json!({"order": 7}))
        );
        assert_eq!(answer_result(None, "j"), None, "not JSON: no result");
        assert_eq!(answer_result(Some(b""), "j"), None, "an empty answer");
        assert_eq!(answer_result(Some(b"{not json"), "j"), None);
        let over = format!("\"{}\"", "x".repeat(DEFAULT_MAX_RESULT_BYTES));
        assert_eq!(
            answer_result(Some(over.as_bytes()), "j"),
            None,
            "over the limit: completed without a result, never cut"
        );
    }

    #[tokio::test]
    async fn verdicts() {
        let store = conveyor_worker::store::connect(
            "sqlite::memory:",
            conveyor_worker::StoreOptions::default(),
        )
        .await
        .unwrap();
        let targets = HttpTargets::new(
            store,
            HttpConfig::default(),
            &conveyor_worker::keyring::Keyring::default(),
        )
        .unwrap();
        let ra = Some(Duration::from_secs(2));
        assert_eq!(targets.classify(None, 204, None), Verdict::Done);
        assert_eq!(targets.classify(None, 503, ra), Verdict::Retry(ra));
        assert_eq!(targets.classify(None, 429, None), Verdict::Retry(None));
        assert_eq!(targets.classify(None, 408, None), Verdict::Retry(None));
        assert_eq!(targets.classify(None, 404, ra), Verdict::Permanent);
        assert_eq!(targets.classify(None, 301, None), Verdict::Permanent);
        assert_eq!(
            targets.classify(None, 503, Some(Duration::from_secs(99_999))),
            Verdict::Retry(Some(Duration::from_secs(3600)))
        );
        let mut t = HttpTarget::new("https://a.example/");
        t.retry_statuses = Some(StatusSet(vec![
            StatusRule::Text("5xx".into()),
            StatusRule::Code(409),
        ]));
        t.permanent_statuses = Some(StatusSet(vec![StatusRule::Code(501)]));
        assert_eq!(targets.classify(Some(&t), 409, None), Verdict::Retry(None));
        assert_eq!(targets.classify(Some(&t), 501, None), Verdict::Permanent);
        assert_eq!(targets.classify(Some(&t), 429, None), Verdict::Permanent);
    }
}
