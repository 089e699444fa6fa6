//! The job model: ids, states, the job row, what an enqueue asks for, and attempt records.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::Error;

/// A job's id: a UUIDv7, so ids sort by creation time and keyset pagination is a plain
/// comparison. Printed as the bare UUID; `job_` prefixed forms are accepted when parsing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub Uuid);

impl JobId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for JobId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let raw = s.strip_prefix("job_").unwrap_or(s);
        Uuid::parse_str(raw).map(JobId).map_err(|e| Error::InvalidInput {
            field: "id".into(),
            message: format!("`{s}` is not a job id ({e}); ids look like 0193f5a2-7c1e-7b44-9a4e-2f1d3c4b5a69"),
        })
    }
}

/// Where a job is in its lifecycle. See `docs/lifecycle.md` for the diagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for its `run_at`. Fetch claims it once due; the promoter also moves due jobs to
    /// `available` so listings and queue stats show them as ready.
    Scheduled,
    /// Ready to run now. A worker's fetch moves it to `running`.
    Available,
    /// Claimed by a worker that holds its lease. The worker moves it to `completed`,
    /// `retryable`, `scheduled` (snooze), `cancelled` or `dead`; the rescuer moves it to
    /// `retryable` or `dead` when the lease expires.
    Running,
    /// Failed an attempt and waits for its backoff (`run_at`). Fetch claims it once due.
    Retryable,
    /// Terminal: the handler finished successfully. The pruner deletes it after retention.
    Completed,
    /// Terminal: cancelled by an operator or by the handler. An operator retry revives it.
    Cancelled,
    /// Terminal: attempts exhausted or a permanent failure. An operator retry revives it.
    Dead,
}

impl JobState {
    /// Every state, in lifecycle order.
    pub const ALL: [JobState; 7] = [
        JobState::Scheduled,
        JobState::Available,
        JobState::Running,
        JobState::Retryable,
        JobState::Completed,
        JobState::Cancelled,
        JobState::Dead,
    ];

    /// The lowercase name used in storage, the CLI and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::Available => "available",
            JobState::Running => "running",
            JobState::Retryable => "retryable",
            JobState::Completed => "completed",
            JobState::Cancelled => "cancelled",
            JobState::Dead => "dead",
        }
    }

    /// Completed, cancelled and dead are terminal: `finalized_at` is set exactly for these.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Cancelled | JobState::Dead
        )
    }

    /// States a waiting (not yet running, not finished) job can be in.
    pub fn is_waiting(self) -> bool {
        matches!(
            self,
            JobState::Scheduled | JobState::Available | JobState::Retryable
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| Error::InvalidInput {
                field: "state".into(),
                message: format!(
                    "unknown state `{s}`; use one of: scheduled, available, running, retryable, completed, cancelled, dead"
                ),
            })
    }
}

/// An operator's action on jobs (the CLI's and the API's retry, cancel, discard and purge) and
/// the states it may start from. This is the one definition: each backend's statements and
/// scripts, the API's bulk actions and the refusal messages are all derived from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OperatorAction {
    /// Make a job available now with a fresh attempt budget (one job, or every job a filter
    /// matches).
    Retry,
    /// Cancel a job: a waiting one at once, a running one by asking its worker to stop.
    Cancel,
    /// Delete one job.
    Discard,
    /// Delete every finished job a filter matches.
    Purge,
}

impl OperatorAction {
    /// Every action.
    pub const ALL: [OperatorAction; 4] = [
        OperatorAction::Retry,
        OperatorAction::Cancel,
        OperatorAction::Discard,
        OperatorAction::Purge,
    ];

