//! The one place that turns how an attempt ended into the job's next state.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::handler::{JobError, Outcome};
use crate::job::{AttemptOutcome, AttemptRecord, Job, JobState};
use crate::retry_policy::RetryPolicy;
use crate::store::Finish;

/// How an attempt ended, as the executor saw it.
#[derive(Clone, Debug, PartialEq)]
pub enum Ended {
    /// The handler returned an outcome.
    Returned(Outcome),
    /// The handler returned `Err` or panicked: a retryable failure.
    Failed(JobError),
    /// The handler ran past the kind's timeout and was dropped.
    TimedOut(Duration),
    /// A cancel was requested and the handler stopped (or was dropped).
    Cancelled,
    /// The worker shut down before the handler finished.
    Interrupted,
    /// The claiming worker has no handler for the job's kind (a rolling deploy where this
    /// worker predates the kind, a queue shared by workers with different kinds, a typo).
    NoHandler,
}

/// A result over `limit` bytes fails the attempt, saying why ([`crate::job::check_result`]);
/// anything else is as it was. Every way a result arrives passes here before [`transition`]:
/// a native handler's (the executor), a remote worker's and an HTTP target's.
pub fn within_result_limit(ended: Ended, limit: usize) -> Ended {
    match ended {
        Ended::Returned(Outcome::DoneWith(value)) => {
            match crate::job::check_result(&value, limit) {
                Ok(()) => Ended::Returned(Outcome::DoneWith(value)),
                Err(e) => Ended::Failed(JobError::new(e.to_string())),
            }
        }
        other => other,
    }
}

/// The start of the error recorded when the claiming worker has no handler for the kind; the
/// trailing run of such records is how long the job has waited for one.
pub const NO_HANDLER: &str = "no handler for kind";

/// How long a job waits for a worker that has its kind before it goes `dead`.
pub const NO_HANDLER_GIVE_UP: Duration = Duration::from_secs(7 * 24 * 3600);

/// The longest wait between two claims of a job no worker could run.
const NO_HANDLER_MAX_DELAY: Duration = Duration::from_secs(3600);

/// What happens to a job the claiming worker has no handler for: it waits, without using an
/// attempt, for a worker that has the kind, claimed again after 5 s, 10 s, 20 s … up to an
/// hour apart; after [`NO_HANDLER_GIVE_UP`] of that it goes `dead`. Returns the next state,
/// its `run_at`, the attempt delta and the record's outcome and error.
fn no_handler(
    job: &Job,
    worker: &str,
    now: DateTime<Utc>,
) -> (
    JobState,
    Option<DateTime<Utc>>,
    i32,
    AttemptOutcome,
    JobError,
) {
    let waiting: Vec<&AttemptRecord> = job
        .attempts
        .iter()
        .rev()
        .take_while(|a| {
            a.outcome == AttemptOutcome::Snoozed
                && a.error
                    .as_deref()
                    .is_some_and(|e| e.starts_with(NO_HANDLER))
        })
        .collect();
    let since = waiting.last().map_or(now, |first| first.started_at);
    let message = format!(
        "{NO_HANDLER} `{}` on worker {worker}; register the kind or run this queue on a worker that has it",
        job.kind
    );
    let waited = (now - since).to_std().unwrap_or_default();
    if waited >= NO_HANDLER_GIVE_UP {
        let error = JobError {
            message: format!(
                "no worker that has kind `{}` claimed the job in {} days",
                job.kind,
                NO_HANDLER_GIVE_UP.as_secs() / 86_400
            ),
            causes: vec![message],
        };
        return (JobState::Dead, None, 0, AttemptOutcome::Failed, error);
    }
    let delay = Duration::from_secs(5)
        .saturating_mul(1u32.checked_shl(waiting.len() as u32).unwrap_or(u32::MAX))
        .min(NO_HANDLER_MAX_DELAY);
    (
        JobState::Scheduled,
        Some(crate::store::after(now, delay)),
        -1,
        AttemptOutcome::Snoozed,
        JobError::new(message),
    )
}

