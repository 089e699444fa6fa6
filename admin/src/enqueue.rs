//! Enqueue, one job or a batch: the checks a client's job must pass (whether it came over
//! HTTP or from `conveyor enqueue`), its kind's args check ([`crate::Admin::with_validators`]),
//! the checks that need the store (an `email.send` job's template is rendered with its data,
//! and its version pinned: [`crate::email`]), then the insert, then the warning when no live
//! worker serves the job's queue or kind.

use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_worker::job::DEFAULT_MAX_ATTEMPTS;
use conveyor_worker::{Enqueued, Error as StoreError, NewJob};
use serde::Serialize;
use serde_json::{Value, json};

use crate::{Actor, Admin, Error, Result};

/// Most tags on one job.
pub const MAX_TAGS: usize = 32;
/// The attempt budget a client may give a job.
pub const MAX_ATTEMPTS: std::ops::RangeInclusive<i32> = 1..=1000;
/// How far in the past a `run_at` may be.
const RUN_AT_PAST: chrono::Duration = chrono::Duration::days(1);
/// How far ahead a `run_at` or a delay may be (five years).
const AHEAD: chrono::Duration = chrono::Duration::days(5 * 366);

/// A job a client asks for, as given: nothing checked yet.
#[derive(Clone, Debug, Default)]
pub struct JobRequest {
    /// The kind.
    pub kind: String,
    /// The queue (default `default`).
    pub queue: Option<String>,
    /// Handler arguments (default `{}`).
    pub args: Option<Value>,
    /// Smaller runs first.
    pub priority: i16,
    /// Attempts before the job goes dead (default 20).
    pub max_attempts: Option<i32>,
    /// Run no earlier than this.
    pub run_at: Option<DateTime<Utc>>,
    /// Run after this long, counted from the store's clock at insert.
    pub delay: Option<Duration>,
    /// Deduplication key.
    pub idempotency_key: Option<String>,
    /// Labels.
    pub tags: Vec<String>,
    /// Application metadata (a JSON object).
    pub metadata: Option<Value>,
}

/// One enqueued job and what the caller should know about it.
#[derive(Clone, Debug, Serialize)]
pub struct EnqueueOutcome {
    /// The job (new, or the holder of its idempotency key).
    #[serde(flatten)]
    pub enqueued: Enqueued,
    /// Why the job may wait longer than expected (no live worker serves its queue or kind).
    pub warnings: Vec<String>,
}

/// A batch's answers, in input order, and its warnings.
#[derive(Clone, Debug, Serialize)]
pub struct BatchOutcome {
    /// One answer per job.
    pub jobs: Vec<Enqueued>,
    /// Each distinct warning once.
    pub warnings: Vec<String>,
}

fn invalid(field: &str, message: String) -> Error {
    Error::Store(StoreError::invalid(field, message))
}

impl JobRequest {
    /// Checks every field and builds the job; errors name the field. `webhook_queue` is the
    /// configured `webhooks.queue` (reserved), `now` bounds `run_at`.
    pub fn into_job(
        self,
        args_limit: usize,
        webhook_queue: &str,
        now: DateTime<Utc>,
    ) -> Result<NewJob> {
        let args = self.args.unwrap_or_else(|| json!({}));
        let size = serde_json::to_vec(&args).map(|v| v.len()).unwrap_or(0);
        if size > args_limit {
            return Err(Error::TooLarge {
                field: "args".into(),
                message: format!("{size} bytes; the limit (api.args_limit) is {args_limit} bytes"),
            });
        }
        let max_attempts = self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if !MAX_ATTEMPTS.contains(&max_attempts) {
            return Err(invalid(
                "max_attempts",
                format!(
                    "must be between {} and {}, got {max_attempts}",
                    MAX_ATTEMPTS.start(),
                    MAX_ATTEMPTS.end()
                ),
            ));
        }
        let mut job = NewJob::new(self.kind, args)
            .queue(self.queue.unwrap_or_else(|| "default".into()))
            .priority(self.priority)
            .max_attempts(max_attempts);
        match (self.run_at, self.delay) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "run_at",
                    "give a run_at or a delay, not both".into(),
                ));
            }
            (Some(at), None) => {
                if at < now - RUN_AT_PAST || at > now + AHEAD {
                    return Err(invalid(
                        "run_at",
                        format!(
                            "{} is out of range: give a time between a day ago and five years ahead",
                            at.to_rfc3339()
                        ),
                    ));
                }
                job = job.run_at(at);
            }
            (None, Some(delay)) => {
                if chrono::Duration::from_std(delay).map_or(true, |d| d > AHEAD) {
                    return Err(invalid(
                        "delay",
                        format!(
                            "{} is more than five years",
                            humantime::format_duration(delay)
                        ),
                    ));
                }
                job = job.delay(delay);
            }
            (None, None) => {}
        }
        if let Some(key) = self.idempotency_key {
            job = job.idempotency_key(key);
        }
        if self.tags.len() > MAX_TAGS {
            return Err(invalid("tags", format!("at most {MAX_TAGS} tags")));
        }
        for (i, tag) in self.tags.iter().enumerate() {
            if tag.is_empty() || tag.chars().count() > 128 || tag.chars().any(char::is_control) {
                return Err(invalid(
                    &format!("tags[{i}]"),
                    "must be 1-128 characters without control characters".into(),
                ));
            }
        }
        job = job.tags(self.tags);
        if let Some(meta) = self.metadata {
            job = job.metadata(meta);
        }
        // Also refuses the platform's reserved kinds and queues (`webhook.deliver`, `webhooks`).
        conveyor_jobs::check_client_job(&job, webhook_queue)?;
        Ok(job)
    }
}

