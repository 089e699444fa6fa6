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
}

/// Computes the write-back for `job`'s current attempt.
///
/// | ended | next state |
/// |---|---|
/// | `Done` | completed |
/// | `Retry`, `Err`, panic, timeout | retryable after the delay, or dead when attempts are used up |
/// | `Snooze(d)` | scheduled after `d`; the attempt does not count |
/// | `Cancel`, cancel requested | cancelled |
/// | `Fail` | dead |
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
    let (state, run_at, attempt_delta, outcome, error) = match ended {
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
        },
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