    /// The states cancel finishes at once (they become `cancelled`).
    pub const CANCEL_AT_ONCE: &'static [JobState] = &[
        JobState::Scheduled,
        JobState::Available,
        JobState::Retryable,
    ];

    /// The states in which cancel only records the request and tells the worker, which
    /// stops the attempt and finishes the job as `cancelled`.
    pub const CANCEL_BY_REQUEST: &'static [JobState] = &[JobState::Running];

    /// The action's name, as the CLI and the API spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorAction::Retry => "retry",
            OperatorAction::Cancel => "cancel",
            OperatorAction::Discard => "discard",
            OperatorAction::Purge => "purge",
        }
    }

    /// The states a job may be in for the action to apply; a job in any other state is
    /// refused ([`Error::WrongState`]), or left out of a bulk action.
    pub fn from_states(self) -> &'static [JobState] {
        // A running job belongs to its worker: it can only be asked to stop (cancel), never
        // reset or deleted under the worker.
        const NOT_RUNNING: &[JobState] = &[
            JobState::Scheduled,
            JobState::Available,
            JobState::Retryable,
            JobState::Completed,
            JobState::Cancelled,
            JobState::Dead,
        ];
        match self {
            OperatorAction::Retry | OperatorAction::Discard => NOT_RUNNING,
            OperatorAction::Cancel => &[
                JobState::Scheduled,
                JobState::Available,
                JobState::Running,
                JobState::Retryable,
            ],
            OperatorAction::Purge => &[JobState::Completed, JobState::Cancelled, JobState::Dead],
        }
    }

    /// Whether the action applies to a job in `state`.
    pub fn allows(self, state: JobState) -> bool {
        self.from_states().contains(&state)
    }

    /// Why the action refuses a job in `state`, and what would work instead.
    pub fn refusal(self, state: JobState) -> String {
        let allowed: Vec<&str> = self.from_states().iter().map(|s| s.as_str()).collect();
        let hint = match (self, state) {
            (OperatorAction::Retry | OperatorAction::Discard, JobState::Running) => {
                " (cancel it first, or wait for its attempt to end)"
            }
            (OperatorAction::Cancel, _) => " (it has finished already)",
            _ => "",
        };
        format!(
            "cannot {} a {state} job; {} applies to {} jobs{hint}",
            self.as_str(),
            self.as_str(),
            allowed.join(", ")
        )
    }
}

impl fmt::Display for OperatorAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one attempt ended, as kept in the attempt history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// The handler finished successfully.
    Completed,
    /// The handler failed (error, panic, timeout or a permanent failure). The job's state says
    /// what followed: `retryable` when attempts remain, `dead` when they are used up or the
    /// failure was permanent. (Records written before this was one outcome say `discarded` for
    /// the last failed attempt of a dead job; they read back as `failed`.)
    #[serde(alias = "discarded")]
    Failed,
    /// The handler asked to run again later without using an attempt.
    Snoozed,
    /// The job was cancelled while this attempt ran.
    Cancelled,
    /// The worker's lease expired (it crashed or hung); the rescuer recorded the attempt.
    LeaseExpired,
    /// The worker shut down before the handler finished; the job went back to the queue.
    Interrupted,
}

/// One attempt in a job's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// 1-based attempt number.
    pub attempt: i32,
    /// When the worker claimed the job for this attempt.
    pub started_at: DateTime<Utc>,
    /// When the attempt ended (or was found dead, for lease expiry).
    pub finished_at: DateTime<Utc>,
    /// The worker process that ran it.
    pub worker: Option<String>,
    /// How it ended.
    pub outcome: AttemptOutcome,
    /// The top-level error message, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The error's cause chain, outermost first (excluding `error` itself).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<String>,
    /// Wall time of the attempt in milliseconds.
    pub duration_ms: i64,
    /// Where the error happened, as the worker reported it (a remote worker's stack trace).
    /// Records written before this field read as `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceback: Option<String>,
}