fn count_enqueued(queue: &str, kind: &str) {
    conveyor_worker::metrics::global()
        .enqueued
        .get(&[queue, kind])
        .inc();
}

impl Admin {
    /// Checks and enqueues one job; warns if no live worker serves it. Enqueues are not
    /// audited (they are the application's traffic, not operator actions); `_actor` is
    /// taken so every operation has the same shape.
    pub async fn enqueue(&self, _actor: &Actor, request: JobRequest) -> Result<EnqueueOutcome> {
        let job = request.into_job(
            self.limits.args_limit,
            &self.webhooks.config().queue,
            Utc::now(),
        )?;
        self.validators.check(&job.kind, &job.args)?;
        let job = self.pin_kind_args(job).await?;
        let (queue, kind) = (job.queue.clone(), job.kind.clone());
        let enqueued = self.store.enqueue(job).await?;
        if !enqueued.duplicate {
            count_enqueued(&queue, &kind);
        }
        let warnings = self
            .serving
            .get(self.store.as_ref())
            .await?
            .warnings([(queue.as_str(), kind.as_str())]);
        Ok(EnqueueOutcome { enqueued, warnings })
    }

    /// Checks every job (errors name `jobs[i].<field>`) and enqueues them all, or none if any
    /// is invalid; warns once per queue or kind no live worker serves.
    pub async fn enqueue_many(
        &self,
        _actor: &Actor,
        requests: Vec<JobRequest>,
    ) -> Result<BatchOutcome> {
        let limit = self.limits.batch_limit;
        if requests.is_empty() || requests.len() > limit {
            return Err(invalid(
                "jobs",
                format!(
                    "send 1 to {limit} jobs per batch (api.batch_limit), got {}",
                    requests.len()
                ),
            ));
        }
        let now = Utc::now();
        let webhook_queue = &self.webhooks.config().queue;
        let jobs = requests
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                r.into_job(self.limits.args_limit, webhook_queue, now)
                    .and_then(|job| {
                        self.validators.check(&job.kind, &job.args)?;
                        Ok(job)
                    })
                    .map_err(|e| e.prefixed(&format!("jobs[{i}].")))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut pinned = Vec::with_capacity(jobs.len());
        for (i, job) in jobs.into_iter().enumerate() {
            pinned.push(
                self.pin_kind_args(job)
                    .await
                    .map_err(|e| e.prefixed(&format!("jobs[{i}].")))?,
            );
        }
        let jobs = pinned;
        let names: Vec<(String, String)> = jobs
            .iter()
            .map(|j| (j.queue.clone(), j.kind.clone()))
            .collect();
        let answers = self.store.enqueue_many(jobs).await?;
        for ((queue, kind), a) in names.iter().zip(&answers) {
            if !a.duplicate {
                count_enqueued(queue, kind);
            }
        }
        let warnings = self
            .serving
            .get(self.store.as_ref())
            .await?
            .warnings(names.iter().map(|(q, k)| (q.as_str(), k.as_str())));
        Ok(BatchOutcome {
            jobs: answers,
            warnings,
        })
    }
}