/// Computes the write-back for `job`'s current attempt.
///
/// | ended | next state |
/// |---|---|
/// | `Done`, `DoneWith` (its value kept as the result) | completed |
/// | `Retry`, `Err`, panic, timeout | retryable after the delay, or dead when attempts are used up |
/// | `Snooze(d)` | scheduled after `d`; the attempt does not count |
/// | `Cancel`, cancel requested | cancelled |
/// | `Fail` | dead |
/// | no handler for the kind | scheduled, 5 s doubling to 1 h later; the attempt does not count; dead after 7 days of it |
/// | shutdown interrupt | available now; the attempt does not count |
pub fn transition(
    job: &Job,
    ended: Ended,
    policy: &RetryPolicy,
    worker: &str,
    started_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Finish {
    // Saturating: a handler's `Snooze(Duration::MAX)` or a `Retry-After` of centuries means
    // "as late as can be", not an overflow that would leave the job running.
    let later = |d: Duration| crate::store::after(now, d);
    let out_of_attempts = job.attempt >= job.max_attempts;
    let failed = |error: JobError, after: Option<Duration>| {
        if out_of_attempts {
            (JobState::Dead, None, 0, AttemptOutcome::Failed, Some(error))
        } else {
            let delay = after.unwrap_or_else(|| policy.delay(job.attempt));
            (
                JobState::Retryable,
                Some(later(delay)),
                0,
                AttemptOutcome::Failed,
                Some(error),
            )
        }
    };
    let mut result = None;
    let (state, run_at, attempt_delta, outcome, error) = match ended {
        Ended::Returned(Outcome::DoneWith(value)) => {
            result = Some(value);
            (
                JobState::Completed,
                None,
                0,
                AttemptOutcome::Completed,
                None,
            )
        }
        Ended::Returned(Outcome::Done) => (
            JobState::Completed,
            None,
            0,
            AttemptOutcome::Completed,
            None,
        ),
        Ended::Returned(Outcome::Retry { after, error }) => failed(error, after),
        Ended::Failed(error) => failed(error, None),
        Ended::TimedOut(limit) => failed(JobError::new(format!("timed out after {limit:?}")), None),
        Ended::Returned(Outcome::Snooze(d)) => (
            JobState::Scheduled,
            Some(later(d)),
            -1,
            AttemptOutcome::Snoozed,
            None,
        ),
        Ended::Returned(Outcome::Cancel { reason }) => (
            JobState::Cancelled,
            None,
            0,
            AttemptOutcome::Cancelled,
            Some(JobError::new(reason)),
        ),
        Ended::Cancelled => (
            JobState::Cancelled,
            None,
            0,
            AttemptOutcome::Cancelled,
            Some(JobError::new("cancelled while running")),
        ),
        Ended::Returned(Outcome::Fail(error)) => {
            (JobState::Dead, None, 0, AttemptOutcome::Failed, Some(error))
        }
        Ended::NoHandler => {
            let (state, run_at, delta, outcome, error) = no_handler(job, worker, now);
            (state, run_at, delta, outcome, Some(error))
        }
        Ended::Interrupted => (
            JobState::Available,
            Some(now),
            -1,
            AttemptOutcome::Interrupted,
            Some(JobError::new("worker shut down before the job finished")),
        ),
    };
    let (error, causes) = match error {
        Some(e) => (Some(e.message), e.causes),
        None => (None, Vec::new()),
    };
    Finish {
        id: job.id,
        attempt: job.attempt,
        state,
        run_at,
        attempt_delta,
        record: AttemptRecord {
            attempt: job.attempt,
            started_at,
            finished_at: now,
            worker: Some(worker.to_string()),
            outcome,
            error,
            causes,
            duration_ms: (now - started_at).num_milliseconds().max(0),
            traceback: None,
        },
        result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobId, NewJob};

    fn job(attempt: i32, max: i32) -> Job {
        let n = NewJob::new("k", serde_json::json!({}));
        let now = Utc::now();
        Job {
            id: JobId::new(),
            queue: n.queue,
            kind: n.kind,
            args: n.args,
            priority: 0,
            state: JobState::Running,
            attempt,
            max_attempts: max,
            run_at: now,
            created_at: now,
            attempted_at: Some(now),
            finalized_at: None,
            lease_owner: Some("w".into()),
            lease_expires_at: Some(now),
            cancel_requested_at: None,
            idempotency_key: None,
            tags: vec![],
            metadata: serde_json::json!({}),
            attempts: vec![],
            result: None,
            progress: None,
        }
    }

    fn run(j: &Job, ended: Ended) -> Finish {
        let now = Utc::now();
        let policy = RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default()
        };
        transition(j, ended, &policy, "w1", now, now)
    }

    #[test]
    fn done_completes() {
        let f = run(&job(1, 3), Ended::Returned(Outcome::Done));
        assert_eq!(f.state, JobState::Completed);
        assert_eq!(f.record.outcome, AttemptOutcome::Completed);
        assert_eq!(f.record.worker.as_deref(), Some("w1"));
    }

    #[test]
    fn done_with_keeps_the_result_and_nothing_else_does() {
        let f = run(
            &job(1, 3),
            Ended::Returned(Outcome::DoneWith(serde_json::json!({"n": 1}))),
        );
        assert_eq!(f.state, JobState::Completed);
        assert_eq!(f.result, Some(serde_json::json!({"n": 1})));
        assert_eq!(run(&job(1, 3), Ended::Returned(Outcome::Done)).result, None);
        assert_eq!(run(&job(1, 3), Ended::Cancelled).result, None);
    }

    #[test]
    fn failures_retry_with_backoff_until_attempts_run_out() {
        let j = job(2, 3);
        let f = run(&j, Ended::Failed(JobError::new("boom")));
        assert_eq!(f.state, JobState::Retryable);
        let wait = f.run_at.unwrap() - f.record.finished_at;
        assert_eq!(wait.num_seconds(), 4, "2 s · 2^(2−1)");
        assert_eq!(f.record.error.as_deref(), Some("boom"));

        let last = run(&job(3, 3), Ended::Failed(JobError::new("boom")));
        assert_eq!(last.state, JobState::Dead);
        assert_eq!(last.record.outcome, AttemptOutcome::Failed);
        let timeout = run(&job(3, 3), Ended::TimedOut(Duration::from_secs(1)));
        assert_eq!(timeout.state, JobState::Dead);
        assert!(timeout.record.error.unwrap().contains("timed out"));
    }

    #[test]
    fn a_job_without_a_handler_waits_for_one_without_using_attempts() {
        let mut j = job(1, 1);
        let mut delays = Vec::new();
        let mut now = Utc::now();
        for _ in 0..12 {
            let f = transition(
                &j,
                Ended::NoHandler,
                &RetryPolicy::default(),
                "w1",
                now,
                now,
            );
            assert_eq!(f.state, JobState::Scheduled);
            assert_eq!(f.attempt_delta, -1, "the attempt does not count");
            assert!(f.record.error.as_deref().unwrap().contains("`k`"));
            let run_at = f.run_at.unwrap();
            delays.push((run_at - now).num_seconds());
            j.attempts.push(f.record);
            now = run_at;
        }
        assert_eq!(&delays[..4], &[5, 10, 20, 40]);
        assert_eq!(*delays.last().unwrap(), 3600, "at most an hour apart");

        // A week of waiting: dead, saying why.
        let later = j.attempts[0].started_at + chrono::Duration::days(7);
        let f = transition(
            &j,
            Ended::NoHandler,
            &RetryPolicy::default(),
            "w1",
            later,
            later,
        );
        assert_eq!(f.state, JobState::Dead);
        assert!(f.record.error.unwrap().contains("in 7 days"));
        assert!(f.record.causes[0].starts_with(NO_HANDLER));

        // An ordinary failure in between starts the wait afresh.
        let fail = run(&job(1, 5), Ended::Failed(JobError::new("boom")));
        j.attempts.push(fail.record);
        let f = transition(
            &j,
            Ended::NoHandler,
            &RetryPolicy::default(),
            "w1",
            later,
            later,
        );
        assert_eq!(f.state, JobState::Scheduled);
        assert_eq!((f.run_at.unwrap() - later).num_seconds(), 5);
    }

    #[test]
    fn retry_after_overrides_backoff() {
        let f = run(
            &job(1, 5),
            Ended::Returned(Outcome::retry_after(Duration::from_secs(120), "429")),
        );
        assert_eq!(f.state, JobState::Retryable);
        assert_eq!(
            (f.run_at.unwrap() - f.record.finished_at).num_seconds(),
            120
        );
    }

    #[test]
    fn snooze_and_interrupt_do_not_use_an_attempt() {
        let f = run(
            &job(1, 1),
            Ended::Returned(Outcome::Snooze(Duration::from_secs(60))),
        );
        assert_eq!((f.state, f.attempt_delta), (JobState::Scheduled, -1));
        let f = run(&job(1, 1), Ended::Interrupted);
        assert_eq!((f.state, f.attempt_delta), (JobState::Available, -1));
    }

    #[test]
    fn fail_and_cancel_are_final() {
        assert_eq!(
            run(&job(1, 9), Ended::Returned(Outcome::fail("bad"))).state,
            JobState::Dead
        );
        assert_eq!(
            run(&job(1, 9), Ended::Returned(Outcome::cancel("no"))).state,
            JobState::Cancelled
        );
        assert_eq!(run(&job(1, 9), Ended::Cancelled).state, JobState::Cancelled);
    }
}