/// A job row as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Time-ordered id.
    pub id: JobId,
    /// The queue it runs on; each queue has its own worker pool and concurrency.
    pub queue: String,
    /// The permanent kind name that selects the handler (`webhook.deliver`).
    pub kind: String,
    /// Handler arguments.
    pub args: serde_json::Value,
    /// Smaller runs first; 0 is the default.
    pub priority: i16,
    /// Where it is in its lifecycle.
    pub state: JobState,
    /// Attempts made so far, counting the one running now.
    pub attempt: i32,
    /// Attempts allowed before the job goes `dead`.
    pub max_attempts: i32,
    /// When it may run (or run again).
    pub run_at: DateTime<Utc>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// When the latest attempt started.
    pub attempted_at: Option<DateTime<Utc>>,
    /// When it reached a terminal state; set exactly when `state` is terminal.
    pub finalized_at: Option<DateTime<Utc>>,
    /// The worker holding the lease while running.
    pub lease_owner: Option<String>,
    /// When the lease runs out unless renewed by a heartbeat.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// An operator or the application asked to cancel it while it ran.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// The deduplication key, if it was enqueued with one.
    pub idempotency_key: Option<String>,
    /// Free-form labels for filtering.
    pub tags: Vec<String>,
    /// Free-form JSON object for the application.
    pub metadata: serde_json::Value,
    /// Every finished attempt, oldest first.
    pub attempts: Vec<AttemptRecord>,
    /// What the handler returned when it completed the job ([`crate::Outcome::DoneWith`]),
    /// at most `worker.max_result_bytes` serialized. Kept until the job is deleted; an
    /// operator retry clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The latest progress a handler reported ([`crate::JobContext::progress`]). It names
    /// the attempt that reported it; an operator retry clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

/// How far a running attempt has got, as its handler reported it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The attempt that reported it.
    pub attempt: i32,
    /// 0 to 100.
    pub percent: f32,
    /// What it is doing, if it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When it was reported (on the store's clock as the worker measures it).
    pub updated_at: DateTime<Utc>,
}

impl Progress {
    /// A report as it is kept, whoever made it (a native handler, a remote worker): `percent`
    /// clamped to 0–100 (NaN is 0), `message` cut to [`PROGRESS_MESSAGE_LIMIT`] bytes at a
    /// character boundary.
    pub fn reported(
        attempt: i32,
        percent: f32,
        mut message: Option<String>,
        at: DateTime<Utc>,
    ) -> Self {
        if let Some(m) = message.as_mut()
            && m.len() > PROGRESS_MESSAGE_LIMIT
        {
            let mut cut = PROGRESS_MESSAGE_LIMIT;
            while !m.is_char_boundary(cut) {
                cut -= 1;
            }
            m.truncate(cut);
        }
        let percent = if percent.is_nan() {
            0.0
        } else {
            percent.clamp(0.0, 100.0)
        };
        Self {
            attempt,
            percent,
            message,
            updated_at: at,
        }
    }
}

/// The longest progress message kept, in bytes; a longer one is cut at a character boundary.
pub const PROGRESS_MESSAGE_LIMIT: usize = 1024;

/// The default for `worker.max_result_bytes`: the most a job's result may take, serialized.
pub const DEFAULT_MAX_RESULT_BYTES: usize = 64 * 1024;

/// Serializes a handler's result and checks it against `limit` bytes. The one rule for
/// every way a result reaches the store (a native handler, a remote worker, an HTTP target):
/// a result over the limit is an error that fails the attempt, never cut short.
pub fn check_result(value: &serde_json::Value, limit: usize) -> Result<(), Error> {
    let size = serde_json::to_vec(value)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > limit {
        return Err(Error::invalid(
            "result",
            format!(
                "the job's result is {size} bytes serialized, over the limit of {limit} bytes \
                 (worker.max_result_bytes); return a smaller value, or store the data elsewhere \
                 and return a reference to it"
            ),
        ));
    }
    Ok(())
}

impl Job {
    /// The last recorded error message, if any attempt failed.
    pub fn last_error(&self) -> Option<&str> {
        self.attempts.iter().rev().find_map(|a| a.error.as_deref())
    }
}

/// Default attempt budget for a job that does not set one.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 20;

/// What an enqueue asks for. Build with [`NewJob::new`] and the chainable setters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewJob {
    /// Id to give the job. `None` (the default) lets the store assign a fresh time-ordered
    /// one at insert, so clones of one `NewJob` become distinct jobs; set it (with
    /// [`NewJob::id`]) when the caller must know the id before the enqueue returns.
    pub id: Option<JobId>,
    /// Queue name.
    pub queue: String,
    /// Kind name.
    pub kind: String,
    /// Handler arguments.
    pub args: serde_json::Value,
    /// Smaller runs first.
    pub priority: i16,
    /// Attempt budget.
    pub max_attempts: i32,
    /// Run no earlier than this; `None` means now (or after `delay`).
    pub run_at: Option<DateTime<Utc>>,
    /// Run this long after the store's clock reads at insert (instead of `run_at`), so a
    /// delay means the same on every machine whatever its own clock says.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub delay: Option<std::time::Duration>,
    /// Deduplication key.
    pub idempotency_key: Option<String>,
    /// Labels.
    pub tags: Vec<String>,
    /// Application metadata (a JSON object).
    pub metadata: serde_json::Value,
}

impl NewJob {
    /// A job for `kind` on the `default` queue that runs now.
    pub fn new(kind: impl Into<String>, args: serde_json::Value) -> Self {
        Self {
            id: None,
            queue: "default".into(),
            kind: kind.into(),
            args,
            priority: 0,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            run_at: None,
            delay: None,
            idempotency_key: None,
            tags: Vec::new(),
            metadata: serde_json::Value::Object(Default::default()),
        }
    }

    /// Give it this id instead of a store-assigned one.
    pub fn id(mut self, id: JobId) -> Self {
        self.id = Some(id);
        self
    }

    /// Put it on `queue`.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Set its priority (smaller runs first).
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    /// Set its attempt budget.
    pub fn max_attempts(mut self, max_attempts: i32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// Run no earlier than `at` (replaces a delay).
    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self.delay = None;
        self
    }

    /// Run `delay` after the store's clock reads at insert (replaces a `run_at`).
    pub fn delay(mut self, delay: std::time::Duration) -> Self {
        self.delay = Some(delay);
        self.run_at = None;
        self
    }

    /// When the job is due, given the store's clock reads `now` at insert.
    pub fn due_at(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        match (self.run_at, self.delay) {
            (Some(at), _) => at,
            (None, Some(d)) => crate::store::after(now, d),
            (None, None) => now,
        }
    }

    /// Deduplicate on `key`.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Attach labels.
    pub fn tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags = tags.into_iter().map(Into::into).collect();
        self
    }

    /// Attach application metadata (must be a JSON object).
    pub fn metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = metadata;
        self
    }

    /// Checks the fields a store relies on; every backend calls this before writing.
    pub fn validate(&self) -> Result<(), Error> {
        check_name("queue", &self.queue)?;
        check_name("kind", &self.kind)?;
        if self.max_attempts < 1 {
            return Err(Error::invalid(
                "max_attempts",
                format!("must be at least 1, got {}", self.max_attempts),
            ));
        }
        if self.run_at.is_some() && self.delay.is_some() {
            return Err(Error::invalid("run_at", "give run_at or delay, not both"));
        }
        if !self.metadata.is_object() {
            return Err(Error::invalid(
                "metadata",
                "must be a JSON object, e.g. {\"team\":\"billing\"}",
            ));
        }
        if let Some(key) = &self.idempotency_key {
            check_idempotency_key("idempotency_key", key, MAX_JOB_KEY_LEN)?;
        }
        Ok(())
    }
}

/// The longest idempotency key a job may hold, in bytes.
pub const MAX_JOB_KEY_LEN: usize = 255;

/// The idempotency-key rule of every API that takes one (jobs, events): 1 to `max` bytes of
/// printable ASCII, not starting or ending with a space (HTTP drops those from a header
/// value, so such a key could not be sent the same way as a header and in a body). The
/// OpenAPI pattern `^[!-~]([ -~]{0,N}[!-~])?$` states the same.
pub fn check_idempotency_key(field: &str, key: &str, max: usize) -> Result<(), Error> {
    let bytes = key.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= max
        && bytes.iter().all(|b| (b' '..=b'~').contains(b))
        && bytes[0] != b' '
        && bytes[bytes.len() - 1] != b' ';
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "must be 1-{max} printable ASCII characters, not starting or ending with a space"
            ),
        ))
    }
}

/// Queue and kind names: 1–128 bytes of ASCII letters, digits, `.`, `_`, `-`, `:`.
pub fn check_name(field: &str, value: &str) -> Result<(), Error> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "`{value}` is not a valid {field} name: use 1-128 ASCII letters, digits, '.', '_', '-' or ':'"
            ),
        ))
    }
}

/// The answer to an enqueue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Enqueued {
    /// The job that holds the request: new, or the existing holder of its idempotency key.
    pub id: JobId,
    /// The state it is in right after the enqueue.
    pub state: JobState,
    /// True when an existing job already held the idempotency key and nothing was inserted.
    pub duplicate: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_splits_its_states_into_at_once_and_by_request() {
        let mut split: Vec<JobState> = OperatorAction::CANCEL_AT_ONCE
            .iter()
            .chain(OperatorAction::CANCEL_BY_REQUEST)
            .copied()
            .collect();
        split.sort();
        assert_eq!(split, OperatorAction::Cancel.from_states());
        assert!(
            !OperatorAction::CANCEL_AT_ONCE
                .iter()
                .any(|s| OperatorAction::CANCEL_BY_REQUEST.contains(s))
        );
        // Nothing resets or deletes a job under its worker.
        for action in [
            OperatorAction::Retry,
            OperatorAction::Discard,
            OperatorAction::Purge,
        ] {
            assert!(!action.allows(JobState::Running), "{action}");
        }
    }

    #[test]
    fn a_refusal_says_what_would_work() {
        let e = Error::WrongState {
            id: JobId::new(),
            state: JobState::Running,
            action: OperatorAction::Retry,
        };
        let message = e.to_string();
        assert!(
            message.contains("is running: cannot retry a running job; retry applies to scheduled, available, retryable, completed, cancelled, dead jobs (cancel it first"),
            "{message}"
        );
    }

    #[test]
    fn state_names_round_trip() {
        for st in JobState::ALL {
            assert_eq!(st.as_str().parse::<JobState>().unwrap(), st);
        }
        let err = "deadish".parse::<JobState>().unwrap_err().to_string();
        assert!(err.contains("unknown state `deadish`"), "{err}");
    }

    #[test]
    fn a_failed_attempt_reads_as_failed_including_records_written_as_discarded() {
        let old: AttemptOutcome = serde_json::from_str("\"discarded\"").unwrap();
        assert_eq!(old, AttemptOutcome::Failed);
        assert_eq!(
            serde_json::to_string(&AttemptOutcome::Failed).unwrap(),
            "\"failed\""
        );
    }

    #[test]
    fn job_ids_accept_the_prefixed_form_and_sort_by_time() {
        let a = JobId::new();
        let b = JobId::new();
        assert!(a < b);
        assert_eq!(format!("job_{a}").parse::<JobId>().unwrap(), a);
        assert!("nope".parse::<JobId>().is_err());
    }

    #[test]
    fn a_result_over_the_limit_is_refused_not_cut() {
        let value = serde_json::json!({"data": "x".repeat(100)});
        check_result(&value, 1000).unwrap();
        let err = check_result(&value, 50).unwrap_err().to_string();
        assert!(err.contains("result"), "{err}");
        assert!(err.contains("over the limit of 50 bytes"), "{err}");
        assert!(err.contains("worker.max_result_bytes"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let err = NewJob::new("bad kind!", serde_json::json!({}))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("kind"), "{err}");
        let err = NewJob::new("ok", serde_json::json!({}))
            .max_attempts(0)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_attempts"), "{err}");
    }
}
